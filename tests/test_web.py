"""The run page: the HTTP server's contract, escaping, bounded history, and the page drawn in a real browser."""

import json
import socket
import urllib.error
import urllib.request

import pytest
from _browser import chromium, dump_dom

from lowcomm.web import Dashboard, History, page_data, parse_address, render_page, write_report


def _get(url, method="GET"):
    req = urllib.request.Request(url, method=method)
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def _data(syncs=3):
    return page_data("run", "sub", summary=[("syncs committed", syncs), ("members", 2)],
                     tables=[{"id": "members", "title": "Members", "columns": ["name", "state"],
                              "rows": [["alice", "active"], ["bob</script><b>x</b>", "pending"]]}],
                     charts=[{"id": "loss", "title": "held-out loss", "x": "step", "y": "nats", "log_x": False,
                              "lines": {"alice": [[1, 3.0], [2, 2.5], [3, float("nan")]], "bob": [[1, 3.1]]}}])


def test_address_parsing_and_loopback_default():
    assert parse_address("8080") == ("127.0.0.1", 8080)
    assert parse_address(":8080") == ("127.0.0.1", 8080)
    assert parse_address("0.0.0.0:80") == ("0.0.0.0", 80)
    assert parse_address("[::1]:9") == ("::1", 9)
    for bad in ("host:", "host:http", "1:70000"):
        with pytest.raises(ValueError, match="HOST:PORT"):
            parse_address(bad)


def test_server_contract():
    d = Dashboard("127.0.0.1:0", title="t")
    try:
        assert d.loopback and d.host == "127.0.0.1"
        code, body = _get(d.url)
        assert code == 200 and b"status.json" in body and b'id="data"' not in body
        d.publish(_data())
        code, body = _get(d.url + "status.json?x=1")
        assert code == 200 and json.loads(body)["summary"][0] == ["syncs committed", 3]
        assert _get(d.url + "nope")[0] == 404
        assert _get(d.url + "status.json", "POST")[0] == 405
        assert _get(d.url, "HEAD")[0] == 200
        with socket.create_connection((d.host, d.port), timeout=10) as s:  # a malformed request line
            s.sendall(b"GET / BOGUS/1.0\r\n\r\n")
            assert b"Error code: 400" in s.recv(400)
        assert json.loads(_get(d.url + "status.json")[1])["summary"][0][1] == 3  # nothing changed
    finally:
        d.close()


def test_history_is_bounded():
    h = History(max_points=5, max_lines=2)
    for i in range(100):
        for n in ("a", "b", "c"):
            h.add("loss", n, i, float(i))
    lines = h.lines("loss")
    assert set(lines) == {"a", "b"} and len(lines["a"]) == 5 and lines["a"][-1] == [99, 99.0]


def test_embedded_data_cannot_close_its_script():
    html = render_page(_data())
    assert "</script><b>" not in html.split('id="data">', 1)[1].split("</script>", 1)[0]


def test_report_drawn_in_browser(request, tmp_path):
    browser = chromium(request)
    path = tmp_path / "report.html"
    write_report(str(path), _data())
    dom = dump_dom(browser, path.as_uri())
    assert 'data-row="alice"' in dom and "bob&lt;/script&gt;&lt;b&gt;x&lt;/b&gt;" in dom
    assert dom.count("<polyline") == 2 and 'id="chart-loss"' in dom
    assert 'data-key="syncs committed"' in dom


def test_live_page_polls_in_browser(request):
    browser = chromium(request)
    d = Dashboard("127.0.0.1:0")
    try:
        d.publish(_data(syncs=7))
        dom = dump_dom(browser, d.url)
        assert 'data-row="alice"' in dom and "<b>7</b>" in dom
    finally:
        d.close()
