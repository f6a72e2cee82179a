"""Orthonormal DCT-II over chunks of a tensor, as batched matrix products.

Used by DeMo (Peng, Quesnelle, Kingma 2024, "DeMo: Decoupled Momentum Optimization",
arXiv 2411.19870), which keeps the top-k DCT coefficients of every chunk of the momentum.

Conventions:

* ``dct_matrix(N)`` is ``F`` with ``x @ F = DCT_II_ortho(x)`` for a row vector ``x``:
  ``F[n, k] = s_k cos(pi (2n + 1) k / (2N))``, ``s_0 = sqrt(1/N)``, ``s_k = sqrt(2/N)``.
  ``F`` is orthogonal, so the inverse (DCT-III, ortho) is ``y @ F.T``.
* Chunk edge of a dimension of length ``n`` for a target ``t``: the largest divisor of
  ``n`` that is ``<= t`` (so chunks tile the tensor exactly; a prime ``n > t`` gives 1).
* A 1-D tensor of length ``n`` is cut into ``n / c`` chunks of ``c`` elements. A 2-D tensor
  ``(R, S)`` is cut into ``(R/h) x (S/w)`` blocks of ``h x w`` and one block is one chunk;
  its 2-D DCT is ``F_h.T @ B @ F_w``. A tensor with more dimensions is viewed as 2-D
  ``(shape[0], prod(shape[1:]))`` (a conv weight ``(out, in, kh, kw)`` becomes
  ``(out, in*kh*kw)``), and a 0-D tensor as 1-D of length 1.
* Coefficients are laid out chunk-major, ``(num_chunks, chunk_numel)``: row ``r`` holds
  chunk ``r`` (row-major over the block grid), flattened row-major inside the chunk (for
  2-D: index ``i*w + j`` is the coefficient of vertical frequency ``i``, horizontal ``j``).

Matrices are built once in float64 and cached per (size, dtype, device); a
:class:`ChunkedDCT` owns its scratch buffers and writes into caller-provided outputs, so
the hot path allocates nothing (fresh memory is the main cost on CPU, DESIGN.md section 9).
"""

from __future__ import annotations

import math

import torch

__all__ = ["ChunkedDCT", "chunk_size", "dct_matrix"]

_MATS: dict[tuple[int, torch.dtype, torch.device], tuple[torch.Tensor, torch.Tensor]] = {}


def chunk_size(n: int, target: int) -> int:
    """The largest divisor of ``n`` that is at most ``target`` (both >= 1)."""
    if n < 1 or target < 1:
        raise ValueError(f"chunk_size needs n >= 1 and target >= 1, got n={n}, target={target}")
    for c in range(min(n, target), 0, -1):
        if n % c == 0:
            return c
    return 1  # unreachable: 1 divides everything


def dct_matrix(n: int, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
               inverse: bool = False) -> torch.Tensor:
    """``F`` (``x @ F`` is the orthonormal DCT-II of rows ``x``), or ``F.T`` when ``inverse``.

    Cached; the returned tensor is shared, do not modify it.
    """
    device = torch.device(device)
    key = (int(n), dtype, device)
    if key not in _MATS:
        i = torch.arange(n, dtype=torch.float64)
        # F[i, k] = s_k cos(pi (2i + 1) k / 2n): column k is the k-th orthonormal cosine basis vector.
        f = torch.cos(math.pi * (2 * i[:, None] + 1) * i[None, :] / (2 * n))
        f[:, 0] *= math.sqrt(1.0 / n)
        f[:, 1:] *= math.sqrt(2.0 / n)
        _MATS[key] = (f.to(dtype=dtype, device=device).contiguous(),
                      f.t().to(dtype=dtype, device=device).contiguous())
    return _MATS[key][1 if inverse else 0]


class ChunkedDCT:
    """Chunked orthonormal DCT-II of tensors of one shape (see the module docstring).

    Args:
        shape: the tensor's shape.
        target: target chunk edge (DeMo: 64).
        dtype, device: of the transforms (and of inputs/outputs).
        scratch: two 1-D buffers of at least ``numel`` elements each that 2-D transforms may
            overwrite (share them between the transforms of a model to save memory); default:
            allocated here.
        edges: explicit chunk edges instead of ``chunk_size(dim, target)`` (each must divide its
            dimension). DeMo uses this to transform several tensors stacked along dimension 0 at
            once with their own chunk edges, so no chunk straddles two tensors.

    Attributes:
        num_chunks, chunk_numel: the coefficient layout ``(num_chunks, chunk_numel)``.
        edges: the chunk edges, ``(c,)`` for 1-D, ``(h, w)`` for 2-D.
    """

    def __init__(self, shape: torch.Size | tuple[int, ...], target: int = 64, dtype: torch.dtype = torch.float32,
                 device: torch.device | str = "cpu", scratch: tuple[torch.Tensor, torch.Tensor] | None = None,
                 edges: tuple[int, ...] | None = None):
        if isinstance(target, bool) or not isinstance(target, int) or target < 1:
            raise ValueError(f"chunk target must be an integer >= 1, got {target!r}")
        self.shape = torch.Size(shape)
        self.numel = self.shape.numel()
        if self.numel == 0:
            raise ValueError(f"cannot chunk an empty tensor of shape {tuple(self.shape)}")
        self.dtype, self.device = dtype, torch.device(device)
        if len(self.shape) >= 2:
            rows = self.shape[0]
            cols = self.numel // rows
            h, w = edges if edges is not None else (chunk_size(rows, target), chunk_size(cols, target))
            if rows % h or cols % w:
                raise ValueError(f"chunk edges {(h, w)} do not divide the 2-D view {(rows, cols)}")
            self.edges: tuple[int, ...] = (h, w)
            self.grid = (rows // h, cols // w)  # (Y, X) blocks
            self.num_chunks, self.chunk_numel = self.grid[0] * self.grid[1], h * w
            self._fh, self._fh_t = dct_matrix(h, dtype, device), dct_matrix(h, dtype, device, inverse=True)
            self._fw, self._fw_t = dct_matrix(w, dtype, device), dct_matrix(w, dtype, device, inverse=True)
            # Two scratch buffers of the tensor's size: the row-transformed tensor and its block-major copy.
            if scratch is None:
                scratch = (torch.empty(self.numel, dtype=dtype, device=device),
                           torch.empty(self.numel, dtype=dtype, device=device))
            if any(s.numel() < self.numel or s.dtype != dtype for s in scratch):
                raise ValueError(f"scratch buffers must hold at least {self.numel} elements of {dtype}")
            self._a, self._b = scratch[0][:self.numel], scratch[1][:self.numel]
        else:
            c = edges[0] if edges is not None else chunk_size(self.numel, target)
            if self.numel % c:
                raise ValueError(f"chunk edge {c} does not divide {self.numel}")
            self.edges = (c,)
            self.num_chunks, self.chunk_numel = self.numel // c, c
            self._f, self._f_t = dct_matrix(c, dtype, device), dct_matrix(c, dtype, device, inverse=True)

    def new_coefficients(self) -> torch.Tensor:
        return torch.empty(self.num_chunks, self.chunk_numel, dtype=self.dtype, device=self.device)

    def encode(self, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """DCT-II of every chunk of ``x`` into ``out`` (``(num_chunks, chunk_numel)``)."""
        if x.shape != self.shape:
            raise ValueError(f"ChunkedDCT built for shape {tuple(self.shape)} got {tuple(x.shape)}")
        out = self.new_coefficients() if out is None else out
        x = x.contiguous()
        if len(self.edges) == 1:
            torch.mm(x.view(self.num_chunks, self.chunk_numel), self._f, out=out)
            return out
        (h, w), (Y, X) = self.edges, self.grid
        # Rows of each block: one large mm over every length-w run (contiguous in memory).
        a = self._a.view(Y * h * X, w)
        torch.mm(x.view(Y * h * X, w), self._fw, out=a)
        # (Y, h, X, w) -> block-major (Y, X, h, w); then the columns of each block: F_h.T @ block.
        b = self._b.view(Y, X, h, w)
        b.copy_(a.view(Y, h, X, w).transpose(1, 2))
        torch.matmul(self._fh_t, b.view(Y * X, h, w), out=out.view(Y * X, h, w))
        return out

    def decode(self, coef: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """Inverse of :meth:`encode`: coefficients ``(num_chunks, chunk_numel)`` to a tensor of ``shape``."""
        if coef.shape != (self.num_chunks, self.chunk_numel):
            raise ValueError(f"expected coefficients of shape {(self.num_chunks, self.chunk_numel)}, "
                             f"got {tuple(coef.shape)}")
        out = torch.empty(self.shape, dtype=self.dtype, device=self.device) if out is None else out
        if not out.is_contiguous():
            raise ValueError("decode needs a contiguous output tensor")
        coef = coef.contiguous()
        if len(self.edges) == 1:
            torch.mm(coef, self._f_t, out=out.view(self.num_chunks, self.chunk_numel))
            return out
        (h, w), (Y, X) = self.edges, self.grid
        b = self._b.view(Y * X, h, w)
        torch.matmul(self._fh, coef.view(Y * X, h, w), out=b)  # F_h @ block
        a = self._a.view(Y, h, X, w)
        a.copy_(b.view(Y, X, h, w).transpose(1, 2))  # block-major back to (Y, h, X, w)
        torch.mm(a.view(Y * h * X, w), self._fw_t, out=out.view(Y * h * X, w))  # ... @ F_w.T
        return out
