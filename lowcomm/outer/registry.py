"""A registry of strategies, so the simulator and the CLI find them by name.

A strategy registers a builder ``build(inner, transport, model, **knobs) -> torch.optim.Optimizer``
(normally an :class:`~lowcomm.outer.base.OuterOptimizer`), the knobs it accepts with their
defaults for short simulated runs, and a one-line description. Strategies written outside
lowcomm register themselves the same way and then run in ``lowcomm sim``.

Two keys of ``defaults`` are read by whoever builds the inner optimizer (the simulator, the
training loop) instead of being passed to ``build``: ``"inner"`` (``"adamw"``, ``"sgd"`` or
``"muon"``, the inner optimizer the strategy is meant to wrap, see :func:`lowcomm.inner.make_inner`)
and ``"lr"`` (its peak learning rate).

Contract for the simulator: a strategy appends a :class:`~lowcomm.outer.base.SyncRecord`
to ``opt.sync_log`` for every communication it performs (launch step, finish step, the
ledger op ids), so the simulated clock can place each transfer in time and tell how much
of it was overlapped with compute.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

__all__ = ["Strategy", "available", "default_strategies", "get_strategy", "register_strategy"]


@dataclass
class Strategy:
    """A named way to train: how to build it and its defaults for the simulator."""

    name: str
    build: Callable[..., Any]
    defaults: dict[str, Any] = field(default_factory=dict)
    description: str = ""
    default_run: bool = True  # part of ``lowcomm sim``'s default set of strategies


_REGISTRY: dict[str, Strategy] = {}


def register_strategy(name: str, build: Callable[..., Any], defaults: dict[str, Any] | None = None,
                      description: str = "", replace: bool = False, default_run: bool = True) -> Strategy:
    """Register ``build`` under ``name`` (``replace=True`` to overwrite an existing entry).

    ``default_run=False`` keeps it out of the strategies ``lowcomm sim`` runs with no ``--strategies``.
    """
    if not name or not isinstance(name, str):
        raise ValueError(f"strategy name must be a non-empty string, got {name!r}")
    if name in _REGISTRY and not replace:
        raise ValueError(f"strategy {name!r} is already registered; pass replace=True to overwrite it")
    s = Strategy(name, build, dict(defaults or {}), description, bool(default_run))
    _REGISTRY[name] = s
    return s


def get_strategy(name: str) -> Strategy:
    """The strategy registered under ``name``."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown strategy {name!r}; available: {', '.join(available())}") from None


def available() -> list[str]:
    """Registered strategy names, in registration order."""
    return list(_REGISTRY)


def default_strategies() -> list[str]:
    """Registered strategies flagged for the default ``lowcomm sim`` run, in registration order."""
    return [n for n, s in _REGISTRY.items() if s.default_run]
