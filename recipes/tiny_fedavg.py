"""Tiny FedAvg on CPU: DiLoCo with outer lr 1 and no momentum (plain model averaging every H steps).

For: the ablation the DiLoCo paper makes (the Nesterov outer step against plain averaging).
"""

import os

from lowcomm.train import load_recipe


def _base():
    return load_recipe(os.path.join(os.path.dirname(os.path.abspath(__file__)), "tiny_diloco.py"))


def config():
    cfg = _base()
    cfg.name, cfg.description = "tiny_fedavg", __doc__.splitlines()[0]
    cfg.strategy, cfg.knobs = "fedavg", {"sync_every": 20}
    return cfg
