"""Outer optimizers: one algorithm per module, shared machinery in :mod:`.base`.

Importing this package registers every built-in strategy (each module registers its typed
config class with :mod:`.registry`).
"""

from .base import OuterOptimizer, SyncUnit, default_outer_optimizer
from .ddp import DDP, DDPConfig
from .demo import DeMo, DeMoConfig
from .diloco import DiLoCo, DiLoCoConfig, FedAvgConfig, MuLoCoConfig
from .noloco import NoLoCo, NoLoCoConfig, noloco_groups
from .registry import Strategy, StrategyConfig, available, default_strategies, get_strategy, register_strategy
from .sparseloco import SparseLoCo, SparseLoCoConfig
from .streaming import StreamingDiLoCo, StreamingDiLoCoConfig

__all__ = ["DDP", "DDPConfig", "DeMo", "DeMoConfig", "DiLoCo", "DiLoCoConfig", "FedAvgConfig", "MuLoCoConfig", "NoLoCo",
           "NoLoCoConfig", "OuterOptimizer", "SparseLoCo", "SparseLoCoConfig", "Strategy", "StrategyConfig",
           "StreamingDiLoCo", "StreamingDiLoCoConfig", "SyncUnit", "available", "default_outer_optimizer",
           "default_strategies", "get_strategy", "noloco_groups",
           "register_strategy"]
