"""How a flat vector is cut into contiguous shards (one rule for transports, codecs and data).

Pure arithmetic with no imports from the rest of lowcomm, so :mod:`lowcomm.codecs`,
:mod:`lowcomm.data` and :mod:`lowcomm.comm` can all use it without import cycles.
"""

from __future__ import annotations

__all__ = ["shard_bounds"]


def shard_bounds(n: int, w: int) -> list[tuple[int, int]]:
    """Contiguous [start, end) bounds of ``w`` shards of ``n`` elements (first n % w longer)."""
    base, extra = divmod(n, w)
    out, start = [], 0
    for j in range(w):
        size = base + (1 if j < extra else 0)
        out.append((start, start + size))
        start += size
    return out
