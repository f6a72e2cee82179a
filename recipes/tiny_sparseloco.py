"""Tiny SparseLoCo on CPU: every H=30 steps, the top 64 of each 64x64 block of the error-fed pseudo-gradient, 2 bits.

For: trying SparseLoCo (Sarfi et al. 2025, arXiv 2508.15706) at the size of tiny_diloco.py with
templar's settings: AdamW inner steps; every 30 steps each worker adds its pseudo-gradient to an
error buffer (decay 0.95), all-gathers the 64 largest entries of every 64x64 block (1.56%) as
12-bit indices and 2-bit values, and steps the global weights with lr 0.6 times their mean.

    lowcomm train --recipe recipes/tiny_sparseloco.py
"""

import os

from lowcomm.train import load_recipe


def _base():
    return load_recipe(os.path.join(os.path.dirname(os.path.abspath(__file__)), "tiny_diloco.py"))


def config():
    cfg = _base()
    cfg.name, cfg.description = "tiny_sparseloco", __doc__.splitlines()[0]
    cfg.strategy = "sparseloco"
    cfg.knobs = {"sync_every": 30, "outer_lr": 0.6, "decay": 0.95, "topk": 64, "chunk": 64, "bins": 4,
                 "quant_range": 6.0}
    return cfg
