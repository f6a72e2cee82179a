"""Typed strategy configs and the registry that lets the simulator and the CLI find them by name.

Every strategy has a config dataclass beside its class (``DiLoCoConfig`` next to ``DiLoCo``):
one field per knob, named as the constructor's argument, with the constructor's default (the
paper's) and a one-line comment, and ``build(inner, transport, model)`` making the strategy.
The registry maps names to these config classes. Knobs from a command line or a recipe go
through :meth:`StrategyConfig.from_knobs`, which parses each value against its field's type
(``"False"`` is ``False``; ``nesterov=maybe`` is a ``ValueError`` naming the field and its
type) and rejects unknown knobs with the list of known ones.

Two class-level settings say which inner optimizer a strategy is meant to wrap: ``inner``
(``"adamw"``, ``"sgd"``, ``"muon"``, ... as in :data:`lowcomm.loop.INNER_OPTIMIZERS`; None: the
loop's default) and ``lr`` (its learning rate; None: the loop's default). The simulator's own
small-model settings (shorter H, ...) are not defaults of the strategy: they live in the
simulator's preset table (:mod:`lowcomm.sim.presets`).

A strategy written outside lowcomm registers its config class the same way and then runs in
``lowcomm sim`` and ``lowcomm train``; the older form ``register_strategy(name, build_fn,
defaults_dict)`` still works (its knobs are typed from the defaults' values).

Contract for the simulator: a strategy appends a :class:`~lowcomm.outer.base.SyncRecord`
to ``opt.sync_log`` for every communication it performs (launch step, finish step, the
ledger op ids), so the simulated clock can place each transfer in time and tell how much
of it was overlapped with compute.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

__all__ = ["Strategy", "StrategyConfig", "available", "default_strategies", "get_strategy", "parse_knob",
           "register_strategy"]

_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")
_NONE = ("none", "null")


def _type_name(tp: Any) -> str:
    if isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union:
        return " | ".join(_type_name(a) for a in typing.get_args(tp))
    return "None" if tp is type(None) else getattr(tp, "__name__", str(tp))


def _parse_one(tp: Any, value: Any) -> Any:
    """``value`` as type ``tp`` (strings are parsed), else raise ValueError/TypeError."""
    if tp is Any:
        return value
    if tp is type(None):
        if value is None or (isinstance(value, str) and value.strip().lower() in _NONE):
            return None
        raise ValueError
    text = value.strip() if isinstance(value, str) else None
    if tp is bool:
        if isinstance(value, bool):
            return value
        if text is not None and text.lower() in _TRUE + _FALSE:
            return text.lower() in _TRUE
        raise ValueError
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if text is not None:
            return int(text)
        raise ValueError
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if text is not None:
            return float(text)
        raise ValueError
    if tp is str:
        if isinstance(value, str):
            # a JSON-quoted string ('"e3m0"', as shells pass it) is the string inside
            return json.loads(value) if len(value) >= 2 and value[0] == value[-1] == '"' else value
        raise ValueError
    origin = typing.get_origin(tp) or tp
    if isinstance(value, str):
        value = json.loads(value)  # lists, tuples, dicts: JSON on the command line
    if isinstance(value, list) and origin is tuple:
        value = tuple(value)
    if isinstance(value, origin):
        return value
    raise ValueError


def parse_knob(name: str, tp: Any, value: Any) -> Any:
    """``value`` for the knob or config field ``name`` of type ``tp``; strings parsed, anything else type-checked.

    A union (``str | None``) tries its members in order, None first for "none"/"null".
    """
    members = typing.get_args(tp) if (isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union) \
        else (tp,)
    if type(None) in members:
        members = (type(None), *[m for m in members if m is not type(None)])
    for m in members:
        try:
            return _parse_one(m, value)
        except (ValueError, TypeError, json.JSONDecodeError):
            continue
    raise ValueError(f"{name} takes {_type_name(tp)}, got {value!r}"
                     + ("; use true or false" if bool in members else ""))


@dataclass
class StrategyConfig:
    """Base of every strategy's typed config (a dataclass; one documented field per knob)."""

    inner: ClassVar[str | None] = None  # the inner optimizer the strategy is meant to wrap (None: the loop's)
    lr: ClassVar[float | None] = None  # its learning rate (None: the loop's default)
    deprecated: ClassVar[dict[str, str]] = {}  # old knob name -> field name (still accepted, with a warning)

    def build(self, inner: Any, transport: Any, model: Any = None) -> Any:
        """The strategy, wrapping the inner optimizer ``inner``, syncing through ``transport``."""
        raise NotImplementedError

    @classmethod
    def knob_names(cls) -> list[str]:
        """The knobs this config takes (its fields), in declaration order."""
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def canonical(cls, name: str) -> str:
        """The field a knob name means (deprecated spellings map to the new one, with a warning)."""
        name = name.strip().replace("-", "_")
        if name in cls.deprecated:
            new = cls.deprecated[name]
            warnings.warn(f"knob {name!r} of {cls.__name__} is deprecated; use {new!r}", DeprecationWarning,
                          stacklevel=3)
            return new
        return name

    @classmethod
    def from_knobs(cls, knobs: Mapping[str, Any] | None = None) -> StrategyConfig:
        """A config with ``knobs`` over the defaults: values parsed against the field types.

        An unknown knob is a ValueError listing the known ones.
        """
        hints = typing.get_type_hints(cls)
        names = cls.knob_names()
        values: dict[str, Any] = {}
        for key, value in (knobs or {}).items():
            name = cls.canonical(key)
            if name not in names:
                raise ValueError(f"unknown knob {key!r} for {cls.__name__}; known knobs: {', '.join(names) or 'none'}")
            values[name] = parse_knob(f"knob {name}", hints[name], value)
        return cls(**values)

    def replace(self, knobs: Mapping[str, Any] | None = None) -> StrategyConfig:
        """A copy with ``knobs`` applied (parsed as :meth:`from_knobs` does)."""
        return type(self).from_knobs({**dataclasses.asdict(self), **(knobs or {})})

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class Strategy:
    """A named way to train: its config class, a one-line description, and whether ``lowcomm sim`` runs it."""

    name: str
    config: type[StrategyConfig]
    description: str = ""
    default_run: bool = True  # part of ``lowcomm sim``'s default set of strategies

    def make_config(self, knobs: Mapping[str, Any] | None = None) -> StrategyConfig:
        """The typed config with ``knobs`` (names and values checked) over the strategy's defaults."""
        return self.config.from_knobs(knobs)

    def build(self, inner: Any, transport: Any, model: Any = None, **knobs: Any) -> Any:
        """``make_config(knobs).build(inner, transport, model)``."""
        return self.make_config(knobs).build(inner, transport, model)

    @property
    def defaults(self) -> dict[str, Any]:
        """Every knob's default (the config's fields)."""
        return self.config().to_dict()

    def knob_names(self) -> list[str]:
        """Knob names this strategy takes, deprecated spellings included."""
        return [*self.config.knob_names(), *self.config.deprecated]


_REGISTRY: dict[str, Strategy] = {}


def _legacy_config(name: str, build: Callable[..., Any], defaults: Mapping[str, Any]) -> type[StrategyConfig]:
    """A config class for the older ``register_strategy(name, build_fn, defaults)`` form."""
    knobs = {k: v for k, v in defaults.items() if k not in ("inner", "lr")}
    fields = [(k, Any if v is None else type(v), dataclasses.field(default=v)) for k, v in knobs.items()]

    def build_(self, inner, transport, model=None):
        return build(inner, transport, model, **dataclasses.asdict(self))

    cls = dataclasses.make_dataclass(f"{name.title().replace('_', '')}Config", fields, bases=(StrategyConfig,),
                                     namespace={"build": build_})
    cls.inner, cls.lr = defaults.get("inner"), defaults.get("lr")
    return cls


def register_strategy(name: str, config: type[StrategyConfig] | Callable[..., Any],
                      defaults: Mapping[str, Any] | str | None = None, description: str = "",
                      replace: bool = False, default_run: bool = True) -> Strategy:
    """Register a strategy's config class under ``name`` (``replace=True`` to overwrite an entry).

    ``register_strategy(name, ConfigClass, description)``; the older form
    ``register_strategy(name, build_fn, defaults_dict, description)`` also works.
    ``default_run=False`` keeps it out of the strategies ``lowcomm sim`` runs with no ``--strategies``.
    """
    if not name or not isinstance(name, str):
        raise ValueError(f"strategy name must be a non-empty string, got {name!r}")
    if name in _REGISTRY and not replace:
        raise ValueError(f"strategy {name!r} is already registered; pass replace=True to overwrite it")
    if isinstance(config, type) and issubclass(config, StrategyConfig):
        if isinstance(defaults, str):
            description, defaults = defaults, None
        if defaults:
            raise ValueError("a config class carries its own defaults; pass register_strategy(name, Config, "
                             "description)")
        cls = config
    elif callable(config):
        cls = _legacy_config(name, config, dict(defaults or {}))
    else:
        raise ValueError(f"register_strategy needs a StrategyConfig subclass (or a build function), got {config!r}")
    s = Strategy(name, cls, description, bool(default_run))
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
