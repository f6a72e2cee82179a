"""The coordinator's books: members, bindings of ids to identities, the state file, verdict MACs,
drops and misses, and what operators see (status). A mixin of
:class:`~lowcomm.comm.zmq.coordinator.Coordinator`, which holds the message handlers and the loop.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import secrets
from dataclasses import dataclass, field

import zmq

from .wire import encode_control

__all__ = ["STATE_VERSION", "TOKEN_BYTES", "Bookkeeping"]

log = logging.getLogger("lowcomm.comm.zmq.coordinator")

STATE_VERSION = 2
TOKEN_BYTES = 16  # a peer's coordinator sockets use routing ids TOKEN + one byte

@dataclass
class _Member:
    id: int
    addr: str
    pub: str | None
    rid: bytes  # the routing id of its data connections (what other peers check)
    who: str  # its identity: the CURVE key, or without CURVE the token of its coordinator connections
    last_seen: float
    active: bool
    activate_op: int = 0
    misses: int = 0  # consecutive sync-start barriers this member missed
    stats: dict = field(default_factory=dict)  # its training loop's latest figures (from heartbeats)


@dataclass
class _Barrier:
    first: float
    ready: dict[int, bytes] = field(default_factory=dict)  # member id -> routing id to answer


@dataclass
class _Vote:
    first: float
    group: list[int]
    votes: dict[int, bool] = field(default_factory=dict)
    whys: dict[int, str] = field(default_factory=dict)  # what failed voters reported (their word, not checked)
    reply_to: dict[int, bytes] = field(default_factory=dict)



class Bookkeeping:
    """State kept by the coordinator (a mixin; see the module docstring)."""

    @staticmethod
    def _load_state(path: str | None) -> dict:
        fresh = {"epoch": 0, "next_id": 0, "dropped": [], "bindings": {}, "secret": secrets.token_hex(32)}
        if not path or not os.path.exists(path):
            return fresh
        with open(path) as f:
            st = json.load(f)
        if not isinstance(st, dict) or st.get("version") != STATE_VERSION:
            raise ValueError(f"state file {path!r} was written by another lowcomm version (format "
                             f"{st.get('version', 1) if isinstance(st, dict) else '?'}, this one writes "
                             f"{STATE_VERSION}) and does not bind member ids to keys; to start afresh, delete it "
                             f"(or pass a new --state path): the peers then join again as new members")
        return {**fresh, **{k: st[k] for k in fresh if k in st}}

    def _persist(self) -> None:
        if len(self.bindings) > 4 * self.max_members:  # forget the oldest ids of peers long gone
            for k in sorted(k for k in self.bindings if k not in self.members)[:len(self.bindings) // 4]:
                del self.bindings[k]
        if len(self.dropped) > 4096:
            self.dropped = set(sorted(self.dropped)[-2048:])
        if not self.state_file:
            return
        tmp = self.state_file + ".tmp"
        with open(tmp, "w") as f:
            json.dump({"version": STATE_VERSION, "epoch": self.epoch, "next_id": self.next_id,
                       "dropped": sorted(self.dropped)[-1024:],
                       "bindings": {str(k): v for k, v in self.bindings.items()},
                       "secret": self._secret.hex()}, f)
        os.replace(tmp, self.state_file)

    def _mac(self, op: int, key: str, ok: bool) -> str:
        return hmac.new(self._secret, f"{op}|{key}|{int(ok)}".encode(), hashlib.sha256).hexdigest()

    def name(self, who: str) -> str:
        """How logs name an identity: a key by its allowlist name, a token by its first hex digits."""
        return self.curve.name(who) if self.curve is not None else f"routing token {who[:8]}"

    def _reject(self, who: str, why: str) -> None:
        self.dropped_invalid += 1
        self.rejects(self.name(who), why)

    def _bump(self, why: str) -> None:
        self.epoch += 1
        self._persist()
        log.info("epoch %d: %s; active members %s", self.epoch, why, self.active_ids())

    def active_ids(self) -> list[int]:
        return sorted(m.id for m in self.members.values() if m.active)

    def _member_list(self, ids=None) -> list[list]:
        ids = self.active_ids() if ids is None else sorted(ids)
        return [[i, self.members[i].addr, self.members[i].pub, self.members[i].rid] for i in ids if i in self.members]

    def _in_recovery(self) -> bool:
        return self._now() - self._born < self.recovery

    def _drop(self, mid: int, why: str, event: str = "dropped") -> None:
        m = self.members.pop(mid, None)
        if m is None:
            return
        self.dropped.add(mid)
        self._persist()
        log.warning("dropped member %d (%s)", mid, why)
        self._event(event, mid, None, m.misses, why)
        if m.active:
            self._bump(f"member {mid} left ({why})")

    def _event(self, kind: str, mid: int, op: int | None, misses: int, reason: str) -> None:
        self.events.append({"event": kind, "member": mid, "op": op, "misses": misses, "reason": reason})
        del self.events[:-1024]
        self._why[mid] = f"{kind}: {reason}"
        if len(self._why) > 4096:
            self._why.pop(next(iter(self._why)))

    def _miss(self, mid: int, op: int) -> None:
        """Member ``mid`` did not reach op ``op``'s barrier in time: count it, and drop it at the limit."""
        m = self.members[mid]
        m.misses += 1
        if m.misses >= self.max_misses:
            self._drop(mid, f"too slow: missed {m.misses} sync(s) in a row, the last op {op} "
                            f"(barrier deadline {self.barrier_timeout:g}s, max_misses {self.max_misses})")
            return
        reason = (f"did not reach the start of op {op} within the barrier deadline ({self.barrier_timeout:g}s): "
                  f"miss {m.misses} of {self.max_misses} before it is dropped; it catches up from a snapshot")
        log.warning("member %d missed op %d: %s", mid, op, reason)
        self._event("missed", mid, op, m.misses, reason)
        # Its state no longer matches the run's: pending until it has fetched a snapshot. Kept in
        # ``dropped`` (persisted) too, so that after a coordinator restart its re-registration
        # cannot make it active again with stale state; activating removes it.
        m.active = False
        self.dropped.add(mid)
        self._persist()
        self._bump(f"member {mid} missed op {op}")

    def _send(self, rid: bytes, frame: bytes) -> None:
        try:
            self.sock.send_multipart([rid, frame], flags=zmq.NOBLOCK)
        except zmq.ZMQError as e:  # peer gone or queue full: it will ask again
            log.debug("could not answer %r: %s", rid, e)

    def _state(self, known: bool) -> bytes:
        # Only members learn who the members are (addresses, keys, routing ids) and who may fetch snapshots.
        pending = [m.id for m in self.members.values() if not m.active]
        return encode_control("state", epoch=self.epoch, members=self._member_list() if known else [],
                              started=self.started, known=known, recovering=self._in_recovery(),
                              joiners=self._member_list(pending) if known else [])

    # ---- what operators see -----------------------------------------------------------------------
    def status(self) -> dict:
        """Members and progress: what ``lowcomm coordinator`` prints every ``--status-every`` seconds."""
        pending = sorted(m.id for m in self.members.values() if not m.active)
        last_op = max([*self.released, -1])
        return {"epoch": self.epoch, "started": self.started, "active": self.active_ids(), "pending": pending,
                "misses": {m.id: m.misses for m in self.members.values() if m.misses},
                "last_op": last_op if last_op >= 0 else None, "ops_committed": self.ops_committed,
                "ops_failed": self.ops_failed, "last_sync_reported": max(self.hashes) if self.hashes else None,
                "stale_or_dropped": len(self.dropped), "invalid_messages": self.dropped_invalid,
                "rejected": dict(sorted(self.rejects.counts.items(), key=lambda kv: -kv[1])[:8])}

    def status_line(self) -> str:
        s = self.status()
        if not s["started"]:
            return f"waiting for {self.min_peers} peer(s) to start the run; joined: {s['pending']}"
        misses = ", ".join(f"{k}: {v}" for k, v in sorted(s["misses"].items())) or "none"
        return (f"epoch {s['epoch']}: {len(s['active'])} active {s['active']}, pending {s['pending']}; "
                f"last op {s['last_op']}, ops committed {s['ops_committed']}, failed {s['ops_failed']}; "
                f"last sync with hashes {s['last_sync_reported']}; consecutive misses {{{misses}}} "
                f"(dropped at {self.max_misses}); invalid or rejected messages {s['invalid_messages']}"
                + (f" (by sender: {s['rejected']})" if s["rejected"] else ""))

