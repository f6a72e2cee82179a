"""The ZeroMQ peer transport: tensors move directly between peers; a coordinator keeps membership.

Sockets (one :class:`zmq.Context` per transport):

* one **ROUTER** bound at ``bind`` (others dial the *announced* address, which may differ,
  e.g. behind port forwarding); all incoming data, aborts and snapshot requests arrive here.
  A background I/O thread owns it: it validates every message (:mod:`.wire`), drops and
  logs invalid ones with their sender, files data chunks into per-(sender, op, tag) inboxes
  as zero-copy frames, and serves snapshots to joining peers.
* one **DEALER** per remote peer, used only by the communication thread, sending chunks of
  at most ``chunk_bytes`` (~4 MiB) straight from tensor memory (``copy=False``).
* two DEALERs to the coordinator: one for heartbeats (I/O thread) and one for requests
  (barrier, commit, activation; serialised by a lock, retried, since requests are idempotent).

Collectives are those of :class:`~lowcomm.comm.p2p.P2PTransport`, so every operation does
the same arithmetic in the same order as the local transport and the simulator: results are
bit-identical to a local run. The fp32 (and bf16/fp16) all-reduce is pipelined over chunks:
each peer sends its pieces of every shard to the shard's owner chunk by chunk, the owner
sums chunk ``c`` in member order as soon as all contributions of ``c`` arrived and sends the
result chunk on at once, so reduce-scatter and all-gather overlap. Each peer sends
``2 (W-1)/W`` of the tensor, as in a ring, but over direct links.

An operation: (1) a sync-start barrier at the coordinator returns the op's member list
(members that missed it catch up from a snapshot, and are dropped after ``max_misses`` misses
in a row); (2) the data exchange, where a wait fails only when
no bytes arrived from the awaited peer for ``progress_timeout`` seconds (a slow link is not a
dead peer), when the coordinator drops that peer, or when a peer reports that it aborted;
(3) a commit round at the coordinator: every participant gets the same verdict, and results
reach the caller's tensors only if committed.

Joining: a peer that arrives after the run started is a world of one until
:meth:`ZmqTransport.attach` fetches a snapshot (model and optimizer state at the donor's last
committed sync) from a live donor, checks it against the donor's hash and the hash of the
global state that the members agree on, loads it and activates from the next operation.

Layout: this module holds the transport, its sockets, membership, barriers and commits;
:mod:`.dataplane` the data plane (sends, inboxes, the pipelined all-reduce) and
:mod:`.snapshots` serving and fetching snapshots. Both are mixins of :class:`ZmqTransport`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import secrets
import signal
import threading
import time
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import zmq

from ..base import CommError, Handle, PeerLost, check_stats
from ..p2p import P2PTransport
from .coordinator_book import TOKEN_BYTES
from .dataplane import BadPayload, DataPlane, _Inbox
from .membership import Membership
from .security import CurveConfig, Rejects, check_insecure
from .snapshots import Snapshots, _Snapshot
from .wire import RID_BYTES, encode_control

__all__ = ["BadPayload", "ZmqTransport", "connect_zmq"]

log = logging.getLogger(__name__)
warnings.filterwarnings("ignore", message="The given buffer is not writable")


class ZmqTransport(Membership, DataPlane, Snapshots, P2PTransport):
    """A peer of a ZeroMQ run (see the module docstring). Build it with :func:`connect_zmq`.

    Args:
        coordinator: the coordinator's endpoint, e.g. ``tcp://10.0.0.1:5555``.
        bind: where this peer's ROUTER listens (``tcp://0.0.0.0:7000``; port ``*`` picks one).
        announce: the address others dial to reach this peer (default: the bound address).
        timeout: hard cap in seconds on one operation (waits are otherwise progress-based).
        progress_timeout: seconds without a byte from an awaited peer before it counts as lost.
        heartbeat: seconds between heartbeats to the coordinator.
        join_timeout: seconds to wait for the run to start (or for a snapshot, when joining).
        chunk_bytes: largest payload frame; bigger tensors travel in chunks of this size.
        curve: a :class:`~lowcomm.comm.zmq.security.CurveConfig` for encryption and authentication.
        max_tensor_bytes: largest tensor a peer may declare in a header (checked before allocating).
        max_snapshot_bytes: largest snapshot a joiner accepts from a donor.
        insecure: allow a non-loopback ``bind`` or ``announce`` without CURVE (only on a trusted network).
        fault: fault injection for tests: ``{"op": k, "after_messages": m, "signal": "KILL"|"STOP",
            "ledger_file": path}`` sends this process the signal during op ``k`` after ``m`` messages;
            ``{"serve_chunks": n}`` kills it after serving ``n`` snapshot chunks to a joiner.
    """

    def __init__(self, coordinator: str, *, bind: str = "tcp://127.0.0.1:*", announce: str | None = None,
                 timeout: float = 3600.0, progress_timeout: float = 30.0, heartbeat: float = 2.0,
                 join_timeout: float = 600.0, chunk_bytes: int = 4 << 20, curve: CurveConfig | None = None,
                 max_tensor_bytes: int = 1 << 36, max_snapshot_bytes: int = 1 << 38, fault: dict | None = None,
                 insecure: bool = False):
        super().__init__(timeout)
        check_insecure("peer", [bind, announce], curve, insecure)
        for name, v in (("progress_timeout", progress_timeout), ("heartbeat", heartbeat),
                        ("join_timeout", join_timeout)):
            if not v or v <= 0:
                raise ValueError(f"{name} must be a positive number of seconds, got {v!r}")
        if not isinstance(chunk_bytes, int) or chunk_bytes < 1024:
            raise ValueError(f"chunk_bytes must be an integer >= 1024 (about 4 MiB is a good size), "
                             f"got {chunk_bytes!r}")
        if not isinstance(coordinator, str) or "://" not in coordinator:
            raise ValueError(f"coordinator must be a ZeroMQ endpoint like tcp://HOST:PORT, got {coordinator!r}")
        self.coordinator = coordinator
        self.progress_timeout = float(progress_timeout)
        self.heartbeat = float(heartbeat)
        self.join_timeout = float(join_timeout)
        self.chunk_bytes = chunk_bytes - chunk_bytes % 8
        self.max_frame = self.chunk_bytes + 65536
        self.max_tensor_bytes = int(max_tensor_bytes)
        self.max_snapshot_bytes = int(max_snapshot_bytes)
        self.curve = curve
        self.fault = dict(fault or {})
        self.dropped_invalid = 0
        self.rejects = Rejects(log)
        # Identities: the routing id of our data connections (registered with the coordinator, which
        # lists it; others accept our data only from it) and the secret token of our coordinator
        # connections (without CURVE, what the coordinator knows us by). Both random.
        self._rid = secrets.token_bytes(RID_BYTES)
        self._token = secrets.token_bytes(TOKEN_BYTES)
        self.header_bytes: dict[int, int] = {}  # ledger op id -> header bytes among its bytes_sent

        self.ctx = zmq.Context()
        self._auth = curve.start_authenticator(self.ctx) if curve is not None else None
        self._router = self._socket(zmq.ROUTER)
        if curve is not None:
            curve.make_server(self._router)
        self._router.bind(bind)
        bound = self._router.getsockopt_string(zmq.LAST_ENDPOINT)
        self.address = announce or bound
        self._pub = curve.public.decode() if curve is not None else None

        self._cv = threading.Condition()
        self._inbox: dict[tuple, _Inbox] = {}
        self._aborts: dict[int, int] = {}
        self._progress: dict[int, float] = {}
        self._floor = 0
        self._live: set[int] | None = None
        self._peers: dict[int, tuple[str, str | None, bytes]] = {}  # id -> (address, public key, routing id)
        self._joiners: dict[int, tuple[str, str | None, bytes]] = {}  # admitted joiners (may fetch snapshots)
        self._groups: dict[int, set[int]] = {}  # op -> its members, once this peer started it
        self._held: dict[int, list[int]] = {}  # sender -> [bytes, chunks] waiting in inboxes
        self._rx: dict[tuple[int, int], int] = {}  # (sender, op) -> bytes received
        self._deferred: list = []  # snapshot requests waiting for the next state from the coordinator
        self._next_hb = 0.0
        self._expect = 0  # most bytes one sender sent us in one op so far (sizes the future-op quota)
        self._own_bytes = 0  # the attached model's size in fp32 (ditto)
        self._last_from: int | None = None  # whose parts the op body used last (named if they are malformed)
        self._resync = False
        self._dealers: dict[int, zmq.Socket] = {}
        self._dealer_addr: dict[int, tuple] = {}
        self._req_lock = threading.Lock()
        self._req = self._coord_socket(b"r")
        self._verdicts: list[list] = []
        self._hashes: list[list] = []
        self._stats: dict[str, float] = {}  # the training loop's latest figures, sent with each heartbeat
        self._snaps: dict[int, _Snapshot] = {}
        self._scratch: dict[tuple, torch.Tensor] = {}
        self._model = None
        self._opt = None
        self._inflight = 0
        self._sent_in_op = 0
        self._cur_seq = -1
        self._served_chunks = 0
        self._stop = threading.Event()
        self._id = -1
        self._active = False
        self._members: list[int] = []
        self._epoch = 0

        try:
            self._register(time.monotonic() + self.join_timeout)
        except BaseException:
            self._close_sockets()
            raise
        if "member" in self.fault and self.fault["member"] != self._id:
            self.fault = {}  # fault injection aimed at another member id
        self._io = threading.Thread(target=self._io_loop, name="lowcomm-zmq-io", daemon=True)
        self._io.start()

    # ---- sockets ---------------------------------------------------------------------------------
    def _socket(self, kind: int) -> zmq.Socket:
        s = self.ctx.socket(kind)
        s.setsockopt(zmq.LINGER, 0)
        s.setsockopt(zmq.MAXMSGSIZE, self.max_frame)
        # No high-water marks: a ROUTER that hits one silently drops messages, which would turn
        # into a spurious timeout. Queued sends reference tensor memory (copy=False), not copies.
        s.setsockopt(zmq.SNDHWM, 0)
        s.setsockopt(zmq.RCVHWM, 0)
        return s

    def _coord_socket(self, suffix: bytes) -> zmq.Socket:
        s = self._socket(zmq.DEALER)
        s.setsockopt(zmq.ROUTING_ID, self._token + suffix)
        if self.curve is not None:
            if self.curve.coordinator_public is None:
                raise ValueError("with CURVE on, pass the coordinator's public key (server_key)")
            self.curve.make_client(s, self.curve.coordinator_public)
        s.connect(self.coordinator)
        return s

    def _dealer(self, peer: int) -> zmq.Socket:
        s = self._dealers.get(peer)
        if s is not None and self._dealer_addr.get(peer) != self._peers.get(peer):
            self._close_dealer(peer)  # the member re-registered from somewhere else
            s = None
        if s is None:
            if peer not in self._peers:
                raise PeerLost([peer], f"no address known for member {peer}")
            addr, pub, _ = self._peers[peer]
            self._dealer_addr[peer] = self._peers[peer]
            s = self._socket(zmq.DEALER)
            if self.curve is None:
                # Without CURVE our registered routing id is how others know our data. With CURVE the key
                # is (and the ROUTER picks the routing id, so nobody can squat ours).
                s.setsockopt(zmq.ROUTING_ID, self._rid)
            if self.curve is not None:
                if not pub:
                    raise PeerLost([peer], f"member {peer} announced no CURVE public key")
                self.curve.make_client(s, pub.encode())
            s.connect(addr)
            self._dealers[peer] = s
        return s

    def _close_dealer(self, peer: int) -> None:
        s = self._dealers.pop(peer, None)
        if s is not None:
            s.close(0)

    # ---- operation plumbing ----------------------------------------------------------------------
    def _start(self, kind: str, participants: Sequence[int], body, tag: str = "") -> Handle:
        seq = self._seq
        self._seq += 1
        barrier = self._active and kind != "group_reduce"
        group = list(participants)
        rec = self.ledger.begin(kind, len(group), tag)
        with self._cv:
            self._inflight += 1

        def run() -> Any:
            try:
                return self._run(seq, kind, group, body, rec, barrier)
            finally:
                with self._cv:
                    self._inflight -= 1

        return Handle(self._executor.submit(run), rec, self.timeout + 30.0)

    def _run(self, seq, kind, group, body, rec, barrier) -> Any:
        deadline = time.monotonic() + self.timeout
        self._on_op_start(seq)
        self._advance_floor(seq)
        members = group
        if barrier:
            try:
                members = self._barrier(seq, deadline)  # raises PeerLost([self]) if the run dropped us
            except CommError:
                rec.ok = False
                raise
            rec.participants = len(members)
        with self._cv:
            self._groups[seq] = set(members)
        err: CommError | None = None
        result = None
        self._last_from = None
        try:
            live = self._live
            gone = [p for p in members if live is not None and p not in live and p != self._id]
            if gone and not barrier:
                raise PeerLost(gone, f"{kind} #{seq}: member(s) {gone} are no longer in the run")
            result = body(seq, rec, members, deadline)
        except CommError as e:
            err = e
        except (ValueError, RuntimeError, IndexError, TypeError, KeyError) as e:
            # A payload that passed the wire checks but not the codec's or the strategy's: the sender
            # whose parts were being used is named; the op is voted down and rolled back everywhere.
            who = self._last_from
            err = BadPayload(who if who is not None else self._id,
                             f"{kind} #{seq}: the payload from member {who} is malformed: {type(e).__name__}: {e}")
        self._op_error, self._verdict_why = err, ""
        ok, lost = self._commit((seq, "commit"), members, err is None, deadline)
        rec.ok = ok
        if ok and err is not None:
            # The others committed an op whose result this peer does not have: never return silently.
            self._resync = True
            raise CommError(f"{kind} #{seq}: the run committed it but this member's part failed ({err}); "
                            f"it rolls back and re-syncs from a snapshot") from err
        if not ok:
            if isinstance(err, PeerLost) and err.lost:
                lost = sorted(set(lost) | set(err.lost))
            why = f"; {self._verdict_why}" if self._verdict_why and err is None else ""
            raise PeerLost(lost, f"{kind} #{seq} failed: lost peer(s) {lost}" + (f" ({err})" if err else "")
                           + why) from err
        return result() if callable(result) else result

    def _advance_floor(self, seq: int) -> None:
        """Operation ``seq`` starts: forget everything about earlier ones (inboxes, aborts, groups, quotas)."""
        with self._cv:
            self._floor = seq
            for key in [k for k in self._inbox if k[1] < seq]:
                self._drop_box(key)
            for op in [o for o in self._aborts if o < seq]:
                del self._aborts[op]
            for op in [o for o in self._groups if o < seq]:
                del self._groups[op]
            for k in [k for k in self._rx if k[1] < seq]:
                self._expect = max(self._expect, self._rx.pop(k))

    def _on_op_start(self, seq: int) -> None:
        self._cur_seq = seq
        self._sent_in_op = 0

    def _maybe_fault(self) -> None:
        f = self.fault
        if f.get("op") is not None and self._cur_seq == f["op"] and self._sent_in_op >= f.get("after_messages", 0):
            if f.get("ledger_file"):
                recs = [r.__dict__ for r in self.ledger.records]
                # atomic: whoever waits for this file must never read it half-written
                with open(f["ledger_file"] + ".tmp", "w") as fh:
                    json.dump({"member": self._id, "records": recs}, fh, default=str)
                os.replace(f["ledger_file"] + ".tmp", f["ledger_file"])
            sig = signal.SIGSTOP if f.get("signal") == "STOP" else signal.SIGKILL
            log.warning("fault injection: member %d sends itself %s in op %d after %d messages",
                        self._id, sig.name, self._cur_seq, self._sent_in_op)
            os.kill(os.getpid(), sig)

    def report_stats(self, stats: Mapping[str, float]) -> None:
        """The training loop's figures; the next heartbeats carry them (with the bytes this peer sent)."""
        self._stats = {**self._stats, **check_stats(stats)}

    def _hb_frame(self) -> bytes:
        stats = {**self._stats, "bytes_sent": int(self.ledger.bytes_sent)}
        return encode_control("hb", id=self._id, hashes=list(self._hashes), stats=stats)

    # ---- data plane -------------------------------------------------------------------------------
    def _io_loop(self) -> None:
        hb = self._coord_socket(b"h")
        poller = zmq.Poller()
        poller.register(self._router, zmq.POLLIN)
        poller.register(hb, zmq.POLLIN)
        self._next_hb = 0.0
        try:
            while not self._stop.is_set():
                now = time.monotonic()
                if now >= self._next_hb:
                    with contextlib.suppress(zmq.Again):
                        hb.send(self._hb_frame(), flags=zmq.NOBLOCK)
                    self._next_hb = now + self.heartbeat
                events = dict(poller.poll(int(1000 * min(0.1, self.heartbeat / 2))))
                if self._router in events:
                    for _ in range(256):
                        try:
                            frames = self._router.recv_multipart(zmq.NOBLOCK, copy=False)
                        except zmq.Again:
                            break
                        self._on_peer_message(frames)
                if hb in events:
                    while True:
                        try:
                            raw = hb.recv(zmq.NOBLOCK)
                        except zmq.Again:
                            break
                        self._on_coordinator(hb, raw)
        except zmq.ZMQError as e:
            if not self._stop.is_set():
                log.error("I/O thread of member %d stopped: %s", self._id, e)
        finally:
            hb.close(0)

    # ---- shutdown -----------------------------------------------------------------------------------
    def _close_sockets(self) -> None:
        for p in list(self._dealers):
            self._close_dealer(p)
        self._req.close(0)
        self._router.close(0)
        if self._auth is not None:
            self._auth.stop()
            self._auth = None
        self.ctx.term()

    def close(self, leave: bool = True) -> None:
        """Leave the run (tell the coordinator) and release sockets and threads."""
        if self._stop.is_set():
            return
        if leave and self._id >= 0:
            try:
                with self._req_lock:
                    self._req.send(encode_control("leave", id=self._id), flags=zmq.NOBLOCK)
            except zmq.ZMQError:
                pass
        super().close()
        self._executor.shutdown(wait=True, cancel_futures=True)
        self._stop.set()
        self._io.join(5.0)
        self._req.setsockopt(zmq.LINGER, 500)
        self._close_sockets()


def connect_zmq(address: str | None = None, **kwargs: Any) -> ZmqTransport:
    """A :class:`ZmqTransport` for the coordinator at ``address`` (default ``$LOWCOMM_COORDINATOR``).

    Environment (keyword arguments win): ``LOWCOMM_BIND``, ``LOWCOMM_ANNOUNCE``, and for CURVE
    ``LOWCOMM_CURVE_SECRET`` (this peer's ``.key_secret``), ``LOWCOMM_CURVE_ALLOW`` (directory of
    allowed public keys) and ``LOWCOMM_COORDINATOR_KEY`` (the coordinator's public key or ``.key``).
    """
    address = address or os.environ.get("LOWCOMM_COORDINATOR")
    if not address:
        raise ValueError("pass the coordinator address (tcp://HOST:PORT) or set LOWCOMM_COORDINATOR")
    env = os.environ
    if "bind" not in kwargs and env.get("LOWCOMM_BIND"):
        kwargs["bind"] = env["LOWCOMM_BIND"]
    if "announce" not in kwargs and env.get("LOWCOMM_ANNOUNCE"):
        kwargs["announce"] = env["LOWCOMM_ANNOUNCE"]
    if "curve" not in kwargs and env.get("LOWCOMM_CURVE_SECRET"):
        if not env.get("LOWCOMM_CURVE_ALLOW") or not env.get("LOWCOMM_COORDINATOR_KEY"):
            raise ValueError("with LOWCOMM_CURVE_SECRET set, also set LOWCOMM_CURVE_ALLOW (directory of allowed "
                             "public keys) and LOWCOMM_COORDINATOR_KEY (the coordinator's public key)")
        kwargs["curve"] = CurveConfig(env["LOWCOMM_CURVE_SECRET"], env["LOWCOMM_CURVE_ALLOW"],
                                      env["LOWCOMM_COORDINATOR_KEY"])
    return ZmqTransport(address, **kwargs)
