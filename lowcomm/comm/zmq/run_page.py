"""The coordinator's live run page: who is in, how fast, what each sent, how the loss goes.

``lowcomm coordinator --dashboard HOST:PORT`` serves it (:class:`lowcomm.web.Dashboard`, its own
thread; loopback unless a non-loopback host is given). The coordinator's loop feeds it: every
heartbeat's ``stats`` map (the figures a peer's training loop reports, validated by the wire
format) is recorded into bounded per-member time series, and about once a second the loop
publishes a fresh snapshot; the HTTP thread only reads the last snapshot. Members are shown by
their key's allowlist name (without CURVE, by a prefix of their coordinator token), never by key;
peer addresses only with ``--dashboard-addresses``.
"""

from __future__ import annotations

import time
from typing import Any

from ...web import Dashboard, History, page_data

__all__ = ["RunPage"]

_CHARTS = (("loss", "eval_loss", "held-out loss", "nats/token"),
           ("throughput", "tokens_per_s", "throughput", "tokens/s"),
           ("bytes", "bytes_sent", "bytes sent", "bytes"))


class RunPage:
    """Bounded history of the members' figures, and the page built from it and the coordinator's state."""

    def __init__(self, address: str, show_addresses: bool = False, every: float = 1.0):
        self.server = Dashboard(address, title="lowcomm run")
        self.history = History()
        self.show_addresses = bool(show_addresses)
        self.every = every
        self._t0 = time.monotonic()
        self._next = 0.0

    @property
    def url(self) -> str:
        return self.server.url

    def record(self, name: str, stats: dict[str, float]) -> None:
        """A heartbeat's figures (called from the coordinator's loop)."""
        t = round(time.monotonic() - self._t0, 1)
        for chart, key, _, _ in _CHARTS:
            if key in stats:
                self.history.add(chart, name, t, stats[key])

    def publish(self, coord: Any) -> None:
        """A fresh snapshot for the page, at most every ``every`` seconds (called from the loop)."""
        now = time.monotonic()
        if now >= self._next:
            self._next = now + self.every
            self.server.publish(self.data(coord))

    def data(self, coord: Any) -> dict[str, Any]:
        s = coord.status()
        offences = coord.rejects.counts
        columns = ["member", "id", "state", "step", "tokens/s", "held-out loss", "syncs", "rolled back",
                   "bytes sent", "missed syncs", "rejected messages"] + (["address"] if self.show_addresses else [])
        rows = []
        for mid in sorted(coord.members):
            mem = coord.members[mid]
            name = coord.name(mem.who)
            st = mem.stats
            row = [name, mid, "active" if mem.active else "pending", st.get("step", ""),
                   round(st["tokens_per_s"]) if "tokens_per_s" in st else "", st.get("eval_loss", ""),
                   st.get("syncs", ""), st.get("rolled_back", ""), st.get("bytes_sent", ""), mem.misses,
                   offences.get(name, 0)]
            rows.append(row + ([mem.addr] if self.show_addresses else []))
        shown = {r[0] for r in rows}
        others = [[n, c] for n, c in sorted(offences.items(), key=lambda kv: -kv[1]) if n not in shown][:16]
        tables = [{"id": "members", "title": "Members", "columns": columns, "rows": rows}]
        if others:
            tables.append({"id": "rejected", "title": "Rejected senders (not members)",
                           "columns": ["sender", "messages"], "rows": others})
        return page_data(
            "lowcomm run", f"epoch {s['epoch']}" + ("" if s["started"] else f" - waiting for {coord.min_peers} peers"),
            summary=[("active", len(s["active"])), ("pending", len(s["pending"])),
                     ("syncs committed", s["ops_committed"]), ("syncs rolled back", s["ops_failed"]),
                     ("rejected messages", s["invalid_messages"])],
            tables=tables,
            charts=[{"id": chart, "title": title, "x": "seconds", "y": unit, "log_x": False,
                     "lines": self.history.lines(chart)} for chart, _, title, unit in _CHARTS])

    def close(self) -> None:
        self.server.close()
