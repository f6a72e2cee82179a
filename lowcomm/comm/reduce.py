"""The one reduction every transport uses: a sum in member order, accumulated in fp32.

Bit-identical results across members and transports rest on one rule: the contributions to
a reduced element are added in member order, ``((x_0 + x_1) + x_2) + ...``, in fp32 (the
first contribution is copied into the accumulator, each later one added in place), then
divided by the number of contributions for a mean. Float addition is not associative, so
any other order (a tree, a ring, pairwise) can give other bits; every code path that reduces
(:mod:`lowcomm.comm.p2p`'s all-reduce, quantized all-reduce and group reduce, the
torch.distributed transport through it, the ZeroMQ data plane chunk by chunk) calls
:func:`reduce_in_member_order`.

A data plane that receives per-sender chunks calls it once per chunk with that chunk's
contributions in member order and a slice of its accumulator as ``out``; elementwise
arithmetic makes the chunked result equal to the whole-shard one bit for bit.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

__all__ = ["reduce_in_member_order"]


def reduce_in_member_order(parts: Iterable[torch.Tensor], op: str = "sum",
                           out: torch.Tensor | None = None) -> torch.Tensor:
    """``((parts[0] + parts[1]) + parts[2]) + ...`` in fp32, divided by their count for ``op="mean"``.

    ``parts`` are the contributions in member order, all of one shape (any floating dtype);
    an iterator is consumed one part at a time, so a caller may decode contributions lazily.
    ``out``: an fp32 buffer of that shape to accumulate into (a new one when None). Returns
    the fp32 accumulator; cast it to the wire dtype yourself.
    """
    if op not in ("sum", "mean"):
        raise ValueError(f"reduce op must be 'mean' or 'sum', got {op!r}")
    acc = out
    count = 0
    for x in parts:
        if count == 0:
            if acc is None:
                acc = x.to(torch.float32, copy=True)
            else:
                if acc.dtype != torch.float32 or acc.shape != x.shape:
                    raise ValueError(f"out must be an fp32 tensor of shape {tuple(x.shape)}, got {acc.dtype} "
                                     f"{tuple(acc.shape)}")
                acc.copy_(x)
        else:
            if x.shape != acc.shape:
                raise ValueError(f"contribution {count} has shape {tuple(x.shape)}, expected {tuple(acc.shape)}")
            acc.add_(x)
        count += 1
    if count == 0:
        raise ValueError("reduce_in_member_order needs at least one contribution")
    if op == "mean":
        acc.div_(count)
    return acc
