"""lowcomm: low-communication, decentralized pretraining for PyTorch.

Replace your optimizer with a lowcomm outer optimizer; nothing else in the loop changes::

    inner = torch.optim.AdamW(model.parameters(), lr=4e-4, weight_decay=0.1)
    opt = lowcomm.DiLoCo(inner, transport=lowcomm.connect(), sync_every=500)
"""

from .comm import CommError, PeerLost, Transport, connect
from .comm.aggregate import Aggregate
from .comm.local import run_local
from .outer import (
    DDP,
    DDPConfig,
    DeMo,
    DeMoConfig,
    DiLoCo,
    DiLoCoConfig,
    FedAvgConfig,
    MuLoCoConfig,
    NoLoCo,
    NoLoCoConfig,
    OuterOptimizer,
    SparseLoCo,
    SparseLoCoConfig,
    StrategyConfig,
    StreamingDiLoCo,
    StreamingDiLoCoConfig,
    available,
    get_strategy,
    register_strategy,
)

__version__ = "0.1.0"

__all__ = [
    "DDP",
    "Aggregate",
    "CommError",
    "DDPConfig",
    "DeMo",
    "DeMoConfig",
    "DiLoCo",
    "DiLoCoConfig",
    "FedAvgConfig",
    "MuLoCoConfig",
    "NoLoCo",
    "NoLoCoConfig",
    "OuterOptimizer",
    "PeerLost",
    "SparseLoCo",
    "SparseLoCoConfig",
    "StrategyConfig",
    "StreamingDiLoCo",
    "StreamingDiLoCoConfig",
    "Transport",
    "__version__",
    "available",
    "connect",
    "get_strategy",
    "register_strategy",
    "run_local",
]
