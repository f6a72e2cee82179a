"""The inner optimizers lowcomm's recipes and simulator build by name: "adamw", "sgd", "muon".

``make_inner(model, "muon", lr, weight_decay)`` builds MuLoCo's split (arXiv 2505.23725):
``torch.optim.Muon`` for the 2-D hidden weights, with ``adjust_lr_fn="match_rms_adamw"`` (its
update is rescaled to AdamW's RMS, so one lr and one schedule fit both), and AdamW for the rest:
embeddings (every ``nn.Embedding`` weight), the output head (a 2-D weight of a module named
``head``, ``lm_head`` or ``output``), norms and biases (every parameter that is not 2-D). It
returns the two as a list, which every lowcomm strategy accepts as ``inner``.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch

__all__ = ["HEAD_NAMES", "INNER_KINDS", "make_inner", "muon_split"]

INNER_KINDS = ("adamw", "sgd", "muon")
HEAD_NAMES = ("head", "lm_head", "output")


def muon_split(model: torch.nn.Module) -> tuple[list[tuple[str, torch.Tensor]], list[tuple[str, torch.Tensor]]]:
    """(named parameters for Muon, named parameters for AdamW) of ``model``'s trainable parameters."""
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    muon, adamw = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        module = name.rsplit(".", 1)[0].rsplit(".", 1)[-1] if "." in name else ""
        hidden = p.ndim == 2 and id(p) not in embeddings and module not in HEAD_NAMES
        (muon if hidden else adamw).append((name, p))
    return muon, adamw


def make_inner(model: torch.nn.Module | Iterable[torch.Tensor], kind: str, lr: float, weight_decay: float = 0.0,
               betas: Sequence[float] = (0.9, 0.95)) -> torch.optim.Optimizer | list[torch.optim.Optimizer]:
    """The inner optimizer(s) ``kind`` names, over ``model``'s trainable parameters.

    "adamw": AdamW(betas, weight_decay); "sgd": plain SGD; "muon": ``[Muon, AdamW]`` over
    :func:`muon_split` (needs the model, to tell embeddings and the head from hidden weights).
    """
    if kind not in INNER_KINDS:
        raise ValueError(f"inner optimizer must be one of {INNER_KINDS}, got {kind!r}")
    if kind == "muon":
        if not isinstance(model, torch.nn.Module):
            raise ValueError("inner='muon' needs the model (not a list of parameters) to tell hidden 2-D weights "
                             "from embeddings and the head")
        hidden, rest = muon_split(model)
        if not hidden:
            raise ValueError("inner='muon': the model has no 2-D hidden weights for Muon; use inner='adamw'")
        opts: list[torch.optim.Optimizer] = [torch.optim.Muon(hidden, lr=lr, weight_decay=weight_decay,
                                                              adjust_lr_fn="match_rms_adamw")]
        if rest:
            opts.append(torch.optim.AdamW(rest, lr=lr, betas=tuple(betas), weight_decay=weight_decay))
        return opts
    params = model.parameters() if isinstance(model, torch.nn.Module) else model
    params = [p for p in params if p.requires_grad]
    if kind == "adamw":
        return torch.optim.AdamW(params, lr=lr, betas=tuple(betas), weight_decay=weight_decay)
    return torch.optim.SGD(params, lr=lr)
