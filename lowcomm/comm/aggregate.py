"""Robust aggregation rules: what the owner of a shard computes from the W contributions it holds.

Pure tensor code (no transport, no strategy). A transport drives :meth:`Aggregate.owner`, a
generator that runs on the owner of one shard: it yields a row of W float64 values (one per
sender: squared norms or squared distances of that sender's piece of this shard), the
transport all-gathers the rows of every owner and sends back the W x W matrix (row = owner,
column = sender, in member order), and the generator finally returns the owner's result.
Every member receives the same matrices, so every owner derives the same per-sender factors
and the same exclusions: the result is identical bits on every member, and owner memory is
O(W x chunk) (the W pieces of its shard, one scratch of the same size).

Rules (``Aggregate(rule=...)``; ``aggregate=`` on every strategy takes a name, a dict or one):

- ``"mean"``: the member-order fp32 sum divided by W: today's arithmetic, bit for bit. It
  trusts every member: nothing is screened and no norms travel.
- ``"clip"``: sender i's *whole* contribution is scaled by ``min(1, clip_ratio * m / |x_i|)``
  with ``m`` the median of the senders' norms (default ``clip_ratio`` 3), then averaged.
- ``"trimmed_mean"``: coordinate-wise, the ``trim`` (default 1) highest and lowest values are
  dropped and the rest averaged; ``ValueError`` if ``2*trim >= W`` (:meth:`Aggregate.check_world`,
  at construction; if members are lost or screened out later, trim shrinks to ``(n - 1) // 2``).
- ``"centered_clip"`` (Karimireddy, He, Jaggi 2021, arXiv 2012.10333, eq. (2); the rule BTARD
  uses): from ``v0`` = the previous sync's aggregate (zero at the first; the caller passes it as
  ``center``), ``iters`` (default 3) rounds of ``v <- v + mean_i clip(x_i - v, tau)``, with
  ``clip(z, tau) = z * min(1, tau / |z|)`` and ``tau`` the median of the distances ``|x_i - v|``
  of that round.

Screening (every rule but ``"mean"``): a sender whose contribution is non-finite, or whose norm
is above ``hard_bound`` (default 100) times the median norm, is left out of the aggregate
(the rule then runs over the others; ``trim`` shrinks if too few remain) and reported in
:class:`Screen`: these are *offences*, with the owner's received values as evidence.

Medians are the lower median (``sorted(v)[(n - 1) // 2]``), so with f < W/2 outliers the median
is an honest value. Norms are float64, summed over owners in member order.
"""

from __future__ import annotations

import math
from collections.abc import Generator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from .reduce import reduce_in_member_order

__all__ = ["RULES", "Aggregate", "Screen", "aggregate", "get_aggregate", "lower_median"]

RULES = ("mean", "clip", "trimmed_mean", "centered_clip")


def lower_median(values: Sequence[float]) -> float:
    """``sorted(values)[(n - 1) // 2]``: an element of ``values``, honest when fewer than half lie."""
    if not values:
        raise ValueError("median of no values")
    return sorted(values)[(len(values) - 1) // 2]


@dataclass
class Screen:
    """What screening found: per-sender norms (member order), who was kept, who offended and why."""

    norms: list[float]
    median: float
    keep: list[int]  # positions (in member order) that entered the aggregate
    offences: dict[int, str] = field(default_factory=dict)  # position -> "non_finite" | "bound"
    bound: float = math.inf  # the hard bound on norms this op (hard_bound x median)


def _sq_row(parts: Sequence[torch.Tensor], ref: torch.Tensor | None = None) -> torch.Tensor:
    """float64 squared norm of each part (of ``part - ref`` when given); inf for a non-finite part."""
    row = torch.empty(len(parts), dtype=torch.float64)
    for i, p in enumerate(parts):
        d = p.double() if ref is None else (p - ref).double()
        v = float(d.pow(2).sum())
        row[i] = v if math.isfinite(v) else math.inf
    return row


def _combine(matrix: torch.Tensor) -> list[float]:
    """Whole-vector norms from a (owners x senders) matrix of squared pieces, summed in owner order."""
    tot = matrix[0].clone()
    for r in range(1, matrix.shape[0]):
        tot.add_(matrix[r])
    return [math.sqrt(x) if math.isfinite(x) else math.inf for x in tot.tolist()]


def _factor(norm: float, limit: float) -> float:
    return 1.0 if norm <= limit or norm == 0.0 else limit / norm


@dataclass(frozen=True)
class Aggregate:
    """A robust aggregation rule and its knobs (see the module docstring for each rule)."""

    rule: str = "mean"
    clip_ratio: float = 3.0  # "clip": cap at clip_ratio x the median norm
    trim: int = 1  # "trimmed_mean": values dropped at each end, per coordinate
    iters: int = 3  # "centered_clip": rounds of the centered clipping iteration
    hard_bound: float = 100.0  # screening: a norm above hard_bound x the median norm is an offence

    def __post_init__(self) -> None:
        if self.rule not in RULES:
            raise ValueError(f"aggregate rule must be one of {RULES}, got {self.rule!r}")
        if not (isinstance(self.clip_ratio, (int, float)) and self.clip_ratio > 0):
            raise ValueError(f"clip_ratio must be > 0 (default 3), got {self.clip_ratio!r}")
        for name in ("trim", "iters"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < (0 if name == "trim" else 1):
                raise ValueError(f"{name} must be an integer >= {0 if name == 'trim' else 1}, got {v!r}")
        if not (isinstance(self.hard_bound, (int, float)) and self.hard_bound >= 1):
            raise ValueError(f"hard_bound must be >= 1 (x the median norm; default 100), got {self.hard_bound!r}")

    @property
    def robust(self) -> bool:
        """Any rule but the plain mean (these screen, and exchange norms)."""
        return self.rule != "mean"

    def check_world(self, w: int) -> None:
        """ValueError if the rule cannot run with ``w`` members."""
        if self.rule == "trimmed_mean" and 2 * self.trim >= w:
            raise ValueError(f"trimmed_mean with trim={self.trim} drops {2 * self.trim} of {w} values per "
                             f"coordinate; use trim <= {(w - 1) // 2} or more workers")

    def describe(self) -> str:
        extra = {"clip": f", clip_ratio={self.clip_ratio:g}", "trimmed_mean": f", trim={self.trim}",
                 "centered_clip": f", iters={self.iters}"}.get(self.rule, "")
        return f"{self.rule}{extra}"

    # ---- screening ------------------------------------------------------------------------------
    def screen(self, norms: Sequence[float]) -> Screen:
        """Keep every finite norm at most ``hard_bound`` x the median of the finite norms."""
        finite = [n for n in norms if math.isfinite(n)]
        med = lower_median(finite) if finite else math.inf
        keep, offences = [], {}
        for i, n in enumerate(norms):
            if not math.isfinite(n):
                offences[i] = "non_finite"
            elif n > self.hard_bound * med:
                offences[i] = "bound"
            else:
                keep.append(i)
        return Screen(list(norms), med, keep, offences, self.hard_bound * med)

    # ---- the owner's computation ------------------------------------------------------------------
    def owner(self, parts: Sequence[torch.Tensor], center: torch.Tensor | None = None
              ) -> Generator[torch.Tensor, torch.Tensor, tuple[torch.Tensor, Screen | None]]:
        """Aggregate the W fp32 ``parts`` of one shard (member order); see the module docstring.

        Yields W float64 values (this owner's row), expects the all-gathered (W x W) matrix
        back; returns ``(result fp32, Screen or None for "mean")``.
        """
        if self.rule == "mean":  # exactly the transports' arithmetic: ((x0 + x1) + x2) ... / W
            return reduce_in_member_order(parts, "mean"), None
        scr = self.screen(_combine((yield _sq_row(parts))))
        if not scr.keep:
            raise ValueError("every contribution was non-finite")
        kept = [parts[i] for i in scr.keep]
        n = len(kept)
        if self.rule == "clip":
            limit = self.clip_ratio * lower_median([scr.norms[i] for i in scr.keep])
            acc = torch.zeros_like(kept[0], dtype=torch.float32)
            for i, p in zip(scr.keep, kept):
                acc.add_(p, alpha=_factor(scr.norms[i], limit))
            return acc.div_(n), scr
        if self.rule == "trimmed_mean":
            t = min(self.trim, (n - 1) // 2)
            srt = torch.stack(kept).sort(dim=0, stable=True).values
            acc = srt[t].clone()
            for r in range(t + 1, n - t):
                acc.add_(srt[r])
            return acc.div_(n - 2 * t), scr
        # centered_clip
        v = torch.zeros_like(kept[0]) if center is None else center.to(torch.float32, copy=True)
        for _ in range(self.iters):
            dist = _combine((yield _sq_row(parts, v)))
            tau = lower_median([dist[i] for i in scr.keep])
            step = torch.zeros_like(v)
            for i, p in zip(scr.keep, kept):
                step.add_(p - v, alpha=_factor(dist[i], tau))
            v.add_(step.div_(n))
        return v, scr


def _parse_spec(spec: str) -> dict[str, Any]:
    """``"clip:clip_ratio=2:hard_bound=50"`` -> ``{"rule": "clip", "clip_ratio": 2.0, "hard_bound": 50.0}``."""
    rule, *opts = spec.strip().split(":")
    out: dict[str, Any] = {"rule": rule.strip()}
    for opt in opts:
        key, eq, value = opt.partition("=")
        key = key.strip()
        if not eq or key not in ("clip_ratio", "trim", "iters", "hard_bound"):
            raise ValueError(f"aggregate spec {spec!r}: options are clip_ratio=, trim=, iters=, hard_bound= "
                             f"(e.g. 'clip:clip_ratio=2'), got {opt!r}")
        try:
            out[key] = int(value) if key in ("trim", "iters") else float(value)
        except ValueError:
            raise ValueError(f"aggregate spec {spec!r}: {key} takes a number, got {value!r}") from None
    return out


def get_aggregate(spec: Any, **knobs: Any) -> Aggregate:
    """An :class:`Aggregate` from a rule name or spec (``"clip:clip_ratio=2"``; options clip_ratio,
    trim, iters, hard_bound; or the same as keyword ``knobs``), a dict of its fields, an Aggregate,
    or None (``"mean"``)."""
    if isinstance(spec, Aggregate):
        if knobs:
            raise ValueError("pass the knobs inside the Aggregate, not beside it")
        return spec
    if spec is None:
        spec = "mean"
    if isinstance(spec, dict):
        return Aggregate(**{**spec, **knobs})
    if isinstance(spec, str):
        return Aggregate(**{**_parse_spec(spec), **{k: v for k, v in knobs.items() if v is not None}})
    raise ValueError(f"aggregate must be a rule name {RULES}, a dict or an Aggregate, got {spec!r}")


def aggregate(xs: Sequence[torch.Tensor], rule: Any = "mean", center: torch.Tensor | None = None,
              shards: int = 1) -> tuple[torch.Tensor, Screen | None]:
    """Reference: aggregate whole flat contributions ``xs`` as ``shards`` owners would (one process).

    Runs the owners' generators in lockstep and all-gathers their rows the way a transport does,
    so ``shards=W`` gives the bits of a W-member all-reduce.
    """
    agg = get_aggregate(rule)
    agg.check_world(len(xs))
    pieces = [torch.tensor_split(x.reshape(-1).to(torch.float32), shards) for x in xs]
    cpieces = None if center is None else torch.tensor_split(center.reshape(-1).to(torch.float32), shards)
    gens = [agg.owner([p[j] for p in pieces], None if cpieces is None else cpieces[j]) for j in range(shards)]
    results: list[Any] = [None] * shards
    rows: list[Any] = [None] * shards
    for j, g in enumerate(gens):
        try:
            rows[j] = next(g)
        except StopIteration as e:
            results[j] = e.value
    while any(r is None for r in results):
        matrix = torch.stack(rows)
        for j, g in enumerate(gens):
            try:
                rows[j] = g.send(matrix)
            except StopIteration as e:
                results[j] = e.value
    return torch.cat([r[0] for r in results]), results[0][1]
