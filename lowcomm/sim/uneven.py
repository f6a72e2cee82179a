"""Workers of uneven speed in the simulator (``lowcomm sim --speeds 1,1,1,0.33``).

Worker ``i`` has a relative compute speed ``s_i``: its step takes ``step / s_i`` seconds, ``step``
being the measured (or configured) compute of a step. The clock advances by the slowest
participant of each phase (:func:`phase_clock`): a phase runs from one sync to the next, lasts as
long as its slowest worker's compute, then the sync's communication.

- A strategy with ``sync_every`` (H): every worker does ``--steps`` steps and syncs every H; the
  fast ones wait for the slowest at every sync.
- A strategy with ``sync_tokens`` (N): syncs are called by the local transport's token board
  (:mod:`lowcomm.comm.tokens`) from the speeds; each worker runs until the sync after which one more
  phase as long as the last would pass the budget of ``--steps`` steps of the fastest worker
  (simulated time in speed-1 steps, from the sync log's token counts), so a run never exceeds the
  budget; choose N so that phases divide it. Each
  worker's LR schedule follows its own steps (``budget x s_i`` of them); held-out evaluations are
  taken at the start and the end only (the workers' step counts differ).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from .clock import Network

__all__ = ["TokenRun", "check_speeds", "phase_clock"]


def check_speeds(speeds: Any, workers: int) -> tuple[float, ...] | None:
    """``speeds`` (None, "1,1,0.5" or a sequence) as one positive float per worker."""
    if speeds is None:
        return None
    from ..comm.tokens import parse_speeds

    return tuple(float(s) for s in parse_speeds(speeds, workers))


class TokenRun:
    """When a worker of a ``sync_tokens`` run stops, and its own LR horizon."""

    def __init__(self, speeds: Sequence[float], steps: int, tokens_per_step: int, rank: int):
        self.speeds = list(speeds)
        self.budget = steps / max(self.speeds)  # in speed-1 steps
        self.tokens_per_step = tokens_per_step
        self.horizon = max(1, round(self.budget * self.speeds[rank]))
        self.elapsed = 0.0
        self._seen = 0

    def done(self, sync_log: Sequence[Any]) -> bool:
        """After a step: True after a sync when another phase as long as the last one would end past
        the budget (never overshoots; the same answer on every worker: it reads the tallies every
        member agreed on)."""
        new = sync_log[self._seen:]
        self._seen = len(sync_log)
        last = 0.0
        for rec in new:
            if rec.tokens:
                last = max(n / self.tokens_per_step / self.speeds[m] for m, n in rec.tokens.items())
                self.elapsed += last
        return bool(new) and self.elapsed + last > self.budget


def phase_clock(computes: Sequence[Sequence[float]], logs: Sequence[Sequence[Any]], comm: Sequence[float],
                speeds: Sequence[float]) -> float:
    """Seconds of a run whose workers compute ``computes[i][k] / speeds[i]`` in step k and meet at the
    syncs of ``logs[i]`` (the same number on every worker, ``comm[j]`` seconds each; overlapped
    syncs are charged as exposed): each phase lasts as long as its slowest worker, then its sync."""
    total, starts = 0.0, [0] * len(computes)
    for j in range(min(len(lg) for lg in logs)):
        slowest = 0.0
        for i, (c, lg) in enumerate(zip(computes, logs)):
            end = min(lg[j].finish_step, len(c))
            slowest = max(slowest, sum(c[starts[i]:end]) / speeds[i])
            starts[i] = end
        total += slowest + comm[j]
    return total + max(sum(c[s:]) / v for c, s, v in zip(computes, starts, speeds))


def sync_seconds(result: dict[str, Any], sizes: Sequence[int], net: Network) -> list[float]:
    """Communication seconds of each sync of one worker's log."""
    records = result["records"]
    return [sum(net.seconds(records[op].kind, records[op].participants, int(sizes[op]))
                for op in s.op_ids if 0 <= op < len(records)) for s in result["sync_log"]]
