"""Simulated attackers and the offence book of a local world (the simulator's threat model).

:class:`Adversary` turns the last K workers of a :class:`~lowcomm.comm.local.LocalWorld` into
attackers. Their *contributions* to every all-reduce and group exchange (and the floating-point
tensors of every all-gather payload) are replaced:

- ``scale``: the honest contribution x 1e4;
- ``sign_flip``: x -10;
- ``noise``: Gaussian noise with 100 x the norm of the attacker's honest contribution;
- ``alie`` ("a little is enough", Baruch et al. 2019, arXiv 1902.06156): every attacker sends
  the coordinate-wise ``mean - z * std`` of the honest contributions of that op, with
  ``z = Phi^-1((W - s) / W)``, ``s = floor(W/2 + 1) - K`` (the paper's z_max); all-reduces only;
- ``lying_owner``: the contribution is honest, but as the owner of a shard the attacker returns
  ``-10 x`` the true result (found by the audit, see :class:`~lowcomm.comm.local.LocalWorld`).

:class:`OffenceBook` counts offences per member. An offence needs evidence: the world recomputes
it from the values the owners *received* (non-finite, or a norm above ``hard_bound`` x the
median norm) or from a majority of audit recomputations; one member's word never counts.
After ``max_offences`` (default 3) the member is ejected for the rest of the run and logged.
"""

from __future__ import annotations

import hashlib
import logging
import math
import statistics
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .base import CommTimeout

__all__ = ["ATTACKS", "Adversary", "OffenceBook", "alie_z"]

log = logging.getLogger(__name__)

ATTACKS = ("scale", "sign_flip", "noise", "alie", "lying_owner")


def alie_z(world_size: int, attackers: int) -> float:
    """Baruch et al. 2019's z_max: ``Phi^-1((n - s) / n)`` with ``s = floor(n/2 + 1) - f``."""
    s = math.floor(world_size / 2 + 1) - attackers
    p = (world_size - s) / world_size
    return statistics.NormalDist().inv_cdf(min(max(p, 1e-6), 1 - 1e-6))


def _seed(*parts: Any) -> int:
    digest = hashlib.sha256(repr(parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


class Adversary:
    """The attack of the last ``attackers`` of ``world_size`` workers (see the module docstring)."""

    def __init__(self, attack: str, attackers: int, world_size: int, seed: int = 0):
        if attack not in ATTACKS:
            raise ValueError(f"attack must be one of {ATTACKS}, got {attack!r}")
        if isinstance(attackers, bool) or not isinstance(attackers, int) or not 0 < attackers < world_size:
            raise ValueError(f"attackers must be an integer in [1, {world_size - 1}] (the last K of {world_size} "
                             f"workers; at least one honest), got {attackers!r}")
        self.attack, self.seed, self.world_size = attack, seed, world_size
        self.attackers = set(range(world_size - attackers, world_size))
        self.z = alie_z(world_size, attackers)
        self._cv = threading.Condition()
        self._honest: dict[Any, dict[int, torch.Tensor]] = {}
        self._reads: dict[Any, int] = {}

    def is_attacker(self, rank: int) -> bool:
        return rank in self.attackers

    def contribution(self, key: Any, rank: int, members: Sequence[int], flat: torch.Tensor,
                     deadline: float) -> torch.Tensor:
        """What ``rank`` sends for ``flat`` in the op ``key`` (all-reduce or group exchange)."""
        if self.attack == "lying_owner":
            return flat
        if self.attack == "alie":
            return self._alie(key, rank, members, flat, deadline)
        if rank not in self.attackers:
            return flat
        return self.poison(key, rank, flat)

    def poison(self, key: Any, rank: int, x: torch.Tensor) -> torch.Tensor:
        """``x`` under the scale / sign_flip / noise attack (a new tensor)."""
        if self.attack == "scale":
            return x * 1e4
        if self.attack == "sign_flip":
            return x * -10.0
        if self.attack == "noise":
            g = torch.Generator().manual_seed(_seed(self.seed, key, rank))
            z = torch.randn(x.shape, generator=g, dtype=torch.float32)
            norm = float(x.double().norm())
            return (z * (100.0 * norm / max(float(z.double().norm()), 1e-30))).to(x.dtype)
        raise ValueError(f"the {self.attack!r} attack does not apply to all-gather payloads; use scale, "
                         f"sign_flip or noise with all-gather strategies (DeMo)")

    def gather_payload(self, key: Any, rank: int, payload: list[torch.Tensor]) -> list[torch.Tensor]:
        """An all-gather payload: the attack applied to its floating-point tensors."""
        if rank not in self.attackers or self.attack == "lying_owner":
            return payload
        return [self.poison((key, i), rank, t) if t.is_floating_point() else t for i, t in enumerate(payload)]

    def owner_result(self, rank: int, result: torch.Tensor) -> torch.Tensor:
        if self.attack == "lying_owner" and rank in self.attackers:
            return result * -10.0
        return result

    def _alie(self, key: Any, rank: int, members: Sequence[int], flat: torch.Tensor, deadline: float) -> torch.Tensor:
        honest = [m for m in members if m not in self.attackers]
        bad = [m for m in members if m in self.attackers]
        with self._cv:
            if rank not in self.attackers:
                if bad:
                    self._honest.setdefault(key, {})[rank] = flat.detach().clone()
                    self._cv.notify_all()
                return flat
            while len(self._honest.get(key, {})) < len(honest):
                left = deadline - time.monotonic()
                if left <= 0:
                    raise CommTimeout([], f"alie attacker {rank}: honest contributions of op {key} never came")
                self._cv.wait(left)
            got = self._honest[key]
            stack = torch.stack([got[m] for m in honest]).to(torch.float32)
            self._reads[key] = self._reads.get(key, 0) + 1
            if self._reads[key] == len(bad):
                del self._honest[key], self._reads[key]
        std = stack.std(0, unbiased=len(honest) > 1) if len(honest) > 1 else torch.zeros_like(stack[0])
        return (stack.mean(0) - self.z * std).to(flat.dtype)


@dataclass
class Offence:
    member: int
    op: str
    kind: str  # "non_finite" | "bound" | "lying_owner" | "hash_mismatch"
    detail: str = ""


class OffenceBook:
    """Offences per member with their evidence checked; ejection after ``max_offences``."""

    def __init__(self, max_offences: int = 3):
        if isinstance(max_offences, bool) or not isinstance(max_offences, int) or max_offences < 1:
            raise ValueError(f"max_offences must be an integer >= 1 (default 3), got {max_offences!r}")
        self.max_offences = max_offences
        self._lock = threading.Lock()
        self.offences: list[Offence] = []
        self.ejected: dict[int, str] = {}  # member -> op at which it was ejected
        self._evidence: dict[tuple, dict[int, float]] = {}  # (op, sender) -> owner -> sq norm received
        self._counted: set[tuple] = set()

    def count(self, member: int) -> int:
        return sum(1 for o in self.offences if o.member == member)

    def evidence(self, op: str, sender: int, owner: int, piece: torch.Tensor, owners: int, bound: float) -> None:
        """``owner`` received ``piece`` of ``sender``'s contribution to ``op`` and screened it out.

        The book recomputes from the pieces themselves: non-finite in any piece, or (once every
        owner's piece is in) a norm above ``bound`` (hard_bound x the op's median norm), is an offence.
        """
        sq = float(piece.double().pow(2).sum())
        with self._lock:
            key = (op, sender)
            if key in self._counted:
                return
            got = self._evidence.setdefault(key, {})
            got[owner] = sq
            if not math.isfinite(sq):
                self._record(Offence(sender, op, "non_finite", f"non-finite values received by member {owner}"))
            elif len(got) == owners:
                norm = math.sqrt(sum(got[o] for o in sorted(got)))
                if norm > bound:
                    self._record(Offence(sender, op, "bound", f"norm {norm:.3g} > bound {bound:.3g}"))
                else:
                    self._counted.add(key)  # the claim did not hold: no offence
                    del self._evidence[key]

    def verified(self, offence: Offence) -> None:
        """An offence the world itself established (audit majority, hash mismatch)."""
        with self._lock:
            if (offence.op, offence.member) not in self._counted:
                self._record(offence)

    def _record(self, off: Offence) -> None:
        self._counted.add((off.op, off.member))
        self._evidence.pop((off.op, off.member), None)
        self.offences.append(off)
        log.warning("offence by member %d in op %s: %s (%s)", off.member, off.op, off.kind, off.detail)
        if off.member not in self.ejected and self.count(off.member) >= self.max_offences:
            self.ejected[off.member] = off.op
            log.warning("member %d ejected for the rest of the run after %d offences", off.member,
                        self.max_offences)

    def summary(self) -> dict[str, Any]:
        return {"detections": [{"member": o.member, "op": o.op, "kind": o.kind, "detail": o.detail}
                               for o in self.offences],
                "ejections": [{"member": m, "op": op} for m, op in sorted(self.ejected.items())]}
