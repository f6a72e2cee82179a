"""Tiny data-parallel baseline on CPU: all-reduce of gradients every step (the reference).

For: comparing the low-communication recipes with ordinary data parallelism at the same size;
same model, data and schedule as tiny_diloco.py.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from tiny_diloco import config as _base  # noqa: E402


def config():
    cfg = _base()
    cfg.name, cfg.description = "tiny_ddp", __doc__.splitlines()[0]
    cfg.strategy, cfg.knobs = "ddp", {}
    return cfg
