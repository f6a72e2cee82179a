"""Tiny NoLoCo on CPU: no all-reduce; every H=20 steps replicas average weights in random pairs.

For: trying gossip-style syncing (Kolehmainen et al. 2025, arXiv 2506.10911) at the size of
tiny_diloco.py; heavy-ball outer step with the reference code's eta 0.7, mu 0.5. Needs 2+ replicas
to exchange anything (a world of one just trains alone).
"""

import os

from lowcomm.train import load_recipe


def _base():
    return load_recipe(os.path.join(os.path.dirname(os.path.abspath(__file__)), "tiny_diloco.py"))


def config():
    cfg = _base()
    cfg.name, cfg.description = "tiny_noloco", __doc__.splitlines()[0]
    cfg.strategy, cfg.knobs = "noloco", {"sync_every": 20, "group_size": 2, "outer_lr": 0.7, "outer_momentum": 0.5}
    return cfg
