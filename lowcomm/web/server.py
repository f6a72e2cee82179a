"""A live run page served from its own thread: ``/`` (the page) and ``/status.json`` (its data).

The process that owns the run (the coordinator) calls :meth:`Dashboard.publish` with a fresh
data object whenever it likes, from its own loop; the HTTP thread only ever reads the last
published object under a lock, so a slow or hostile client can never block the owner's loop.
Requests: ``GET`` (or ``HEAD``) of ``/``, ``/index.html`` or ``/status.json``; any other path
is a 404, any other method a 405, a malformed request a 400 (the standard library's parser),
and every connection has a 5 s socket timeout.

Binding: loopback unless a non-loopback host is given explicitly (``HOST:PORT``; ``:PORT`` or
``PORT`` alone means ``127.0.0.1``).
"""

from __future__ import annotations

import ipaddress
import json
import logging
import threading
from collections import deque
from collections.abc import Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from .page import render_page

__all__ = ["Dashboard", "History", "parse_address"]

log = logging.getLogger(__name__)


def parse_address(spec: str) -> tuple[str, int]:
    """``(host, port)`` from ``HOST:PORT``, ``:PORT`` or ``PORT`` (host 127.0.0.1 unless given)."""
    s = str(spec).strip()
    host, sep, port = s.rpartition(":")
    if not sep:
        host, port = "", s
    host = host.strip("[]") or "127.0.0.1"
    try:
        p = int(port)
    except ValueError:
        p = -1
    if not 0 <= p <= 65535:
        raise ValueError(f"dashboard address must be HOST:PORT (e.g. 127.0.0.1:8080), got {spec!r}")
    return host, p


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class History:
    """Bounded time series: at most ``max_points`` points per line and ``max_lines`` lines per chart."""

    def __init__(self, max_points: int = 720, max_lines: int = 64):
        self.max_points, self.max_lines = max_points, max_lines
        self._lines: dict[str, dict[str, deque]] = {}

    def add(self, chart: str, line: str, x: float, y: float | None) -> None:
        if y is None:
            return
        lines = self._lines.setdefault(chart, {})
        if line not in lines:
            if len(lines) >= self.max_lines:
                return
            lines[line] = deque(maxlen=self.max_points)
        pts = lines[line]
        if pts and pts[-1][0] == x:
            pts[-1] = (x, float(y))
        else:
            pts.append((x, float(y)))

    def lines(self, chart: str) -> dict[str, list]:
        return {n: [list(p) for p in pts] for n, pts in self._lines.get(chart, {}).items()}


class _Handler(BaseHTTPRequestHandler):
    timeout = 5.0
    server_version = "lowcomm"
    sys_version = ""

    def log_message(self, fmt: str, *args: Any) -> None:  # the owner's log, not stderr
        log.debug("dashboard %s: " + fmt, self.client_address[0], *args)

    def _send(self, code: int, body: bytes, ctype: str, head: bool = False) -> None:
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.send_header("X-Content-Type-Options", "nosniff")
        self.end_headers()
        if not head:
            self.wfile.write(body)

    def _get(self, head: bool) -> None:
        path = self.path.split("?", 1)[0]
        dash: Dashboard = self.server.dashboard  # type: ignore[attr-defined]
        if path in ("/", "/index.html"):
            self._send(200, dash.page, "text/html; charset=utf-8", head)
        elif path == "/status.json":
            self._send(200, dash.snapshot_bytes(), "application/json", head)
        else:
            self._send(404, b"not found\n", "text/plain", head)

    def do_GET(self) -> None:  # noqa: N802 (the standard library's names)
        self._get(False)

    def do_HEAD(self) -> None:  # noqa: N802
        self._get(True)

    def _refuse(self) -> None:
        self._send(405, b"method not allowed\n", "text/plain")

    do_POST = do_PUT = do_DELETE = do_PATCH = do_OPTIONS = do_CONNECT = do_TRACE = _refuse  # noqa: N815


class Dashboard:
    """Serve the live page at ``address`` until :meth:`close`; :meth:`publish` replaces its data."""

    def __init__(self, address: str, title: str = "lowcomm run"):
        host, port = parse_address(address)
        self._lock = threading.Lock()
        self._blob = json.dumps({"title": title, "subtitle": "starting", "summary": [], "tables": [],
                                 "charts": []}).encode()
        self.page = render_page(None, title).encode()
        self._httpd = ThreadingHTTPServer((host, port), _Handler)
        self._httpd.daemon_threads = True
        self._httpd.dashboard = self  # type: ignore[attr-defined]
        self.host, self.port = self._httpd.server_address[:2]
        self.loopback = is_loopback(host)
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.2},
                                        name="lowcomm-dashboard", daemon=True)
        self._thread.start()
        log.info("run page at http://%s:%d/", self.host, self.port)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}/"

    def publish(self, data: Mapping[str, Any]) -> None:
        blob = json.dumps(data, allow_nan=False, default=str).encode()
        with self._lock:
            self._blob = blob

    def snapshot_bytes(self) -> bytes:
        with self._lock:
            return self._blob

    def close(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=5)
