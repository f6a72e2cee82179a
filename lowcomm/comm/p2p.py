"""Collective algorithms written once over point-to-point messages.

A transport that can send a list of tensors to one peer and receive from one peer
(``_send`` / ``_recv``) and run a commit round (``_commit``) gets every operation of the
protocol from :class:`P2PTransport`. The local and ZeroMQ transports share this code, so
they perform the same arithmetic in the same order.

Summation order (what makes results bit-identical):

* ``all_reduce`` is reduce-scatter + all-gather. Tensors are flattened per dtype; the flat
  vector is cut into ``W`` contiguous shards (the first ``n % W`` shards one element
  longer); the owner of shard ``j`` is ``members()[j]``. The owner accumulates in fp32 in
  member order, ``((x_0 + x_1) + x_2) + ...``, divides by ``W`` for a mean, casts back,
  and sends the result to everyone. Every member sends ``(W-1)/W`` of the tensor twice:
  ``2 (W-1)/W`` in all, as a ring would.
* With a codec the whole input is flattened to fp32; each member encodes every shard
  (its own too, so every contribution passes through the same quantizer), the owner
  decodes and sums in fp32 in member order, encodes the result once and sends that; every
  member, the owner included, keeps ``decode(encode(result))``.
* ``group_reduce`` sends the whole tensor to each other group member; each member sums in
  sorted member-id order in fp32, so the group agrees bit for bit.
* ``all_reduce(..., aggregate=rule)`` with a rule other than ``"mean"`` flattens to fp32 and
  runs :func:`lowcomm.comm.robust.robust_reduce` (the owner aggregates its shard with the rule;
  see :mod:`lowcomm.comm.aggregate`). Concrete transports declare the rules they serve in
  :attr:`P2PTransport.aggregate_rules`.

Results are assembled in scratch buffers and written into the caller's tensors only after
the commit round agrees that the operation succeeded everywhere, so a failed operation
leaves the caller's tensors untouched.
"""

from __future__ import annotations

import abc
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch

from ..codecs import wire_codec
from ..shards import shard_bounds
from .aggregate import get_aggregate
from .base import DEFAULT_TIMEOUT, BadPayload, ByteLedger, CommError, Handle, OpRecord, PeerLost, Transport
from .reduce import reduce_in_member_order

__all__ = ["P2PTransport", "shard_bounds"]  # shard_bounds lives in lowcomm.shards; re-exported here


def _check_op(op: str) -> str:
    if op not in ("mean", "sum"):
        raise ValueError(f"reduce op must be 'mean' or 'sum', got {op!r}")
    return op


def _dtype_groups(tensors: Sequence[torch.Tensor]) -> list[tuple[torch.dtype, list[int]]]:
    groups: dict[torch.dtype, list[int]] = {}
    for i, t in enumerate(tensors):
        groups.setdefault(t.dtype, []).append(i)
    return list(groups.items())


def _flatten(tensors: Sequence[torch.Tensor], idxs: Sequence[int], dtype: torch.dtype) -> torch.Tensor:
    if len(idxs) == 1:
        return tensors[idxs[0]].detach().reshape(-1).to(dtype=dtype, copy=True)
    return torch.cat([tensors[i].detach().reshape(-1).to(dtype) for i in idxs])


def _unflatten_into(flat: torch.Tensor, tensors: Sequence[torch.Tensor], idxs: Sequence[int]) -> None:
    off = 0
    with torch.no_grad():
        for i in idxs:
            t = tensors[i]
            n = t.numel()
            t.copy_(flat[off:off + n].view(t.shape))
            off += n


def _write_back(flats: list[tuple[torch.Tensor, Sequence[int]]], tensors: Sequence[torch.Tensor]):
    """A closure that writes each reduced flat buffer into the caller's tensors (run after the commit)."""

    def finish() -> Sequence[torch.Tensor]:
        for flat, idxs in flats:
            _unflatten_into(flat, tensors, idxs)
        return tensors
    return finish


class P2PTransport(Transport):
    """Implements the protocol's operations on top of ``_send``, ``_recv`` and ``_commit``."""

    def __init__(self, timeout: float = DEFAULT_TIMEOUT) -> None:
        if not timeout or timeout <= 0:
            raise ValueError(f"timeout must be a positive number of seconds, got {timeout!r}")
        self.timeout = float(timeout)
        self.ledger = ByteLedger()
        self._seq = 0  # operations this worker started (ledger op ids, fault injection)
        self._op_counts: dict[tuple, int] = {}
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lowcomm-comm")

    # ---- what a concrete transport provides -------------------------------------------
    @abc.abstractmethod
    def _send(self, peer: int, tag: tuple, parts: list[torch.Tensor], rec: OpRecord) -> None:
        """Send ``parts`` to ``peer`` under ``tag`` (must not block on the receiver)."""

    @abc.abstractmethod
    def _recv(self, peer: int, tag: tuple, deadline: float) -> list[torch.Tensor]:
        """Receive what ``peer`` sent under ``tag``; raise PeerLost / CommTimeout."""

    @abc.abstractmethod
    def _commit(self, tag: tuple, participants: Sequence[int], ok: bool, deadline: float) -> tuple[bool, list[int]]:
        """Agree with ``participants`` whether the operation ``tag`` succeeded everywhere.

        Returns ``(committed, lost)``; every live participant gets the same answer.
        """

    def _on_op_start(self, seq: int) -> None:  # noqa: B027 - hook for fault injection
        """Called in the communication thread when operation ``seq`` starts."""

    # Hooks of the simulator (the local transport overrides them); identity / no-op here.
    def _contribution(self, seq: Any, members: Sequence[int], flat: torch.Tensor) -> torch.Tensor:
        """What this member contributes to an all-reduce of ``flat`` (simulated attackers change it)."""
        return flat

    def _owner_result(self, seq: Any, result: torch.Tensor) -> torch.Tensor:
        """What this member, as the owner of a shard, returns for ``result`` (a simulated liar changes it)."""
        return result

    def _on_screen(self, seq: Any, members: Sequence[int], screen: Any, parts: list[torch.Tensor]) -> None:  # noqa: B027
        """A robust rule screened this owner's shard (offences with the received pieces as evidence)."""

    def _auditing(self) -> bool:
        """Whether all-reduces keep what :meth:`_audit` needs (simulation of owner audits)."""
        return False

    def _audit(self, seq: Any, rec: OpRecord, members: Sequence[int], deadline: float, args: tuple) -> None:  # noqa: B027
        """Audit an all-reduce before its commit vote (``args``: see :func:`lowcomm.comm.audit.run_audit`)."""

    # ---- plumbing ----------------------------------------------------------------------
    def _start(self, kind: str, participants: Sequence[int], body, tag: str = "") -> Handle:
        seq = self._seq
        self._seq += 1
        members = list(participants)
        # Messages and votes are matched by (participants, n-th operation among them), not by
        # this worker's own operation count: a group_reduce that leaves some members out must
        # not put them out of step for the next collective.
        group_key = tuple(members)
        n = self._op_counts.get(group_key, 0)
        self._op_counts[group_key] = n + 1
        key = (group_key, n)
        rec = self.ledger.begin(kind, len(members), tag)

        def run() -> Any:
            deadline = time.monotonic() + self.timeout
            err: BaseException | None = None
            result = None
            self._on_op_start(seq)
            try:
                result = body(key, rec, members, deadline)
            except CommError as e:
                err = e
            ok, lost = self._commit((key, "commit"), members, err is None, time.monotonic() + self.timeout)
            rec.ok = ok
            if not ok:
                if isinstance(err, PeerLost) and err.lost:
                    lost = sorted(set(lost) | set(err.lost))
                raise PeerLost(lost, f"{kind} #{seq} failed: lost peer(s) {lost}"
                               + (f" ({err})" if err else "")) from err
            return result() if callable(result) else result

        return Handle(self._executor.submit(run), rec, self.timeout + 5.0)

    def _members_or_raise(self) -> list[int]:
        members = self.members()
        if self.rank not in members:
            raise PeerLost([self.rank], f"member {self.rank} is no longer part of the run")
        return members

    # ---- operations --------------------------------------------------------------------
    aggregate_rules: tuple[str, ...] = ("mean",)
    """Aggregation rules ``all_reduce(aggregate=...)`` serves (a transport that can, lists them all)."""

    def all_reduce(self, tensors: Sequence[torch.Tensor], op: str = "mean", codec: Any = None,
                   aggregate: Any = None, center: Sequence[torch.Tensor] | None = None) -> Handle:
        """See :meth:`Transport.all_reduce`; ``aggregate`` a rule (name, dict or
        :class:`~lowcomm.comm.aggregate.Aggregate`), ``center`` the previous aggregate for
        ``"centered_clip"`` (same shapes as ``tensors``; None = zero)."""
        _check_op(op)
        tensors = list(tensors)
        members = self._members_or_raise()
        agg = get_aggregate(aggregate)
        if agg.robust:
            if agg.rule not in self.aggregate_rules:
                raise ValueError(f"{type(self).__name__} cannot aggregate with {agg.rule!r} "
                                 f"(it serves {self.aggregate_rules})")
            if op != "mean":
                raise ValueError(f"aggregate={agg.rule!r} needs op='mean', got {op!r}")
            # (no check_world here: strategies check it at construction; when members are lost
            # later, trimmed_mean's trim shrinks so that at least one value remains)
        codec = wire_codec(codec)

        def body(seq, rec, members, deadline):
            me = members.index(self.rank)
            w = len(members)
            if codec is None and not agg.robust:
                flats = []
                for gi, (dtype, idxs) in enumerate(_dtype_groups(tensors)):
                    flat = self._contribution((seq, gi), members, _flatten(tensors, idxs, dtype))
                    orig = flat.clone() if self._auditing() else None
                    self._reduce_scatter_gather(seq, rec, members, me, w, flat, op, deadline, gi)
                    if orig is not None:
                        from .audit import plain_audit

                        self._audit((seq, gi), rec, members, deadline, plain_audit(orig, flat, w, op))
                    flats.append((flat, idxs))

                return _write_back(flats, tensors)
            idxs = list(range(len(tensors)))
            flat = self._contribution((seq, 0), members, _flatten(tensors, idxs, torch.float32))
            orig = flat.clone() if self._auditing() else None
            if agg.robust:
                from .audit import robust_audit
                from .robust import robust_reduce

                c = None if center is None else _flatten(list(center), idxs, torch.float32)
                mats = robust_reduce(self, seq, rec, members, me, flat, agg, codec, c, deadline,
                                     shard_bounds(flat.numel(), w),
                                     on_screen=lambda scr, parts: self._on_screen(seq, members, scr, parts),
                                     owner_result=lambda r: self._owner_result(seq, r))
                if orig is not None:
                    self._audit((seq, 0), rec, members, deadline, robust_audit(orig, flat, w, agg, codec, c, mats))
            else:
                self._quantized_reduce(seq, rec, members, me, w, flat, op, codec, deadline)
                if orig is not None:
                    from .audit import plain_audit

                    self._audit((seq, 0), rec, members, deadline, plain_audit(orig, flat, w, op, codec))
            return _write_back([(flat, idxs)], tensors)

        return self._start("all_reduce", members, body)

    def _reduce_scatter_gather(self, seq, rec, members, me, w, flat, op, deadline, gi) -> None:
        bounds = shard_bounds(flat.numel(), w)
        for j, peer in enumerate(members):
            if j != me:
                s, e = bounds[j]
                self._send(peer, (seq, "rs", gi), [flat[s:e]], rec)
        s, e = bounds[me]

        def shards():
            for j, peer in enumerate(members):
                part = flat[s:e] if j == me else self._recv(peer, (seq, "rs", gi), deadline)[0]
                if part.numel() != e - s:
                    raise CommError(f"shard from member {peer} has {part.numel()} elements, expected {e - s}")
                yield part
        mine = self._owner_result(seq, reduce_in_member_order(shards(), op).to(flat.dtype))
        for j, peer in enumerate(members):
            if j != me:
                self._send(peer, (seq, "ag", gi), [mine], rec)
        flat[s:e].copy_(mine)
        for j, peer in enumerate(members):
            if j != me:
                s2, e2 = bounds[j]
                part = self._recv(peer, (seq, "ag", gi), deadline)[0]
                if part.numel() != e2 - s2:
                    raise CommError(f"result shard from member {peer} has wrong size")
                flat[s2:e2].copy_(part)

    def _quantized_reduce(self, seq, rec, members, me, w, flat, op, codec, deadline) -> None:
        bounds = shard_bounds(flat.numel(), w)
        own_parts = None
        for j, peer in enumerate(members):
            s, e = bounds[j]
            parts = codec.encode(flat[s:e])
            if j == me:
                own_parts = parts
            else:
                self._send(peer, (seq, "qrs"), parts, rec)
        s, e = bounds[me]
        decoded = (codec.decode(own_parts if j == me else self._recv(peer, (seq, "qrs"), deadline), e - s)
                   for j, peer in enumerate(members))
        result = codec.encode(self._owner_result(seq, reduce_in_member_order(decoded, op)))
        for j, peer in enumerate(members):
            if j != me:
                self._send(peer, (seq, "qag"), result, rec)
        flat[s:e].copy_(codec.decode(result, e - s))
        for j, peer in enumerate(members):
            if j != me:
                s2, e2 = bounds[j]
                flat[s2:e2].copy_(codec.decode(self._recv(peer, (seq, "qag"), deadline), e2 - s2))

    def all_gather(self, payload: Sequence[torch.Tensor], validate: Callable[[list, int], Any] | None = None
                   ) -> Handle:
        payload = [t.detach() for t in payload]
        members = self._members_or_raise()

        def body(seq, rec, members, deadline):
            for peer in members:
                if peer != self.rank:
                    self._send(peer, (seq, "gather"), payload, rec)
            out = []
            for peer in members:
                parts = payload if peer == self.rank else self._recv(peer, (seq, "gather"), deadline)
                if validate is not None and peer != self.rank:
                    try:
                        validate(list(parts), peer)
                    except ValueError as e:  # fails the op for everyone (voted), naming the sender
                        raise BadPayload(peer, f"the payload from member {peer} is malformed: {e}") from e
                out.append(parts)
            return out

        return self._start("all_gather", members, body)

    def group_reduce(self, group: Sequence[int], tensors: Sequence[torch.Tensor], op: str = "mean",
                     check: Callable[[dict[int, list[torch.Tensor]]], None] | None = None) -> Handle:
        """See :meth:`Transport.group_reduce`.

        ``check(tensors_by_member)``, when given, is called inside the operation with every group
        member's tensors as received (``{member id: [flat tensor per dtype group]}``, this member's
        own included) before the commit vote; a :class:`CommError` it raises fails the exchange
        for the whole group (every member rolls back), so it can reject a member (NoLoCo's partner
        screening) and name it.
        """
        _check_op(op)
        group = sorted(set(int(g) for g in group))
        if self.rank not in group:
            raise ValueError(f"group_reduce: this member ({self.rank}) is not in the group {group}; "
                             f"only the group's members call it")
        tensors = list(tensors)

        def body(seq, rec, group, deadline):
            flats = []
            received: dict[int, list[torch.Tensor]] = {peer: [] for peer in group}
            for gi, (dtype, idxs) in enumerate(_dtype_groups(tensors)):
                flat = self._contribution((seq, gi), group, _flatten(tensors, idxs, dtype))
                for peer in group:
                    if peer != self.rank:
                        self._send(peer, (seq, "grp", gi), [flat], rec)

                def contributions(flat=flat, gi=gi):
                    for peer in group:
                        part = flat if peer == self.rank else self._recv(peer, (seq, "grp", gi), deadline)[0]
                        if part.numel() != flat.numel():
                            raise CommError(f"group_reduce: member {peer} sent {part.numel()} elements, "
                                            f"expected {flat.numel()}")
                        received[peer].append(part)
                        yield part
                flats.append((reduce_in_member_order(contributions(), op).to(dtype), idxs))
            if check is not None:
                check(received)
            return _write_back(flats, tensors)

        return self._start("group_reduce", group, body)

    def broadcast(self, tensors: Sequence[torch.Tensor], src: int) -> Handle:
        tensors = list(tensors)
        members = self._members_or_raise()
        if src not in members:
            raise ValueError(f"broadcast source {src} is not a member ({members})")

        def body(seq, rec, members, deadline):
            groups = _dtype_groups(tensors)
            if self.rank == src:
                for gi, (dtype, idxs) in enumerate(groups):
                    flat = _flatten(tensors, idxs, dtype)
                    for peer in members:
                        if peer != src:
                            self._send(peer, (seq, "bc", gi), [flat], rec)
                return tensors
            flats = []
            for gi, (dtype, idxs) in enumerate(groups):
                flat = self._recv(src, (seq, "bc", gi), deadline)[0]
                if flat.numel() != sum(tensors[i].numel() for i in idxs) or flat.dtype != dtype:
                    raise CommError(f"broadcast from {src}: payload does not match the local tensors")
                flats.append((flat, idxs))

            return _write_back(flats, tensors)

        return self._start("broadcast", members, body)

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
