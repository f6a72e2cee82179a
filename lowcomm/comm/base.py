"""The transport protocol every strategy talks to, its errors, handles and byte ledger.

A transport moves tensors between the members of a run. Every operation is
non-blocking: it returns a :class:`Handle` whose ``wait(timeout)`` gives the result or
raises a :class:`CommError`. Operations are *atomic across survivors*: either every live
participant sees success, or every one sees the same failure (the transport runs a
commit round), so an outer optimizer can roll back without disagreeing with its peers.

Three implementations exist: :mod:`lowcomm.comm.local` (threads in one process, with
fault injection), :mod:`lowcomm.comm.torchdist` (torch.distributed, fail-stop) and
:mod:`lowcomm.comm.zmq` (peers over ZeroMQ, survives churn).
"""

from __future__ import annotations

import abc
import threading
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future
from concurrent.futures import TimeoutError as _FutureTimeout
from dataclasses import dataclass, field
from typing import Any

import torch

from .aggregate import RULES, Aggregate, get_aggregate, lower_median

__all__ = [
    "RULES",
    "STAT_KEYS",
    "Aggregate",
    "BadPayload",
    "ByteLedger",
    "CommError",
    "check_stats",
    "CommTimeout",
    "Handle",
    "OpRecord",
    "PeerLost",
    "Transport",
    "check_transport",
    "get_aggregate",
    "lower_median",
    "tensor_nbytes",
]

DEFAULT_TIMEOUT = 300.0
"""Seconds an operation may wait without completing before it fails (every wait has one)."""


class CommError(RuntimeError):
    """A collective operation failed; the caller should roll back and carry on."""


class BadPayload(CommError):
    """A member sent data that cannot be used (malformed parts, NaN/Inf); ``sender`` names it."""

    def __init__(self, sender: int, message: str):
        self.sender = sender
        super().__init__(message)


class PeerLost(CommError):
    """One or more peers died or stalled during an operation.

    ``lost`` names the member ids that were lost (may be empty when the cause is unknown).
    """

    def __init__(self, lost: Sequence[int] = (), message: str | None = None):
        self.lost = sorted(set(int(x) for x in lost))
        super().__init__(message or f"lost peer(s) {self.lost} during a collective operation")


class CommTimeout(PeerLost):
    """An operation made no progress before its deadline."""


def tensor_nbytes(tensors: Sequence[torch.Tensor]) -> int:
    """Bytes the raw contents of ``tensors`` occupy on the wire."""
    return sum(t.numel() * t.element_size() for t in tensors)


@dataclass
class OpRecord:
    """What one operation put on the wire, as seen by one worker."""

    op_id: int
    kind: str  # "all_reduce" | "all_gather" | "group_reduce" | "broadcast" | ...
    participants: int  # members taking part (W for collectives, n for a group)
    bytes_sent: int = 0
    bytes_by_peer: dict[int, int] = field(default_factory=dict)
    messages: int = 0
    ok: bool | None = None  # None while running, then committed or not
    tag: str = ""  # free-form annotation by the caller (e.g. "fragment 1")


class ByteLedger:
    """Counts every byte a worker frames for the wire, per operation and per peer.

    Transports call :meth:`begin` when an operation starts and :meth:`add` for every
    message they send; benchmarks read :attr:`records` and the totals. Nothing here
    estimates: a count is only ever the size of a buffer that was actually sent.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.records: list[OpRecord] = []

    def begin(self, kind: str, participants: int, tag: str = "") -> OpRecord:
        with self._lock:
            rec = OpRecord(op_id=len(self.records), kind=kind, participants=participants, tag=tag)
            self.records.append(rec)
            return rec

    def add(self, rec: OpRecord, peer: int, nbytes: int) -> None:
        with self._lock:
            rec.bytes_sent += nbytes
            rec.bytes_by_peer[peer] = rec.bytes_by_peer.get(peer, 0) + nbytes
            rec.messages += 1

    @property
    def ops(self) -> int:
        """Number of operations started."""
        return len(self.records)

    @property
    def bytes_sent(self) -> int:
        """Total bytes this worker put on the wire."""
        return sum(r.bytes_sent for r in self.records)

    def by_kind(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for r in self.records:
            out[r.kind] = out.get(r.kind, 0) + r.bytes_sent
        return out

    def by_peer(self) -> dict[int, int]:
        out: dict[int, int] = {}
        for r in self.records:
            for p, n in r.bytes_by_peer.items():
                out[p] = out.get(p, 0) + n
        return out

    def count(self, kind: str | None = None) -> int:
        return sum(1 for r in self.records if kind is None or r.kind == kind)


class Handle:
    """The pending result of a non-blocking operation.

    ``wait(timeout)`` returns the result, or raises the operation's :class:`CommError`;
    a wait that outlives ``timeout`` seconds raises :class:`CommTimeout`.
    """

    def __init__(self, future: Future, record: OpRecord | None = None, default_timeout: float = DEFAULT_TIMEOUT):
        self._future = future
        self.record = record
        self._default_timeout = default_timeout

    @classmethod
    def completed(cls, value: Any, record: OpRecord | None = None) -> Handle:
        f: Future = Future()
        f.set_result(value)
        if record is not None and record.ok is None:
            record.ok = True
        return cls(f, record)

    @classmethod
    def failed(cls, error: BaseException, record: OpRecord | None = None) -> Handle:
        """A handle whose ``wait()`` raises ``error`` (an operation that could not even start)."""
        f: Future = Future()
        f.set_exception(error)
        if record is not None:
            record.ok = False
        return cls(f, record)

    @property
    def op_id(self) -> int | None:
        return None if self.record is None else self.record.op_id

    def done(self) -> bool:
        return self._future.done()

    def wait(self, timeout: float | None = None) -> Any:
        t = self._default_timeout if timeout is None else timeout
        try:
            return self._future.result(timeout=t)
        except _FutureTimeout:
            raise CommTimeout((), f"operation did not complete within {t:.1f}s") from None


STAT_KEYS = ("step", "tokens", "tokens_per_s", "train_loss", "eval_loss", "syncs", "rolled_back", "bytes_sent")
"""The figures a training loop reports with :meth:`Transport.report_stats` (numbers, all optional)."""


def check_stats(stats: Any) -> dict[str, float]:
    """``stats`` as a plain dict of known keys and finite numbers, else a ValueError naming the bad entry."""
    if not isinstance(stats, Mapping):
        raise ValueError(f"stats must be a mapping of {', '.join(STAT_KEYS)} to numbers, got {type(stats).__name__}")
    out: dict[str, float] = {}
    for k, v in stats.items():
        if k not in STAT_KEYS:
            raise ValueError(f"unknown stat {k!r}; known: {', '.join(STAT_KEYS)}")
        if isinstance(v, bool) or not isinstance(v, (int, float)) or v != v or abs(v) > 1e18:
            raise ValueError(f"stat {k} must be a finite number, got {v!r}")
        out[k] = v
    return out


class Transport(abc.ABC):
    """The protocol every transport implements (see the module docstring).

    Members are identified by integer *member ids*. On fixed-membership transports
    (local, torch.distributed) the member id of a worker is its rank; on the ZeroMQ
    transport ids are assigned by the coordinator and survive others leaving.
    """

    ledger: ByteLedger

    replica_group: Any = None
    """Optional capability: the process group of this member's replica (ranks that do ordinary data
    parallelism together, e.g. for ``DistributedDataParallel``); None where a member is one process."""

    replica_ranks: list[int] | None = None
    """Optional capability: the global torch.distributed ranks of this member's replica (the mesh that
    FSDP2 may shard parameters over); None where the transport does not know them."""

    hierarchical: bool = False
    """Whether ``all_reduce`` assumes every rank of a replica holds the same tensors (syncing 1/R of them
    per rank); sharded (FSDP) parameters need the flat path."""

    @property
    @abc.abstractmethod
    def rank(self) -> int:
        """This worker's member id."""

    @property
    def world_size(self) -> int:
        """Number of current members."""
        return len(self.members())

    @abc.abstractmethod
    def members(self) -> list[int]:
        """Current member ids, sorted; the same list on every member of an epoch."""

    @property
    @abc.abstractmethod
    def epoch(self) -> int:
        """A number that changes whenever membership changes."""

    aggregate_rules: tuple[str, ...] = ("mean",)
    """Capability: the rules ``all_reduce(aggregate=...)`` serves (:mod:`lowcomm.comm.aggregate`).
    A transport that lists only ``"mean"`` need not accept the ``aggregate``/``center`` keywords;
    strategies pass them only for another rule, after checking this at construction."""

    token_syncs: bool = False
    """Capability: :meth:`tally_tokens` calls syncs by work done (``sync_tokens=`` on a strategy)."""

    def tally_tokens(self, tokens: int, target: int) -> dict[int, int] | None:
        """Report that this member finished a step of ``tokens`` tokens; None while the group's tokens
        since the last sync are below ``target``, else every member's tokens since the last sync (the
        same dict on every member: they all sync now, see :mod:`lowcomm.comm.tokens`). Only a
        transport with :attr:`token_syncs` implements it."""
        raise NotImplementedError(f"{type(self).__name__} cannot call syncs by tokens")

    @abc.abstractmethod
    def all_reduce(self, tensors: Sequence[torch.Tensor], op: str = "mean", codec: Any = None) -> Handle:
        """Reduce ``tensors`` (in place) across all members; ``op`` is "mean" or "sum".

        With a codec, every contribution and the result pass through it (see
        :mod:`lowcomm.codecs`); every member ends with identical bits. A transport whose
        :attr:`aggregate_rules` lists more than ``"mean"`` also takes ``aggregate=`` (a rule) and
        ``center=`` (the previous aggregate, for ``"centered_clip"``).
        """

    @abc.abstractmethod
    def all_gather(self, payload: Sequence[torch.Tensor], validate: Callable[[list, int], Any] | None = None
                   ) -> Handle:
        """Gather every member's ``payload`` (sizes may differ between members).

        The result is a list, in :meth:`members` order, of each member's list of tensors.
        ``validate(parts, member)``, raising ``ValueError``, checks every other member's payload as
        it arrives, before the op's commit vote: a malformed one fails the op on every member as a
        :class:`BadPayload` naming its sender (rolled back), instead of diverging the members that
        parse it after the commit.
        """

    @abc.abstractmethod
    def group_reduce(self, group: Sequence[int], tensors: Sequence[torch.Tensor], op: str = "mean") -> Handle:
        """Reduce ``tensors`` (in place) among the member ids in ``group`` only.

        Only the members of ``group`` call it; others are not involved. The p2p transports also
        take ``check=callable``: it receives every member's tensors as received
        (``{member id: [flat tensor per dtype]}``) before the commit vote, and a ``CommError`` it
        raises fails the exchange for the whole group (NoLoCo's partner screening uses it).
        """

    @abc.abstractmethod
    def broadcast(self, tensors: Sequence[torch.Tensor], src: int) -> Handle:
        """Copy member ``src``'s ``tensors`` into everyone's ``tensors`` (in place)."""

    def refresh(self) -> None:  # noqa: B027 - optional for fixed-membership transports
        """Bring membership up to date after a failure (no-op where membership is fixed)."""

    def close(self) -> None:  # noqa: B027
        """Release sockets, threads and process groups."""

    def on_sync_applied(self, optimizer: Any) -> None:  # noqa: B027
        """Called by an outer optimizer after a committed sync has been applied (global parameters,
        outer state and counters updated). The ZeroMQ transport snapshots the state for joining
        peers here; other transports ignore it."""

    def report_stats(self, stats: Mapping[str, float]) -> None:  # noqa: B027
        """A training loop's figures for whoever watches the run (keys: :data:`STAT_KEYS`).

        The ZeroMQ transport sends the latest ones with its heartbeats, and the coordinator's run
        page shows them; other transports ignore them.
        """

    def attach(self, model: Any, optimizer: Any, *, verify_global: bool = True) -> None:  # noqa: B027
        """Give the transport the model and optimizer once both are built (a training loop calls it).

        A transport whose members can join a run under way (ZeroMQ) serves snapshots to joiners
        from here on, and a joiner fetches the run's current state into ``model`` and
        ``optimizer`` here (``optimizer.local_step`` then says where the run is);
        ``verify_global``: the strategy's members hold identical global state, which a joiner
        checks. Fixed-membership transports do nothing.
        """


_REQUIRED = ("rank", "world_size", "members", "epoch", "all_reduce", "all_gather", "group_reduce",
             "broadcast", "refresh", "ledger", "on_sync_applied", "attach")


def check_transport(obj: Any) -> Transport:
    """Return ``obj`` if it implements the transport protocol, else raise ``ValueError``."""
    missing = [name for name in _REQUIRED if not hasattr(obj, name)]
    if missing:
        raise ValueError(
            f"transport {type(obj).__name__!r} does not implement the lowcomm transport protocol "
            f"(missing: {', '.join(missing)}); pass lowcomm.connect(), a lowcomm.comm.local transport, "
            f"or a subclass of lowcomm.comm.base.Transport"
        )
    return obj
