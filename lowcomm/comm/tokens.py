"""Syncs called by work done: the token tally and the contribution weights.

With ``sync_tokens=N`` a strategy syncs when the group's tokens since the last sync reach N, and
each member contributes its pseudo-gradient weighted by the tokens it processed since then
(:func:`token_weights`). Deciding *when* needs everyone's progress, so it is the transport's job
(:meth:`~lowcomm.comm.base.Transport.tally_tokens`):

- **Local transport and the simulator**: a :class:`TokenBoard` in the shared world. Worker ``i``
  has a relative compute speed ``s_i`` (``LocalWorld(speeds=...)``, ``lowcomm sim --speeds``); after
  a sync every worker starts at simulated time 0 and its ``j``-th step ends at ``j / s_i``. The sync
  is called at the first step end ``T`` at which the tokens of all steps ending at or before ``T``
  reach N; a worker whose step is under way at ``T`` finishes it and contributes it. So worker ``i``
  syncs after its step ``j`` exactly when the tokens of the steps ending at or before ``j / s_i``
  reach N. Times are exact fractions and a worker waits only for the others' steps that end before
  its own, so the trigger is a function of the speeds and the token counts, never of wall time:
  runs repeat bitwise. With equal speeds and N = W x H x tokens per step every worker syncs after
  H steps (DiLoCo with H).
- **ZeroMQ**: peers report tokens with their heartbeats and the coordinator calls the sync.

A simulator gives the board a wall-clock ``budget`` (in speed-1 steps): a sync is then also called
at the first step end at or past it, so a run can stop exactly there (:attr:`TokenBoard.starts`).

Self-reported tokens are an attack vector: no weight exceeds ``2 / W`` (:func:`token_weights`).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from fractions import Fraction

from .base import CommTimeout

__all__ = ["TokenBoard", "contribution_factors", "parse_speeds", "token_weights"]


def parse_speeds(speeds: Sequence[float] | str, world_size: int) -> list[Fraction]:
    """Relative compute speeds as exact fractions (``"1,1,1,0.33"`` or a list), one per worker."""
    items = [s for s in speeds.split(",") if s.strip()] if isinstance(speeds, str) else list(speeds)
    if len(items) != world_size:
        raise ValueError(f"speeds has {len(items)} entries for {world_size} workers; give one relative speed "
                         f"per worker, e.g. 1,1,1,0.33")
    out = []
    for s in items:
        try:
            f = Fraction(str(s).strip()).limit_denominator(10**6)
        except (TypeError, ValueError, ZeroDivisionError):
            raise ValueError(f"speed {s!r} is not a number; speeds are relative, e.g. 1,1,1,0.33") from None
        if not f > 0:
            raise ValueError(f"speed {s!r} must be > 0 (a relative compute speed, e.g. 0.33 for 3x slower)")
        out.append(f)
    return out


def token_weights(tokens: dict[int, int]) -> dict[int, float]:
    """Each member's share of the group's tokens, capped at ``2 / W`` with the excess handed to the
    uncapped members in proportion to their tokens (so the weights still sum to 1 and one member
    claiming absurd counts moves the result at most as much as two honest members). A group with no
    tokens at all weighs everyone equally."""
    members = sorted(tokens)
    w = len(members)
    if w == 0:
        return {}
    if any(t < 0 for t in tokens.values()):
        raise ValueError(f"token counts must be >= 0, got {tokens}")
    total = sum(tokens.values())
    if total == 0:
        return {m: 1.0 / w for m in members}
    cap = Fraction(2, w)
    weights: dict[int, Fraction] = {}
    free = list(members)
    budget = Fraction(1)
    while free:
        pool = sum(tokens[m] for m in free)
        over = [m for m in free if pool == 0 or Fraction(tokens[m]) * budget / pool > cap]
        if not over:
            for m in free:
                weights[m] = Fraction(tokens[m]) * budget / pool
            break
        for m in over:
            weights[m] = cap
            budget -= cap
            free.remove(m)
    return {m: float(weights.get(m, 0)) for m in members}


def contribution_factors(tokens: dict[int, int]) -> dict[int, float]:
    """The factor each member multiplies its pseudo-gradient by before a *mean* all-reduce so the
    mean is the token-weighted sum: ``W x weight`` (exactly 1.0 when everyone did the same work, so
    equal work is bitwise the unweighted mean). Robust rules then see these weight-normalised
    contributions."""
    w = len(tokens)
    if w and len(set(tokens.values())) == 1:
        return {m: 1.0 for m in tokens}
    return {m: w * x for m, x in token_weights(tokens).items()}


class _Phase:
    def __init__(self) -> None:
        self.ends: dict[int, list[tuple[Fraction, int]]] = {}  # member -> [(end time, tokens)] per step
        self.decided: dict[int, int] = {}  # member -> its tokens in this phase, once it called the sync


class TokenBoard:
    """The local world's token tally (see the module docstring): one phase per sync."""

    def __init__(self, speeds: Sequence[Fraction]):
        self.speeds = list(speeds)
        self._cv = threading.Condition()
        self._phases: dict[int, _Phase] = {}
        # simulated time (in speed-1 steps) at which each phase started: a phase lasts until its
        # slowest member's last step ends
        self.starts: dict[int, Fraction] = {0: Fraction(0)}
        self.budget: Fraction | None = None  # a simulator's wall-clock budget: a sync is also called there

    def _phase(self, k: int) -> _Phase:
        return self._phases.setdefault(k, _Phase())

    def step(self, member: int, phase: int, tokens: int, target: int, alive, deadline: float) -> dict[int, int] | None:
        """Record ``member``'s step of ``tokens`` in ``phase``; None while no sync is due, else every
        live member's tokens of the phase (the same dict for all, once each has finished its step)."""
        with self._cv:
            ph = self._phase(phase)
            mine = ph.ends.setdefault(member, [])
            t = Fraction(len(mine) + 1) / self.speeds[member]
            mine.append((t, int(tokens)))
            self._cv.notify_all()
            # wait for every other live member's steps that end at or before t (or its own call)
            while True:
                live = sorted(alive())
                waiting = [m for m in live if m != member and m not in ph.decided
                           and len(ph.ends.get(m, ())) < int(t * self.speeds[m])]
                if not waiting:
                    break
                self._wait(deadline, waiting, "steps")
            done = sum(n for m in live for (e, n) in ph.ends.get(m, ()) if e <= t)
            if done < target and (self.budget is None or self.starts[phase] + t < self.budget):
                return None
            ph.decided[member] = sum(n for _, n in mine)
            self._cv.notify_all()
            while True:
                live = sorted(alive())
                waiting = [m for m in live if m not in ph.decided]
                if not waiting:
                    break
                self._wait(deadline, waiting, "the sync call")
            self._phases.pop(phase - 2, None)  # everyone is past it (they all reached this phase)
            if phase + 1 not in self.starts:
                self.starts[phase + 1] = self.starts[phase] + max(ph.ends[m][-1][0] for m in live if ph.ends.get(m))
            return {m: ph.decided[m] for m in live}

    def _wait(self, deadline: float, waiting: list[int], what: str) -> None:
        left = deadline - time.monotonic()
        if left <= 0:
            raise CommTimeout(waiting, f"members {waiting} did not report their {what} before the deadline")
        self._cv.wait(min(left, 1.0))
