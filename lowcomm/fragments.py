"""Split a model into F fragments of whole blocks, for Streaming DiLoCo (arXiv 2501.18512).

The paper syncs one fragment of the model at a time. A fragment is a set of whole
transformer blocks; the paper's better choice is *strided* (block ``l`` goes to fragment
``l mod F``, so every fragment spans the whole depth), the alternative *sequential*
(consecutive blocks together). The blocks are the children of the model's largest
``nn.ModuleList`` whose children all have the same type. Parameters outside the blocks
(embeddings, final norm, head) are spread over the same F fragments - each, largest first,
goes to the fragment that is smallest so far - so there are always exactly F fragments and
their sizes stay close. An explicit list of F module groups is also accepted.

Everything here is deterministic (model order, sizes, ties by index), so every worker that
builds the same model gets the same fragments.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from torch import nn

__all__ = ["find_blocks", "split_fragments"]


def find_blocks(model: nn.Module) -> nn.ModuleList:
    """The model's largest ``nn.ModuleList`` of repeated blocks (same type, most children; ties: most params)."""
    best, key = None, None
    for mod in model.modules():
        if isinstance(mod, nn.ModuleList) and len(mod) > 0 and len({type(c) for c in mod}) == 1:
            k = (len(mod), sum(p.numel() for p in mod.parameters()))
            if key is None or k > key:
                best, key = mod, k
    if best is None:
        raise ValueError(f"{type(model).__name__} has no nn.ModuleList of repeated blocks; pass fragments as an "
                         f"explicit list of module groups, e.g. fragments=[[model.a, model.b], [model.c]]")
    return best


def _group_params(group: nn.Module | torch.Tensor | Iterable) -> list[torch.Tensor]:
    if isinstance(group, nn.Module):
        return list(group.parameters())
    if isinstance(group, torch.Tensor):
        return [group]
    out: list[torch.Tensor] = []
    try:
        items = list(group)
    except TypeError:
        raise ValueError(f"a fragment must be a module, a parameter or a list of them, got {type(group).__name__}") \
            from None
    for g in items:
        out.extend(_group_params(g))
    return out


def split_fragments(model: nn.Module | None, fragments: int | Sequence, *, params: Sequence[torch.Tensor] | None = None,
                    mode: str = "strided") -> list[list[torch.Tensor]]:
    """F lists of parameters, each a fragment of whole blocks plus its share of the rest.

    Args:
        model: the model (required unless ``fragments`` is an explicit list covering ``params``,
            or ``fragments == 1``).
        fragments: a count F, or an explicit list of F groups (each a module, a parameter, or a
            list of them).
        params: the parameters to split (default: the model's). Only these appear in the result;
            every one of them appears in exactly one fragment.
        mode: ``"strided"`` (block l -> fragment l mod F, the paper's choice) or ``"sequential"``.
    """
    if mode not in ("strided", "sequential"):
        raise ValueError(f"fragment mode must be 'strided' or 'sequential', got {mode!r}")
    if params is None:
        if model is None:
            raise ValueError("split_fragments needs the model or the list of parameters to split")
        params = [p for p in model.parameters()]
    params = list(params)
    wanted = {id(p): i for i, p in enumerate(params)}
    if len(wanted) != len(params):
        raise ValueError("a parameter appears twice in the parameters to split")

    if isinstance(fragments, bool) or not isinstance(fragments, (int, Sequence)) or isinstance(fragments, str):
        raise ValueError(f"fragments must be a count (int >= 1) or a list of module groups, got {fragments!r}")
    if isinstance(fragments, int):
        F = fragments
        if F < 1:
            raise ValueError(f"fragments must be >= 1, got {F}")
        if F == 1:
            return [params]
        if model is None:
            raise ValueError(f"fragments={F} needs model= to find its blocks (or pass an explicit list of groups)")
        blocks = find_blocks(model)
        if F > len(blocks):
            raise ValueError(f"fragments={F} but the model has only {len(blocks)} blocks "
                             f"({type(blocks[0]).__name__}); use fragments <= {len(blocks)}")
        groups: list[list[nn.Module]] = [[] for _ in range(F)]
        if mode == "strided":
            for i, b in enumerate(blocks):
                groups[i % F].append(b)
        else:
            base, extra = divmod(len(blocks), F)
            start = 0
            for f in range(F):
                size = base + (1 if f < extra else 0)
                groups[f] = list(blocks[start:start + size])
                start += size
        group_params = [_group_params(g) for g in groups]
    else:
        if len(fragments) == 0:
            raise ValueError("fragments is an empty list; pass a count or at least one module group")
        group_params = [_group_params(g) for g in fragments]
        F = len(group_params)

    out: list[list[int]] = [[] for _ in range(F)]
    owner: dict[int, int] = {}
    for f, ps in enumerate(group_params):
        for p in ps:
            if id(p) in owner:
                if owner[id(p)] != f:
                    raise ValueError(f"a parameter of shape {tuple(p.shape)} is in fragments {owner[id(p)]} and {f}; "
                                     f"fragments must not overlap")
                continue  # shared within one fragment (tied weights)
            owner[id(p)] = f
            if id(p) in wanted:
                out[f].append(wanted[id(p)])
    # The rest (embeddings, norms, head): largest first to the smallest fragment so far.
    sizes = [sum(params[i].numel() for i in idxs) for idxs in out]
    rest = [i for i, p in enumerate(params) if id(p) not in owner]
    for i in sorted(rest, key=lambda i: (-params[i].numel(), i)):
        f = min(range(F), key=lambda f: (sizes[f], f))
        out[f].append(i)
        sizes[f] += params[i].numel()
    for f, idxs in enumerate(out):
        if not idxs:
            raise ValueError(f"fragment {f} has no parameters to sync (its modules are frozen or not in the "
                             f"optimizer); use fewer fragments or other groups")
    # Within a fragment keep the optimizer's parameter order (deterministic and familiar).
    return [[params[i] for i in sorted(idxs)] for idxs in out]
