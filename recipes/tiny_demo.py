"""Tiny DeMo on CPU: every step, all-gather top-k DCT coefficients of the momentum; sign-SGD.

For: trying decoupled momentum (Peng, Quesnelle, Kingma 2024, arXiv 2411.19870) at the size of
tiny_diloco.py; inner SGD as the paper's optimizer, top-32 of each 64-chunk, momentum decay 0.999.
"""

import os

from lowcomm.train import load_recipe


def _base():
    return load_recipe(os.path.join(os.path.dirname(os.path.abspath(__file__)), "tiny_diloco.py"))


def config():
    cfg = _base()
    cfg.name, cfg.description = "tiny_demo", __doc__.splitlines()[0]
    cfg.strategy, cfg.knobs = "demo", {"topk": 32, "chunk": 64, "decay": 0.999, "sign": True}
    cfg.inner, cfg.lr = "sgd", 1e-3
    return cfg
