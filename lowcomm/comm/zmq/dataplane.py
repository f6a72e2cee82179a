"""The data plane of a ZeroMQ peer: chunked sends straight from tensor memory, per-(sender, op, tag)
inboxes filled by the I/O thread, progress-based waits, and the pipelined fp32 all-reduce.

:class:`DataPlane` is a mixin of :class:`~lowcomm.comm.zmq.peer.ZmqTransport`; it uses the
transport's sockets, condition variable and membership, and is not used on its own.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import zmq

from ..base import BadPayload, CommError, CommTimeout, Handle, OpRecord, PeerLost
from ..p2p import _check_op, _dtype_groups, _write_back, shard_bounds
from ..reduce import reduce_in_member_order
from .wire import (
    RID_BYTES,
    WireError,
    check_payload,
    decode_control,
    decode_header,
    dtype_from_name,
    dtype_name,
    encode_header,
)

__all__ = ["BadPayload", "DataPlane"]

log = logging.getLogger(__name__)

_FLOATS = {torch.float32, torch.float64, torch.float16, torch.bfloat16}

@dataclass
class _Inbox:
    nparts: int
    parts: dict[int, tuple[str, tuple, int]] = field(default_factory=dict)  # pi -> (dtype, shape, nbytes)
    chunks: dict[tuple[int, int], zmq.Frame] = field(default_factory=dict)  # (pi, byte offset) -> frame
    got: dict[int, int] = field(default_factory=dict)

    def complete(self) -> bool:
        return len(self.parts) == self.nparts and all(self.got.get(p, 0) == n[2] for p, n in self.parts.items())



def _frame_tensor(frame: zmq.Frame | None, dtype: torch.dtype) -> torch.Tensor:
    """A tensor viewing a received frame's memory (no copy)."""
    if frame is None or len(frame) == 0:
        return torch.empty(0, dtype=dtype)
    return torch.frombuffer(frame.buffer, dtype=dtype)


def _bytes_of(t: torch.Tensor) -> torch.Tensor:
    return t.detach().contiguous().reshape(-1).view(torch.uint8)


def _nonfinite(t: torch.Tensor) -> bool:
    return t.dtype in _FLOATS and t.numel() > 0 and not bool(torch.isfinite(t).all())


def _culprits(parts: list[tuple[int, torch.Tensor]], w: int) -> list[int]:
    """Who made a sum of ``w`` contributions non-finite: senders of NaN/Inf, else (an overflow) the senders
    of values above ``max / w``: if every value were at most that, the sum could not overflow."""
    bad = [p for p, x in parts if _nonfinite(x)]
    if bad:
        return bad
    big = torch.finfo(torch.float32).max / w
    return [p for p, x in parts if x.numel() and float(x.detach().abs().max()) > big]



class DataPlane:
    """Sending, receiving and reducing tensors (a mixin of ZmqTransport)."""

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
            self._drop_box(key)
        self._last_from = peer
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
            fr = box.chunks.pop((0, off), None)
            if fr is not None:
                self._release(peer, len(fr), 1)
            return fr
        frame = self._wait(peer, key, ready, deadline)
        self._last_from = peer
        return _frame_tensor(frame, dtype)

    # ---- quotas: what a sender may make us hold (called under the condition) ----------------------
    def _release(self, sender: int, nbytes: int, chunks: int) -> None:
        held = self._held.get(sender)
        if held is not None:
            held[0] -= nbytes
            held[1] -= chunks
            if held[1] <= 0:
                del self._held[sender]

    def _drop_box(self, key: tuple) -> None:
        box = self._inbox.pop(key, None)
        if box is not None:
            self._release(key[0], sum(len(f) for f in box.chunks.values()), len(box.chunks))

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
            # ((x_0 + x_1) + x_2) + ... in fp32, as every transport does, then / W and back to the dtype
            chunk_acc = reduce_in_member_order((x for _, x in parts), op,
                                               out=acc[a - s:b - s] if flat.dtype == torch.float32 else None)
            res = chunk_acc if flat.dtype == torch.float32 else chunk_acc.to(flat.dtype)
            if _nonfinite(res):
                bad = _culprits(parts, w)
                raise BadPayload(bad[0] if bad else self._id,
                                 f"NaN/Inf in the all-reduce of op {seq}: caused by the values of member(s) "
                                 f"{bad or [self._id]}")
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


    def _name(self, rid: bytes, key: str | None) -> str:
        return self.curve.name(key) if self.curve is not None else f"routing id {rid[:8].hex()}"

    def _is(self, sender: int, rid: bytes, key: str | None, book: dict) -> bool:
        """Does a message over connection (``rid``, ``key``) come from ``sender`` as listed in ``book``?"""
        entry = book.get(sender)
        if entry is None:
            return False
        return key == entry[1] if self.curve is not None else rid == entry[2]

    def _on_peer_message(self, frames: list[zmq.Frame], deferred: bool = False) -> None:
        """Check and file one message from the ROUTER (I/O thread). A message counts only when its
        connection (routing id, and with CURVE its key) is that of the member it claims to come from,
        that member belongs to the op, the op is the current one or one of the next two, and the
        sender stays within its quota; anything else is dropped, counted and logged at a bounded rate."""
        rid = frames[0].bytes
        key = None
        if self.curve is not None:
            with contextlib.suppress(zmq.ZMQError):
                key = frames[-1].get("User-Id")
        try:
            if len(frames) == 2:
                m = decode_control(frames[1].bytes, ("abort", "fetch"))
                if m["k"] == "abort":
                    with self._cv:
                        self._check_sender(m["id"], m["op"], rid, key)
                        self._aborts.setdefault(m["op"], m["id"])
                        self._cv.notify_all()
                    return
                # A snapshot: only for members and the joiners the coordinator admitted (their ticket).
                book = {**self._joiners, **self._peers}
                if not self._is(m["id"], rid[:RID_BYTES], key, book):
                    if not deferred and len(self._deferred) < 8:
                        # maybe a joiner admitted since our last heartbeat: ask the coordinator now
                        self._deferred.append(frames)
                        self._next_hb = 0.0
                        return
                    raise WireError(f"snapshot request claiming member {m['id']} from a peer that is neither a "
                                    f"member nor an admitted joiner")
                self._serve(rid, m)
                return
            if len(frames) != 3:
                raise WireError(f"{len(frames) - 1} frames (a data message has 2, a control message 1)")
            h = decode_header(frames[1].bytes, self.max_tensor_bytes)
            payload = frames[2]
            check_payload(h, len(payload))
            with self._cv:
                self._check_sender(h.sender, h.op, rid, key)
                box_key = (h.sender, h.op, h.tag, h.group)
                held = self._held.setdefault(h.sender, [0, 0])
                # two ops' worth of what we expect from one sender: the most it sent in one op so far
                # (this op included), our own model's size, at least four chunks
                now_rx = max((v for (_, o), v in self._rx.items() if o == self._floor), default=0)
                quota = 2 * max(self._expect, now_rx, self._own_bytes, 4 * self.chunk_bytes)
                if held[1] >= 4096 or (h.op > self._floor and held[0] + len(payload) > quota):
                    raise WireError(f"member {h.sender} is over its quota ({held[1]} chunks, {held[0]} bytes "
                                    f"waiting; at most 4096 chunks and {quota} bytes for ops not started)")
                box = self._inbox.get(box_key)
                if box is None:
                    box = self._inbox[box_key] = _Inbox(h.nparts)
                desc = (h.dtype, h.shape, h.nbytes)
                if box.nparts != h.nparts or box.parts.setdefault(h.part, desc) != desc:
                    raise WireError(f"chunk of op {h.op} disagrees with earlier chunks of the same message")
                if (h.part, h.offset) in box.chunks or box.got.get(h.part, 0) + len(payload) > h.nbytes:
                    raise WireError(f"duplicate chunk at offset {h.offset} of op {h.op}")
                box.chunks[(h.part, h.offset)] = payload
                box.got[h.part] = box.got.get(h.part, 0) + len(payload)
                held[0] += len(payload)
                held[1] += 1
                self._rx[(h.sender, h.op)] = self._rx.get((h.sender, h.op), 0) + len(payload)
                self._progress[h.sender] = time.monotonic()
                self._cv.notify_all()
        except WireError as e:
            self.dropped_invalid += 1
            self.rejects(self._name(rid, key), f"member {self._id}: {e}")

    def _check_sender(self, sender: int, op: int, rid: bytes, key: str | None) -> None:
        """Raise WireError unless ``sender`` may send us a message for ``op`` over this connection."""
        if not self._is(sender, rid, key, self._peers):
            raise WireError(f"message claims member {sender} but does not come over its connection")
        if op < self._floor:
            raise WireError(f"message for op {op}, which is over")
        top = max(self._floor, self._seq - 1) + 2
        if op > top:
            raise WireError(f"message for op {op}, beyond the next two ({top})")
        group = self._groups.get(op)
        if group is not None and sender not in group:
            raise WireError(f"member {sender} is not in op {op}'s group")
        if group is None and sender not in self._members and sender not in self._joiners and (
                self._live is None or sender not in self._live):
            raise WireError(f"member {sender} is not an active member")
