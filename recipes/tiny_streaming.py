"""Tiny Streaming DiLoCo on CPU: 2 fragments synced in turn, 4-bit pseudo-gradients, overlapped.

For: trying Streaming DiLoCo (Douillard et al. 2025, arXiv 2501.18512) at the size of tiny_diloco.py:
the 2 transformer blocks form F=2 strided fragments, fragment p syncs at steps offset by p*H/F,
its E3M0 4-bit pseudo-gradient travels while training goes on for tau=1 step, then the outer step
(Nesterov, lr 0.7, momentum 0.9) and mixing with alpha=0.5.
"""

import os

from lowcomm.train import load_recipe


def _base():
    return load_recipe(os.path.join(os.path.dirname(os.path.abspath(__file__)), "tiny_diloco.py"))


def config():
    cfg = _base()
    cfg.name, cfg.description = "tiny_streaming", __doc__.splitlines()[0]
    cfg.strategy = "streaming"
    cfg.knobs = {"sync_every": 20, "fragments": 2, "overlap": 1, "alpha": 0.5, "codec": "e3m0",
                 "outer_lr": 0.7, "outer_momentum": 0.9, "nesterov": True}
    return cfg
