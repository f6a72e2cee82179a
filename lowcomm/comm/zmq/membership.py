"""A ZeroMQ peer's side of membership: requests to the coordinator (join, heartbeat state,
sync-start barrier, commit vote), re-registration after a coordinator restart, and the
coordinator's heartbeat answers handled by the I/O thread. A mixin of
:class:`~lowcomm.comm.zmq.peer.ZmqTransport`.
"""

from __future__ import annotations

import contextlib
import logging
import time

import zmq

from ..base import CommError, CommTimeout, PeerLost
from .wire import WireError, decode_control, encode_control

__all__ = ["Membership"]

log = logging.getLogger("lowcomm.comm.zmq.peer")


class Membership:
    """Talking to the coordinator (a mixin of ZmqTransport)."""

    # ---- coordinator requests --------------------------------------------------------------------
    def _request(self, frame: bytes, accept, deadline: float, resend: float = 1.0) -> dict:
        """Send ``frame`` to the coordinator until a reply satisfying ``accept`` arrives (idempotent)."""
        with self._req_lock:
            poller = zmq.Poller()
            poller.register(self._req, zmq.POLLIN)
            last_send = 0.0
            while True:
                now = time.monotonic()
                if now >= deadline:
                    raise CommTimeout([], f"no answer from the coordinator at {self.coordinator}")
                if now - last_send >= resend:
                    # NOBLOCK: a DEALER whose handshake was refused has no pipe, and a plain send
                    # would block forever; the request is simply tried again at the next resend.
                    with contextlib.suppress(zmq.Again):
                        self._req.send(frame, flags=zmq.NOBLOCK)
                    last_send = now
                if not poller.poll(int(1000 * min(0.2, max(0.0, deadline - now)))):
                    continue
                raw = self._req.recv()
                try:
                    m = decode_control(raw)
                except WireError as e:
                    log.warning("dropped an invalid message from the coordinator: %s", e)
                    continue
                if m["k"] == "error":
                    raise CommError(f"coordinator refused: {m['reason']}")
                if accept(m):
                    return m

    def _adopt(self, members: list[list], joiners: list[list] | None = None) -> list[int]:
        for mid, addr, pub, rid in members:
            self._peers[mid] = (addr, pub, rid)
        if len(self._peers) > 2 * len(members) + 64:  # forget peers long gone (bounded)
            keep = {m[0] for m in members} | {self._id}
            for mid in [k for k in self._peers if k not in keep][:len(self._peers) // 2]:
                del self._peers[mid]
        if joiners is not None:
            self._joiners = {j[0]: (j[1], j[2], j[3]) for j in joiners}
        return sorted(m[0] for m in members)

    def _join_frame(self, active: bool = False, verdicts: list | None = None) -> bytes:
        return encode_control("join", id=self._id if self._id >= 0 else None, addr=self.address, pub=self._pub,
                              rid=self._rid, active=active, next_op=self._seq, verdicts=list(verdicts or []))

    def _register(self, deadline: float) -> None:
        while True:
            m = self._request(self._join_frame(), lambda m: m["k"] in ("welcome", "retry"), deadline)
            if m["k"] == "welcome":
                break
            time.sleep(0.1)
        self._id = m["id"]
        self._epoch = m["epoch"]
        ids = self._adopt(m["members"])
        if self._id in ids:
            self._active, self._members = True, ids
            log.info("member %d: founding member of a run of %d (epoch %d)", self._id, len(ids), self._epoch)
            return
        if m["started"]:
            log.info("member %d: the run is under way; a world of one until attach() fetches a snapshot", self._id)
            return
        # Wait for the run to start (min_peers reached); heartbeats keep us registered meanwhile.
        while True:
            st = self._state_request(deadline)
            ids = self._adopt(st["members"], st["joiners"])
            if st["started"] and self._id in ids:
                self._active, self._members, self._epoch = True, ids, st["epoch"]
                log.info("member %d: founding member of a run of %d (epoch %d)", self._id, len(ids), self._epoch)
                return
            if st["started"]:
                return
            time.sleep(min(0.1, self.heartbeat))

    def _state_request(self, deadline: float, recovering: bool = True) -> dict:
        """The coordinator's view of the run; re-registers first if it does not know us (it restarted)."""
        while True:
            st = self._request(self._hb_frame(),
                               lambda m: m["k"] == "state" and (recovering or not m["recovering"]), deadline)
            if st["known"]:
                return st
            self._request(self._join_frame(self._active, self._verdicts), lambda m: m["k"] == "welcome", deadline)

    # ---- protocol surface ----------------------------------------------------------------------
    @property
    def rank(self) -> int:
        return self._id

    @property
    def epoch(self) -> int:
        return self._epoch

    def members(self) -> list[int]:
        return list(self._members) if self._active else [self._id]

    def refresh(self) -> None:
        """Bring membership up to date; a peer the run dropped re-joins through a snapshot."""
        deadline = time.monotonic() + max(10.0, 5 * self.heartbeat)
        st = self._state_request(deadline, recovering=False)
        ids = self._adopt(st["members"], st["joiners"])
        if self._resync and self._active and self._id in ids and self._model is not None:
            # Our part of an op failed but the others committed it: take their state from a snapshot.
            self._resync = False
            log.warning("member %d re-syncs from a snapshot: the run committed an op its own part failed",
                        self._id)
            self._rejoin()
            return
        if self._active and self._id not in ids:
            self._active = False
            log.warning("member %d is no longer an active member of the run (it missed a sync, or was dropped)",
                        self._id)
            if self._model is None:
                raise CommError(f"member {self._id} missed a sync or was dropped from the run; call "
                                f"transport.attach(model, optimizer) so it can catch up from a snapshot")
            self._rejoin()
            return
        if self._active:
            self._members, self._epoch = ids, st["epoch"]

    def wait_members(self, predicate, timeout: float) -> list[int]:
        """Poll the coordinator until ``predicate(active member ids)`` holds; returns them."""
        deadline = time.monotonic() + timeout
        while True:
            st = self._state_request(deadline)
            ids = self._adopt(st["members"], st["joiners"])
            if predicate(ids):
                if self._active and self._id in ids:
                    self._members, self._epoch = ids, st["epoch"]
                return ids
            if time.monotonic() > deadline:
                raise CommTimeout([], f"membership did not reach the wanted state within {timeout}s: {ids}")
            time.sleep(0.05)


    def _barrier(self, seq: int, deadline: float) -> list[int]:
        frame = encode_control("ready", id=self._id, op=seq)
        while True:
            m = self._request(frame, lambda m: (m["k"] in ("go", "drop") and m["op"] == seq)
                              or (m["k"] == "state" and not m["known"]), deadline)
            if m["k"] != "state":
                break
            # The coordinator restarted and does not know us yet: register again (with the verdicts we
            # hold), then ask again, so the restart costs no barrier deadline.
            self._request(self._join_frame(self._active, self._verdicts), lambda m: m["k"] == "welcome", deadline)
        if m["k"] == "drop":
            raise PeerLost([self._id], f"the coordinator dropped member {self._id} from op {seq}: {m['reason']}")
        ids = self._adopt(m["members"])
        if self._id not in ids:
            raise PeerLost([self._id], f"member {self._id} is not part of op {seq}")
        for peer in list(self._dealers):
            if peer not in ids:
                self._close_dealer(peer)
        self._members, self._epoch = ids, m["epoch"]
        with self._cv:  # the op's members are live even if our last heartbeat predates a joiner
            if self._live is not None:
                self._live = self._live | set(ids)
        return ids

    def _commit(self, tag, participants, ok, deadline):
        seq = tag[0]
        group = sorted(participants)
        if not ok:
            # Tell everyone still exchanging data for this op to stop waiting now.
            abort = encode_control("abort", id=self._id, op=seq)
            for p in group:
                if p != self._id:
                    try:
                        self._dealer(p).send(abort, flags=zmq.NOBLOCK)
                    except (zmq.ZMQError, CommError):
                        pass
        if len(group) == 1:
            return ok, []
        why = "" if ok else str(getattr(self, "_op_error", "") or "")[:256]
        frame = encode_control("done", id=self._id, op=seq, group=group, ok=ok, why=why)
        m = self._request(frame, lambda m: m["k"] == "verdict" and m["op"] == seq, deadline)
        self._verdicts.append([seq, ",".join(map(str, group)), m["ok"], m["mac"]])
        del self._verdicts[:-64]
        self._verdict_why = m["why"]
        return m["ok"], list(m["lost"])


    def _on_coordinator(self, hb: zmq.Socket, raw: bytes) -> None:
        try:
            m = decode_control(raw, ("state", "welcome", "retry", "error"))
        except WireError as e:
            log.warning("dropped an invalid message from the coordinator: %s", e)
            return
        if m["k"] == "state":
            if not m["known"]:
                # The coordinator restarted (or dropped us): register again with our id and the verdicts
                # we hold, so a verdict given before the restart cannot be decided differently after it.
                with contextlib.suppress(zmq.Again):
                    hb.send(self._join_frame(self._active, self._verdicts), flags=zmq.NOBLOCK)
                return
            if not m["recovering"]:
                ids = {x[0] for x in m["members"]}
                with self._cv:
                    self._live = ids
                    self._joiners = {j[0]: (j[1], j[2], j[3]) for j in m["joiners"]}
                    self._cv.notify_all()
                # snapshot requests from peers we did not know as joiners yet: judged on this fresh state
                deferred, self._deferred = self._deferred, []
                for frames in deferred:
                    self._on_peer_message(frames, deferred=True)
        elif m["k"] == "welcome":
            log.info("member %d re-registered with the coordinator (epoch %d)", self._id, m["epoch"])
        elif m["k"] == "error":
            log.warning("coordinator: %s", m["reason"])
