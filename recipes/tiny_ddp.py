"""Tiny data-parallel baseline on CPU: all-reduce of gradients every step (the reference).

For: comparing the low-communication recipes with ordinary data parallelism at the same size;
same model, data and schedule as tiny_diloco.py.
"""

import os

from lowcomm.train import load_recipe


def _base():
    return load_recipe(os.path.join(os.path.dirname(os.path.abspath(__file__)), "tiny_diloco.py"))


def config():
    cfg = _base()
    cfg.name, cfg.description = "tiny_ddp", __doc__.splitlines()[0]
    cfg.strategy, cfg.knobs = "ddp", {}
    return cfg
