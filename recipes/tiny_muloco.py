"""Tiny MuLoCo on CPU: DiLoCo with Muon inner steps on the 2-D hidden weights and AdamW on the rest.

For: trying MuLoCo (arXiv 2505.23725) at the size of tiny_diloco.py: torch.optim.Muon (its update
rescaled to AdamW's RMS, so one lr and schedule fit both) for the attention and MLP matrices, AdamW
for embeddings, norms and biases; every H=30 steps an all-reduce of pseudo-gradients and a
Nesterov outer step (lr 0.7, momentum 0.9).

    lowcomm train --recipe recipes/tiny_muloco.py
"""

import os

from lowcomm.train import load_recipe


def _base():
    return load_recipe(os.path.join(os.path.dirname(os.path.abspath(__file__)), "tiny_diloco.py"))


def config():
    cfg = _base()
    cfg.name, cfg.description = "tiny_muloco", __doc__.splitlines()[0]
    cfg.strategy, cfg.inner = "muloco", "muon"
    cfg.knobs = {"sync_every": 30, "outer_lr": 0.7, "outer_momentum": 0.9, "nesterov": True}
    return cfg
