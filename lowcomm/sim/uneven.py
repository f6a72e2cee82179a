"""Workers of uneven speed in the simulator (``lowcomm sim --speeds 1,1,1,0.33``).

Worker ``i`` has a relative compute speed ``s_i``: its step takes ``step / s_i`` seconds, ``step``
being the measured (or configured) compute of a step. The clock advances by the slowest
participant of each phase (:func:`phase_clock`): a phase runs from one sync to the next, lasts as
long as its slowest worker's compute, then the sync's communication.

- A strategy with ``sync_every`` (H): every worker does ``--steps`` steps and syncs every H; the
  fast ones wait for the slowest at every sync.
- A strategy with ``sync_tokens`` (N): syncs are called by the local transport's token board
  (:mod:`lowcomm.comm.tokens`) from the speeds; the board also calls a last sync at the
  budget of ``--steps`` steps of the fastest worker, after which every worker stops (a worker
  whose step is under way finishes it, so the run ends when the slowest's step does). Each
  worker's LR schedule follows its own steps (``budget x s_i`` of them); held-out evaluations are
  taken at the start and the end only (the workers' step counts differ).
"""

from __future__ import annotations

from collections.abc import Sequence
from fractions import Fraction
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
    """When a worker of a ``sync_tokens`` run stops, and its own LR horizon: the world's token board
    calls a last sync at the budget (``--steps`` steps of the fastest worker, in speed-1 steps) and
    every worker stops after it."""

    def __init__(self, world: Any, steps: int, rank: int):
        board = world.tokens
        self.board = board
        speeds = board.speeds
        board.budget = Fraction(steps) / max(speeds)
        self.horizon = max(1, round(float(board.budget * speeds[rank])))
        self._seen = 0

    def done(self, transport: Any) -> bool:
        """After a step: True after the sync that reached the budget (the same on every worker)."""
        phase = transport.token_phase
        if phase == self._seen:
            return False
        self._seen = phase
        return self.board.starts[phase] >= self.board.budget


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
