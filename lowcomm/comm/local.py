"""W workers as threads in one process: the transport for tests and the simulator.

Messages are real copies of the tensors a worker would frame for the wire, so the byte
ledger counts what a network transport would send (payload bytes; no headers). The
collective algorithms are those of :mod:`lowcomm.comm.p2p`, shared with the ZeroMQ
transport.

Fault injection: ``run_local(..., faults={rank: Fault(op=k, after_messages=m)})`` makes
worker ``rank`` die during its operation number ``k`` (counted from 0, the initial
broadcast included) after it has sent ``m`` messages of it. Survivors see
:class:`~lowcomm.comm.base.PeerLost` naming it, roll back, and ``refresh()`` gives them the
new membership. A ``Fault(..., stall=True)`` stops sending instead of dying, so survivors
see a :class:`~lowcomm.comm.base.CommTimeout` at the deadline.

Robust aggregation (simulation): the local transport serves every rule of
:mod:`lowcomm.comm.aggregate`. ``LocalWorld(..., adversary=Adversary(...))`` makes the last K
workers attackers (:mod:`lowcomm.comm.adversary`); offences found by screening are checked
against the owners' received values by the world's :class:`~lowcomm.comm.adversary.OffenceBook`
and a member with ``max_offences`` of them is ejected: from the next operation on it is no
longer in anyone's :meth:`LocalTransport.members` (its own operations fail with ``PeerLost``).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .adversary import Adversary, OffenceBook
from .aggregate import RULES
from .audit import AuditBoard, run_audit
from .base import DEFAULT_TIMEOUT, CommError, CommTimeout, Handle, OpRecord, PeerLost, tensor_nbytes
from .p2p import P2PTransport
from .tokens import TokenBoard, parse_speeds

__all__ = ["Fault", "LocalTransport", "LocalWorld", "WorkerKilled", "run_local"]

log = logging.getLogger(__name__)


class WorkerKilled(BaseException):  # noqa: N818 - not an error the worker may catch
    """Raised inside a worker that fault injection killed (a BaseException so no
    ``except Exception`` in user code swallows it)."""


@dataclass(frozen=True)
class Fault:
    """Kill (or stall) a worker during its operation number ``op`` after ``after_messages`` sends."""

    op: int
    after_messages: int = 0
    stall: bool = False


class LocalWorld:
    """Shared state of a group of local workers: mailboxes, liveness, commit votes."""

    def __init__(self, world_size: int, timeout: float = DEFAULT_TIMEOUT, adversary: Adversary | None = None,
                 max_offences: int = 3, audit: float = 0.0, seed: int = 0, speeds: Any = None):
        if world_size < 1:
            raise ValueError(f"world_size must be >= 1, got {world_size}")
        self.world_size = world_size
        self.timeout = timeout
        self.adversary = adversary
        self.book = OffenceBook(max_offences)
        self.audits = AuditBoard(audit, seed)
        self._cv = threading.Condition()
        self._mail: dict[tuple, list[torch.Tensor]] = {}
        self._votes: dict[tuple, dict[int, bool]] = {}
        self.alive: set[int] = set(range(world_size))
        self.stalled: set[int] = set()
        self.epoch = 0
        # relative compute speeds: when token-triggered syncs are due (lowcomm.comm.tokens)
        self.tokens = TokenBoard(parse_speeds([1] * world_size if speeds is None else speeds, world_size))

    def kill(self, rank: int) -> None:
        with self._cv:
            if rank in self.alive:
                self.alive.discard(rank)
                self.epoch += 1
                log.warning("local worker %d died (epoch now %d)", rank, self.epoch)
            self._cv.notify_all()

    def put(self, src: int, dst: int, tag: tuple, parts: list[torch.Tensor]) -> None:
        with self._cv:
            self._mail[(src, dst, tag)] = parts
            self._cv.notify_all()

    def get(self, dst: int, src: int, tag: tuple, deadline: float) -> list[torch.Tensor]:
        key = (src, dst, tag)
        with self._cv:
            while True:
                if key in self._mail:
                    return self._mail.pop(key)
                if src not in self.alive:
                    raise PeerLost([src], f"member {src} died before sending {tag}")
                if src in self._votes.get((tag[0], "commit"), ()):
                    # src already gave up on this operation (it lost someone else): abort now
                    # rather than wait for a message that will never come.
                    raise CommError(f"member {src} aborted operation {tag[0]}")
                left = deadline - time.monotonic()
                if left <= 0:
                    raise CommTimeout([src], f"no message from member {src} for {tag} before the deadline")
                self._cv.wait(left)

    def commit(self, rank: int, tag: tuple, participants: Sequence[int], ok: bool,
               deadline: float) -> tuple[bool, list[int]]:
        with self._cv:
            votes = self._votes.setdefault(tag, {})
            votes[rank] = ok
            self._cv.notify_all()
            while True:
                missing = [p for p in participants if p not in votes]
                dead = [p for p in missing if p not in self.alive]
                if not missing or (len(dead) == len(missing)):
                    break
                left = deadline - time.monotonic()
                if left <= 0:
                    # A stalled member never votes: treat it as lost, and make sure every
                    # other participant reaches the same verdict by declaring it dead.
                    for p in missing:
                        self.alive.discard(p)
                        self.stalled.add(p)
                    self.epoch += 1
                    self._cv.notify_all()
                    break
                self._cv.wait(left)
            missing = [p for p in participants if p not in votes]
            lost = sorted(set(missing) | {p for p, v in votes.items() if not v and p not in self.alive})
            committed = not missing and all(votes[p] for p in participants)
            return committed, ([] if committed else lost)


class LocalTransport(P2PTransport):
    """One worker's view of a :class:`LocalWorld` (see the module docstring)."""

    aggregate_rules = RULES
    token_syncs = True

    def __init__(self, world: LocalWorld, rank: int, fault: Fault | None = None,
                 timeout: float | None = None):
        super().__init__(timeout or world.timeout)
        if not 0 <= rank < world.world_size:
            raise ValueError(f"rank {rank} out of range for a world of {world.world_size}")
        self.world = world
        self._rank = rank
        self._fault = fault
        self._members = sorted(world.alive)
        self._epoch = world.epoch
        self._cur_seq = -1
        self._sent_in_op = 0
        self._token_phase = 0

    @property
    def rank(self) -> int:
        return self._rank

    @property
    def epoch(self) -> int:
        return self._epoch

    def members(self) -> list[int]:
        ejected = self.world.book.ejected
        return [m for m in self._members if m not in ejected]

    def refresh(self) -> None:
        self._members = sorted(self.world.alive)
        self._epoch = self.world.epoch

    @property
    def token_phase(self) -> int:
        """Token-triggered syncs called so far (the world's :class:`TokenBoard` phase)."""
        return self._token_phase

    def tally_tokens(self, tokens: int, target: int) -> dict[int, int] | None:
        world = self.world
        got = world.tokens.step(self.rank, self._token_phase, tokens, target,
                                lambda: [m for m in world.alive if m not in world.book.ejected],
                                time.monotonic() + self.timeout)
        if got is not None:
            self._token_phase += 1
        return got

    # ---- simulation hooks (attacks, offences) ----------------------------------------------
    def _contribution(self, seq, members, flat):
        adv = self.world.adversary
        if adv is None:
            return flat
        return adv.contribution(seq, self.rank, members, flat, time.monotonic() + self.timeout)

    def _owner_result(self, seq, result):
        adv = self.world.adversary
        return result if adv is None else adv.owner_result(self.rank, result)

    def _on_screen(self, seq, members, screen, parts):
        for i in screen.offences:
            self.world.book.evidence(repr(seq), members[i], self.rank, parts[i], len(members), screen.bound)

    def _auditing(self) -> bool:
        return self.world.audits.probability > 0

    def _audit(self, seq, rec, members, deadline, args):
        run_audit(self, self.world.audits, self.world.book, seq, rec, members, *args, deadline)

    def all_gather(self, payload: Sequence[torch.Tensor], validate=None) -> Handle:
        adv = self.world.adversary
        if adv is not None:
            payload = adv.gather_payload(self._seq, self.rank, list(payload))
        return super().all_gather(payload, validate)

    # ---- point to point ------------------------------------------------------------------
    def _on_op_start(self, seq: int) -> None:
        self._cur_seq = seq
        self._sent_in_op = 0
        self._maybe_fail()

    def _maybe_fail(self) -> None:
        f = self._fault
        if f is not None and self._cur_seq == f.op and self._sent_in_op >= f.after_messages:
            if f.stall:
                self.world.stalled.add(self.rank)
                # Stop taking part without dying: peers must notice by their deadline.
                raise WorkerKilled(f"worker {self.rank} stalled at operation {f.op}")
            self.world.kill(self.rank)
            raise WorkerKilled(f"worker {self.rank} killed at operation {f.op} "
                               f"after {self._sent_in_op} message(s)")

    def _send(self, peer: int, tag: tuple, parts: list[torch.Tensor], rec: OpRecord) -> None:
        self._maybe_fail()
        copies = [p.detach().clone() for p in parts]
        self.ledger.add(rec, peer, tensor_nbytes(copies))
        self.world.put(self.rank, peer, tag, copies)
        self._sent_in_op += 1

    def _recv(self, peer: int, tag: tuple, deadline: float) -> list[torch.Tensor]:
        return self.world.get(self.rank, peer, tag, deadline)

    def _commit(self, tag, participants, ok, deadline):
        return self.world.commit(self.rank, tag, participants, ok, deadline)


def run_local(world_size: int, fn: Callable[..., Any], *args: Any,
              faults: dict[int, Fault] | None = None, timeout: float = DEFAULT_TIMEOUT,
              join_timeout: float | None = 3600.0, world: LocalWorld | None = None, **kwargs: Any) -> list[Any]:
    """Run ``fn(transport, *args, **kwargs)`` in ``world_size`` threads; results in rank order.

    ``world``: a :class:`LocalWorld` of ``world_size`` built by the caller (e.g. with an
    adversary); by default a fresh one with ``timeout``.

    The workers are threads: torch's global RNG is shared between them, so build models
    (or seed and draw) under a lock, or before calling, to get reproducible initial weights.

    A worker killed by fault injection returns ``None``. Any other exception in a worker is
    re-raised here (the first one, by rank) once all workers have stopped.
    """
    faults = dict(faults or {})
    for r in faults:
        if not 0 <= r < world_size:
            raise ValueError(f"fault for rank {r} but the world has ranks 0..{world_size - 1}")
    if world is None:
        world = LocalWorld(world_size, timeout)
    elif world.world_size != world_size:
        raise ValueError(f"world has {world.world_size} workers, run_local was asked for {world_size}")
    transports = [LocalTransport(world, r, faults.get(r)) for r in range(world_size)]
    results: list[Any] = [None] * world_size
    errors: list[BaseException | None] = [None] * world_size

    def worker(r: int) -> None:
        try:
            results[r] = fn(transports[r], *args, **kwargs)
        except WorkerKilled:
            results[r] = None
        except BaseException as e:  # noqa: BLE001 - reported to the caller below
            errors[r] = e
            world.kill(r)  # a crashed worker is a lost peer for the others
        finally:
            transports[r].close()

    threads = [threading.Thread(target=worker, args=(r,), name=f"lowcomm-local-{r}", daemon=True)
               for r in range(world_size)]
    for t in threads:
        t.start()
    end = None if join_timeout is None else time.monotonic() + join_timeout
    for t in threads:
        t.join(None if end is None else max(0.0, end - time.monotonic()))
    hung = [r for r, t in enumerate(threads) if t.is_alive()]
    if hung:
        raise TimeoutError(f"local workers {hung} did not finish within {join_timeout}s")
    for r, e in enumerate(errors):
        if e is not None:
            raise RuntimeError(f"local worker {r} failed: {e!r}") from e
    return results
