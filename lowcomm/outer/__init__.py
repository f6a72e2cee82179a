"""Outer optimizers: one algorithm per module, shared machinery in :mod:`.base`."""

from .base import OuterOptimizer, SyncUnit, default_outer_optimizer
from .ddp import DDP
from .demo import DeMo
from .diloco import DiLoCo
from .noloco import NoLoCo, noloco_groups
from .registry import Strategy, available, default_strategies, get_strategy, register_strategy
from .sparseloco import SparseLoCo
from .streaming import StreamingDiLoCo

__all__ = ["DDP", "DeMo", "DiLoCo", "NoLoCo", "OuterOptimizer", "SparseLoCo", "Strategy", "StreamingDiLoCo", "SyncUnit",
           "available", "default_outer_optimizer", "default_strategies", "get_strategy", "noloco_groups",
           "register_strategy"]
