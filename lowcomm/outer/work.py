"""Syncs called by work done (``sync_tokens=N`` on DiLoCo, Streaming DiLoCo and SparseLoCo).

Instead of every ``sync_every`` inner steps, a sync is called when the group's tokens since the last
sync reach N; the transport decides when (:meth:`~lowcomm.comm.base.Transport.tally_tokens`, see
:mod:`lowcomm.comm.tokens`), and every member gets everyone's tokens since the last sync. Each
member then scales its pseudo-gradient by ``W x weight`` (:func:`~lowcomm.comm.tokens.contribution_factors`:
weights proportional to tokens, capped at 2/W) before the mean all-reduce, so the mean is the
token-weighted sum; with equal work the factor is exactly 1 and the sync is bitwise today's.

Tokens per step: ``opt.count_tokens(n)`` before ``opt.step()`` (the training loop does it), else
``tokens_per_step`` given at construction. Each worker's LR schedule follows its own steps.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from ..comm.tokens import contribution_factors, token_weights
from .base import check_int

__all__ = ["WorkTrigger", "sync_schedule"]


def sync_schedule(sync_every: int, sync_tokens: int | None, default_every: int) -> int:
    """``sync_every`` checked; with ``sync_tokens`` it must stay at its default (syncs are then called by
    tokens and it is not used)."""
    if sync_tokens is not None and sync_every != default_every:
        raise ValueError(f"give sync_every (H steps) or sync_tokens (N tokens of the group), not both "
                         f"(got {sync_every} and {sync_tokens})")
    return check_int("sync_every", sync_every, 1, "it is H, the number of inner steps between syncs")


class WorkTrigger:
    """One member's side of token-triggered syncs."""

    def __init__(self, transport: Any, sync_tokens: int, tokens_per_step: int | None = None, window: int = 1):
        """``window``: syncs per pass over the model (Streaming DiLoCo's F fragments: one is called every
        N / F tokens, and a fragment's contributions are weighted by the tokens of the last F calls)."""
        check_int("sync_tokens", sync_tokens, 1, "it is N, the group's tokens between syncs "
                  "(W x H x tokens per step is DiLoCo with H)")
        if sync_tokens % window:
            raise ValueError(f"sync_tokens ({sync_tokens}) must be a multiple of the number of fragments ({window}), "
                             f"so a fragment syncs every sync_tokens / fragments tokens")
        self.target = sync_tokens // window
        self.window = window
        self._history: list[dict[int, int]] = []
        if tokens_per_step is not None:
            check_int("tokens_per_step", tokens_per_step, 1)
        if not getattr(transport, "token_syncs", False):
            raise ValueError(f"sync_tokens needs a transport that calls syncs by tokens (local, ZeroMQ); "
                             f"{type(transport).__name__} cannot: use sync_every")
        self.transport = transport
        self.tokens_per_step = tokens_per_step
        self._next: int | None = None
        self.last: dict[int, int] = {}  # every member's tokens in the last sync called

    def count(self, tokens: int) -> None:
        """Tokens of the next inner step."""
        if isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < 0:
            raise ValueError(f"count_tokens takes the step's token count, an integer >= 0; got {tokens!r}")
        self._next = tokens

    def due(self) -> bool:
        """After an inner step: report its tokens; True when the group calls a sync now."""
        n = self._next if self._next is not None else self.tokens_per_step
        if n is None:
            raise ValueError("sync_tokens needs each step's tokens: call opt.count_tokens(n) before opt.step(), "
                             "or pass tokens_per_step=")
        self._next = None
        got = self.transport.tally_tokens(n, self.target)
        if got is None:
            return False
        self._history = (self._history + [dict(got)])[-self.window:]
        self.last = {}
        for tally in self._history:
            for m, n in tally.items():
                self.last[m] = self.last.get(m, 0) + n
        return True

    def state_dict(self) -> dict[str, Any]:
        """The tallies that weigh the next contributions (a checkpoint's)."""
        return {"history": [dict(t) for t in self._history], "last": dict(self.last)}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        self._history = [{int(m): int(n) for m, n in t.items()} for t in sd.get("history", [])][-self.window:]
        self.last = {int(m): int(n) for m, n in sd.get("last", {}).items()}

    def weights(self) -> dict[int, float]:
        """Every member's weight in the last sync called."""
        return token_weights(self.last)

    @torch.no_grad()
    def weigh(self, buffers: Sequence[torch.Tensor]) -> None:
        """Scale this member's contribution for the last sync called (in place; nothing at factor 1)."""
        f = contribution_factors(self.last).get(self.transport.rank, 1.0)
        if f != 1.0:
            torch._foreach_mul_(list(buffers), f)
