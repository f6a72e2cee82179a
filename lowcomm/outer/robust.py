"""What the strategies share of robust aggregation (the rules themselves: :mod:`lowcomm.comm.aggregate`).

- :func:`resolve_aggregate`: the ``aggregate=`` argument of every strategy, checked against the
  transport's ``aggregate_rules`` capability at construction (torch.distributed's
  ``native_all_reduce=True`` / ``hierarchical=True`` serve ``"mean"`` only: ValueError there).
- :func:`sender_factors`: the per-sender weights an all-gather strategy applies at decode
  (DeMo; the hook for SparseLoCo): screening, then ``"clip"``'s factors, from each sender's norm.
- :class:`PartnerScreen`: NoLoCo's rejection of a partner whose weights are too far from ours.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import Any

import torch

from ..comm.base import Aggregate, CommError, get_aggregate, lower_median

__all__ = ["PartnerScreen", "resolve_aggregate", "sender_factors"]

log = logging.getLogger(__name__)


def resolve_aggregate(transport: Any, aggregate: Any, allowed: Sequence[str] | None = None,
                      who: str = "this strategy") -> Aggregate:
    """``aggregate`` (name, dict, Aggregate or None) as an Aggregate the transport can serve."""
    agg = get_aggregate(aggregate)
    if allowed is not None and agg.rule not in allowed:
        raise ValueError(f"{who} applies aggregate={agg.rule!r} nowhere; it supports {tuple(allowed)}")
    if agg.robust and allowed is None:
        rules = tuple(getattr(transport, "aggregate_rules", ("mean",)))
        if agg.rule not in rules:
            raise ValueError(f"transport {type(transport).__name__} cannot aggregate with {agg.rule!r} (it serves "
                             f"{rules}); on torch.distributed use the p2p path (native_all_reduce=False, "
                             f"hierarchical=False), or aggregate='mean'")
        agg.check_world(max(1, len(transport.members())))
    return agg


def sender_factors(agg: Aggregate, norms: Sequence[float]) -> tuple[list[float], dict[int, str]]:
    """Per-sender weights for an all-gather decode: 0 for a screened sender (non-finite, or beyond
    ``hard_bound`` x the median norm), ``"clip"``'s factor ``min(1, clip_ratio * median / norm)``
    otherwise (1 for ``"mean"``, which screens nothing). Returns (weights, offences by position)."""
    if not agg.robust:
        return [1.0] * len(norms), {}
    scr = agg.screen(list(norms))
    weights = [0.0] * len(norms)
    limit = agg.clip_ratio * lower_median([norms[i] for i in scr.keep]) if scr.keep else 0.0
    for i in scr.keep:
        n = norms[i]
        weights[i] = 1.0 if agg.rule != "clip" or n <= limit or n == 0 else limit / n
    return weights, scr.offences


class PartnerScreen:
    """NoLoCo: reject a partner whose weights are farther than ``ratio`` x the running median of the
    distances of the partners accepted so far (before any: ``ratio`` x twice this worker's own
    movement since its last sync, the distance two honest workers that each moved that far can be
    apart). The exchange fails for the whole group, naming the partner, and rolls back."""

    def __init__(self, ratio: float = 3.0, history: int = 64):
        self.ratio = float(ratio)
        self.history = history
        self.distances: list[float] = []
        self.rejected: list[tuple[int, int, float, float]] = []  # (step, member, distance, threshold)

    def check(self, me: int, own_movement: float, step: int = 0):
        """The ``check=`` callback for ``transport.group_reduce``."""

        def check(received: dict[int, list[torch.Tensor]]) -> None:
            mine = torch.cat([t.reshape(-1).double() for t in received[me]])
            dist = {peer: float((torch.cat([t.reshape(-1).double() for t in parts]) - mine).norm())
                    for peer, parts in sorted(received.items()) if peer != me}
            limit = self.ratio * (lower_median(self.distances) if self.distances else 2.0 * own_movement)
            for peer, d in dist.items():
                if not math.isfinite(d) or d > limit:
                    self.rejected.append((step, peer, d, limit))
                    raise CommError(f"NoLoCo partner {peer} rejected: its weights are {d:.4g} from ours, more than "
                                    f"{self.ratio:g} x the running median partner distance ({limit:.4g})")
            self.distances = (self.distances + list(dist.values()))[-self.history:]

        return check
