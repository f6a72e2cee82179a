"""The torch.distributed transport: lowcomm under ``torchrun`` (gloo, nccl for the replicas).

The world of ``W`` ranks is split into ``W / R`` *replicas* of ``R = replica_size``
consecutive ranks (replica ``k`` holds global ranks ``kR .. kR+R-1``):

* inside a replica the ranks do ordinary data parallelism: :attr:`TorchDistTransport.replica_group`
  is a process group of the default backend (nccl when CUDA is there, else gloo) for
  ``DistributedDataParallel(model, process_group=t.replica_group)`` or FSDP;
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

import collections
import datetime
import os
import threading
import time
import zlib
from collections.abc import Sequence
from concurrent.futures import Future
from typing import Any

import torch
import torch.distributed as dist

from ..codecs import wire_codec
from ..shards import shard_bounds
from .aggregate import RULES, get_aggregate
from .base import DEFAULT_TIMEOUT, ByteLedger, CommError, CommTimeout, Handle, OpRecord, PeerLost
from .p2p import P2PTransport, _check_op, _dtype_groups, _flatten, _write_back

__all__ = ["TorchDistTransport", "TransportFailed"]

# Wire codes for the dtypes a part may have (the header says which).
_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int8, torch.uint8,
           torch.int16, torch.int32, torch.int64, torch.bool)
_DTYPE_CODE = {d: i for i, d in enumerate(_DTYPES)}
_MAX_HEADER = 1 << 16  # int64 words; a header longer than this is corrupt
_HEADER = 32  # int64 words in a message's first (fixed-size) header; longer ones continue in a second
_ONE_SENDER = ("bc",)  # phases where one member sends to the others (no receives posted ahead)


class _Incoming:
    """A message being received: its fixed-size header, then its parts."""

    __slots__ = ("hdr", "work", "parts", "works")

    def __init__(self, hdr: torch.Tensor, work: Any):
        self.hdr, self.work = hdr, work
        self.parts: list[torch.Tensor] | None = None
        self.works: list[Any] = []


class TransportFailed(RuntimeError):
    """The torch.distributed transport lost a rank and cannot go on (fail-stop).

    Not a :class:`~lowcomm.comm.base.CommError` on purpose: the outer optimizer rolls back
    ``CommError`` and continues, but a torch.distributed run cannot continue without the
    lost rank, so this ends ``opt.step()``. Restart from the last checkpoint.
    """


def _wire_tag(tag: tuple) -> int:
    """A gloo tag (a non-negative int32) for a message tag tuple such as ``(seq, "rs", 0)``.

    Messages between two ranks on one tag arrive in order and the algorithms send and
    receive in the same order on every rank, so a rare collision is harmless; distinct tags
    just keep the phases of an operation apart.
    """
    return zlib.crc32(repr(tag[1:]).encode()) & 0x7FFFFFFF


class _GroupP2P(P2PTransport):
    """The point-to-point layer of :mod:`lowcomm.comm.p2p` over one gloo process group.

    Member ``i`` is global rank ``ranks[i]``; ``me`` is this rank's member id.
    """

    def __init__(self, group: Any, ranks: Sequence[int], me: int, timeout: float):
        super().__init__(timeout)
        self._group = group
        self._ranks = list(ranks)
        self._me = me
        self._pending: list[tuple[int, Any, list[torch.Tensor]]] = []  # (peer, work, buffers kept alive)
        self._op_lost: set[int] = set()
        self._op_error: CommError | None = None
        self._failure: BaseException | None = None
        self._op_members: list[int] = []
        self._inbox: dict[tuple[int, int], collections.deque] = {}

    @property
    def rank(self) -> int:
        return self._me

    @property
    def epoch(self) -> int:
        return 0

    def members(self) -> list[int]:
        return list(range(len(self._ranks)))

    def _describe(self, peer: int) -> str:
        return f"member {peer} (global rank {self._ranks[peer]})"

    def _on_op_start(self, seq: int) -> None:
        self._op_lost = set()
        self._op_error = None
        self._pending = []

    def _start(self, kind: str, participants: Sequence[int], body, tag: str = "") -> Handle:
        def noted(*args):
            self._op_members = list(args[2])
            try:
                return body(*args)
            except CommError as e:  # kept so that the fail-stop error can say what happened
                self._op_error = e
                raise
        return super()._start(kind, participants, noted, tag)

    def _wait(self, work: Any, peer: int, deadline: float, what: str) -> None:
        left = deadline - time.monotonic()
        try:
            if left <= 0:
                raise RuntimeError("deadline passed")
            if work.wait(timeout=datetime.timedelta(seconds=left)) is False:
                raise RuntimeError("timed out")
        except RuntimeError as e:
            self._op_lost.add(peer)
            msg = str(e).splitlines()[0] if str(e) else type(e).__name__
            if "Timed out" in msg or "timed out" in msg or "deadline" in msg:
                raise CommTimeout([peer], f"no {what} from {self._describe(peer)} before the deadline "
                                          f"({self.timeout:.0f}s): {msg}") from None
            raise PeerLost([peer], f"{self._describe(peer)} was lost during {what}: {msg}") from None

    def _post(self, fn: Any, tensor: torch.Tensor, peer: int, tag: int, what: str) -> Any:
        try:
            return fn(tensor, self._ranks[peer], group=self._group, tag=tag)
        except RuntimeError as e:
            self._op_lost.add(peer)
            raise PeerLost([peer], f"{self._describe(peer)} was lost during {what}: "
                                   f"{str(e).splitlines()[0] if str(e) else e!r}") from None

    # ---- the three primitives of P2PTransport ---------------------------------------------------
    def _send(self, peer: int, tag: tuple, parts: list[torch.Tensor], rec: OpRecord) -> None:
        """Post the sends of ``parts`` to ``peer`` (gloo sends asynchronously).

        Uncompressed buffers are not copied: the algorithms of p2p only overwrite a sent
        shard after the peer it went to has answered, and every send is waited for before
        the operation ends (:meth:`_flush_sends`).
        """
        wt = _wire_tag(tag)
        parts = [p.detach().contiguous() for p in parts]
        if tag[1] in ("qrs", "qag"):
            # Codec output is small; copy it in case a codec hands out reused buffers.
            parts = [p.clone() for p in parts]
        words = [0, len(parts)]
        for p in parts:
            if p.dtype not in _DTYPE_CODE:
                raise CommError(f"cannot send dtype {p.dtype}; supported: {[str(d) for d in _DTYPES]}")
            if p.device.type != "cpu":
                raise CommError("internal: lowcomm's gloo messages carry host tensors only")
            words += [_DTYPE_CODE[p.dtype], p.dim(), *p.shape]
        words[0] = len(words)
        if len(words) > _MAX_HEADER:
            raise CommError(f"a message of {len(parts)} tensors is too large a header; send fewer, larger tensors")
        header = torch.zeros(max(_HEADER, len(words)), dtype=torch.int64)
        header[:len(words)] = torch.tensor(words, dtype=torch.int64)
        # The first _HEADER words go as one fixed-size message (its receive is posted ahead of
        # time, see _recv); a longer header continues in a second message.
        msgs = [header[:_HEADER]] + ([header[_HEADER:]] if len(words) > _HEADER else [])
        keep = [header, *parts]
        for t in (*msgs, *[p for p in parts if p.numel() > 0]):
            work = self._post(dist.isend, t, peer, wt, f"sending {tag[1:]}")
            self._pending.append((peer, work, keep))
        # Payload only, as the local transport counts it; the header is framing.
        self.ledger.add(rec, peer, sum(p.numel() * p.element_size() for p in parts))

    def _post_header(self, peer: int, wt: int) -> None:
        hdr = torch.empty(_HEADER, dtype=torch.int64)
        work = self._post(dist.irecv, hdr, peer, wt, "a message header")
        self._inbox.setdefault((peer, wt), collections.deque()).append(_Incoming(hdr, work))

    def _advance(self, inc: _Incoming, peer: int, wt: int, deadline: float, block: bool, what: str) -> None:
        """Once ``inc``'s header is in, post the receives of its parts (so their data flows)."""
        if inc.parts is not None or (not block and not inc.work.is_completed()):
            return
        self._wait(inc.work, peer, deadline, what)
        words = inc.hdr.tolist()
        n = words[0]
        if not 2 <= n <= _MAX_HEADER:
            raise CommError(f"corrupt header (length {n}) from {self._describe(peer)}")
        if n > _HEADER:
            ext = torch.empty(n - _HEADER, dtype=torch.int64)
            self._wait(self._post(dist.irecv, ext, peer, wt, what), peer, deadline, what)
            words = words + ext.tolist()
        parts, works, i = [], [], 2
        try:
            for _ in range(words[1]):
                code, ndim = words[i], words[i + 1]
                shape = words[i + 2:i + 2 + ndim]
                i += 2 + ndim
                t = torch.empty(shape, dtype=_DTYPES[code])
                parts.append(t)
                if t.numel() > 0:
                    works.append(self._post(dist.irecv, t, peer, wt, what))
        except (IndexError, RuntimeError) as e:
            raise CommError(f"corrupt header from {self._describe(peer)}: {e}") from None
        inc.parts, inc.works = parts, works

    def _recv(self, peer: int, tag: tuple, deadline: float) -> list[torch.Tensor]:
        """Receive ``peer``'s next message on ``tag``.

        gloo moves a message only once its receive is posted, so waiting for one peer at a
        time would serialise the peers (and all ranks would queue on member 0 first). So the
        first receive of a phase posts header receives for every other member of the
        operation, and while waiting for one peer the parts of every peer whose header has
        arrived are posted too; the data of all peers flows at once, and the results are
        still consumed in member order. Receives are per (peer, tag) queues in message
        order, so one posted for a message that comes in a later operation is used then.
        """
        wt = _wire_tag(tag)
        what = f"message {tag[1:]} of operation {tag[0]}"
        if tag[1] not in _ONE_SENDER:
            for p in self._op_members:
                if p != self._me and not self._inbox.get((p, wt)):
                    self._post_header(p, wt)
        if not self._inbox.get((peer, wt)):
            self._post_header(peer, wt)
        inc = self._inbox[(peer, wt)].popleft()
        self._advance(inc, peer, wt, deadline, True, what)
        for (p, w2), q in self._inbox.items():
            if w2 == wt and q and p != peer:
                self._advance(q[0], p, wt, deadline, False, what)
        for w in inc.works:
            self._wait(w, peer, deadline, what)
        return inc.parts

    def _flush_sends(self, deadline: float) -> None:
        pending, self._pending = self._pending, []
        for peer, work, _keep in pending:
            self._wait(work, peer, deadline, "a send to it")

    def _commit(self, tag: tuple, participants: Sequence[int], ok: bool, deadline: float) -> tuple[bool, list[int]]:
        """Vote: every participant tells every other whether it succeeded and whom it lost.

        A participant that failed sends its vote without waiting for the others' (it is
        leaving: fail-stop) and drops its unfinished sends. One that succeeded waits for
        its sends and for every vote, so it never applies a result that another rank
        rejected.
        """
        parts = list(participants)
        if ok:
            try:
                self._flush_sends(deadline)
            except CommError:
                ok = False
        else:
            self._pending = []
        vote = torch.tensor([1 if ok else 0] + [1 if p in self._op_lost else 0 for p in parts], dtype=torch.int64)
        wt = _wire_tag(tag)
        sends = []
        for p in parts:
            if p != self._me:
                try:
                    sends.append((p, dist.isend(vote, self._ranks[p], group=self._group, tag=wt)))
                except RuntimeError:
                    self._op_lost.add(p)
        if not ok:
            self._note_failure(tag, self._op_lost)
            return False, sorted(self._op_lost)
        committed = True
        lost = set(self._op_lost)
        for p in parts:
            if p == self._me:
                continue
            theirs = torch.empty_like(vote)
            try:
                self._wait(self._post(dist.irecv, theirs, p, wt, "vote"), p, deadline, "the commit vote")
            except CommError:
                committed = False
                lost.add(p)
                continue
            if theirs[0].item() != 1:
                committed = False
            lost |= {q for q, flag in zip(parts, theirs[1:].tolist()) if flag}
        for p, w in sends:
            try:
                self._wait(w, p, deadline, "the commit vote")
            except CommError:
                committed = False
                lost.add(p)
        if not committed:
            self._note_failure(tag, lost)
            return False, sorted(lost)
        return True, []

    def _note_failure(self, tag: tuple, lost: set[int]) -> None:
        if self._failure is None:
            who = ", ".join(self._describe(p) for p in sorted(lost)) or "another member (it voted to abort)"
            cause = f": {self._op_error}" if self._op_error is not None else ""
            self._failure = PeerLost(sorted(lost), f"operation #{tag[0]} failed; lost {who}{cause}")


class TorchDistTransport(_GroupP2P):
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
        super().__init__(cross[self.replica_rank], cross_ranks[self.replica_rank], self.replica_id, timeout)
        # The intra-replica messages of the hierarchical sync run on this transport's single
        # communication thread (inside its operations), never on their own.
        self._intra = _GroupP2P(intra[self.replica_id], replica_ranks[self.replica_id], self.replica_rank, timeout)
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

    def all_gather(self, payload: Sequence[torch.Tensor]) -> Handle:
        self._check_usable()
        payload = list(payload)
        if all(t.device.type == "cpu" for t in payload):
            return P2PTransport.all_gather(self, payload)
        device = next(t.device for t in payload if t.device.type != "cpu")
        inner = P2PTransport.all_gather(self, [t.detach().cpu() for t in payload])
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
