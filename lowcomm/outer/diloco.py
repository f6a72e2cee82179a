"""DiLoCo: Distributed Low-Communication training (Douillard et al. 2023, arXiv 2311.08105).

Every ``sync_every`` (H) inner steps each worker computes its pseudo-gradient
``phi - theta_i`` (global minus local: old minus new, so it points like a gradient), the
workers average it with one all-reduce, the outer optimizer steps the global parameters
``phi`` with that mean as gradient (paper, Algorithm 1, line 12), and every worker's local
parameters are set to the new ``phi``. The inner optimizer's state is never averaged or
reset. Paper defaults: H=500, outer SGD lr 0.7 momentum 0.9 Nesterov, inner AdamW;
FedAvg is outer lr 1 momentum 0.

Memory: besides the model, DiLoCo keeps the global copy and the outer optimizer's state
(the Nesterov momentum): about 2x the parameters. The pseudo-gradient is computed in place
in the local parameters, which the sync overwrites anyway, so it needs no buffer of its own.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from ..codecs import wire_codec
from ..comm.base import Transport
from .base import OuterFactory, OuterOptimizer, PendingSync, SyncUnit, check_float
from .placement import resolve_anchor_device
from .registry import StrategyConfig, register_strategy
from .work import WorkTrigger, sync_schedule

__all__ = ["DiLoCo", "DiLoCoConfig", "FedAvgConfig", "sgd_outer"]


class DiLoCo(OuterOptimizer):
    """DiLoCo around any inner optimizer.

    Args:
        inner: the inner optimizer (AdamW in the paper).
        transport: where the pseudo-gradients are averaged (``lowcomm.connect()``).
        sync_every: H, inner steps between syncs (paper: 500).
        sync_tokens: N: instead of ``sync_every`` (leave that at its default), sync when the group's
            tokens since the last sync reach N, each member's pseudo-gradient weighted by its tokens
            (:mod:`lowcomm.outer.work`).
        tokens_per_step: tokens of a step when ``opt.count_tokens(n)`` is not called (``sync_tokens``).
        outer_lr: learning rate of the outer SGD on the global parameters (paper: 0.7).
        outer_momentum: its momentum (paper: 0.9; 0 with ``outer_lr=1`` is FedAvg).
        nesterov: Nesterov momentum for the outer SGD (paper: True).
        outer_optimizer: a factory ``params -> torch.optim.Optimizer`` for the global parameters,
            used instead of the SGD that ``outer_lr``/``outer_momentum``/``nesterov`` describe.
        codec: optional wire codec for the all-reduce (see :mod:`lowcomm.codecs`); None is fp32.
        anchor_device: where the global weights and outer state live (None: the parameters' device;
            "cpu": CPU memory, pinned when CUDA is present; see :mod:`.placement`).
        aggregate: robust aggregation rule: ``"mean"`` (default, exact), ``"clip"``, ``"trimmed_mean"``,
            ``"centered_clip"``, with knobs as a spec (``"clip:clip_ratio=2"``) or an
            :class:`~lowcomm.comm.aggregate.Aggregate`; see :mod:`lowcomm.comm.aggregate`.
        strict: raise on a failed sync instead of rolling back.
        timeout: seconds a sync may wait.
    """

    shares_global_state = True
    supports_sharding = True  # elementwise: exact on each FSDP shard

    def __init__(self, inner: torch.optim.Optimizer, *, transport: Transport, sync_every: int = 500,
                 outer_lr: float = 0.7, outer_momentum: float = 0.9, nesterov: bool = True,
                 outer_optimizer: OuterFactory | None = None, codec: Any = None, anchor_device: Any = None,
                 strict: bool = False, timeout: float | None = None, aggregate: Any = "mean",
                 sync_tokens: int | None = None, tokens_per_step: int | None = None):
        super().__init__(inner, transport=transport, strict=strict, timeout=timeout, aggregate=aggregate)
        self.sync_every = sync_schedule(sync_every, sync_tokens, 500)
        if sync_tokens is not None:
            self.work = WorkTrigger(transport, sync_tokens, tokens_per_step)
        self.codec = wire_codec(codec)
        factory = outer_optimizer or sgd_outer(outer_lr, outer_momentum, nesterov)
        device = resolve_anchor_device(anchor_device)
        self.broadcast_initial()
        self.units = [SyncUnit(self.params, factory, anchor_device=device)]

    def after_inner_step(self) -> None:
        if self.work.due() if self.work is not None else self.local_step % self.sync_every == 0:
            self.sync()

    @torch.no_grad()
    def sync(self) -> bool:
        """Average pseudo-gradients, step the global parameters, reset the locals. Returns success."""
        unit = self.units[0]
        # theta := phi - theta, in place (Algorithm 1 line 11); the locals are reset afterwards anyway
        # (offloaded: in a buffer beside the global weights).
        grads = unit.pseudo_grads()
        if self.work is not None:
            self.work.weigh(grads)  # this member's token share (sync_tokens)
        pending = self.launch_reduce(unit, grads, codec=self.codec)
        return self.finish(pending, self._apply)

    @staticmethod
    def _apply(pending: PendingSync) -> None:
        unit = pending.unit
        unit.outer_step(pending.buffers)
        unit.reset_locals()


def sgd_outer(lr: float = 0.7, momentum: float = 0.9, nesterov: bool = True) -> OuterFactory:
    """Factory for an SGD outer optimizer (``momentum=0`` and ``lr=1`` is FedAvg)."""
    lr, momentum = check_float("outer_lr", lr), check_float("outer_momentum", momentum)
    if lr <= 0:
        raise ValueError(f"outer lr must be > 0, got {lr}")
    if not 0 <= momentum < 1:
        raise ValueError(f"outer momentum must be in [0, 1), got {momentum}")
    return lambda ps: torch.optim.SGD(ps, lr=lr, momentum=momentum, nesterov=bool(nesterov and momentum > 0))


@dataclass
class DiLoCoConfig(StrategyConfig):
    """DiLoCo's knobs (defaults: the paper's, arXiv 2311.08105)."""

    sync_every: int = 500  # H, inner steps between syncs
    outer_lr: float = 0.7  # outer SGD learning rate
    outer_momentum: float = 0.9  # outer SGD momentum
    nesterov: bool = True  # Nesterov outer momentum
    codec: str | None = None  # wire codec of the all-reduce (lowcomm.codecs spec); None: fp32
    anchor_device: str | None = None  # global weights and outer state: None (parameters' device) or "cpu"
    aggregate: str = "mean"  # robust aggregation rule spec, e.g. "clip", "trimmed_mean:trim=2" (lowcomm.comm.aggregate)
    sync_tokens: int | None = None  # N: sync when the group's tokens since the last sync reach N (replaces sync_every)

    def build(self, inner, transport, model=None) -> DiLoCo:
        return DiLoCo(inner, transport=transport, outer_lr=self.outer_lr,
                      outer_momentum=self.outer_momentum, nesterov=self.nesterov, codec=self.codec,
                      anchor_device=self.anchor_device, aggregate=self.aggregate, **schedule_kwargs(self))


def schedule_kwargs(cfg: Any) -> dict[str, Any]:
    """A config's ``sync_every`` or, when set, its ``sync_tokens`` (which replaces it)."""
    return {"sync_every": cfg.sync_every} if cfg.sync_tokens is None else {"sync_tokens": cfg.sync_tokens}


@dataclass
class FedAvgConfig(StrategyConfig):
    """FedAvg: DiLoCo with outer lr 1 and no momentum (plain model averaging)."""

    sync_every: int = 500  # H, inner steps between syncs
    codec: str | None = None  # wire codec of the all-reduce; None: fp32
    anchor_device: str | None = None  # global weights: None (parameters' device) or "cpu"
    aggregate: str = "mean"  # robust aggregation rule spec, e.g. "clip", "trimmed_mean:trim=2" (lowcomm.comm.aggregate)

    def build(self, inner, transport, model=None) -> DiLoCo:
        return DiLoCo(inner, transport=transport, sync_every=self.sync_every, aggregate=self.aggregate,
                      outer_lr=1.0, outer_momentum=0.0, nesterov=False, codec=self.codec,
                      anchor_device=self.anchor_device)


register_strategy("diloco", DiLoCoConfig, "DiLoCo: all-reduce of pseudo-gradients every H steps, Nesterov outer SGD")
register_strategy("fedavg", FedAvgConfig, "FedAvg: DiLoCo with outer lr 1 and no momentum (plain model averaging)",
                  default_run=False)


@dataclass
class MuLoCoConfig(DiLoCoConfig):
    """MuLoCo (arXiv 2505.23725): DiLoCo around Muon on the 2-D hidden weights and AdamW on the rest
    (the ``"muon"`` inner optimizer of :mod:`lowcomm.loop`); the knobs are DiLoCo's."""

    inner: ClassVar[str | None] = "muon"


register_strategy("muloco", MuLoCoConfig, "MuLoCo: DiLoCo with Muon inner steps on the 2-D hidden weights "
                  "(AdamW for the rest)", default_run=False)
