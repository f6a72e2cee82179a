"""Audits of shard owners in a local world (simulation of the coordinator's audit).

With probability ``audit`` per all-reduce (drawn by the world, which plays the coordinator,
only after every member has reported the hashes of its shard contributions and of the results
it received, so no owner can know in advance), one shard ``j`` is picked and up to two other
members (the *auditors*) fetch every member's contribution to that shard (the extra bytes are
on the ledger, kind ``"audit"``) and recompute it with the op's rule (the norm rows the owners
published included). Then:

- a contribution whose bytes do not hash to what its sender reported names the sender;
- a result that disagrees with the majority of the auditors' recomputations names the owner.

Either fails the op on every member (so it is rolled back) and counts an offence, backed by that
evidence, in the world's :class:`~lowcomm.comm.adversary.OffenceBook`.
"""

from __future__ import annotations

import hashlib
import random
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

from ..shards import shard_bounds
from .adversary import Offence
from .base import CommError, CommTimeout
from .reduce import reduce_in_member_order

__all__ = ["AuditBoard", "digest", "plain_audit", "robust_audit", "run_audit"]


def digest(parts: Sequence[torch.Tensor]) -> str:
    h = hashlib.sha256()
    for t in parts:
        t = t.detach().contiguous()
        h.update(str(t.dtype).encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


class AuditBoard:
    """The world's side: hash reports, the draw, the auditors' verdicts, the outcome per op."""

    def __init__(self, probability: float, seed: int = 0):
        if not 0.0 <= probability <= 1.0:
            raise ValueError(f"audit must be a probability in [0, 1], got {probability!r}")
        self.probability = probability
        self._rng = random.Random(seed)
        self._cv = threading.Condition()
        self._reports: dict[Any, dict[int, tuple[list[str], list[str]]]] = {}
        self._draws: dict[Any, tuple[int, list[int]] | None] = {}
        self._verdicts: dict[Any, dict[int, tuple[str, int] | None]] = {}
        self.ops = 0  # all-reduce ops seen (each counted once)
        self.extra_bytes = 0  # bytes the audits moved (contributions fetched by auditors)
        self.found: dict[Any, tuple[int, str, int]] = {}  # op key -> (op number, "owner"|"sender", member)
        self._opnum: dict[Any, int] = {}
        self._done: dict[Any, int] = {}
        self.audits: list[dict[str, Any]] = []  # {"op": n, "shard": j, "auditors": [...], "verdict": ...}

    def report(self, key: Any, rank: int, members: Sequence[int], sent: list[str], results: list[str],
               deadline: float) -> tuple[int, list[int]] | None:
        """Report this member's hashes; once all are in, the (single) draw for ``key``."""
        with self._cv:
            got = self._reports.setdefault(key, {})
            got[rank] = (sent, results)
            self._cv.notify_all()
            while len(got) < len(members) and key not in self._draws:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise CommTimeout([m for m in members if m not in got], f"audit hashes of op {key} missing")
                self._cv.wait(left)
            if key not in self._draws:
                self.ops += 1
                self._opnum[key] = self.ops
                draw = None
                if len(members) >= 2 and self._rng.random() < self.probability:
                    j = self._rng.randrange(len(members))
                    others = [m for m in members if m != members[j]]
                    draw = (j, sorted(self._rng.sample(others, min(2, len(others)))))
                    self.audits.append({"op": self.ops, "shard": j, "owner": members[j], "auditors": draw[1]})
                self._draws[key] = draw
            return self._draws[key]

    def done(self, key: Any, members: int) -> None:
        """A member is through with op ``key``'s audit; the last one frees the op's records."""
        with self._cv:
            self._done[key] = self._done.get(key, 0) + 1
            if self._done[key] >= members:
                for d in (self._reports, self._draws, self._verdicts, self._opnum, self._done):
                    d.pop(key, None)

    def named(self, key: Any, kind: str, member: int) -> None:
        with self._cv:
            self.found.setdefault(key, (self._opnum.get(key, 0), kind, member))

    def summary(self) -> dict[str, Any]:
        """Ops seen, audits drawn, extra bytes, and who was named at which op number."""
        with self._cv:
            return {"probability": self.probability, "ops": self.ops, "audits": len(self.audits),
                    "extra_bytes": self.extra_bytes,
                    "named": [{"op": n, "kind": k, "member": m} for n, k, m in sorted(self.found.values())]}

    def hashes(self, key: Any) -> dict[int, tuple[list[str], list[str]]]:
        with self._cv:
            return dict(self._reports[key])

    def verdict(self, key: Any, rank: int, auditors: Sequence[int], found: tuple[str, int] | None,
                deadline: float) -> dict[int, tuple[str, int] | None]:
        with self._cv:
            got = self._verdicts.setdefault(key, {})
            if rank in auditors:
                got[rank] = found
            self._cv.notify_all()
            while len(got) < len(auditors):
                left = deadline - time.monotonic()
                if left <= 0:
                    raise CommTimeout([a for a in auditors if a not in got], f"audit verdicts of op {key} missing")
                self._cv.wait(left)
            return dict(got)


def run_audit(tr: Any, board: AuditBoard, book: Any, seq: Any, rec: Any, members: Sequence[int],
              sent: list[list[torch.Tensor]], results: list[list[torch.Tensor]],
              decode: Callable[[list[torch.Tensor], int], torch.Tensor],
              expected: Callable[[int, list[torch.Tensor]], list[torch.Tensor]], deadline: float) -> None:
    """One member's part in the audit of op ``seq`` (see the module docstring).

    ``sent[j]``: the parts this member sent for shard j (its own shard included); ``results[j]``:
    owner j's result parts as received; ``decode(parts, j)``: a contribution as the owner read it;
    ``expected(j, contributions)``: the result parts owner j should have sent.
    """
    me = tr.rank
    draw = board.report(seq, me, members, [digest(p) for p in sent], [digest(p) for p in results], deadline)
    try:
        if draw is not None:
            _audit_shard(tr, board, book, seq, rec, members, sent, results, decode, expected, deadline, *draw)
    finally:
        board.done(seq, len(members))


def _audit_shard(tr, board, book, seq, rec, members, sent, results, decode, expected, deadline, j, auditors):
    me = tr.rank
    owner = members[j]
    for a in auditors:
        if a != me:
            tr._send(a, (seq, "audit"), sent[j], rec)
            with board._cv:
                board.extra_bytes += sum(t.numel() * t.element_size() for t in sent[j])
    found = None
    if me in auditors:
        reports = board.hashes(seq)
        contribs = []
        for peer in members:
            parts = sent[j] if peer == me else tr._recv(peer, (seq, "audit"), deadline)
            if found is None and digest(parts) != reports[peer][0][j]:
                found = ("sender", peer)
            contribs.append(decode(parts, j))
        if found is None and digest(expected(j, contribs)) != digest(results[j]):
            found = ("owner", owner)
    verdicts = board.verdict(seq, me, auditors, found, deadline)
    against_owner = sum(1 for v in verdicts.values() if v == ("owner", owner))
    senders = sorted({v[1] for v in verdicts.values() if v is not None and v[0] == "sender"})
    if senders:
        for s in senders:
            board.named(seq, "sender", s)
            book.verified(Offence(s, repr(seq), "hash_mismatch", "contribution bytes differ from the reported hash"))
        raise CommError(f"audit of shard {j}: member(s) {senders} sent bytes that do not match their hash")
    if against_owner * 2 > len(auditors):
        board.named(seq, "owner", owner)
        book.verified(Offence(owner, repr(seq), "lying_owner",
                              f"{against_owner} of {len(auditors)} auditors recomputed a different result"))
        raise CommError(f"audit of shard {j}: owner {owner} returned a result that {against_owner} of "
                        f"{len(auditors)} auditors' recomputations disagree with")


def plain_audit(orig: torch.Tensor, flat: torch.Tensor, w: int, op: str, codec: Any = None) -> tuple:
    """``(sent, results, decode, expected)`` of :func:`run_audit` for the plain (and quantized) sum/mean:
    ``orig`` this member's contribution, ``flat`` the op's result as this member holds it."""
    b = shard_bounds(flat.numel(), w)
    if codec is None:
        return ([[orig[s:e]] for s, e in b], [[flat[s:e]] for s, e in b], lambda parts, j: parts[0],
                lambda j, parts: [reduce_in_member_order(parts, op).to(flat.dtype)])
    n = [e - s for s, e in b]
    return ([codec.encode(orig[s:e]) for s, e in b], [[flat[s:e]] for s, e in b],
            lambda parts, j: codec.decode(parts, n[j]),
            lambda j, parts: [codec.decode(codec.encode(reduce_in_member_order(parts, op)), n[j])])


def robust_audit(orig: torch.Tensor, flat: torch.Tensor, w: int, agg: Any, codec: Any,
                 center: torch.Tensor | None, matrices: list[torch.Tensor]) -> tuple:
    """As :func:`plain_audit` for a robust rule: the recomputation replays the published norm rows
    and checks the owner's own row in each of them."""
    sent, results, decode, _ = plain_audit(orig, flat, w, "mean", codec)
    b = shard_bounds(flat.numel(), w)

    def expected(j: int, parts: list[torch.Tensor]) -> list[torch.Tensor]:
        s, e = b[j]
        gen = agg.owner([p.to(torch.float32).reshape(-1) for p in parts], None if center is None else center[s:e])
        try:
            row = next(gen)
            for m in matrices:
                if not torch.equal(row, m[j]):
                    return [torch.full((1,), float("nan"))]  # the owner published a false norm row
                row = gen.send(m)
            return [torch.full((1,), float("nan"))]  # more rounds than were published
        except StopIteration as stop:
            res = stop.value[0]
        return [codec.decode(codec.encode(res), e - s) if codec is not None else res]

    return sent, results, decode, expected
