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

**Identity.** Every message names the member it comes from; it counts only if it arrives over
that member's connection: with CURVE, the connection's public key (ZAP's ``User-Id``) must be
the key the member id was bound to at join; without CURVE, the connection's routing id must
carry the random token the peer registered with. Bindings are kept in the state file, so no
id can be taken over across restarts either. Anything else is dropped, counted per sender and
logged at a bounded rate (:class:`~lowcomm.comm.zmq.security.Rejects`). A key holds one member
id at a time. Verdicts carry a MAC under a secret of the coordinator's (kept in the state
file), so a verdict re-reported after a restart is one this coordinator really gave. What a
message can make the coordinator keep is bounded: at most ``max_members`` members, two open
barriers and four open votes per member, groups no larger than the membership.
"""

from __future__ import annotations

import hmac
import logging
import threading
import time

import zmq

from .coordinator_book import STATE_VERSION, TOKEN_BYTES, Bookkeeping, _Barrier, _Member, _Vote
from .run_page import RunPage
from .security import CurveConfig, Rejects, check_insecure
from .wire import MAX_MEMBERS, WireError, decode_control, encode_control

__all__ = ["STATE_VERSION", "TOKEN_BYTES", "Coordinator"]


log = logging.getLogger(__name__)

PEER_KINDS = ("join", "hb", "leave", "ready", "done", "activate", "query")


class Coordinator(Bookkeeping):
    """See the module docstring. ``serve()`` runs until :meth:`stop` (or forever)."""

    def __init__(self, bind: str, *, min_peers: int = 1, heartbeat: float = 2.0,
                 heartbeat_timeout: float | None = None, barrier_timeout: float = 600.0,
                 recovery: float | None = None, state_file: str | None = None,
                 curve: CurveConfig | None = None, max_members: int = 4096, max_misses: int = 3,
                 insecure: bool = False, clock=time.monotonic, dashboard: str | None = None,
                 dashboard_addresses: bool = False):
        if not isinstance(bind, str) or "://" not in bind:
            raise ValueError(f"bind must be a ZeroMQ endpoint like tcp://0.0.0.0:5555, got {bind!r}")
        if isinstance(min_peers, bool) or not isinstance(min_peers, int) or min_peers < 1:
            raise ValueError(f"min_peers must be an integer >= 1, got {min_peers!r}")
        if isinstance(max_members, bool) or not isinstance(max_members, int) or not 1 <= max_members <= MAX_MEMBERS:
            raise ValueError(f"max_members must be an integer in [1, {MAX_MEMBERS}], got {max_members!r}")
        check_insecure("coordinator", [bind], curve, insecure)
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
        self.curve = curve
        self._now = clock
        st = self._load_state(state_file)
        self.epoch = max(st["epoch"] + 1, int(time.time() * 1000))
        self.next_id = st["next_id"]
        # member id -> identity (CURVE key or token): who may speak for that id, across restarts
        self.bindings: dict[int, str] = {int(k): v for k, v in st["bindings"].items()}
        self._secret = bytes.fromhex(st["secret"])
        self.rejects = Rejects(log)
        self.members: dict[int, _Member] = {}
        self.dropped: set[int] = {int(x) for x in st["dropped"]}
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
        self._born = self._now()
        self._reload = threading.Event()
        self._stop = threading.Event()
        # The live run page (its own HTTP thread; this loop only records heartbeats and publishes).
        self.page = RunPage(dashboard, dashboard_addresses) if dashboard else None
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

    # ---- message handlers -------------------------------------------------------------------------
    def _on_join(self, rid: bytes, who: str, m: dict) -> None:
        now = self._now()
        mid = m["id"]
        clash = [x.id for x in self.members.values() if x.rid == m["rid"] and x.who != who]
        if clash:
            self._reject(who, f"join with the data routing id of member {clash[0]}")
            self._send(rid, encode_control("error", reason="that routing id is taken; use a fresh random one"))
            return
        if mid is not None:
            # A peer that had an id re-registers (after our restart, or after being dropped).
            bound = self.bindings.get(mid)
            held = [x.id for x in self.members.values() if x.who == who and x.id != mid]
            if (bound is not None and bound != who) or (bound is None and mid >= self.next_id) or held:
                self._reject(who, f"join claiming member id {mid}, which is not bound to it")
                self._send(rid, encode_control("error", reason=f"member id {mid} is held by another peer"))
                return
            for op, key, ok, mac in m["verdicts"]:
                # Only verdicts this coordinator gave (before a restart) count: they carry its MAC.
                if (op, key) not in self.verdicts and hmac.compare_digest(mac, self._mac(op, key, ok)):
                    self.verdicts[(op, key)] = (ok, [])
            old = self.members.get(mid)
            if old is None:
                # A member this coordinator dropped comes back as pending: its state is stale and it
                # must fetch a snapshot before it takes part again.
                active = bool(m["active"]) and mid not in self.dropped
                # activate_op 0: a re-registered member is expected at every barrier from now on.
                self.members[mid] = _Member(mid, m["addr"], m["pub"], m["rid"], who, now, active, 0)
                self.bindings[mid] = who
                self._persist()
                if active:
                    self.started = True
                    self._bump(f"member {mid} re-registered")
            else:
                old.last_seen = now
                old.addr, old.pub, old.rid = m["addr"], m["pub"], m["rid"]
        elif any(x.who == who and x.rid == m["rid"] for x in self.members.values()):
            # the same peer asking again (a resent join): the same answer
            mid = next(x.id for x in self.members.values() if x.who == who and x.rid == m["rid"])
        else:
            if self._in_recovery():
                # Until the run's members have had time to re-register, a fresh id could collide.
                self._send(rid, encode_control("retry", reason="coordinator starting; try again shortly"))
                return
            for x in [x for x in self.members.values() if x.who == who]:
                self._drop(x.id, "its key joined again as a new peer")  # one member id per identity
            if len(self.members) >= self.max_members:
                self._send(rid, encode_control("error", reason="run is full"))
                return
            mid = self.next_id
            self.next_id += 1
            self.bindings[mid] = who
            self._persist()
            self.members[mid] = _Member(mid, m["addr"], m["pub"], m["rid"], who, now, False)
            if not self.started:
                waiting = [x for x in self.members.values() if not x.active]
                if len(waiting) >= self.min_peers:
                    for x in waiting:
                        x.active, x.activate_op = True, 0
                    self.started = True
                    self._bump(f"run started with founding members {sorted(x.id for x in waiting)}")
            log.info("peer %d joined from %s as %s (%s)", mid, m["addr"], self.name(who),
                     "active" if self.members[mid].active else "pending")
        self._send(rid, encode_control("welcome", id=mid, epoch=self.epoch, members=self._member_list(),
                                       started=self.started, min_peers=self.min_peers))

    def _on_hb(self, rid: bytes, mem: _Member, m: dict) -> None:
        mem.last_seen = self._now()
        mem.stats = m["stats"]
        if self.page is not None:
            self.page.record(self.name(mem.who), mem.stats)
        for sync, h in m["hashes"]:
            self.hashes.setdefault(sync, {})[m["id"]] = h
        if len(self.hashes) > 256:
            for k in sorted(self.hashes)[:-128]:
                del self.hashes[k]
        self._send(rid, self._state(True))

    def _on_leave(self, rid: bytes, mem: _Member, m: dict) -> None:
        self._drop(m["id"], "left", event="left")
        self._send(rid, self._state(False))

    def _on_activate(self, rid: bytes, mem: _Member, m: dict) -> None:
        op = m["next_op"]
        if any(o >= op for o in self.released) or any(o >= op for o in self.barriers):
            # The run already started that op without this peer: its snapshot is stale.
            self._send(rid, encode_control("drop", op=op, reason="stale snapshot: the run has moved on"))
            return
        mem.last_seen = self._now()
        if not mem.active:
            mem.active, mem.activate_op = True, op
            self.dropped.discard(mem.id)
            self._why.pop(mem.id, None)
            self._persist()
            self.started = True
            self._bump(f"member {mem.id} activated from op {op}")
        self._send(rid, self._state(True))

    def _on_ready(self, rid: bytes, mem: _Member, m: dict) -> None:
        mid, op = m["id"], m["op"]
        if op in self.released:
            ids, go = self.released[op]
            if mid in ids:
                self._send(rid, go)
            else:
                why = self._why.get(mid, "you were not an active member")
                self._send(rid, encode_control("drop", op=op, reason=f"the run started op {op} without you: {why}"))
            return
        if not mem.active:
            self._send(rid, encode_control("drop", op=op, reason="not an active member (dropped or not joined)"))
            return
        if self.released and op < max(self.released):
            self._send(rid, encode_control("drop", op=op, reason=f"op {op} is over"))
            return
        mine = [o for o, b in self.barriers.items() if mid in b.ready and o != op]
        if len(mine) >= 2:
            self._reject(mem.who, f"member {mid} is ready for a third op at once ({op}; open {mine})")
            return
        mem.last_seen = self._now()
        b = self.barriers.setdefault(op, _Barrier(self._now()))
        b.ready[mid] = rid
        self._check_barriers()

    def _check_barriers(self) -> None:
        if self._in_recovery():
            return
        now = self._now()
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

    def _on_done(self, rid: bytes, mem: _Member, m: dict) -> None:
        mid, op, group = m["id"], m["op"], sorted(set(m["group"]))
        key = (op, ",".join(map(str, group)))
        bogus = None
        if mid not in group:
            bogus = f"member {mid} is not in the group it reports for"
        elif len(group) > self.max_members or any(g not in self.members and g not in self.bindings for g in group):
            bogus = f"op {op}'s group {group[:8]} holds ids that are not members"
        elif op in self.released and set(group) != self.released[op][0]:
            bogus = f"op {op}'s group {group[:8]} is not the one the coordinator opened"
        if bogus:
            self._reject(mem.who, bogus)
            self._send(rid, encode_control("error", reason=bogus))
            return
        if key in self.verdicts:
            ok, lost = self.verdicts[key]
            self._send(rid, encode_control("verdict", op=op, ok=ok, lost=lost, mac=self._mac(*key, ok), why=""))
            return
        if key not in self.votes and sum(mid in v.group for v in self.votes.values()) >= 4:
            self._reject(mem.who, f"member {mid} votes on a fifth open op at once ({op})")
            return
        v = self.votes.setdefault(key, _Vote(self._now(), group))
        v.votes[mid] = bool(m["ok"])
        if not m["ok"] and m["why"]:
            v.whys[mid] = m["why"]
        v.reply_to[mid] = rid
        self._check_votes()

    def _check_votes(self) -> None:
        if self._in_recovery():
            return  # members may not have re-registered yet: "gone" would be premature
        now = self._now()
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
            why = "; ".join(f"member {g} reports: {w}" for g, w in sorted(v.whys.items()))[:1024]
            frame = encode_control("verdict", op=key[0], ok=ok, lost=lost, mac=self._mac(*key, ok), why=why)
            for rid in v.reply_to.values():
                self._send(rid, frame)
            if not ok:
                log.warning("op %d (group %s) failed: failed=%s gone=%s", key[0], key[1], failed, gone)
        if len(self.verdicts) > 1024:
            for k in sorted(self.verdicts)[:-512]:
                del self.verdicts[k]

    def _on_query(self, rid: bytes, mem: _Member, m: dict) -> None:
        reports = self.hashes.get(m["sync"], {})
        others = {i: h for i, h in reports.items() if i != m["id"]}
        values = set(others.values())
        # agreement of at least two members other than the asker (one if that is all there is)
        active_others = [i for i in self.active_ids() if i != m["id"]]
        agreed = len(values) == 1 and len(others) >= min(2, max(1, len(active_others)))
        self._send(rid, encode_control("answer", sync=m["sync"], hash=next(iter(values)) if agreed else None,
                                       agreed=agreed))

    # ---- loop -------------------------------------------------------------------------------------
    def _expire(self) -> None:
        now = self._now()
        for mid, mem in list(self.members.items()):
            if now - mem.last_seen > self.heartbeat_timeout:
                self._drop(mid, f"no heartbeat for {self.heartbeat_timeout:g}s")

    def reload_allowlist(self) -> None:
        """Re-read the CURVE allowlist (``lowcomm coordinator`` does on SIGHUP); eject members of removed keys."""
        if self.curve is None:
            return
        removed = {k.decode() for k in self.curve.reload()}
        for x in [x for x in self.members.values() if x.who in removed]:
            self._drop(x.id, f"its key {self.name(x.who)} was removed from the allowlist")
        log.info("allowlist re-read: %d keys, %d removed", len(self.curve.allowed), len(removed))

    def identity(self, rid: bytes, frame: zmq.Frame | None) -> str:
        """Who sent a message: the CURVE key of its connection, else the token of its routing id."""
        if self.curve is not None:
            return frame.get("User-Id") if frame is not None else ""
        return (rid[:TOKEN_BYTES] if len(rid) == TOKEN_BYTES + 1 else rid).hex()

    def handle(self, rid: bytes, frame: bytes, who: str | None = None) -> None:
        """One control message from routing id ``rid`` sent by identity ``who`` (see :meth:`identity`)."""
        who = self.identity(rid, None) if who is None else who
        if self.curve is not None and who.encode() not in self.curve.allowed:
            self._reject(who, "its key is not (or no longer) on the allowlist")
            return
        try:
            m = decode_control(frame, PEER_KINDS)
        except WireError as e:
            self._reject(who, f"invalid message: {e}")
            return
        if m["k"] == "join":
            self._on_join(rid, who, m)
            return
        mem = self.members.get(m["id"])
        if mem is None:
            if self.bindings.get(m["id"], who) != who:
                self._reject(who, f"{m['k']!r} claims member {m['id']}, which is bound to another identity")
            elif m["k"] == "ready" and m["op"] in self.released:
                why = self._why.get(m["id"], "you are not a member")
                self._send(rid, encode_control("drop", op=m["op"], reason=f"the run started op {m['op']} without "
                                                                          f"you: {why}"))
            elif m["k"] in ("hb", "ready"):
                self._send(rid, self._state(False))  # unknown (we restarted, or it was dropped): join again
            elif m["k"] in ("activate", "query"):
                self._send(rid, encode_control("error", reason="unknown member; join first"))
            return
        if mem.who != who:
            self._reject(who, f"{m['k']!r} claims member {m['id']}, whose identity is {self.name(mem.who)}")
            return
        getattr(self, "_on_" + m["k"])(rid, mem, m)

    def serve(self, duration: float | None = None, status_every: float | None = None) -> None:
        """Answer peers until :meth:`stop` is called (or ``duration`` seconds pass).

        With ``status_every``, print :meth:`status_line` that often (and when it changes).
        """
        if status_every is not None and not status_every > 0:
            raise ValueError(f"status_every must be > 0 seconds (or None for no status lines), got {status_every!r}")
        end = None if duration is None else self._now() + duration
        next_status, last_line, last_print = self._now(), None, 0.0
        poller = zmq.Poller()
        poller.register(self.sock, zmq.POLLIN)
        tick = min(0.2, self.heartbeat / 4)
        try:
            while not self._stop.is_set() and (end is None or self._now() < end):
                if self._reload.is_set():
                    self._reload.clear()
                    self.reload_allowlist()
                if poller.poll(int(tick * 1000)):
                    for _ in range(1000):
                        try:
                            frames = self.sock.recv_multipart(zmq.NOBLOCK, copy=False)
                        except zmq.Again:
                            break
                        rid = frames[0].bytes
                        who = self.identity(rid, frames[-1])
                        if len(frames) != 2:
                            self._reject(who, f"a {len(frames) - 1}-frame message (expected one control frame)")
                            continue
                        self.handle(rid, frames[1].bytes, who)
                self._expire()
                self._check_barriers()
                self._check_votes()
                if self.page is not None:
                    self.page.publish(self)
                if status_every:
                    now = self._now()
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

    def request_reload(self) -> None:
        """Ask :meth:`serve` to re-read the allowlist (safe from a signal handler)."""
        self._reload.set()

    def close(self) -> None:
        if self.page is not None:
            self.page.close()
            self.page = None
        if self._auth is not None:
            self._auth.stop()
            self._auth = None
        self.sock.close(0)
        self.ctx.term()

