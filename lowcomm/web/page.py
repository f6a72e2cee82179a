"""The run page: one self-contained HTML document (no CDN, nothing downloaded) that draws itself.

The same page serves two uses:

* **live** (``lowcomm coordinator --dashboard``): the page polls ``status.json`` beside it every
  two seconds and redraws;
* **report** (``report.html`` beside ``lowcomm sim``'s and ``lowcomm train``'s PNGs): the data is
  embedded in the document, so the file opens anywhere, offline.

The data is one JSON object (:func:`page_data` builds it)::

    {"title": str, "subtitle": str, "updated": unix seconds,
     "summary": [[label, value], ...],                       # key figures, shown as cards
     "tables": [{"id": str, "title": str, "columns": [str], "rows": [[cell, ...]]}],
     "charts": [{"id": str, "title": str, "x": str, "y": str, "log_x": bool,
                 "lines": {name: [[x, y], ...]}}]}

Every string reaches the DOM through ``textContent`` or SVG text nodes (never ``innerHTML``),
and the embedded JSON escapes ``<`` so no value can close the script element that holds it.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = ["page_data", "render_page", "write_report"]

_STYLE = """
body{font:14px/1.4 system-ui,sans-serif;margin:0;background:#f6f7f9;color:#1d232b}
header{background:#1d3557;color:#fff;padding:14px 24px}header h1{margin:0;font-size:20px}
header p{margin:4px 0 0;opacity:.8}main{padding:16px 24px}
.cards{display:flex;flex-wrap:wrap;gap:10px;margin-bottom:16px}
.card{background:#fff;border-radius:6px;padding:8px 14px;box-shadow:0 1px 2px #0002;min-width:110px}
.card b{display:block;font-size:18px}.card span{font-size:12px;color:#5a6470}
table{border-collapse:collapse;background:#fff;box-shadow:0 1px 2px #0002;margin-bottom:18px}
th,td{padding:5px 10px;border-bottom:1px solid #e3e6ea;text-align:right}th{background:#eef1f4}
td:first-child,th:first-child{text-align:left}h2{font-size:16px;margin:18px 0 8px}
.charts{display:flex;flex-wrap:wrap;gap:16px}.chart{background:#fff;box-shadow:0 1px 2px #0002;padding:8px}
.muted{color:#5a6470;font-size:12px}
"""

_SCRIPT = (Path(__file__).parent / "page.js").read_text(encoding="utf-8")


def _clean(v: Any) -> Any:
    """JSON-safe: non-finite floats become strings (JSON has no NaN), tuples lists."""
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    if isinstance(v, Mapping):
        return {str(k): _clean(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_clean(x) for x in v]
    return v


def page_data(title: str, subtitle: str = "", summary: Sequence[tuple[str, Any]] = (),
              tables: Sequence[Mapping[str, Any]] = (), charts: Sequence[Mapping[str, Any]] = ()) -> dict[str, Any]:
    """The page's data object (see the module docstring)."""
    return _clean({"title": title, "subtitle": subtitle, "updated": time.time(), "summary": list(summary),
                   "tables": list(tables), "charts": list(charts)})


def render_page(data: Mapping[str, Any] | None = None, title: str = "lowcomm") -> str:
    """The HTML document: with ``data`` embedded (a report), or polling ``status.json`` (live)."""
    esc = lambda s: s.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    blob = ""
    if data is not None:
        text = json.dumps(_clean(data), allow_nan=False).replace("<", "\\u003c")
        blob = f'<script type="application/json" id="data">{text}</script>'
    return (f'<!doctype html><html lang="en"><head><meta charset="utf-8"><title>{esc(title)}</title>'
            f'<meta name="viewport" content="width=device-width,initial-scale=1"><style>{_STYLE}</style></head>'
            f'<body><header><h1 id="title">{esc(title)}</h1><p id="subtitle"></p></header>'
            f'<main id="content"></main>{blob}<script>{_SCRIPT}</script></body></html>')


def write_report(path: str, data: Mapping[str, Any]) -> None:
    """A static ``report.html`` with ``data`` embedded (written atomically)."""
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(render_page(data, str(data.get("title", "lowcomm"))))
    os.replace(tmp, path)
