"""Chunked top-k sparsification with low-bit values: SparseLoCo's wire format (pure tensor code).

Used by :class:`lowcomm.outer.sparseloco.SparseLoCo` (Sarfi et al. 2025, arXiv 2508.15706). No
transport and no optimizer here: a :class:`TopKCodec` turns a model-wide fp32 vector in *chunk
layout* into a few raw tensors (what goes on the wire) and back.

**Chunks** (as DeMo cuts them, :mod:`lowcomm.dct`, without the DCT): a tensor of 2 or more
dimensions is viewed as ``(R, S) = (shape[0], prod(shape[1:]))`` and cut into ``h x w`` blocks
whose edges are the largest divisors of ``R`` and ``S`` that are ``<= chunk`` (64); one block is
one chunk, flattened row-major (entry ``i*w + j``). A 1-D (or 0-D) tensor of ``n`` entries is cut
into pieces of the largest divisor of ``n`` that is ``<= chunk``. The *chunk layout* of a model is
every tensor's chunks, one row of ``chunk_numel`` entries per chunk, tensors grouped by
``chunk_numel`` (stable order), each group a ``(chunks, chunk_numel)`` matrix;
:meth:`TopKCodec.to_chunks` and :meth:`TopKCodec.chunk_view` convert.

**Selection.** In each chunk the ``k`` entries of largest magnitude are kept (``torch.topk``);
a chunk of ``<= k`` entries is kept whole and then sends no indices at all (its positions are
implied).

**Wire format** (one worker's payload; every part a flat tensor, in this order):

1. ``uint8`` index bits: the in-chunk position of every kept entry of every sparse chunk, in
   ``ceil(log2(chunk_numel))`` bits (12 for a 4096-entry 64x64 block, 6 for a 48-entry block),
   concatenated over the whole model as one bit string (least significant bit first) and padded
   to whole bytes: ``ceil(sum_t chunks_t * k * bits_t / 8)`` bytes.
2. values, either ``fp32`` (``bins=None``: ``4 * nvalues`` bytes), or with ``bins`` levels
   (4: 2 bits): ``uint8`` codes packed ``8 / log2(bins)`` to a byte (``ceil(nvalues * log2(bins) /
   8)`` bytes) and 3. an ``fp32`` table of ``bins`` values per tensor (``4 * bins * tensors``
   bytes), the level a code decodes to.

**Quantisation** (per tensor, over its kept values ``v``; templar's ``quantization_bins`` 4 and
``quantization_range`` 6): ``m = mean(v)``, ``s = std(v)`` (unbiased; 0 for one value), bin width
``d = range * s / bins`` (1.5 s), bins ``[m + (j - bins/2) d, m + (j + 1 - bins/2) d)`` for
``j = 0 .. bins-1``, i.e. the range ``m +- 3 s`` (6 standard deviations wide) cut into 4 equal
bins; values outside it fall into the outer bins. **What is sent for a code is the mean of the
values that fell into its bin** (templar's lookup table), in fp32: each level is the centroid of
its values, so (error bounds, tested) every tensor's sum of kept values is preserved up to
rounding; a value in an inner bin decodes within ``d = 1.5 s`` of itself (both lie in the bin);
a value in an outer bin decodes within that bin's spread (its largest minus its smallest value:
outliers beyond ``m +- 3 s`` land there and pull its level out); and the squared error summed
over a tensor is at most ``(n - 1) s**2``, what sending the one mean ``m`` for every value would
cost. An empty bin's level is 0 (no code refers to it).

Where this differs from templar's ``TopKCompressor`` (``src/tplr/compress.py``): its codes are
``round((v - m) / d) + bins/2`` clamped to ``[0, bins-1]``, which with an even bin count centres
the range asymmetrically (``[m - 2.5d, m + 1.5d)``); lowcomm's bins are symmetric about the mean
(floor). templar sends the mean ``m`` and the table of centred bin means separately; lowcomm sends
the bin means themselves (one fp32 table, no shift). templar packs indices with a variable-rate
row codec (or, in its legacy path, 12 bits) and rounds ``k`` down to an even number; lowcomm
packs every index in the fixed ``ceil(log2(chunk_numel))`` bits and keeps ``k`` as given.

**Decode** checks every field of a payload against this codec's layout (part count, dtypes and
sizes, finite values, every index inside its chunk, no position twice in a chunk) and raises
``ValueError`` naming what is wrong: a malformed payload from a peer fails cleanly instead of
writing out of bounds or making replicas disagree (a repeated position would be added twice,
in an order that is not deterministic on a GPU).

Determinism: encode and decode are pure functions of their inputs (the bin means are plain
reductions, no atomics), so every worker decoding the same bytes gets the same bits.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from .dct import chunk_size

__all__ = ["TopKCodec", "chunk_edges", "pack_bits", "pack_bitvec", "unpack_bits", "unpack_bitvec"]

_BYTE_WEIGHTS = torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.uint8)
BINS = (2, 4, 16)


def chunk_edges(shape: Sequence[int], target: int) -> tuple[int, ...]:
    """Chunk edges of a tensor of ``shape``: ``(h, w)`` for 2 or more dimensions, ``(c,)`` otherwise."""
    shape = tuple(int(s) for s in shape)
    if len(shape) >= 2:
        rows = shape[0]
        cols = math.prod(shape[1:])
        return chunk_size(rows, target), chunk_size(cols, target)
    return (chunk_size(max(1, math.prod(shape)), target),)


def _to_bits(values: torch.Tensor, bits: int) -> torch.Tensor:
    """Non-negative integers (< 2**bits) -> their bits, least significant first, as a uint8 0/1 vector."""
    shifts = torch.arange(bits, device=values.device, dtype=torch.int64)
    return values.to(torch.int64).unsqueeze(1).bitwise_right_shift(shifts).bitwise_and_(1).to(torch.uint8).view(-1)


def pack_bitvec(bitvec: torch.Tensor) -> torch.Tensor:
    """A 0/1 (or bool) vector -> uint8, 8 per byte, least significant bit first, zero-padded."""
    n = bitvec.numel()
    padded = torch.zeros(-(-n // 8) * 8, dtype=torch.uint8, device=bitvec.device)
    padded[:n] = bitvec
    return (padded.view(-1, 8) * _BYTE_WEIGHTS.to(bitvec.device)).sum(1, dtype=torch.uint8)


def unpack_bitvec(packed: torch.Tensor, nbits: int) -> torch.Tensor:
    """The first ``nbits`` bits of ``packed`` (see :func:`pack_bitvec`) as a bool vector."""
    return packed.unsqueeze(1).bitwise_and(_BYTE_WEIGHTS.to(packed.device)).ne(0).view(-1)[:nbits]


def _from_bits(bitvec: torch.Tensor, bits: int) -> torch.Tensor:
    weights = torch.pow(2, torch.arange(bits, device=bitvec.device, dtype=torch.int64))
    return (bitvec.view(-1, bits).to(torch.int64) * weights).sum(1)


def pack_bits(values: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack non-negative integers below ``2**bits`` into ``ceil(n * bits / 8)`` bytes (LSB first)."""
    return pack_bitvec(_to_bits(values, bits))


def unpack_bits(packed: torch.Tensor, n: int, bits: int) -> torch.Tensor:
    """Inverse of :func:`pack_bits`: ``n`` int64 values of ``bits`` bits each."""
    return _from_bits(unpack_bitvec(packed, n * bits), bits)


class _Group:
    """Tensors with one chunk size: a ``(rows, n)`` block of the chunk layout."""

    def __init__(self, n: int, k: int, start: int):
        self.n, self.k, self.start = n, min(k, n), start
        self.rows = 0
        self.dense = self.k >= n  # kept whole: no indices on the wire
        self.bits = 0 if self.dense else max(1, math.ceil(math.log2(n)))

    @property
    def end(self) -> int:
        return self.start + self.rows * self.n


class TopKCodec:
    """Chunked top-k + quantised values for a fixed list of tensor shapes (see the module docstring).

    Args:
        shapes: the tensors' shapes (model order).
        k: entries kept per chunk (chunks of ``<= k`` entries are kept whole).
        chunk: target chunk edge (64).
        bins: quantisation levels (2, 4 or 16: 1, 2 or 4 bits per value) or None for fp32 values.
        quant_range: width of the quantised range in standard deviations of the kept values (6).
        device: where the layout's index tensors live (the tensors' device).
    """

    def __init__(self, shapes: Sequence[Sequence[int]], k: int = 64, chunk: int = 64, bins: int | None = 4,
                 quant_range: float = 6.0, device: torch.device | str = "cpu"):
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"k must be an integer >= 1 (entries kept per chunk), got {k!r}")
        if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1:
            raise ValueError(f"chunk must be an integer >= 1 (target chunk edge), got {chunk!r}")
        if bins is not None and bins not in BINS:
            raise ValueError(f"bins must be one of {BINS} (1, 2 or 4 bits per value) or None for fp32 values, "
                             f"got {bins!r}")
        if not (isinstance(quant_range, (int, float)) and not isinstance(quant_range, bool)
                and math.isfinite(quant_range) and quant_range > 0):
            raise ValueError(f"quant_range must be a positive number of standard deviations, got {quant_range!r}")
        if not shapes:
            raise ValueError("TopKCodec needs at least one tensor shape")
        self.k, self.chunk, self.bins, self.quant_range = k, chunk, bins, float(quant_range)
        self.device = torch.device(device)
        self.shapes = [torch.Size(s) for s in shapes]
        self.edges = [chunk_edges(s, chunk) for s in self.shapes]
        numels = [math.prod(e) for e in self.edges]
        # Group by chunk size (stable): each group is one (rows, n) matrix for one topk call.
        by_n: dict[int, list[int]] = {}
        for i, n in enumerate(numels):
            by_n.setdefault(n, []).append(i)
        self.groups: list[_Group] = []
        self.offsets = [0] * len(self.shapes)  # where tensor i's chunks start in the chunk layout
        self.order: list[int] = []  # tensors in layout order
        off = 0
        for n, members in by_n.items():
            g = _Group(n, k, off)
            for i in members:
                self.offsets[i] = off
                c = max(1, self.shapes[i].numel()) // n
                g.rows += c
                off += c * n
                self.order.append(i)
            self.groups.append(g)
        self.numel = off
        # Per kept value: its tensor (for the quantisation table) and its row's start in the layout.
        tid, row_base, val_start = [], [], [0] * len(self.shapes)
        nval = 0
        for g in self.groups:
            for i in self.order:
                if not g.start <= self.offsets[i] < g.end:
                    continue
                c = max(1, self.shapes[i].numel()) // g.n
                val_start[i] = nval
                tid.append(torch.full((c * g.k,), i, dtype=torch.int64, device=self.device))
                rows = self.offsets[i] + g.n * torch.arange(c, dtype=torch.int64, device=self.device)
                row_base.append(rows.repeat_interleave(g.k))
                nval += c * g.k
        self.nvalues = nval
        self._val_start = val_start
        self._tid = torch.cat(tid)
        self._row_base = torch.cat(row_base)
        self.index_bits = sum(g.rows * g.k * g.bits for g in self.groups)

    # ---- layout ----------------------------------------------------------------------------------
    def _blocked(self, i: int) -> tuple[int, ...]:
        """Tensor i viewed as (R/h, h, S/w, w) (2-D) or (chunks, c) (1-D)."""
        s, e = self.shapes[i], self.edges[i]
        if len(e) == 2:
            rows = s[0]
            cols = max(1, s.numel()) // rows
            return rows // e[0], e[0], cols // e[1], e[1]
        return max(1, s.numel()) // e[0], e[0]

    def chunk_view(self, flat: torch.Tensor, i: int) -> torch.Tensor:
        """Tensor i's chunks in ``flat`` (a chunk-layout vector), as a view in the tensor's own shape
        order (``(R/h, h, S/w, w)`` for 2-D, ``(chunks, c)`` for 1-D), ready to combine with
        ``param.view(codec.blocked_shape(i))``."""
        b = self._blocked(i)
        region = flat[self.offsets[i]:self.offsets[i] + math.prod(b)]
        if len(b) == 4:
            return region.view(b[0], b[2], b[1], b[3]).permute(0, 2, 1, 3)
        return region.view(b)

    def blocked_shape(self, i: int) -> tuple[int, ...]:
        """The shape to ``view`` tensor i as, to match :meth:`chunk_view`."""
        return self._blocked(i)

    @torch.no_grad()
    def to_chunks(self, tensors: Sequence[torch.Tensor], out: torch.Tensor) -> torch.Tensor:
        """Write ``tensors`` (parameter shapes) into ``out`` (chunk layout, fp32) and return it."""
        for i, t in enumerate(tensors):
            self.chunk_view(out, i).copy_(t.reshape(self._blocked(i)))
        return out

    @torch.no_grad()
    def from_chunks(self, flat: torch.Tensor) -> list[torch.Tensor]:
        """New tensors in the parameters' shapes from a chunk-layout vector."""
        return [self.chunk_view(flat, i).reshape(s).clone() for i, s in enumerate(self.shapes)]

    def payload_bytes(self) -> int:
        """Bytes of one payload (the closed form of the wire format in the module docstring)."""
        idx = -(-self.index_bits // 8)
        if self.bins is None:
            return idx + 4 * self.nvalues
        vbits = int(math.log2(self.bins))
        return idx + -(-self.nvalues * vbits // 8) + 4 * self.bins * len(self.shapes)

    # ---- encode ------------------------------------------------------------------------------------
    @torch.no_grad()
    def encode(self, flat: torch.Tensor) -> list[torch.Tensor]:
        """The payload for ``flat`` (chunk layout, fp32, finite): index bits, then values."""
        if flat.numel() != self.numel:
            raise ValueError(f"encode expects {self.numel} entries in chunk layout, got {flat.numel()}")
        idx_bits, vals = [], []
        for g in self.groups:
            block = flat[g.start:g.end].view(g.rows, g.n)
            if g.dense:
                vals.append(block.reshape(-1))
                continue
            idx = torch.topk(block.abs(), g.k, dim=1, largest=True, sorted=False).indices
            vals.append(block.gather(1, idx).reshape(-1))
            idx_bits.append(_to_bits(idx.reshape(-1), g.bits))
        bits = torch.cat(idx_bits) if idx_bits else torch.zeros(0, dtype=torch.uint8, device=flat.device)
        v = torch.cat(vals)
        if not bool(torch.isfinite(v).all()):
            raise ValueError("encode: the vector to send has NaN or Inf entries (a diverged pseudo-gradient?)")
        parts = [pack_bitvec(bits)]
        if self.bins is None:
            return parts + [v.to(torch.float32, copy=True)]
        codes, table = self._quantise(v)
        return parts + [pack_bits(codes, int(math.log2(self.bins))), table]

    def _quantise(self, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-tensor codes in [0, bins) and the fp32 table of bin means (``tensors * bins``)."""
        bins, half = self.bins, self.bins // 2
        codes = torch.empty(v.numel(), dtype=torch.int64, device=v.device)
        table = torch.zeros(len(self.shapes), bins, dtype=torch.float32, device=v.device)
        for i in range(len(self.shapes)):
            a = self._val_start[i]
            b = a + self._count(i)
            x = v[a:b]
            m = x.mean()
            s = x.std() if x.numel() > 1 else torch.zeros((), device=v.device)
            width = self.quant_range * s / bins
            if bool(width > 0):
                c = torch.floor((x - m) / width).to(torch.int64).add_(half).clamp_(0, bins - 1)
            else:  # all kept values equal (or one value): one level, their mean
                c = torch.full_like(x, half, dtype=torch.int64)
            codes[a:b] = c
            for j in range(bins):
                sel = c == j
                cnt = int(sel.sum())
                if cnt:
                    table[i, j] = x[sel].sum() / cnt
        return codes, table.view(-1)

    def _count(self, i: int) -> int:
        n = math.prod(self.edges[i])
        return (max(1, self.shapes[i].numel()) // n) * min(self.k, n)

    # ---- decode ------------------------------------------------------------------------------------
    @torch.no_grad()
    def decode(self, parts: Sequence[torch.Tensor], who: str = "payload") -> tuple[torch.Tensor, torch.Tensor]:
        """(positions in the chunk layout, fp32 values) of a payload; ``ValueError`` if malformed.

        Positions are distinct, so ``acc.scatter_add_(0, positions, values)`` adds once per entry.
        """
        parts = list(parts)
        expect = 2 if self.bins is None else 3
        if len(parts) != expect:
            raise ValueError(f"{who}: {len(parts)} tensors, expected {expect}; every worker must run SparseLoCo "
                             f"with the same model, k, chunk and bins")
        if any(not isinstance(p, torch.Tensor) for p in parts):
            raise ValueError(f"{who}: a part is not a tensor")
        dev = self._tid.device
        parts = [p.to(dev).reshape(-1) for p in parts]
        nidx = -(-self.index_bits // 8)
        self._check(parts[0], torch.uint8, nidx, "index bytes", who)
        pos = self._positions(parts[0], who)
        if self.bins is None:
            self._check(parts[1], torch.float32, self.nvalues, "fp32 values", who)
            vals = parts[1]
        else:
            vbits = int(math.log2(self.bins))
            self._check(parts[1], torch.uint8, -(-self.nvalues * vbits // 8), "value codes", who)
            self._check(parts[2], torch.float32, self.bins * len(self.shapes), "quantisation levels", who)
            codes = unpack_bits(parts[1], self.nvalues, vbits)
            vals = parts[2][self._tid * self.bins + codes]
        if not bool(torch.isfinite(parts[-1]).all()):
            raise ValueError(f"{who}: NaN or Inf among the values")
        return pos, vals.to(torch.float32)

    @staticmethod
    def _check(t: torch.Tensor, dtype: torch.dtype, numel: int, what: str, who: str) -> None:
        if t.dtype != dtype or t.numel() != numel:
            raise ValueError(f"{who}: {what} are {t.numel()} x {t.dtype}, expected {numel} x {dtype}; every worker "
                             f"must run SparseLoCo with the same model, k, chunk and bins")

    def _positions(self, packed: torch.Tensor, who: str) -> torch.Tensor:
        bits = unpack_bitvec(packed, self.index_bits)
        within, start = [], 0
        for g in self.groups:
            if g.dense:
                within.append(torch.arange(g.n, device=packed.device).repeat(g.rows))
                continue
            nb = g.rows * g.k * g.bits
            idx = _from_bits(bits[start:start + nb], g.bits)
            start += nb
            if g.n < 2 ** g.bits and bool((idx >= g.n).any()):
                raise ValueError(f"{who}: an index is outside its {g.n}-entry chunk")
            srt = idx.view(g.rows, g.k).sort(dim=1).values
            if g.k > 1 and bool((srt[:, 1:] == srt[:, :-1]).any()):
                raise ValueError(f"{who}: a position appears twice in one chunk")
            within.append(idx)
        return torch.cat(within) + self._row_base
