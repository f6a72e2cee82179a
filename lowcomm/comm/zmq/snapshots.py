"""Snapshots for joining peers: a member snapshots its model and optimizer after every committed
sync and serves them to joiners; a joiner fetches one from a live donor, checks it, loads it and
activates from the next operation.

:class:`Snapshots` is a mixin of :class:`~lowcomm.comm.zmq.peer.ZmqTransport`.
"""

from __future__ import annotations

import itertools
import logging
import math
import os
import random
import signal
import time
from dataclasses import dataclass
from typing import Any

import torch
import zmq

from ..base import CommError, CommTimeout
from .dataplane import _bytes_of, _frame_tensor
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

__all__ = ["Snapshots"]

log = logging.getLogger(__name__)

@dataclass
class _Snapshot:
    snap_id: int
    meta: bytes
    tensors: list[torch.Tensor]
    digest: str
    next_op: int
    sync: int



class Snapshots:
    """Serving and fetching snapshots (a mixin of ZmqTransport)."""

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
        # what one sender may send us per op is about the model's size in fp32 (sizes the future-op quota)
        self._own_bytes = sum(t.numel() * max(4, t.element_size()) for t in model.state_dict().values()
                              if isinstance(t, torch.Tensor))
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
        addr, pub, _ = self._peers[donor]
        s = self._socket(zmq.DEALER)
        # our registered routing id plus a fetch counter: the donor serves only members and admitted joiners
        self._fetches = getattr(self, "_fetches", 0) + 1
        if self.curve is None:
            s.setsockopt(zmq.ROUTING_ID, self._rid + b"f%d" % (self._fetches % 1000))
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
        self._request(self._join_frame(False, self._verdicts), lambda m: m["k"] == "welcome", deadline)
        tried: list[int] = []
        for attempt in itertools.count():
            if time.monotonic() > deadline:
                raise CommTimeout([], f"member {self._id} could not fetch a snapshot within the join timeout")
            st = self._state_request(deadline)
            donors = [i for i in self._adopt(st["members"], st["joiners"]) if i != self._id]
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
            except (CommError, WireError, ValueError, KeyError, TypeError, RuntimeError, zmq.ZMQError) as e:
                # a bad hash, a snapshot that does not fit the model, a donor gone: try the next donor
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
