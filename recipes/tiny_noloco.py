"""Tiny NoLoCo on CPU: no all-reduce; every H=20 steps replicas average weights in random pairs.

For: trying gossip-style syncing (Kolehmainen et al. 2025, arXiv 2506.10911) at the size of
tiny_diloco.py; heavy-ball outer step with the reference code's eta 0.7, mu 0.5. Needs 2+ replicas
to exchange anything (a world of one just trains alone).
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from tiny_diloco import config as _base  # noqa: E402


def config():
    cfg = _base()
    cfg.name, cfg.description = "tiny_noloco", __doc__.splitlines()[0]
    cfg.strategy, cfg.knobs = "noloco", {"sync_every": 20, "group_size": 2, "outer_lr": 0.7, "momentum": 0.5}
    return cfg
