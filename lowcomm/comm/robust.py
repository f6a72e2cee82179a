"""The messages of a robust all-reduce over point-to-point sends (used by :mod:`lowcomm.comm.p2p`).

A rule other than ``"mean"`` (see :mod:`lowcomm.comm.aggregate`) runs as:

1. reduce-scatter: every member sends shard ``j`` of its fp32 contribution to ``members()[j]``
   (encoded once when there is a codec; the owner decodes), exactly like the mean;
2. the owner drives :meth:`Aggregate.owner` over the W pieces it holds; each row it yields
   (W float64 values) goes to every member, which stacks the rows of all owners in member
   order: ``W x 8`` bytes per member per round (one round for ``clip`` and ``trimmed_mean``,
   ``1 + iters`` for ``centered_clip``). Norms come from what the owners *received*, so a
   sender cannot understate its own;
3. all-gather: the owner sends its result (encoded once with a codec; everyone, the owner too,
   keeps ``decode(encode(result))``).

Every member sees the same matrices and so the same :class:`~lowcomm.comm.aggregate.Screen`;
the caller's ``on_screen`` hook gets it with the owner's received pieces (the evidence).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from .aggregate import Aggregate, Screen
from .base import CommError

__all__ = ["robust_reduce"]


def _gather_rows(tr: Any, seq: Any, rec: Any, members: Sequence[int], me: int, row: torch.Tensor, k: int,
                 deadline: float) -> torch.Tensor:
    w = len(members)
    for peer in members:
        if peer != tr.rank:
            tr._send(peer, (seq, "rn", k), [row], rec)
    rows = []
    for j, peer in enumerate(members):
        r = row if j == me else tr._recv(peer, (seq, "rn", k), deadline)[0]
        if r.dtype != torch.float64 or r.numel() != w:
            raise CommError(f"norm row from member {peer} has {r.numel()} values of {r.dtype}, expected {w} float64")
        rows.append(r.reshape(w))
    return torch.stack(rows)


def robust_reduce(tr: Any, seq: Any, rec: Any, members: Sequence[int], me: int, flat: torch.Tensor,
                  agg: Aggregate, codec: Any, center: torch.Tensor | None, deadline: float,
                  bounds: Sequence[tuple[int, int]],
                  on_screen: Callable[[Screen, list[torch.Tensor]], None] | None = None,
                  owner_result: Callable[[torch.Tensor], torch.Tensor] | None = None) -> list[torch.Tensor]:
    """Aggregate ``flat`` (fp32, this member's contribution) with ``agg``; the result replaces ``flat``.

    Returns the all-gathered norm matrices, in order (what an audit replays)."""
    s, e = bounds[me]
    own = None
    for j, peer in enumerate(members):
        s2, e2 = bounds[j]
        out = codec.encode(flat[s2:e2]) if codec is not None else [flat[s2:e2]]
        if j == me:
            own = out
        else:
            tr._send(peer, (seq, "rrs"), out, rec)
    parts = []
    for j, peer in enumerate(members):
        got = own if j == me else tr._recv(peer, (seq, "rrs"), deadline)
        if codec is not None:
            part = codec.decode(got, e - s).to(torch.float32)
        else:
            part = got[0]
            if part.numel() != e - s or part.dtype != torch.float32:
                raise CommError(f"shard from member {peer} has {part.numel()} values of {part.dtype}, "
                                f"expected {e - s} float32")
        parts.append(part.reshape(-1))
    gen = agg.owner(parts, None if center is None else center[s:e])
    matrices: list[torch.Tensor] = []
    try:
        row = next(gen)
        while True:
            matrices.append(_gather_rows(tr, seq, rec, members, me, row, len(matrices), deadline))
            row = gen.send(matrices[-1])
    except StopIteration as stop:
        result, screen = stop.value
    except ValueError as err:  # every contribution non-finite: nothing to aggregate
        raise CommError(f"robust all-reduce ({agg.describe()}): {err}") from None
    if screen is not None and on_screen is not None:
        on_screen(screen, parts)
    if owner_result is not None:  # simulation: a lying owner
        result = owner_result(result)
    out = codec.encode(result) if codec is not None else [result]
    for j, peer in enumerate(members):
        if j != me:
            tr._send(peer, (seq, "rag"), out, rec)
    flat[s:e].copy_(codec.decode(out, e - s) if codec is not None else result)
    for j, peer in enumerate(members):
        if j != me:
            s2, e2 = bounds[j]
            got = tr._recv(peer, (seq, "rag"), deadline)
            if codec is not None:
                flat[s2:e2].copy_(codec.decode(got, e2 - s2))
            else:
                if got[0].numel() != e2 - s2:
                    raise CommError(f"result shard from member {peer} has the wrong size")
                flat[s2:e2].copy_(got[0])
    return matrices
