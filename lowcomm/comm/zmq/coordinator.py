"""The coordinator of a ZeroMQ run: membership, sync-start barriers and commit verdicts only.

No tensor passes through it. One ROUTER socket; every message is a single msgpack control
frame (:mod:`lowcomm.comm.zmq.wire`). What it keeps:

* **Membership.** ``join`` gives a peer a member id (or takes back the id it had, after a
  coordinator restart), its *announced* address (what others dial, which may differ from
  the address it binds, e.g. behind port forwarding) and its CURVE public key. Peers send
  ``hb`` every ``heartbeat`` seconds; one silent for ``heartbeat_timeout`` is dropped.
  ``leave`` drops at once. Every change of the active member set bumps the **epoch**.
  Epochs increase across restarts: they start from ``max(stored + 1, wall-clock ms)``,
  the stored value coming from ``state_file`` when given.
* **Start.** The run starts once ``min_peers`` peers have joined: they are its founding
  members. A peer that joins later is *pending* until it has fetched a snapshot from a
  donor and sent ``activate`` with the op id it will take part from.
* **Sync-start barrier.** Before every collective, each member sends ``ready(op)``. When
  every active member expected at that op has, all get ``go(op, epoch, members)``: the
  member list of that operation. A member still missing ``barrier_timeout`` seconds after
  the first arrival *misses* the op: the others go on without it, and it is reported (log,
  :attr:`Coordinator.events`, the status line). Its state is then stale, so it becomes
  pending again and catches up through a snapshot, keeping its id; a member that takes part
  in an op has its count of consecutive misses reset. At ``max_misses`` consecutive misses
  the member is dropped from the run as too slow (also reported); it can re-join later like
  any peer (``lowcomm peer`` does so by itself) and starts again from zero misses.
* **Commit verdicts.** After an operation each participant sends ``done(op, group, ok)``.
  The verdict is *committed* only if every participant reported ok; it fails at once when
  one reports failure or is dropped. Every participant gets the same verdict, also when it
  asks again (verdicts are remembered, and peers re-report verdicts they hold when they
  re-register with a restarted coordinator, so a restart cannot split a verdict).
* **Agreed hashes.** Members report a hash of their global state after each committed sync
  (:func:`~lowcomm.comm.zmq.state.global_state_hash`); a joiner checks its snapshot against
  the value all reporters agree on (``query``).

After a restart the coordinator waits ``recovery`` seconds (default 3 heartbeats) before
it admits new peers or releases a barrier, so the members of the run can re-register first.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from dataclasses import dataclass, field

import zmq

from .security import CurveConfig
from .wire import WireError, decode_control, encode_control

__all__ = ["Coordinator", "run_coordinator"]

log = logging.getLogger(__name__)

PEER_KINDS = ("join", "hb", "leave", "ready", "done", "activate", "query")


@dataclass
class _Member:
    id: int
    addr: str
    pub: str | None
    last_seen: float
    active: bool
    activate_op: int = 0
    misses: int = 0  # consecutive sync-start barriers this member missed


@dataclass
class _Barrier:
    first: float
    ready: dict[int, bytes] = field(default_factory=dict)  # member id -> routing id to answer


@dataclass
class _Vote:
    first: float
    group: list[int]
    votes: dict[int, bool] = field(default_factory=dict)
    reply_to: dict[int, bytes] = field(default_factory=dict)


class Coordinator:
    """See the module docstring. ``serve()`` runs until :meth:`stop` (or forever)."""

    def __init__(self, bind: str, *, min_peers: int = 1, heartbeat: float = 2.0,
                 heartbeat_timeout: float | None = None, barrier_timeout: float = 600.0,
                 recovery: float | None = None, state_file: str | None = None,
                 curve: CurveConfig | None = None, max_members: int = 4096, max_misses: int = 3):
        if not isinstance(bind, str) or "://" not in bind:
            raise ValueError(f"bind must be a ZeroMQ endpoint like tcp://0.0.0.0:5555, got {bind!r}")
        if isinstance(min_peers, bool) or not isinstance(min_peers, int) or min_peers < 1:
            raise ValueError(f"min_peers must be an integer >= 1, got {min_peers!r}")
        if isinstance(max_misses, bool) or not isinstance(max_misses, int) or max_misses < 1:
            raise ValueError(f"max_misses must be an integer >= 1 (1 drops a peer at its first missed sync), "
                             f"got {max_misses!r}")
        for name, v in (("heartbeat", heartbeat), ("barrier_timeout", barrier_timeout)):
            if not v or v <= 0:
                raise ValueError(f"{name} must be a positive number of seconds, got {v!r}")
        self.min_peers = min_peers
        self.heartbeat = float(heartbeat)
        self.heartbeat_timeout = float(heartbeat_timeout or 5 * heartbeat)
        self.barrier_timeout = float(barrier_timeout)
        self.recovery = float(3 * heartbeat if recovery is None else recovery)
        self.state_file = state_file
        self.max_members = max_members
        self.max_misses = max_misses
        stored_epoch, stored_next, stored_dropped = 0, 0, set()
        if state_file and os.path.exists(state_file):
            with open(state_file) as f:
                st = json.load(f)
            stored_epoch, stored_next = int(st.get("epoch", 0)), int(st.get("next_id", 0))
            stored_dropped = {int(x) for x in st.get("dropped", [])}
        self.epoch = max(stored_epoch + 1, int(time.time() * 1000))
        self.next_id = stored_next
        self.members: dict[int, _Member] = {}
        self.dropped: set[int] = stored_dropped
        self.started = False
        self.barriers: dict[int, _Barrier] = {}
        self.released: dict[int, tuple[set[int], bytes]] = {}  # op -> (members, go frame)
        self.votes: dict[tuple, _Vote] = {}
        self.verdicts: dict[tuple, tuple[bool, list[int]]] = {}
        self.hashes: dict[int, dict[int, str]] = {}
        self.dropped_invalid = 0
        # What happened to members, for operators and tests: dicts with "event" ("missed",
        # "dropped" or "left"), "member", "op" (or None), "misses" and "reason"; the last 1024 kept.
        self.events: list[dict] = []
        self._why: dict[int, str] = {}  # member id -> its last event, told to it when it comes back late
        self.ops_committed = 0
        self.ops_failed = 0
        self._born = time.monotonic()
        self._stop = threading.Event()
        self.ctx = zmq.Context()
        self._auth = None
        self.sock = self.ctx.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.MAXMSGSIZE, 1 << 20)  # control frames only
        self.sock.setsockopt(zmq.ROUTER_MANDATORY, 0)
        if curve is not None:
            self._auth = curve.start_authenticator(self.ctx)
            curve.make_server(self.sock)
        self.sock.bind(bind)
        self.endpoint = self.sock.getsockopt_string(zmq.LAST_ENDPOINT)
        self._persist()
        log.info("coordinator bound at %s (epoch %d, min_peers %d)", self.endpoint, self.epoch, min_peers)

    # ---- bookkeeping ------------------------------------------------------------------------------
    def _persist(self) -> None:
        if not self.state_file:
            return
        tmp = self.state_file + ".tmp"
        with open(tmp, "w") as f:
            json.dump({"epoch": self.epoch, "next_id": self.next_id, "dropped": sorted(self.dropped)[-1024:]}, f)
        os.replace(tmp, self.state_file)

    def _bump(self, why: str) -> None:
        self.epoch += 1
        self._persist()
        log.info("epoch %d: %s; active members %s", self.epoch, why, self.active_ids())

    def active_ids(self) -> list[int]:
        return sorted(m.id for m in self.members.values() if m.active)

    def _member_list(self, ids=None) -> list[list]:
        ids = self.active_ids() if ids is None else sorted(ids)
        return [[i, self.members[i].addr, self.members[i].pub] for i in ids if i in self.members]

    def _in_recovery(self) -> bool:
        return time.monotonic() - self._born < self.recovery

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
        return encode_control("state", epoch=self.epoch, members=self._member_list(), started=self.started,
                              known=known, recovering=self._in_recovery())

    # ---- message handlers -------------------------------------------------------------------------
    def _on_join(self, rid: bytes, m: dict) -> None:
        now = time.monotonic()
        mid = m["id"]
        if mid is not None and mid >= 0:
            # A peer that had an id re-registers (after our restart, or after being dropped).
            old = self.members.get(mid)
            if old is not None and old.addr != m["addr"]:
                self._send(rid, encode_control("error", reason=f"member id {mid} is held by another peer"))
                return
            for op, key, ok in m["verdicts"]:
                k = (op, key)
                if k not in self.verdicts:
                    self.verdicts[k] = (ok, [])
            if old is None:
                # A member this coordinator dropped comes back as pending: its state is stale and it
                # must fetch a snapshot before it takes part again.
                active = bool(m["active"]) and mid not in self.dropped
                # activate_op 0: a re-registered member is expected at every barrier from now on.
                self.members[mid] = _Member(mid, m["addr"], m["pub"], now, active, 0)
                self.next_id = max(self.next_id, mid + 1)
                self._persist()
                if active:
                    self.started = True
                    self._bump(f"member {mid} re-registered")
            else:
                old.last_seen = now
        else:
            if self._in_recovery():
                # Until the run's members have had time to re-register, a fresh id could collide.
                self._send(rid, encode_control("retry", reason="coordinator starting; try again shortly"))
                return
            if len(self.members) >= self.max_members:
                self._send(rid, encode_control("error", reason="run is full"))
                return
            mid = self.next_id
            self.next_id += 1
            self._persist()
            self.members[mid] = _Member(mid, m["addr"], m["pub"], now, False)
            if not self.started:
                waiting = [x for x in self.members.values() if not x.active]
                if len(waiting) >= self.min_peers:
                    for x in waiting:
                        x.active, x.activate_op = True, 0
                    self.started = True
                    self._bump(f"run started with founding members {sorted(x.id for x in waiting)}")
            log.info("peer %d joined from %s (%s)", mid, m["addr"], "active" if self.members[mid].active
                     else "pending")
        self._send(rid, encode_control("welcome", id=mid, epoch=self.epoch, members=self._member_list(),
                                       started=self.started, min_peers=self.min_peers))

    def _on_hb(self, rid: bytes, m: dict) -> None:
        mem = self.members.get(m["id"])
        if mem is None:
            self._send(rid, self._state(False))
            return
        mem.last_seen = time.monotonic()
        for sync, h in m["hashes"]:
            self.hashes.setdefault(sync, {})[m["id"]] = h
        if len(self.hashes) > 256:
            for k in sorted(self.hashes)[:-128]:
                del self.hashes[k]
        self._send(rid, self._state(True))

    def _on_leave(self, rid: bytes, m: dict) -> None:
        self._drop(m["id"], "left", event="left")
        self._send(rid, self._state(False))

    def _on_activate(self, rid: bytes, m: dict) -> None:
        mem = self.members.get(m["id"])
        if mem is None:
            self._send(rid, encode_control("error", reason="unknown member; join first"))
            return
        op = m["next_op"]
        if any(o >= op for o in self.released) or any(o >= op for o in self.barriers):
            # The run already started that op without this peer: its snapshot is stale.
            self._send(rid, encode_control("drop", op=op, reason="stale snapshot: the run has moved on"))
            return
        mem.last_seen = time.monotonic()
        if not mem.active:
            mem.active, mem.activate_op = True, op
            self.dropped.discard(mem.id)
            self._why.pop(mem.id, None)
            self._persist()
            self.started = True
            self._bump(f"member {mem.id} activated from op {op}")
        self._send(rid, self._state(True))

    def _on_ready(self, rid: bytes, m: dict) -> None:
        mid, op = m["id"], m["op"]
        mem = self.members.get(mid)
        if op in self.released:
            ids, go = self.released[op]
            if mid in ids:
                self._send(rid, go)
            else:
                why = self._why.get(mid, "you were not an active member")
                self._send(rid, encode_control("drop", op=op, reason=f"the run started op {op} without you: {why}"))
            return
        if mem is None or not mem.active:
            self._send(rid, encode_control("drop", op=op, reason="not an active member (dropped or not joined)"))
            return
        mem.last_seen = time.monotonic()
        b = self.barriers.setdefault(op, _Barrier(time.monotonic()))
        b.ready[mid] = rid
        self._check_barriers()

    def _check_barriers(self) -> None:
        if self._in_recovery():
            return
        now = time.monotonic()
        for op in sorted(self.barriers):
            b = self.barriers[op]
            b.ready = {i: r for i, r in b.ready.items() if i in self.members and self.members[i].active}
            expected = {m.id for m in self.members.values() if m.active and m.activate_op <= op}
            missing = expected - set(b.ready)
            if missing and now - b.first < self.barrier_timeout:
                continue
            if not b.ready:
                del self.barriers[op]  # nobody is waiting: nobody went ahead without anyone
                continue
            for mid in sorted(missing):
                self._miss(mid, op)
            ids = set(b.ready)
            for mid in ids:
                self.members[mid].misses = 0
            del self.barriers[op]
            if not ids:
                continue
            go = encode_control("go", op=op, epoch=self.epoch, members=self._member_list(ids))
            self.released[op] = (ids, go)
            for rid in b.ready.values():
                self._send(rid, go)
        if len(self.released) > 128:
            for k in sorted(self.released)[:-64]:
                del self.released[k]

    def _on_done(self, rid: bytes, m: dict) -> None:
        mid, op, group = m["id"], m["op"], sorted(set(m["group"]))
        key = (op, ",".join(map(str, group)))
        if mid not in group:
            self._send(rid, encode_control("error", reason=f"member {mid} is not in the group it reports for"))
            return
        if key in self.verdicts:
            ok, lost = self.verdicts[key]
            self._send(rid, encode_control("verdict", op=op, ok=ok, lost=lost))
            return
        v = self.votes.setdefault(key, _Vote(time.monotonic(), group))
        v.votes[mid] = bool(m["ok"])
        v.reply_to[mid] = rid
        self._check_votes()

    def _check_votes(self) -> None:
        if self._in_recovery():
            return  # members may not have re-registered yet: "gone" would be premature
        now = time.monotonic()
        for key in list(self.votes):
            v = self.votes[key]
            # Left or dropped; a member that only missed a later op (pending) may still report.
            gone = [g for g in v.group if g not in self.members]
            failed = [g for g, ok in v.votes.items() if not ok]
            complete = all(g in v.votes for g in v.group)
            if failed or gone or now - v.first > self.barrier_timeout:
                ok = False
            elif complete:
                ok = True
            else:
                continue
            lost = sorted(set(gone) | ({g for g in v.group if g not in v.votes} if not complete and not failed
                                       and not gone else set()))
            self.verdicts[key] = (ok, lost)
            del self.votes[key]
            if ok:
                self.ops_committed += 1
            else:
                self.ops_failed += 1
            frame = encode_control("verdict", op=key[0], ok=ok, lost=lost)
            for rid in v.reply_to.values():
                self._send(rid, frame)
            if not ok:
                log.warning("op %d (group %s) failed: failed=%s gone=%s", key[0], key[1], failed, gone)
        if len(self.verdicts) > 1024:
            for k in sorted(self.verdicts)[:-512]:
                del self.verdicts[k]

    def _on_query(self, rid: bytes, m: dict) -> None:
        reports = self.hashes.get(m["sync"], {})
        others = {i: h for i, h in reports.items() if i != m["id"]}
        values = set(others.values())
        agreed = len(values) == 1 and len(others) >= min(2, max(1, len(self.active_ids())))
        self._send(rid, encode_control("answer", sync=m["sync"], hash=next(iter(values)) if agreed else None,
                                       agreed=agreed))

    # ---- what operators see -----------------------------------------------------------------------
    def status(self) -> dict:
        """Members and progress: what ``lowcomm coordinator`` prints every ``--status-every`` seconds."""
        pending = sorted(m.id for m in self.members.values() if not m.active)
        last_op = max([*self.released, -1])
        return {"epoch": self.epoch, "started": self.started, "active": self.active_ids(), "pending": pending,
                "misses": {m.id: m.misses for m in self.members.values() if m.misses},
                "last_op": last_op if last_op >= 0 else None, "ops_committed": self.ops_committed,
                "ops_failed": self.ops_failed, "last_sync_reported": max(self.hashes) if self.hashes else None,
                "stale_or_dropped": len(self.dropped), "invalid_messages": self.dropped_invalid}

    def status_line(self) -> str:
        s = self.status()
        if not s["started"]:
            return f"waiting for {self.min_peers} peer(s) to start the run; joined: {s['pending']}"
        misses = ", ".join(f"{k}: {v}" for k, v in sorted(s["misses"].items())) or "none"
        return (f"epoch {s['epoch']}: {len(s['active'])} active {s['active']}, pending {s['pending']}; "
                f"last op {s['last_op']}, ops committed {s['ops_committed']}, failed {s['ops_failed']}; "
                f"last sync with hashes {s['last_sync_reported']}; consecutive misses {{{misses}}} "
                f"(dropped at {self.max_misses}); invalid messages {s['invalid_messages']}")

    # ---- loop -------------------------------------------------------------------------------------
    def _expire(self) -> None:
        now = time.monotonic()
        for mid, mem in list(self.members.items()):
            if now - mem.last_seen > self.heartbeat_timeout:
                self._drop(mid, f"no heartbeat for {self.heartbeat_timeout:g}s")

    def handle(self, rid: bytes, frame: bytes) -> None:
        try:
            m = decode_control(frame, PEER_KINDS)
        except WireError as e:
            self.dropped_invalid += 1
            log.warning("dropped an invalid message from %r: %s", rid, e)
            return
        getattr(self, "_on_" + m["k"])(rid, m)

    def serve(self, duration: float | None = None, status_every: float | None = None) -> None:
        """Answer peers until :meth:`stop` is called (or ``duration`` seconds pass).

        With ``status_every``, print :meth:`status_line` that often (and when it changes).
        """
        if status_every is not None and not status_every > 0:
            raise ValueError(f"status_every must be > 0 seconds (or None for no status lines), got {status_every!r}")
        end = None if duration is None else time.monotonic() + duration
        next_status, last_line, last_print = time.monotonic(), None, 0.0
        poller = zmq.Poller()
        poller.register(self.sock, zmq.POLLIN)
        tick = min(0.2, self.heartbeat / 4)
        try:
            while not self._stop.is_set() and (end is None or time.monotonic() < end):
                if poller.poll(int(tick * 1000)):
                    for _ in range(1000):
                        try:
                            frames = self.sock.recv_multipart(zmq.NOBLOCK)
                        except zmq.Again:
                            break
                        if len(frames) != 2:
                            self.dropped_invalid += 1
                            log.warning("dropped a %d-frame message from %r (expected one control frame)",
                                        len(frames) - 1, frames[0])
                            continue
                        self.handle(frames[0], frames[1])
                self._expire()
                self._check_barriers()
                self._check_votes()
                if status_every:
                    now = time.monotonic()
                    if now >= next_status:
                        line = self.status_line()
                        if line != last_line or now - last_print >= 6 * status_every:
                            print(time.strftime("%H:%M:%S ") + line, flush=True)
                            last_line, last_print = line, now
                        next_status = now + status_every
        finally:
            self.close()

    def stop(self) -> None:
        self._stop.set()

    def close(self) -> None:
        if self._auth is not None:
            self._auth.stop()
            self._auth = None
        self.sock.close(0)
        self.ctx.term()


def run_coordinator(bind: str, status_every: float | None = None, **kwargs) -> None:
    """Run a coordinator in this process until interrupted (what ``lowcomm coordinator`` does)."""
    c = Coordinator(bind, **kwargs)
    print(f"lowcomm coordinator listening on {c.endpoint} (epoch {c.epoch})", flush=True)
    try:
        c.serve(status_every=status_every)
    except KeyboardInterrupt:
        pass


def add_arguments(ap) -> None:
    """Arguments of ``lowcomm coordinator``."""
    ap.add_argument("--bind", required=True, help="where to listen, e.g. tcp://0.0.0.0:5555")
    ap.add_argument("--min-peers", type=int, default=1, help="peers needed before the run starts")
    ap.add_argument("--heartbeat", type=float, default=2.0, help="seconds between peer heartbeats")
    ap.add_argument("--heartbeat-timeout", type=float, default=None,
                    help="drop a peer silent for this long (default 5 heartbeats)")
    ap.add_argument("--barrier-timeout", type=float, default=600.0,
                    help="seconds the sync-start barrier waits for the slowest member before going on "
                         "without it (it misses that sync); "
                         "allow for the slowest expected compute between syncs")
    ap.add_argument("--max-misses", type=int, default=3,
                    help="consecutive missed syncs after which a slow peer is dropped (it may join again); "
                         "below that a peer that missed a sync catches up from a snapshot")
    ap.add_argument("--status-every", type=float, default=10.0,
                    help="seconds between status lines (members and progress); 0 for none")
    ap.add_argument("--state", default=None, help="file keeping the epoch and ids across coordinator restarts")
    ap.add_argument("--curve-secret", default=None, help="the coordinator's .key_secret (from lowcomm keygen)")
    ap.add_argument("--curve-allow", default=None, help="directory of allowed peers' public .key files")


def main(args) -> int:
    """Run ``lowcomm coordinator`` with parsed arguments."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    curve = None
    if args.curve_secret or args.curve_allow:
        if not (args.curve_secret and args.curve_allow):
            raise ValueError("CURVE needs both --curve-secret and --curve-allow")
        curve = CurveConfig(args.curve_secret, args.curve_allow)
    run_coordinator(args.bind, min_peers=args.min_peers, heartbeat=args.heartbeat,
                    heartbeat_timeout=args.heartbeat_timeout, barrier_timeout=args.barrier_timeout,
                    max_misses=args.max_misses, state_file=args.state, curve=curve,
                    status_every=None if args.status_every == 0 else args.status_every)
    return 0
