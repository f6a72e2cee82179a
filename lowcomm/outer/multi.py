"""Several inner optimizers over disjoint parameters, driven as one (e.g. Muon + AdamW for MuLoCo).

``torch.optim.Muon`` takes only 2-D weights; embeddings, the output head, norms and biases need
another optimizer (AdamW). Every lowcomm strategy accepts ``inner=[muon, adamw]``: the list is
wrapped in an :class:`InnerOptimizers`, which *is* a ``torch.optim.Optimizer``:

* ``param_groups`` is every optimizer's groups concatenated, in list order: the same group dicts,
  so one LR scheduler on the outer optimizer (or on this) drives every inner lr (the list itself
  is new on every read; add groups to the optimizers before wrapping them); ``state`` is a
  read-only view of every optimizer's state;
* ``step()`` runs the closure once, then steps each optimizer in list order; ``zero_grad()`` each;
* ``state_dict()`` is ``{"inner": [sd_0, sd_1, ...]}``; ``load_state_dict`` takes that, or the
  plain state dict of a single optimizer when there is one (a single-inner checkpoint).

Construction checks that no parameter is in two optimizers (or twice in one) and that every
parameter of a ``torch.optim.Muon`` is 2-D (``Muon.add_param_group`` does not check), raising
``ValueError`` that names the parameter (its name when the optimizer was built from
``model.named_parameters()``, else its optimizer, group, index and shape).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from types import MappingProxyType
from typing import Any

import torch

__all__ = ["InnerOptimizers", "as_inner", "inner_list"]


def _describe(opt_index: int, opt: torch.optim.Optimizer, group_index: int, group: dict, i: int,
              p: torch.Tensor) -> str:
    names = group.get("param_names")
    name = f"{names[i]!r} " if names and i < len(names) else ""
    return (f"parameter {name}(inner optimizer {opt_index}, {type(opt).__name__}, group {group_index}, "
            f"index {i}, shape {tuple(p.shape)})")


class InnerOptimizers(torch.optim.Optimizer):
    """Several optimizers over disjoint parameters as one ``torch.optim.Optimizer`` (module docstring)."""

    def __init__(self, optimizers: Sequence[torch.optim.Optimizer]):
        from .base import OuterOptimizer  # base imports this module

        optimizers = list(optimizers)
        if not optimizers:
            raise ValueError("inner is an empty list: pass one torch optimizer or a list of them")
        seen: dict[int, str] = {}
        for k, opt in enumerate(optimizers):
            if isinstance(opt, (InnerOptimizers, OuterOptimizer)) or not isinstance(opt, torch.optim.Optimizer):
                raise ValueError(f"inner optimizer {k} must be a plain torch.optim.Optimizer (e.g. torch.optim.AdamW"
                                 f"(params)), got {type(opt).__name__}")
            for gi, g in enumerate(opt.param_groups):
                for i, p in enumerate(g["params"]):
                    where = _describe(k, opt, gi, g, i, p)
                    if id(p) in seen:
                        raise ValueError(f"{where} is also {seen[id(p)]}: each parameter belongs to exactly one "
                                         f"inner optimizer")
                    seen[id(p)] = where
                    if isinstance(opt, torch.optim.Muon) and p.ndim != 2:
                        raise ValueError(f"{where} is not 2-D but is given to torch.optim.Muon, which orthogonalizes "
                                         f"matrices only: give it to AdamW (lowcomm's make_inner('muon') splits a "
                                         f"model this way)")
        self.optimizers = optimizers
        self._optimizer_step_pre_hooks = OrderedDict()
        self._optimizer_step_post_hooks = OrderedDict()
        self._optimizer_state_dict_pre_hooks = OrderedDict()
        self._optimizer_state_dict_post_hooks = OrderedDict()
        self._optimizer_load_state_dict_pre_hooks = OrderedDict()
        self._optimizer_load_state_dict_post_hooks = OrderedDict()
        self._patch_step_function()
        self._warned_capturable_if_run_uncaptured = True

    @property
    def param_groups(self) -> list[dict[str, Any]]:  # type: ignore[override]
        """Every optimizer's groups, concatenated (the same dicts: schedulers drive them all)."""
        return [g for o in self.optimizers for g in o.param_groups]

    @param_groups.setter
    def param_groups(self, value: list[dict[str, Any]]) -> None:
        value = list(value)
        counts = [len(o.param_groups) for o in self.optimizers]
        if len(value) != sum(counts):
            raise ValueError(f"{len(value)} param groups given for inner optimizers with {counts} groups")
        start = 0
        for o, n in zip(self.optimizers, counts):
            o.param_groups = value[start:start + n]
            start += n

    @property
    def state(self) -> Mapping[Any, Any]:  # type: ignore[override]
        """Per-parameter state of every optimizer (a merged read-only view; parameters are disjoint)."""
        out: dict[Any, Any] = {}
        for o in self.optimizers:
            out.update(o.state)
        return MappingProxyType(out)

    @state.setter
    def state(self, value: Any) -> None:
        raise ValueError("set the state of the individual inner optimizers (InnerOptimizers.optimizers)")

    @property
    def defaults(self) -> dict[str, Any]:  # type: ignore[override]
        return self.optimizers[0].defaults

    @defaults.setter
    def defaults(self, value: dict[str, Any]) -> None:
        self.optimizers[0].defaults = value

    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for o in self.optimizers:
            o.step()
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        for o in self.optimizers:
            o.zero_grad(set_to_none=set_to_none)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        raise ValueError("add parameter groups to one of the inner optimizers before wrapping them")

    def state_dict(self) -> dict[str, Any]:
        return {"inner": [o.state_dict() for o in self.optimizers]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        load_inner(self.optimizers, state_dict.get("inner", state_dict) if isinstance(state_dict, dict) else None)

    def __repr__(self) -> str:
        return f"InnerOptimizers({', '.join(type(o).__name__ for o in self.optimizers)})"


def as_inner(inner: Any) -> torch.optim.Optimizer:
    """One optimizer as is; a list or tuple of several as :class:`InnerOptimizers` (one: itself)."""
    if isinstance(inner, (list, tuple)):
        if len(inner) == 1:
            return as_inner(inner[0])
        return InnerOptimizers(inner)
    return inner


def inner_list(inner: torch.optim.Optimizer) -> list[torch.optim.Optimizer]:
    """The plain optimizers behind ``inner``."""
    return list(inner.optimizers) if isinstance(inner, InnerOptimizers) else [inner]


def load_inner(optimizers: Sequence[torch.optim.Optimizer], sd: Any) -> None:
    """Load a list of inner state dicts, or one plain state dict (a single-inner checkpoint) into one optimizer."""
    if isinstance(sd, dict) and "state" in sd and "param_groups" in sd:
        sd = [sd]  # one optimizer's own state dict: what single-inner runs saved
    if not isinstance(sd, (list, tuple)) or not all(isinstance(s, dict) for s in sd):
        raise ValueError("inner state must be a list of optimizer state dicts (or one optimizer's state dict)")
    if len(sd) != len(optimizers):
        raise ValueError(f"the state holds {len(sd)} inner optimizer(s), this run has {len(optimizers)}: build the "
                         f"same inner optimizers (e.g. the same inner='muon' split) to resume it")
    for o, s in zip(optimizers, sd):
        o.load_state_dict(s)
