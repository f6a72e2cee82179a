"""Outer optimizers: one algorithm per module, shared machinery in :mod:`.base`."""

from .base import OuterOptimizer, SyncUnit, default_outer_optimizer
from .ddp import DDP
from .diloco import DiLoCo
from .registry import Strategy, available, get_strategy, register_strategy

__all__ = ["DDP", "DiLoCo", "OuterOptimizer", "Strategy", "SyncUnit", "available", "default_outer_optimizer",
           "get_strategy", "register_strategy"]
