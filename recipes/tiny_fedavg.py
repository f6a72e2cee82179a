"""Tiny FedAvg on CPU: DiLoCo with outer lr 1 and no momentum (plain model averaging every H steps).

For: the ablation the DiLoCo paper makes (the Nesterov outer step against plain averaging).
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from tiny_diloco import config as _base  # noqa: E402


def config():
    cfg = _base()
    cfg.name, cfg.description = "tiny_fedavg", __doc__.splitlines()[0]
    cfg.strategy, cfg.knobs = "fedavg", {"sync_every": 20}
    return cfg
