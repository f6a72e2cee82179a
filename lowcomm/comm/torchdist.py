"""The torch.distributed transport: lowcomm under ``torchrun`` (gloo, nccl for the replicas).

The world of ``W`` ranks is split into ``W / R`` *replicas* of ``R = replica_size``
consecutive ranks (replica ``k`` holds global ranks ``kR .. kR+R-1``):

* inside a replica the ranks do ordinary data parallelism: :attr:`TorchDistTransport.replica_group`
  is a process group of the default backend (nccl when CUDA is there, else gloo) for
  ``DistributedDataParallel(model, process_group=t.replica_group)``, or FSDP2 with
  ``fully_shard(module, mesh=DeviceMesh.from_group(t.replica_group, device_type))``. With FSDP
  each rank holds a shard of every parameter (a DTensor); the strategies that accept it
  (DiLoCo, FedAvg, Streaming DiLoCo, NoLoCo) keep global weights and outer state for the local
  shard only and sync it over the flat path below, so ``hierarchical`` must be False
  (:mod:`lowcomm.outer.placement`);
* across replicas the outer optimizer syncs rarely (DiLoCo, Douillard et al. 2023,
  arXiv 2311.08105): rank ``r`` of every replica syncs with rank ``r`` of the others. The
  transport's members are the replicas: ``rank`` is the replica index, ``members()`` is
  ``range(W / R)``, ``epoch`` is always 0 (membership never changes: see fail-stop below).

How the operations run. lowcomm's own traffic never shares a process group with the user's:
the constructor creates, on every rank and in the same order (as torch requires), one
default-backend group per replica (``replica_group``), one *gloo* group per replica for
lowcomm's intra-replica messages and one *gloo* group per replica rank ``r`` for the
cross-replica messages. Every operation is the algorithm of :mod:`lowcomm.comm.p2p`
(reduce-scatter to shard owners, fp32 sums in member order, all-gather of the results;
the codec path: encode shards, owner decodes all contributions, sums, encodes once,
everyone keeps ``decode(encode(result))``) run over gloo ``isend``/``irecv`` on one
communication thread per transport, so (a) operations are issued in call order on every
rank, (b) results are bit-identical to :class:`~lowcomm.comm.local.LocalTransport`'s, and
(c) the byte ledger counts exactly the payload bytes this rank handed to gloo, per
operation and per peer, as the local transport does (each message is preceded by a 256-byte
int64 header giving the parts' dtypes and shapes, whose receives are posted ahead of time;
like the other transports' headers it is not counted). Tensors on a GPU are staged through
host memory for these operations: the cross-replica sync is rare and bound by the slow links,
not by PCIe. Messages are matched by (peer, phase) tags, not by operation number, so members
left out of a ``group_reduce`` stay in step for the next collective.

``hierarchical=True`` (issue 8): when every rank of a replica holds the same tensors (after
DDP), rank ``r`` of a replica reduces only shard ``r`` of ``R`` across replicas and the
replica then all-gathers the shards over its own group, so the slow cross-replica links
carry one copy per replica instead of ``R``. Without a codec the result is bit-identical to
the flat path (the sums are elementwise in the same member order); :attr:`ledger` counts
the cross-replica bytes, :attr:`replica_ledger` the intra-replica all-gather.

``native_all_reduce=True`` runs uncompressed all_reduces with gloo's own all_reduce on fp32
copies instead (faster on loopback, see benchmarks/README.md; sums within float rounding of
the p2p path, not bit-identical to the local transport); its ledger entry is the ring's
framing of the buffer passed, ``2 (W-1)/W`` of its bytes, since gloo reports nothing.

Fail-stop (the choice made here). torch.distributed cannot drop a rank and go on, so a lost
rank ends the run: the operation that sees it fails on this rank with
:class:`~lowcomm.comm.base.PeerLost` (a closed connection, naming the member and global
rank) or :class:`~lowcomm.comm.base.CommTimeout` (no message before the deadline), after a
vote among the participants so that survivors that finished agree it failed. The outer
optimizer then rolls that sync back as usual and calls :meth:`TorchDistTransport.refresh`,
which raises :class:`TransportFailed` - deliberately *not* a ``CommError``, so it is not
swallowed and ends ``opt.step()`` (and every later operation raises it too). Restart the
job from the last checkpoint (e.g. ``torchrun --max-restarts``). Initialisation that does
not complete within ``timeout`` raises ``CommTimeout``.
"""

from __future__ import annotations

import datetime
import os
import threading
import time
from collections.abc import Sequence
from concurrent.futures import Future
from typing import Any

import torch
import torch.distributed as dist

from ..codecs import wire_codec
from ..shards import shard_bounds
from .aggregate import RULES, get_aggregate
from .base import DEFAULT_TIMEOUT, ByteLedger, CommError, CommTimeout, Handle, PeerLost
from .gloo_p2p import GlooP2P
from .p2p import P2PTransport, _check_op, _dtype_groups, _flatten, _write_back

__all__ = ["TorchDistTransport", "TransportFailed"]

class TransportFailed(RuntimeError):
    """The torch.distributed transport lost a rank and cannot go on (fail-stop).

    Not a :class:`~lowcomm.comm.base.CommError` on purpose: the outer optimizer rolls back
    ``CommError`` and continues, but a torch.distributed run cannot continue without the
    lost rank, so this ends ``opt.step()``. Restart from the last checkpoint.
    """


class TorchDistTransport(GlooP2P):
    """lowcomm over torch.distributed (see the module docstring).

    Build it with :meth:`from_env` under torchrun (or ``lowcomm.connect(replica_size)``);
    the constructor itself needs the default process group to be initialised already.

    Args:
        replica_size: ranks per replica (``R``); the world size must be a multiple of it.
        timeout: seconds an operation (and each group's set-up) may take before it fails.
        hierarchical: all_reduce syncs only this rank's ``1/R`` shard across replicas and
            all-gathers inside the replica (every rank of a replica must hold the same tensors).
        native_all_reduce: uncompressed all_reduce through gloo's ring (not bit-identical to
            the local transport; the ledger records the ring's framing).

    Attributes:
        replica_group: process group of this rank's replica (default backend), for DDP/FSDP.
        replica_ranks: the global ranks of this rank's replica (the mesh FSDP must shard over).
        replica_id / replica_rank / num_replicas / replica_size: where this rank sits.
        ledger: bytes sent to other replicas; replica_ledger: bytes sent inside the replica
            by the hierarchical all-gather.
    """

    def __init__(self, replica_size: int = 1, *, timeout: float = DEFAULT_TIMEOUT, hierarchical: bool = False,
                 native_all_reduce: bool = False):
        if isinstance(replica_size, bool) or not isinstance(replica_size, int) or replica_size < 1:
            raise ValueError(f"replica_size must be an integer >= 1 (ranks per replica), got {replica_size!r}")
        if not timeout or timeout <= 0:
            raise ValueError(f"timeout must be a positive number of seconds, got {timeout!r}")
        if not dist.is_available() or not dist.is_initialized():
            raise ValueError("the default process group is not initialised; use TorchDistTransport.from_env() "
                             "under torchrun (or lowcomm.connect(replica_size=...))")
        world, grank = dist.get_world_size(), dist.get_rank()
        if world % replica_size:
            raise ValueError(f"world size {world} is not a multiple of replica_size={replica_size}; "
                             f"launch a multiple of {replica_size} processes or change replica_size")
        R, n = replica_size, world // replica_size
        self.replica_size, self.num_replicas = R, n
        self.replica_id, self.replica_rank = divmod(grank, R)
        self.global_rank = grank
        self.hierarchical = bool(hierarchical)
        self.native_all_reduce = bool(native_all_reduce)
        if self.hierarchical and self.native_all_reduce:
            raise ValueError("hierarchical=True and native_all_reduce=True do not combine; pick one")
        # Robust rules run on the p2p path only (gloo's ring and the hierarchical sync never hold
        # a whole shard's W contributions): a strategy asking for one fails at its construction.
        self.aggregate_rules = ("mean",) if (self.hierarchical or self.native_all_reduce) else RULES
        td = datetime.timedelta(seconds=float(timeout))
        replica_ranks = [list(range(k * R, (k + 1) * R)) for k in range(n)]
        cross_ranks = [[k * R + r for k in range(n)] for r in range(R)]
        try:
            # Every rank creates every group, in this order (torch requires it).
            user = [dist.new_group(rs, timeout=td) for rs in replica_ranks]
            intra = [dist.new_group(rs, timeout=td, backend="gloo") for rs in replica_ranks]
            cross = [dist.new_group(rs, timeout=td, backend="gloo") for rs in cross_ranks]
        except RuntimeError as e:
            raise CommTimeout([], f"creating lowcomm's process groups failed within {timeout}s on global rank "
                                  f"{grank}: {e}") from e
        self.replica_group = user[self.replica_id]
        self.replica_ranks = replica_ranks[self.replica_id]
        super().__init__(cross[self.replica_rank], cross_ranks[self.replica_rank], self.replica_id, timeout)
        # The intra-replica messages of the hierarchical sync run on this transport's single
        # communication thread (inside its operations), never on their own.
        self._intra = GlooP2P(intra[self.replica_id], replica_ranks[self.replica_id], self.replica_rank, timeout)
        self._intra._executor.shutdown(wait=False)
        self.replica_ledger: ByteLedger = self._intra.ledger
        self._owns_default_group = False
        self._last: Future | None = None
        self._lock = threading.Lock()

    # ---- construction from torchrun's environment ------------------------------------------------
    @classmethod
    def from_env(cls, replica_size: int = 1, backend: str | None = None, timeout: float = DEFAULT_TIMEOUT,
                 hierarchical: bool = False, native_all_reduce: bool = False) -> TorchDistTransport:
        """Initialise torch.distributed from torchrun's variables and build the transport.

        ``backend`` defaults to nccl when CUDA is available (for the replicas' DDP/FSDP),
        else gloo; lowcomm's own messages always use gloo groups. An already initialised
        default process group is reused. Raises ``CommTimeout`` when the other ranks do not
        show up within ``timeout`` seconds.
        """
        if isinstance(replica_size, bool) or not isinstance(replica_size, int) or replica_size < 1:
            raise ValueError(f"replica_size must be an integer >= 1 (ranks per replica), got {replica_size!r}")
        if not timeout or timeout <= 0:
            raise ValueError(f"timeout must be a positive number of seconds, got {timeout!r}")
        owns = False
        if backend is not None and dist.is_initialized() and dist.get_backend() != backend:
            raise ValueError(f"the default process group is already initialised with {dist.get_backend()!r}, "
                             f"not {backend!r}; pass backend=None to reuse it")
        if not dist.is_initialized():
            missing = [v for v in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if v not in os.environ]
            if missing:
                raise ValueError(f"environment variables {missing} are not set; launch with torchrun "
                                 f"(e.g. torchrun --nproc-per-node 4 train.py)")
            if backend is None:
                backend = "nccl" if torch.cuda.is_available() and dist.is_nccl_available() else "gloo"
            if backend not in ("gloo", "nccl"):
                raise ValueError(f"backend must be 'gloo' or 'nccl' (or None to choose), got {backend!r}")
            if backend == "nccl":
                torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
            where = (f"rank {os.environ['RANK']} of {os.environ['WORLD_SIZE']} at "
                     f"{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']}")
            try:
                dist.init_process_group(backend, timeout=datetime.timedelta(seconds=float(timeout)))
            except RuntimeError as e:
                first = str(e).splitlines()[0] if str(e) else repr(e)
                raise CommTimeout([], f"torch.distributed initialisation ({backend}, {where}) did not complete "
                                      f"within {timeout}s: {first}") from e
            owns = True
        t = cls(replica_size, timeout=timeout, hierarchical=hierarchical, native_all_reduce=native_all_reduce)
        t._owns_default_group = owns
        return t

    # ---- fail-stop -------------------------------------------------------------------------------
    def _check_usable(self) -> None:
        if self._failure is not None:
            raise TransportFailed(
                f"the torch.distributed transport is fail-stop and an earlier operation failed ({self._failure}); "
                f"the run cannot go on without the lost rank: restart it from the last checkpoint") from self._failure

    def refresh(self) -> None:
        """Membership is fixed: raises :class:`TransportFailed` once an operation has failed
        (or is still running after its caller gave up on it), else does nothing."""
        self._check_usable()
        last = self._last
        if last is not None and not last.done():
            self._failure = CommTimeout([], "an operation outlived its caller's deadline and is still running")
            self._check_usable()

    def _start(self, kind: str, participants: Sequence[int], body, tag: str = "") -> Handle:
        self._check_usable()
        h = super()._start(kind, participants, body, tag)
        self._last = h._future
        return h

    # ---- GPU tensors go through host memory ------------------------------------------------------
    def _staged(self, tensors: list[torch.Tensor], launch, write_back: bool = True) -> Handle:
        if all(t.device.type == "cpu" for t in tensors):
            return launch(tensors)
        host = [t.detach().to("cpu", copy=True) for t in tensors]
        inner = launch(host)
        fut: Future = Future()

        def done(f: Future) -> None:
            try:
                res = f.result()
                if write_back:
                    with torch.no_grad():
                        for t, h in zip(tensors, host):
                            t.copy_(h)
                    res = tensors
                fut.set_result(res)
            except BaseException as e:  # noqa: BLE001 - handed to the waiter
                fut.set_exception(e)

        inner._future.add_done_callback(done)
        return Handle(fut, inner.record, inner._default_timeout)

    # ---- operations ------------------------------------------------------------------------------
    def all_reduce(self, tensors: Sequence[torch.Tensor], op: str = "mean", codec: Any = None,
                   aggregate: Any = None, center: Sequence[torch.Tensor] | None = None) -> Handle:
        self._check_usable()
        _check_op(op)
        tensors = list(tensors)
        if aggregate is not None and get_aggregate(aggregate).robust:
            if center is not None:
                center = [c.detach().to("cpu") for c in center]
            return self._staged(tensors, lambda ts: P2PTransport.all_reduce(self, ts, op, codec, aggregate, center))
        if self.hierarchical and self.replica_size > 1:
            return self._staged(tensors, lambda ts: self._hierarchical_all_reduce(ts, op, codec))
        if self.native_all_reduce and wire_codec(codec) is None:
            return self._staged(tensors, lambda ts: self._native_all_reduce(ts, op))
        return self._staged(tensors, lambda ts: P2PTransport.all_reduce(self, ts, op, codec))

    def all_gather(self, payload: Sequence[torch.Tensor], validate=None) -> Handle:
        self._check_usable()
        payload = list(payload)
        if all(t.device.type == "cpu" for t in payload):
            return P2PTransport.all_gather(self, payload, validate)
        device = next(t.device for t in payload if t.device.type != "cpu")
        inner = P2PTransport.all_gather(self, [t.detach().cpu() for t in payload], validate)
        fut: Future = Future()

        def done(f: Future) -> None:
            try:
                fut.set_result([[t.to(device) for t in ts] for ts in f.result()])
            except BaseException as e:  # noqa: BLE001
                fut.set_exception(e)

        inner._future.add_done_callback(done)
        return Handle(fut, inner.record, inner._default_timeout)

    def group_reduce(self, group: Sequence[int], tensors: Sequence[torch.Tensor], op: str = "mean",
                     check: Any = None) -> Handle:
        self._check_usable()
        bad = [g for g in group if not 0 <= int(g) < self.num_replicas]
        if bad:
            raise ValueError(f"group_reduce: {bad} are not members; members are replicas 0..{self.num_replicas - 1}")
        return self._staged(list(tensors), lambda ts: P2PTransport.group_reduce(self, group, ts, op, check))

    def broadcast(self, tensors: Sequence[torch.Tensor], src: int) -> Handle:
        self._check_usable()
        return self._staged(list(tensors), lambda ts: P2PTransport.broadcast(self, ts, src))

    def _native_all_reduce(self, tensors: list[torch.Tensor], op: str) -> Handle:
        """gloo's own all_reduce (a ring) on fp32 (or fp64) copies; faster, not bit-identical to local.

        The ledger records the ring's framing of the buffer passed, ``2 (W-1)/W`` of its
        bytes, under the ring successor: gloo does not report what it sent, so this one count
        is the algorithm's, not a measurement.
        """
        members = self._members_or_raise()

        def body(seq, rec, members, deadline):
            w, me = len(members), members.index(self.rank)
            flats = []
            for dtype, idxs in _dtype_groups(tensors):
                acc = torch.float64 if dtype == torch.float64 else torch.float32  # fp32 accumulation
                flat = _flatten(tensors, idxs, acc)
                if w > 1:
                    try:
                        work = dist.all_reduce(flat, group=self._group, async_op=True)
                        left = deadline - time.monotonic()
                        if left <= 0 or work.wait(timeout=datetime.timedelta(seconds=left)) is False:
                            raise RuntimeError("timed out")
                    except RuntimeError as e:
                        msg = str(e).splitlines()[0] if str(e) else repr(e)
                        raise PeerLost([], f"gloo all_reduce among {w} members failed: {msg}") from None
                    nbytes = flat.numel() * flat.element_size()
                    self.ledger.add(rec, members[(me + 1) % w], 2 * (w - 1) * nbytes // w)
                if op == "mean":
                    flat.div_(w)
                flats.append((flat.to(dtype), idxs))

            return _write_back(flats, tensors)

        return self._start("all_reduce", members, body, tag="native")

    def _hierarchical_all_reduce(self, tensors: list[torch.Tensor], op: str, codec: Any) -> Handle:
        """Shard ``replica_rank`` of ``R`` goes across replicas; the replica all-gathers the shards."""
        codec = wire_codec(codec)
        members = self._members_or_raise()
        R, rr, intra = self.replica_size, self.replica_rank, self._intra

        def body(seq, rec, members, deadline):
            me, w = members.index(self.rank), len(members)
            groups = ([(torch.float32, list(range(len(tensors))))] if codec is not None
                      else _dtype_groups(tensors))
            flats = []
            for gi, (dtype, idxs) in enumerate(groups):
                flat = _flatten(tensors, idxs, dtype)
                bounds = shard_bounds(flat.numel(), R)
                s, e = bounds[rr]
                shard = flat[s:e].clone()
                # The cross-replica part: exactly the flat algorithm, on 1/R of the vector.
                if codec is None:
                    self._reduce_scatter_gather(seq, rec, members, me, w, shard, op, deadline, gi)
                else:
                    self._quantized_reduce(seq, rec, members, me, w, shard, op, codec, deadline)
                # Inside the replica: every rank sends its reduced shard to the others.
                irec = intra.ledger.begin("all_gather", R, tag=f"hierarchical all_reduce #{seq}")
                try:
                    intra._op_lost, intra._op_members = set(), list(range(R))
                    for peer in range(R):
                        if peer != rr:
                            intra._send(peer, (seq, "hag", gi), [shard], irec)
                    for peer in range(R):
                        if peer != rr:
                            s2, e2 = bounds[peer]
                            part = intra._recv(peer, (seq, "hag", gi), deadline)[0]
                            if part.numel() != e2 - s2 or part.dtype != flat.dtype:
                                raise CommError(f"replica rank {peer} sent a shard of the wrong size or dtype")
                            flat[s2:e2].copy_(part)
                    intra._flush_sends(deadline)
                    irec.ok = True
                except PeerLost as err:
                    irec.ok = False
                    intra._pending = []
                    raise CommError(f"hierarchical all_reduce: a rank of replica {self.replica_id} was lost during "
                                    f"the intra-replica all-gather ({err})") from err
                flat[s:e].copy_(shard)
                flats.append((flat, idxs))

            return _write_back(flats, tensors)

        return self._start("all_reduce", members, body, tag="hierarchical")

    def close(self) -> None:
        super().close()
        if self._owns_default_group and dist.is_initialized():
            dist.destroy_process_group()
            self._owns_default_group = False

    def __repr__(self) -> str:
        return (f"TorchDistTransport(replica {self.replica_id}/{self.num_replicas}, replica_rank "
                f"{self.replica_rank}/{self.replica_size}, global rank {self.global_rank}"
                f"{', hierarchical' if self.hierarchical else ''})")
