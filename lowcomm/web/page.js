// The run page's drawing code (lowcomm/web/page.py embeds it; no external scripts).
const COLORS=["#1f77b4","#d62728","#2ca02c","#ff7f0e","#9467bd","#8c564b","#e377c2","#17becf","#7f7f7f","#bcbd22"];
const SVG="http://www.w3.org/2000/svg";
function el(tag,text,attrs){const e=document.createElement(tag);if(text!==undefined&&text!==null)e.textContent=String(text);
  for(const k in (attrs||{}))e.setAttribute(k,attrs[k]);return e;}
function sv(tag,attrs,text){const e=document.createElementNS(SVG,tag);for(const k in attrs)e.setAttribute(k,attrs[k]);
  if(text!==undefined)e.textContent=String(text);return e;}
function fmt(v){if(typeof v!=="number")return v;if(!isFinite(v))return String(v);const a=Math.abs(v);
  if(a!==0&&(a>=1e6||a<1e-3))return v.toExponential(2);return Number.isInteger(v)?String(v):v.toFixed(4);}
function tick(v){if(!isFinite(v))return String(v);const a=Math.abs(v);if(a!==0&&(a>=1e5||a<1e-3))return v.toExponential(1);
  return String(Number(v.toPrecision(4)));}
const colorOf={};
function color(name){if(!(name in colorOf))colorOf[name]=COLORS[Object.keys(colorOf).length%COLORS.length];return colorOf[name];}
function chart(c){
  const W=440,H=260,L=60,R=12,T=24,B=40;const box=el("div",null,{class:"chart",id:"chart-"+c.id});
  const s=sv("svg",{width:W,height:H,viewBox:"0 0 "+W+" "+H});box.appendChild(s);
  s.appendChild(sv("text",{x:L,y:15,"font-size":13,"font-weight":"bold"},c.title));
  const tx=x=>c.log_x?Math.log10(Math.max(x,1e-12)):x;let pts=[];
  for(const n in c.lines)for(const p of c.lines[n])if(isFinite(p[0])&&isFinite(p[1]))pts.push([tx(p[0]),p[1]]);
  if(!pts.length){s.appendChild(sv("text",{x:L,y:H/2,fill:"#888"},"no data yet"));return box;}
  let x0=Math.min(...pts.map(p=>p[0])),x1=Math.max(...pts.map(p=>p[0])),y0=Math.min(...pts.map(p=>p[1])),
      y1=Math.max(...pts.map(p=>p[1]));if(x1===x0){x1+=1;x0-=1;}if(y1===y0){y1+=Math.abs(y1)*0.05+1e-9;y0-=Math.abs(y0)*0.05+1e-9;}
  const X=x=>L+(tx(x)-x0)/(x1-x0)*(W-L-R),Y=y=>H-B-(y-y0)/(y1-y0)*(H-T-B);
  s.appendChild(sv("rect",{x:L,y:T,width:W-L-R,height:H-T-B,fill:"none",stroke:"#ccc"}));
  for(let i=0;i<=4;i++){const yv=y0+(y1-y0)*i/4,xv=x0+(x1-x0)*i/4,yy=H-B-(H-T-B)*i/4,xx=L+(W-L-R)*i/4;
    s.appendChild(sv("text",{x:L-4,y:yy+4,"font-size":10,"text-anchor":"end"},tick(yv)));
    s.appendChild(sv("text",{x:xx,y:H-B+13,"font-size":10,"text-anchor":"middle"},tick(c.log_x?Math.pow(10,xv):xv)));}
  s.appendChild(sv("text",{x:(L+W-R)/2,y:H-6,"font-size":11,"text-anchor":"middle"},c.x));
  s.appendChild(sv("text",{x:12,y:(T+H-B)/2,"font-size":11,"text-anchor":"middle",transform:"rotate(-90 12 "+(T+H-B)/2+")"},c.y));
  let i=0;for(const n of Object.keys(c.lines).sort()){const col=color(n);
    const d=c.lines[n].filter(p=>isFinite(p[0])&&isFinite(p[1])).map(p=>X(p[0]).toFixed(1)+","+Y(p[1]).toFixed(1)).join(" ");
    s.appendChild(sv("polyline",{points:d,fill:"none",stroke:col,"stroke-width":1.8,"data-line":n}));
    const pts=c.lines[n].filter(p=>isFinite(p[0])&&isFinite(p[1]));
    if(pts.length<=60)for(const p of pts)s.appendChild(sv("circle",{cx:X(p[0]).toFixed(1),cy:Y(p[1]).toFixed(1),r:2.5,fill:col}));
    s.appendChild(sv("text",{x:L+8,y:T+14+13*i,"font-size":11,fill:col},n));i++;}
  return box;}
function render(d){
  document.getElementById("title").textContent=d.title||"lowcomm";
  document.getElementById("subtitle").textContent=(d.subtitle||"")+(d.updated?"  (updated "+new Date(d.updated*1000).toLocaleTimeString()+")":"");
  const m=document.getElementById("content");m.replaceChildren();
  const cards=el("div",null,{class:"cards",id:"summary"});
  for(const [k,v] of d.summary||[]){const c=el("div",null,{class:"card","data-key":k});c.appendChild(el("b",fmt(v)));
    c.appendChild(el("span",k));cards.appendChild(c);}m.appendChild(cards);
  for(const t of d.tables||[]){m.appendChild(el("h2",t.title));const tb=el("table",null,{id:t.id});const hr=el("tr");
    for(const c of t.columns)hr.appendChild(el("th",c));tb.appendChild(hr);
    for(const r of t.rows){const tr=el("tr",null,{"data-row":String(r[0])});for(const c of r)tr.appendChild(el("td",fmt(c)));tb.appendChild(tr);}
    if(!t.rows.length){const tr=el("tr");const td=el("td","none yet",{colspan:t.columns.length,class:"muted"});tr.appendChild(td);tb.appendChild(tr);}
    m.appendChild(tb);}
  const ch=el("div",null,{class:"charts"});for(const c of d.charts||[])ch.appendChild(chart(c));m.appendChild(ch);}
const embedded=document.getElementById("data");
if(embedded){render(JSON.parse(embedded.textContent));}
else{const poll=()=>fetch("status.json",{cache:"no-store"}).then(r=>r.json()).then(render)
  .catch(e=>{document.getElementById("subtitle").textContent="cannot reach the coordinator: "+e;});
  poll();setInterval(poll,2000);}
