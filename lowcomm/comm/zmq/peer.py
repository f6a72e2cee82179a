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
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import math
import os
import random
import signal
import threading
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import zmq

from ..base import CommError, CommTimeout, Handle, OpRecord, PeerLost
from ..p2p import P2PTransport, _check_op, _dtype_groups, _write_back, shard_bounds
from .security import CurveConfig
from .state import flatten_state, global_state_hash, snapshot_hash, unflatten_state
from .wire import (
    WireError,
    check_payload,
    decode_control,
    decode_header,
    dtype_from_name,
    dtype_name,
    encode_control,
    encode_header,
)

__all__ = ["BadPayload", "ZmqTransport", "connect_zmq"]

log = logging.getLogger(__name__)
warnings.filterwarnings("ignore", message="The given buffer is not writable")

_FLOATS = {torch.float32, torch.float64, torch.float16, torch.bfloat16}


class BadPayload(CommError):
    """A peer sent data that cannot be used (NaN/Inf); ``sender`` names it."""

    def __init__(self, sender: int, message: str):
        self.sender = sender
        super().__init__(message)


@dataclass
class _Inbox:
    nparts: int
    parts: dict[int, tuple[str, tuple, int]] = field(default_factory=dict)  # pi -> (dtype, shape, nbytes)
    chunks: dict[tuple[int, int], zmq.Frame] = field(default_factory=dict)  # (pi, byte offset) -> frame
    got: dict[int, int] = field(default_factory=dict)

    def complete(self) -> bool:
        return len(self.parts) == self.nparts and all(self.got.get(p, 0) == n[2] for p, n in self.parts.items())


@dataclass
class _Snapshot:
    snap_id: int
    meta: bytes
    tensors: list[torch.Tensor]
    digest: str
    next_op: int
    sync: int


def _frame_tensor(frame: zmq.Frame | None, dtype: torch.dtype) -> torch.Tensor:
    """A tensor viewing a received frame's memory (no copy)."""
    if frame is None or len(frame) == 0:
        return torch.empty(0, dtype=dtype)
    return torch.frombuffer(frame.buffer, dtype=dtype)


def _bytes_of(t: torch.Tensor) -> torch.Tensor:
    return t.detach().contiguous().reshape(-1).view(torch.uint8)


def _nonfinite(t: torch.Tensor) -> bool:
    return t.dtype in _FLOATS and t.numel() > 0 and not bool(torch.isfinite(t).all())


class ZmqTransport(P2PTransport):
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
        fault: fault injection for tests: ``{"op": k, "after_messages": m, "signal": "KILL"|"STOP",
            "ledger_file": path}`` sends this process the signal during op ``k`` after ``m`` messages;
            ``{"serve_chunks": n}`` kills it after serving ``n`` snapshot chunks to a joiner.
    """

    def __init__(self, coordinator: str, *, bind: str = "tcp://127.0.0.1:*", announce: str | None = None,
                 timeout: float = 3600.0, progress_timeout: float = 30.0, heartbeat: float = 2.0,
                 join_timeout: float = 600.0, chunk_bytes: int = 4 << 20, curve: CurveConfig | None = None,
                 max_tensor_bytes: int = 1 << 36, max_snapshot_bytes: int = 1 << 38, fault: dict | None = None):
        super().__init__(timeout)
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
        self._peers: dict[int, tuple[str, str | None]] = {}  # id -> (address, public key)
        self._dealers: dict[int, zmq.Socket] = {}
        self._dealer_addr: dict[int, tuple] = {}
        self._req_lock = threading.Lock()
        self._req = self._coord_socket()
        self._verdicts: list[list] = []
        self._hashes: list[list] = []
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

    def _coord_socket(self) -> zmq.Socket:
        s = self._socket(zmq.DEALER)
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
            addr, pub = self._peers[peer]
            self._dealer_addr[peer] = (addr, pub)
            s = self._socket(zmq.DEALER)
            s.setsockopt(zmq.ROUTING_ID, b"m%d" % self._id)
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

    def _adopt(self, members: list[list]) -> list[int]:
        for mid, addr, pub in members:
            self._peers[mid] = (addr, pub)
        return sorted(m[0] for m in members)

    def _register(self, deadline: float) -> None:
        join = lambda: encode_control("join", id=self._id if self._id >= 0 else None, addr=self.address,  # noqa: E731
                                      pub=self._pub, active=False, next_op=self._seq, verdicts=[])
        while True:
            m = self._request(join(), lambda m: m["k"] in ("welcome", "retry"), deadline)
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
        hb = encode_control("hb", id=self._id, hashes=[])
        while True:
            st = self._request(hb, lambda m: m["k"] == "state", deadline)
            ids = self._adopt(st["members"])
            if st["started"] and self._id in ids:
                self._active, self._members, self._epoch = True, ids, st["epoch"]
                log.info("member %d: founding member of a run of %d (epoch %d)", self._id, len(ids), self._epoch)
                return
            if st["started"]:
                return
            time.sleep(min(0.1, self.heartbeat))

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
        st = self._request(encode_control("hb", id=self._id, hashes=list(self._hashes)),
                           lambda m: m["k"] == "state" and not m["recovering"], deadline)
        ids = self._adopt(st["members"])
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
            st = self._request(encode_control("hb", id=self._id, hashes=list(self._hashes)),
                               lambda m: m["k"] == "state", deadline)
            ids = self._adopt(st["members"])
            if predicate(ids):
                if self._active and self._id in ids:
                    self._members, self._epoch = ids, st["epoch"]
                return ids
            if time.monotonic() > deadline:
                raise CommTimeout([], f"membership did not reach the wanted state within {timeout}s: {ids}")
            time.sleep(0.05)

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
        with self._cv:
            self._floor = seq
            for key in [k for k in self._inbox if k[1] < seq]:
                del self._inbox[key]
            for op in [o for o in self._aborts if o < seq]:
                del self._aborts[op]
        members = group
        if barrier:
            try:
                members = self._barrier(seq, deadline)  # raises PeerLost([self]) if the run dropped us
            except CommError:
                rec.ok = False
                raise
            rec.participants = len(members)
        err: CommError | None = None
        result = None
        try:
            live = self._live
            gone = [p for p in members if live is not None and p not in live and p != self._id]
            if gone and not barrier:
                raise PeerLost(gone, f"{kind} #{seq}: member(s) {gone} are no longer in the run")
            result = body(seq, rec, members, deadline)
        except CommError as e:
            err = e
        ok, lost = self._commit((seq, "commit"), members, err is None, deadline)
        rec.ok = ok
        if not ok:
            if isinstance(err, PeerLost) and err.lost:
                lost = sorted(set(lost) | set(err.lost))
            raise PeerLost(lost, f"{kind} #{seq} failed: lost peer(s) {lost}" + (f" ({err})" if err else "")) from err
        return result() if callable(result) else result

    def _barrier(self, seq: int, deadline: float) -> list[int]:
        frame = encode_control("ready", id=self._id, op=seq)
        m = self._request(frame, lambda m: m["k"] in ("go", "drop") and m["op"] == seq, deadline)
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
        frame = encode_control("done", id=self._id, op=seq, group=group, ok=ok)
        m = self._request(frame, lambda m: m["k"] == "verdict" and m["op"] == seq, deadline)
        self._verdicts.append([seq, ",".join(map(str, group)), m["ok"]])
        del self._verdicts[:-64]
        return m["ok"], list(m["lost"])

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

    # ---- data plane -------------------------------------------------------------------------------
    def _send_chunk(self, sock: zmq.Socket, peer: int, op: int, tag: str, g: int, pi: int, nparts: int,
                    dname: str, shape: list, off: int, payload: torch.Tensor, rec: OpRecord,
                    codec: str | None = None) -> None:
        self._maybe_fault()
        hdr = encode_header("data", self._id, self._epoch, op, tag, g, pi, nparts, dname, shape, off, codec)
        buf = payload.numpy() if payload.numel() else b""
        start = time.monotonic()
        while True:
            try:
                sock.send_multipart([hdr, buf], copy=False, flags=zmq.NOBLOCK)
                break
            except zmq.Again:  # no connection to the peer (yet): wait, but not forever
                if time.monotonic() - start > self.progress_timeout:
                    raise PeerLost([peer], f"could not send to member {peer} for {self.progress_timeout:g}s") from None
                time.sleep(0.005)
        self.ledger.add(rec, peer, len(hdr) + payload.numel())
        self.header_bytes[rec.op_id] = self.header_bytes.get(rec.op_id, 0) + len(hdr)
        self._sent_in_op += 1

    def _send_parts(self, sock, peer, op, tag, g, parts, rec, codec=None) -> None:
        step = self.chunk_bytes
        for pi, t in enumerate(parts):
            b = _bytes_of(t)
            dname, shape = dtype_name(t.dtype), list(t.shape)
            n = b.numel()
            for off in range(0, max(n, 1), step):
                self._send_chunk(sock, peer, op, tag, g, pi, len(parts), dname, shape, off, b[off:off + step],
                                 rec, codec)

    def _send(self, peer: int, tag: tuple, parts: list[torch.Tensor], rec: OpRecord) -> None:
        op, name = tag[0], tag[1]
        g = tag[2] if len(tag) > 2 else 0
        # Codecs may return views of a scratch buffer that their next encode overwrites, while a
        # copy=False send reads the memory later: send a private copy.
        parts = [p.detach().clone() for p in parts]
        self._send_parts(self._dealer(peer), peer, op, name, g, parts, rec)

    def _wait(self, peer: int, key: tuple, ready, deadline: float) -> Any:
        """Wait (under the condition) until ``ready(inbox)`` returns non-None; progress-based deadline."""
        start = time.monotonic()
        op = key[1]
        with self._cv:
            while True:
                box = self._inbox.get(key)
                if box is not None:
                    got = ready(box)
                    if got is not None:
                        return got
                if op in self._aborts:
                    raise CommError(f"member {self._aborts[op]} aborted op {op}")
                live = self._live
                if live is not None and peer not in live:
                    raise PeerLost([peer], f"member {peer} left the run during op {op}")
                now = time.monotonic()
                idle = now - max(start, self._progress.get(peer, 0.0))
                if idle > self.progress_timeout:
                    raise CommTimeout([peer], f"no bytes from member {peer} for {self.progress_timeout:g}s "
                                              f"during op {op}")
                if now > deadline:
                    raise CommTimeout([peer], f"op {op} exceeded its {self.timeout:g}s limit")
                self._cv.wait(min(0.25, self.progress_timeout - idle + 0.01, max(0.01, deadline - now)))

    def _recv(self, peer: int, tag: tuple, deadline: float) -> list[torch.Tensor]:
        op, name = tag[0], tag[1]
        g = tag[2] if len(tag) > 2 else 0
        key = (peer, op, name, g)
        box = self._wait(peer, key, lambda b: b if b.complete() else None, deadline)
        with self._cv:
            self._inbox.pop(key, None)
        out = []
        for pi in range(box.nparts):
            dname, shape, nbytes = box.parts[pi]
            dtype = dtype_from_name(dname)
            chunks = sorted((off, fr) for (p, off), fr in box.chunks.items() if p == pi)
            if len(chunks) == 1:
                t = _frame_tensor(chunks[0][1], dtype)
            else:
                # Several chunks: assemble them in one buffer sized from the validated header.
                t = torch.empty(nbytes // max(1, torch.empty(0, dtype=dtype).element_size()), dtype=dtype)
                tb = t.view(torch.uint8)
                for off, fr in chunks:
                    tb[off:off + len(fr)].copy_(_frame_tensor(fr, torch.uint8))
            t = t.view(shape)
            if _nonfinite(t):
                raise BadPayload(peer, f"member {peer} sent NaN/Inf in op {op} ({name}); the sync fails")
            out.append(t)
        return out

    def _recv_chunk(self, peer: int, key: tuple, off: int, dtype: torch.dtype, deadline: float) -> torch.Tensor:
        def ready(box: _Inbox):
            return box.chunks.pop((0, off), None)
        frame = self._wait(peer, key, ready, deadline)
        return _frame_tensor(frame, dtype)

    def _scratch_buf(self, key: tuple, numel: int, dtype: torch.dtype) -> torch.Tensor:
        """A reused buffer (fresh memory costs ~5x a reused one here: first-touch page faults)."""
        buf = self._scratch.get(key)
        if buf is None or buf.numel() < numel or buf.dtype != dtype:
            buf = torch.empty(numel, dtype=dtype)
            self._scratch[key] = buf
        return buf[:numel]

    def all_reduce(self, tensors: Sequence[torch.Tensor], op: str = "mean", codec: Any = None) -> Handle:
        """As :meth:`P2PTransport.all_reduce`; without a codec, the flat copy lives in a reused buffer."""
        if codec is not None and getattr(codec, "name", codec) not in ("identity", "none"):
            return super().all_reduce(tensors, op=op, codec=codec)
        _check_op(op)
        tensors = list(tensors)
        members = self._members_or_raise()

        def body(seq, rec, members, deadline):
            me, w = members.index(self.rank), len(members)
            flats = []
            for gi, (dtype, idxs) in enumerate(_dtype_groups(tensors)):
                n = sum(tensors[i].numel() for i in idxs)
                flat = self._scratch_buf(("flat", gi), n, dtype)
                off = 0
                for i in idxs:
                    k = tensors[i].numel()
                    flat[off:off + k].copy_(tensors[i].detach().reshape(-1))
                    off += k
                self._reduce_scatter_gather(seq, rec, members, me, w, flat, op, deadline, gi)
                flats.append((flat, idxs))

            return _write_back(flats, tensors)

        return self._start("all_reduce", members, body)

    def _reduce_scatter_gather(self, seq, rec, members, me, w, flat, op, deadline, gi) -> None:
        """P2P's fp32 all-reduce, pipelined over chunks (same arithmetic, same order: same bits)."""
        n = flat.numel()
        esz = flat.element_size()
        dname = dtype_name(flat.dtype)
        ce = max(1, self.chunk_bytes // esz)
        bounds = shard_bounds(n, w)
        chunks = [[(a, min(a + ce, e)) for a in range(s, e, ce)] or [(s, s)] for s, e in bounds]
        socks = {j: self._dealer(p) for j, p in enumerate(members) if j != me}
        order = [(me + k) % w for k in range(1, w)]  # start with the next member, so owners get load evenly
        # reduce-scatter: my pieces of every other shard go to their owners, chunk by chunk
        for c in range(max(len(x) for x in chunks)):
            for j in order:
                if c < len(chunks[j]):
                    s, e = bounds[j]
                    a, b = chunks[j][c]
                    self._send_chunk(socks[j], members[j], seq, "rs", gi, 0, 1, dname, [e - s], (a - s) * esz,
                                     _bytes_of(flat[a:b]), rec)
        s, e = bounds[me]
        if flat.dtype == torch.float32:
            acc = self._scratch_buf(("acc", gi), e - s, torch.float32)
        rs_key = lambda p: (p, seq, "rs", gi)  # noqa: E731
        for a, b in chunks[me]:
            parts = []
            for j, peer in enumerate(members):
                if j == me:
                    x = flat[a:b]
                else:
                    x = self._recv_chunk(peer, rs_key(peer), (a - s) * esz, flat.dtype, deadline)
                    if x.numel() != b - a:
                        raise CommError(f"chunk from member {peer} has {x.numel()} elements, expected {b - a}")
                parts.append((peer, x))
            # ((x_0 + x_1) + x_2) + ... in fp32, as P2PTransport does, then / W and back to the dtype
            if flat.dtype == torch.float32:
                chunk_acc = acc[a - s:b - s]
                chunk_acc.copy_(parts[0][1])
            else:
                chunk_acc = parts[0][1].to(torch.float32, copy=True)
            for _, x in parts[1:]:
                chunk_acc.add_(x)
            if op == "mean":
                chunk_acc.div_(w)
            res = chunk_acc if flat.dtype == torch.float32 else chunk_acc.to(flat.dtype)
            if _nonfinite(res):
                bad = [p for p, x in parts if _nonfinite(x)]
                raise BadPayload(bad[0] if bad else self._id,
                                 f"NaN/Inf in the all-reduce of op {seq}: sent by member(s) {bad or [self._id]}")
            rb = _bytes_of(res)
            for j in order:
                self._send_chunk(socks[j], members[j], seq, "ag", gi, 0, 1, dname, [e - s], (a - s) * esz, rb, rec)
            flat[a:b].copy_(res)
        # all-gather: the owners' result chunks land in their place in ``flat``
        for c in range(max(len(x) for x in chunks)):
            for j in order:
                if c < len(chunks[j]):
                    s2, _ = bounds[j]
                    a, b = chunks[j][c]
                    x = self._recv_chunk(members[j], (members[j], seq, "ag", gi), (a - s2) * esz, flat.dtype,
                                         deadline)
                    if x.numel() != b - a:
                        raise CommError(f"result chunk from member {members[j]} has the wrong size")
                    if _nonfinite(x):
                        raise BadPayload(members[j], f"member {members[j]} sent NaN/Inf results in op {seq}")
                    flat[a:b].copy_(x)

    # ---- I/O thread -------------------------------------------------------------------------------
    def _io_loop(self) -> None:
        hb = self._coord_socket()
        poller = zmq.Poller()
        poller.register(self._router, zmq.POLLIN)
        poller.register(hb, zmq.POLLIN)
        next_hb = 0.0
        try:
            while not self._stop.is_set():
                now = time.monotonic()
                if now >= next_hb:
                    with contextlib.suppress(zmq.Again):
                        hb.send(encode_control("hb", id=self._id, hashes=list(self._hashes)), flags=zmq.NOBLOCK)
                    next_hb = now + self.heartbeat
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
                    hb.send(encode_control("join", id=self._id, addr=self.address, pub=self._pub, active=self._active,
                                           next_op=self._seq, verdicts=list(self._verdicts)), flags=zmq.NOBLOCK)
                return
            if not m["recovering"]:
                ids = {x[0] for x in m["members"]}
                with self._cv:
                    self._live = ids
                    self._cv.notify_all()
        elif m["k"] == "welcome":
            log.info("member %d re-registered with the coordinator (epoch %d)", self._id, m["epoch"])
        elif m["k"] == "error":
            log.warning("coordinator: %s", m["reason"])

    def _on_peer_message(self, frames: list[zmq.Frame]) -> None:
        rid = frames[0].bytes
        try:
            if len(frames) == 2:
                m = decode_control(frames[1].bytes, ("abort", "fetch"))
                if m["k"] == "abort":
                    if rid != b"m%d" % m["id"]:
                        raise WireError(f"abort claims member {m['id']} but came from {rid!r}")
                    with self._cv:
                        self._aborts.setdefault(m["op"], m["id"])
                        self._cv.notify_all()
                else:
                    self._serve(rid, m)
                return
            if len(frames) != 3:
                raise WireError(f"{len(frames) - 1} frames (a data message has 2, a control message 1)")
            h = decode_header(frames[1].bytes, self.max_tensor_bytes)
            payload = frames[2]
            check_payload(h, len(payload))
            if rid != b"m%d" % h.sender:
                raise WireError(f"header claims member {h.sender} but the connection is {rid!r}")
            if self.curve is not None:
                pub = self._peers.get(h.sender, (None, None))[1]
                user = payload.get("User-Id")
                if pub is None or user != pub:
                    raise WireError(f"member {h.sender}'s CURVE key does not match the one it registered")
            with self._cv:
                if h.op < self._floor:
                    return  # a late chunk of an operation that is over
                key = (h.sender, h.op, h.tag, h.group)
                box = self._inbox.get(key)
                if box is None:
                    box = self._inbox[key] = _Inbox(h.nparts)
                desc = (h.dtype, h.shape, h.nbytes)
                if box.nparts != h.nparts or box.parts.setdefault(h.part, desc) != desc:
                    raise WireError(f"chunk of op {h.op} disagrees with earlier chunks of the same message")
                if (h.part, h.offset) in box.chunks or box.got.get(h.part, 0) + len(payload) > h.nbytes:
                    raise WireError(f"duplicate chunk at offset {h.offset} of op {h.op}")
                box.chunks[(h.part, h.offset)] = payload
                box.got[h.part] = box.got.get(h.part, 0) + len(payload)
                self._progress[h.sender] = time.monotonic()
                self._cv.notify_all()
        except WireError as e:
            self.dropped_invalid += 1
            key = ""
            if self.curve is not None:
                with contextlib.suppress(zmq.ZMQError):
                    key = f" (CURVE key {frames[-1].get('User-Id')})"
            log.warning("member %d dropped an invalid message from %r%s: %s", self._id, rid, key, e)

    # ---- joining: snapshots -------------------------------------------------------------------------
    def attach(self, model: torch.nn.Module, optimizer: Any, *, verify_global: bool = True,
               timeout: float | None = None) -> None:
        """Tie this transport to the training state it syncs.

        A member of the run snapshots ``model`` and ``optimizer`` after every committed sync
        and serves them to joining peers. A peer that joined a run under way fetches a snapshot
        from a live donor now (another donor if one dies mid-transfer), checks it, loads it and
        takes part from the next operation. ``verify_global`` also checks the global parameters,
        outer state and counters against the hash all members agree on (DiLoCo, Streaming
        DiLoCo); pass False for strategies whose members legitimately differ (NoLoCo).
        """
        if not hasattr(model, "state_dict") or not hasattr(optimizer, "state_dict"):
            raise ValueError("attach(model, optimizer) needs a torch.nn.Module and a lowcomm optimizer")
        self._model, self._opt = model, optimizer
        self._verify_global = verify_global
        if self._active:
            self._take_snapshot()
        else:
            self._rejoin(timeout)

    def on_sync_applied(self, optimizer: Any) -> None:
        if self._model is None or optimizer is not self._opt:
            return
        h = global_state_hash(optimizer)
        if h is not None:
            self._hashes.append([int(optimizer.sync_count), h])
            del self._hashes[:-8]
        with self._cv:
            busy = self._inflight > 0
        if not busy:  # a snapshot is only consistent with no operation in flight
            self._take_snapshot()

    def _take_snapshot(self) -> None:
        state = {"model": self._model.state_dict(), "opt": self._opt.state_dict()}
        meta, tensors = flatten_state(state)
        tensors = [t.detach().clone() for t in tensors]
        sync = int(getattr(self._opt, "sync_count", 0))
        snap = _Snapshot(random.getrandbits(48), meta, tensors, snapshot_hash(meta, tensors), self._seq, sync)
        with self._cv:
            self._snaps[snap.snap_id] = snap
            for k in sorted(self._snaps, key=lambda k: self._snaps[k].sync)[:-2]:
                del self._snaps[k]
            self._latest = snap.snap_id

    def _serve(self, rid: bytes, m: dict) -> None:
        """Answer a joiner's fetch (I/O thread): metadata, or every chunk of one tensor."""
        with self._cv:
            snap = self._snaps.get(m["snap"] if m["snap"] is not None else getattr(self, "_latest", -1))
        if snap is None:
            self._router.send_multipart([rid, encode_control("nosnap", reason="no snapshot (yet)")])
            return
        if m["tensor"] < 0:
            desc = [[dtype_name(t.dtype), list(t.shape)] for t in snap.tensors]
            self._router.send_multipart([rid, encode_control("snap", snap=snap.snap_id, meta=snap.meta, tensors=desc,
                                                             hash=snap.digest, next_op=snap.next_op,
                                                             sync=snap.sync)])
            return
        i = m["tensor"]
        if i >= len(snap.tensors):
            self._router.send_multipart([rid, encode_control("nosnap", reason=f"no tensor {i}")])
            return
        t = snap.tensors[i]
        b = _bytes_of(t)
        for off in range(0, max(b.numel(), 1), self.chunk_bytes):
            limit = self.fault.get("serve_chunks")
            if limit is not None and self._served_chunks >= limit:
                log.warning("fault injection: donor %d dies after serving %d snapshot chunks", self._id, limit)
                os.kill(os.getpid(), signal.SIGKILL)
            piece = b[off:off + self.chunk_bytes]
            hdr = encode_header("data", self._id, self._epoch, snap.snap_id, "snap", 0, i, len(snap.tensors),
                                dtype_name(t.dtype), list(t.shape), off)
            self._router.send_multipart([rid, hdr, piece.numpy() if piece.numel() else b""], copy=False)
            self._served_chunks += 1

    def _fetch_from(self, donor: int, deadline: float) -> tuple[_Snapshot, dict]:
        addr, pub = self._peers[donor]
        s = self._socket(zmq.DEALER)
        s.setsockopt(zmq.ROUTING_ID, b"f%d-%x" % (self._id, random.getrandbits(32)))
        if self.curve is not None:
            self.curve.make_client(s, pub.encode())
        s.connect(addr)
        poller = zmq.Poller()
        poller.register(s, zmq.POLLIN)

        def recv(what: str):
            last = time.monotonic()
            while True:
                if poller.poll(100):
                    return s.recv_multipart(copy=False)
                now = time.monotonic()
                if now - last > self.progress_timeout or now > deadline:
                    raise CommTimeout([donor], f"donor {donor} sent nothing for {self.progress_timeout:g}s "
                                               f"while sending {what}")
        try:
            s.send(encode_control("fetch", id=self._id, snap=None, tensor=-1), flags=zmq.NOBLOCK)
            frames = recv("snapshot metadata")
            m = decode_control(frames[0].bytes, ("snap", "nosnap"))
            if m["k"] == "nosnap":
                raise CommError(f"donor {donor} has no snapshot: {m['reason']}")
            descs = m["tensors"]
            total = sum(math.prod(shape) * torch.empty(0, dtype=dtype_from_name(d)).element_size()
                        for d, shape in descs)
            if total > self.max_snapshot_bytes:
                raise WireError(f"donor {donor} announces a {total}-byte snapshot, over the "
                                f"{self.max_snapshot_bytes}-byte limit")
            # dtypes and shapes were validated by decode_control; sizes just above
            tensors = [torch.empty(shape, dtype=dtype_from_name(d)) for d, shape in descs]
            window = 8
            requested = 0
            done = 0
            got = [0] * len(tensors)
            need = [t.numel() * t.element_size() for t in tensors]
            while done < len(tensors):
                while requested < len(tensors) and requested - done < window:
                    s.send(encode_control("fetch", id=self._id, snap=m["snap"], tensor=requested), flags=zmq.NOBLOCK)
                    requested += 1
                frames = recv(f"tensor {done}")
                if len(frames) == 1:
                    c = decode_control(frames[0].bytes, ("nosnap",))
                    raise CommError(f"donor {donor} stopped serving: {c['reason']}")
                if len(frames) != 2:
                    raise WireError(f"donor {donor} sent a {len(frames)}-frame message")
                h = decode_header(frames[0].bytes, max(need) if need else 0)
                check_payload(h, len(frames[1]))
                i = h.part
                if h.op != m["snap"] or h.tag != "snap" or h.nparts != len(tensors) or \
                        (h.dtype, list(h.shape)) != (descs[i][0], list(descs[i][1])):
                    raise WireError(f"donor {donor} sent a chunk that does not match its snapshot")
                if need[i]:
                    _bytes_of(tensors[i])[h.offset:h.offset + len(frames[1])].copy_(
                        _frame_tensor(frames[1], torch.uint8))
                got[i] += len(frames[1])
                while done < len(tensors) and got[done] >= need[done]:
                    done += 1
            digest = snapshot_hash(m["meta"], tensors)
            if digest != m["hash"]:
                raise CommError(f"snapshot from donor {donor} does not match the donor's hash")
            return _Snapshot(m["snap"], m["meta"], tensors, digest, m["next_op"], m["sync"]), m
        finally:
            s.close(0)

    def _rejoin(self, timeout: float | None = None) -> None:
        deadline = time.monotonic() + (timeout or self.join_timeout)
        # (Re-)register as a pending member.
        self._request(encode_control("join", id=self._id, addr=self.address, pub=self._pub, active=False,
                                     next_op=self._seq, verdicts=list(self._verdicts)),
                      lambda m: m["k"] == "welcome", deadline)
        tried: list[int] = []
        for attempt in itertools.count():
            if time.monotonic() > deadline:
                raise CommTimeout([], f"member {self._id} could not fetch a snapshot within the join timeout")
            st = self._request(encode_control("hb", id=self._id, hashes=[]), lambda m: m["k"] == "state", deadline)
            donors = [i for i in self._adopt(st["members"]) if i != self._id]
            if not donors:
                time.sleep(0.2)
                continue
            fresh = [d for d in donors if d not in tried] or donors
            donor = fresh[0]
            tried.append(donor)
            try:
                snap, _ = self._fetch_from(donor, deadline)
                state = unflatten_state(snap.meta, snap.tensors)
                self._model.load_state_dict(state["model"])
                self._opt.load_state_dict(state["opt"])
                if self._verify_global:
                    self._verify(snap.sync, donor, deadline)
            except (CommError, WireError, ValueError, KeyError, TypeError, zmq.ZMQError) as e:
                log.warning("member %d: snapshot from donor %d failed (%s); trying another donor", self._id, donor, e)
                continue
            self._seq = snap.next_op
            a = self._request(encode_control("activate", id=self._id, next_op=snap.next_op),
                              lambda m: m["k"] in ("state", "drop"), deadline)
            if a["k"] == "drop":
                log.info("member %d: %s; fetching again", self._id, a["reason"])
                tried.clear()
                continue
            self._active = True
            self._members = self._adopt(a["members"])
            self._epoch = a["epoch"]
            self._take_snapshot()
            log.info("member %d joined from donor %d's snapshot at sync %d (attempt %d); takes part from op %d",
                     self._id, donor, snap.sync, attempt + 1, snap.next_op)
            return

    def _verify(self, sync: int, donor: int, deadline: float) -> None:
        mine = global_state_hash(self._opt)
        if mine is None:
            return
        while True:
            a = self._request(encode_control("query", id=self._id, sync=sync), lambda m: m["k"] == "answer",
                              deadline)
            if a["agreed"]:
                break
            if time.monotonic() > deadline:
                raise CommTimeout([], f"the members never agreed on a hash for sync {sync}")
            time.sleep(min(0.2, self.heartbeat))
        if a["hash"] != mine:
            raise CommError(f"donor {donor}'s global state at sync {sync} differs from what the members agree on")

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
