"""The simulator's own settings per strategy, for its small model and short runs.

A strategy's config defaults are its paper's (H = 500 for DiLoCo, ...), which suit real runs of
thousands of steps. ``lowcomm sim`` trains a 0.2M-parameter GPT for a few hundred steps, so it
states here what it changes for that scale; everything not listed is the strategy's default.
``--sync-every`` and ``--set knob=value`` on the command line go over these.
"""

from __future__ import annotations

from typing import Any

__all__ = ["SIM_PRESETS", "preset"]

SIM_PRESETS: dict[str, dict[str, Any]] = {
    # H = 50: several syncs in a 300-step run (the papers' H of 100-500 would give at most six).
    "diloco": {"sync_every": 50},
    "fedavg": {"sync_every": 50},
    "streaming": {"sync_every": 50},
    "muloco": {"sync_every": 50},
    # lr 3e-3 was the best of {2e-3, 3e-3, 5e-3} for sign descent on the simulator's 300-step GPT run,
    # and decay 0.99 beat the paper's 0.999 there (a 0.999 momentum outlives such a short run); see
    # benchmarks/README.md.
    "demo": {"lr": 3e-3, "decay": 0.99},
}


def preset(name: str) -> dict[str, Any]:
    """The simulator's settings for strategy ``name`` (knobs, plus "inner"/"lr" for the inner optimizer)."""
    return dict(SIM_PRESETS.get(name, {}))
