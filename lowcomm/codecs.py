"""What goes on the wire: codecs that turn an fp32 vector into a few raw tensors and back.

Pure tensor code: no transport, no optimizer. A codec's ``encode(x)`` takes a 1-D fp32
tensor and returns a list of tensors (codes, scales, ...) whose raw bytes are exactly what
a transport sends and counts; ``decode(parts, numel)`` returns a 1-D fp32 tensor.

Codecs (``get_codec(name)``; a spec such as ``"int4:block=64:scale=bf16"`` sets options):

========  ==========================================  ====================================
name      wire format                                 error bound per element
========  ==========================================  ====================================
identity  fp32                                        0
bf16      bfloat16                                    ``|x| * 2**-8`` (round to nearest)
fp16      float16 (raises beyond +-65504)             ``max(|x| * 2**-11, 2**-25)``
int8      int8 codes in [-127, 127] + 1 scale/block   ``s / 254``
int4      4-bit codes in [-7, 7], 2 a byte + scales   ``s / 14``
e3m0      4-bit sign + 3-bit exponent, 2 a byte       ``|x| / 3`` for ``|x| >= s/64``,
          + scales (Streaming DiLoCo's 4-bit format)  ``s / 128`` below
========  ==========================================  ====================================

``s`` is the block's scale: its absolute maximum, stored in ``scale`` dtype (fp32 by
default) and rounded *up* when the scale dtype is narrower, so ``|x| / s <= 1`` always
holds and nothing is clipped. For fp32 scales ``s`` is the block absmax exactly; fp16/bf16
scales add a relative slack of 2**-10 / 2**-7 and a floor for tiny blocks (their smallest
subnormal: 2**-24 / 2**-133).
Storing the absmax itself (not absmax/127) and dividing before multiplying keeps the
computation free of overflow and underflow from the tiniest subnormal block to 3.4e38.

**E3M0** (Streaming DiLoCo, Douillard et al. 2025, arXiv 2501.18512, sends its outer
gradients as 4-bit floats with 1 sign bit, 3 exponent bits and no mantissa). The paper does
not pin the exact encoding down, so lowcomm defines it as: per block of ``block`` values a
scale ``s`` (the absmax); each value has a sign and a 3-bit exponent ``k`` where ``k = 0``
means 0 and ``k = 1..7`` means ``s * 2**(k - 7)``, i.e. magnitudes ``s/64 ... s/2, s``. The
nibble is the offset code ``7 + sign * k`` (0..14, ordered like the values; 15 is unused),
which carries the same sign + exponent as a sign-magnitude layout and is cheaper to compute
(``sign(r) * k + 7`` with no boolean masks). Rounding is to
the nearest representable value in linear space: between ``2**e`` and ``2**(e+1)`` the
split is at ``1.5 * 2**e``, which bounds the relative error by exactly 1/3 inside the range
``[s/64, s]``; below it values round to 0 or ``s/64`` (absolute error <= ``s/128``). The
exponent is read from the fp32 bit pattern: adding half a mantissa (``0x400000``) to the
bits of ``|x|/s`` carries into the exponent exactly when the mantissa is >= 1.5.

Packing: two 4-bit codes a byte, element ``2i`` in the low nibble and ``2i+1`` in the high
one; an odd count is padded with a zero code. Decoding goes through a 256-entry table
(one byte -> two values), so it is one gather plus one multiply per block.

Determinism: ``decode`` is a pure function of the parts (no state, no randomness), so every
worker that decodes the same bytes gets the same bits; the quantized all-reduce relies on it.

Speed (DESIGN section 9): fresh memory costs more than arithmetic, so each codec keeps a
per-thread scratch buffer (grown to the largest input seen) for its intermediate passes and
works in place. The returned wire parts are fresh (a zero-copy sender may still hold them),
and small (1/2 to 1/8 of the input). ``decode(parts, numel, out=buf)`` writes into a reused
buffer; without ``out`` it allocates.

NaN or Inf in the input raise ``ValueError``: a non-finite pseudo-gradient would poison
every worker's model, and a blockwise scale would hide where it came from.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Sequence
from typing import Any

import torch

from .shards import shard_bounds

__all__ = ["Codec", "IdentityCodec", "BF16Codec", "FP16Codec", "Int8Codec", "Int4Codec", "E3M0Codec",
           "ErrorFeedback", "get_codec", "register_codec", "wire_codec", "CODECS"]

_SCALE_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


class Codec:
    """Base class: subclass, set ``name``, implement ``encode`` / ``decode``."""

    name = "base"

    def encode(self, x: torch.Tensor) -> list[torch.Tensor]:
        raise NotImplementedError

    def decode(self, parts: Sequence[torch.Tensor], numel: int, out: torch.Tensor | None = None) -> torch.Tensor:
        raise NotImplementedError

    @property
    def spec(self) -> str:
        """A string that ``get_codec`` turns back into an equal codec (for wire headers, configs)."""
        return self.name

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.spec!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Codec) and other.spec == self.spec

    def __hash__(self) -> int:
        return hash(self.spec)


def _flat_input(x: torch.Tensor, name: str) -> torch.Tensor:
    if not isinstance(x, torch.Tensor) or not torch.is_floating_point(x):
        raise ValueError(f"codec {name}: encode takes a floating-point tensor, got "
                         f"{type(x).__name__ if not isinstance(x, torch.Tensor) else x.dtype}")
    return x.detach().reshape(-1)


def _raise_nonfinite(x: torch.Tensor, name: str) -> None:
    bad = (~torch.isfinite(x)).nonzero()
    i = int(bad[0]) if bad.numel() else -1
    v = float(x[i]) if i >= 0 else float("nan")
    raise ValueError(f"codec {name}: input has {bad.numel()} non-finite value(s) (first: {v} at index {i}); "
                     f"a pseudo-gradient must be finite - lower the learning rate or check the loss for NaN")


def _out_buffer(out: torch.Tensor | None, numel: int, name: str, device: torch.device) -> torch.Tensor:
    if out is None:
        return torch.empty(numel, dtype=torch.float32, device=device)
    if out.dtype != torch.float32 or out.numel() != numel or not out.is_contiguous():
        raise ValueError(f"codec {name}: out must be a contiguous fp32 tensor of {numel} elements, "
                         f"got {out.dtype} with {out.numel()}")
    return out.view(-1)


class _Scratch(threading.local):
    """Per-thread reusable buffers (a transport may encode on its own thread meanwhile)."""

    def __init__(self) -> None:
        self.bufs: dict[tuple[str, torch.device], torch.Tensor] = {}

    def get(self, key: str, numel: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """A buffer of ``numel`` ``dtype`` values on ``device`` (the data's device), reused per thread."""
        buf = self.bufs.get((key, device))
        if buf is None or buf.numel() < numel:
            buf = torch.empty(max(numel, 1), dtype=dtype, device=device)
            self.bufs[(key, device)] = buf
        return buf[:numel]


class IdentityCodec(Codec):
    """fp32 as is (transports treat it as no codec at all)."""

    name = "identity"

    def encode(self, x: torch.Tensor) -> list[torch.Tensor]:
        return [x.detach().to(torch.float32).reshape(-1)]

    def decode(self, parts: Sequence[torch.Tensor], numel: int, out: torch.Tensor | None = None) -> torch.Tensor:
        (x,) = parts
        if x.numel() != numel:
            raise ValueError(f"identity codec: payload has {x.numel()} values, expected {numel}")
        if out is None:
            return x.to(torch.float32)
        return _out_buffer(out, numel, self.name, x.device).copy_(x.reshape(-1))


class _CastCodec(Codec):
    """Round to a narrower float type (round to nearest even)."""

    dtype = torch.bfloat16

    def encode(self, x: torch.Tensor) -> list[torch.Tensor]:
        flat = _flat_input(x, self.name)
        y = flat.to(self.dtype)  # fresh: it is the wire payload
        if y.numel():
            lo, hi = torch.aminmax(y)
            if not (math.isfinite(float(lo)) and math.isfinite(float(hi))):
                if not bool(torch.isfinite(flat).all()):
                    _raise_nonfinite(flat, self.name)
                raise ValueError(f"codec {self.name}: a value is beyond the {self.dtype} range "
                                 f"(max {torch.finfo(self.dtype).max:g}); use 'bf16' or a blockwise codec "
                                 f"('int8', 'int4', 'e3m0')")
        return [y]

    def decode(self, parts: Sequence[torch.Tensor], numel: int, out: torch.Tensor | None = None) -> torch.Tensor:
        if len(parts) != 1 or parts[0].dtype != self.dtype or parts[0].numel() != numel:
            raise ValueError(f"codec {self.name}: expected one {self.dtype} tensor of {numel} values")
        return _out_buffer(out, numel, self.name, parts[0].device).copy_(parts[0].reshape(-1))


class BF16Codec(_CastCodec):
    """bfloat16: fp32's range, 8 significant bits (relative error <= 2**-8)."""

    name = "bf16"
    dtype = torch.bfloat16


class FP16Codec(_CastCodec):
    """float16: 11 significant bits, range +-65504 (beyond it encode raises)."""

    name = "fp16"
    dtype = torch.float16


class _BlockCodec(Codec):
    """Shared machinery of the blockwise codecs: padding, absmax scales, NaN checks."""

    default_block = 128
    levels = 127  # codes run over [-levels, levels] (int codecs)

    def __init__(self, block: int | None = None, scale: str = "fp32"):
        block = self.default_block if block is None else block
        if isinstance(block, bool) or not isinstance(block, int) or block < 2 or block % 2:
            raise ValueError(f"codec {self.name}: block must be an even integer >= 2, got {block!r}")
        if scale not in _SCALE_DTYPES:
            raise ValueError(f"codec {self.name}: scale must be one of {sorted(_SCALE_DTYPES)}, got {scale!r}")
        self.block = block
        self.scale = scale
        self.scale_dtype = _SCALE_DTYPES[scale]
        self._scratch = _Scratch()

    @property
    def spec(self) -> str:
        return f"{self.name}:block={self.block}:scale={self.scale}"

    def _nblocks(self, numel: int) -> int:
        return -(-numel // self.block)

    def _prepare(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Padded fp32 copy of x as (nblocks, block), wire scales, fp32 scales, safe divisors."""
        flat = _flat_input(x, self.name)
        n = flat.numel()
        nb = self._nblocks(n)
        f = self._scratch.get("f", nb * self.block, torch.float32, flat.device)
        f[:n].copy_(flat)
        f[n:].zero_()
        fb = f.view(nb, self.block)
        # |x| into a second scratch, then a per-block amax (a contiguous inner-dim reduction is
        # vectorized; aminmax / abs().amax() over fresh memory are 3-6x slower here).
        g = self._scratch.get("g", nb * self.block, torch.float32, flat.device)
        torch.abs(f, out=g)
        absmax = g.view(nb, self.block).amax(1)  # NaN propagates, so one small check covers the input
        if not bool(torch.isfinite(absmax).all()):
            _raise_nonfinite(flat, self.name)
        if self.scale_dtype is torch.float32:
            s_wire = absmax
        else:
            s_wire = absmax.to(self.scale_dtype)
            # Round the scale up (next representable value: +1 on the bit pattern of a positive
            # float), so |x| / s <= 1 and no code is ever clipped.
            bump = s_wire.to(torch.float32) < absmax
            s_wire.view(torch.int16).add_(bump.to(torch.int16))
            if not bool(torch.isfinite(s_wire).all()):
                alt = "'fp32' or 'bf16'" if self.scale == "fp16" else "'fp32'"
                raise ValueError(f"codec {self.name}: a block's absmax ({float(absmax.max()):g}) is beyond the "
                                 f"{self.scale} scale range; use scale={alt}")
        s = s_wire.to(torch.float32)
        div = torch.where(s > 0, s, torch.ones_like(s))  # an all-zero block stays zero
        return fb, s_wire, s, div

    def _check_parts(self, parts: Sequence[torch.Tensor], numel: int, ncodes: int, code_dtype: torch.dtype) -> None:
        nb = self._nblocks(numel)
        if (len(parts) != 2 or parts[0].dtype != code_dtype or parts[0].numel() != ncodes
                or parts[1].dtype != self.scale_dtype or parts[1].numel() != nb):
            got = [(tuple(p.shape), p.dtype) for p in parts]
            raise ValueError(f"codec {self.spec}: for {numel} values expected [{ncodes} {code_dtype} codes, "
                             f"{nb} {self.scale_dtype} scales], got {got}")

    def _scale_blocks(self, out: torch.Tensor, numel: int, factor: torch.Tensor) -> None:
        """out[i] *= factor[i // block], without padding out."""
        full = numel // self.block
        m = full * self.block
        if full:
            out[:m].view(full, self.block).mul_(factor[:full, None])
        if m < numel:
            out[m:numel].mul_(factor[full])

    def _decode_pairs(self, packed: torch.Tensor, numel: int, out: torch.Tensor, table: torch.Tensor) -> None:
        """Two values per byte through a (256, 2) table into out[:numel]."""
        m = packed.numel()
        idx = self._scratch.get("idx", m, torch.int32, out.device)
        idx.copy_(packed)
        table = table.to(out.device)  # a no-op on the CPU, where the tables live
        if numel == 2 * m:
            torch.index_select(table, 0, idx, out=out.view(m, 2))
        else:
            tmp = self._scratch.get("pairs", 2 * m, torch.float32, out.device)
            torch.index_select(table, 0, idx, out=tmp.view(m, 2))
            out.copy_(tmp[:numel])

    @staticmethod
    def _pack_pairs(codes: torch.Tensor, numel: int) -> torch.Tensor:
        """codes (even length, values 0..15, fp32 or int32) -> uint8 bytes, low nibble first."""
        pairs = codes.view(-1, 2)
        lo = pairs[:, 0]
        lo.add_(pairs[:, 1], alpha=16)
        m = (numel + 1) // 2
        packed = torch.empty(m, dtype=torch.uint8, device=codes.device)
        packed.copy_(lo[:m])
        return packed


class Int8Codec(_BlockCodec):
    """Blockwise absmax int8: q = round(127 x / s), x ~ q s / 127; error <= s/254."""

    name = "int8"
    default_block = 256

    def encode(self, x: torch.Tensor) -> list[torch.Tensor]:
        n = x.numel()
        fb, s_wire, _, div = self._prepare(x)
        # divide first (|x/s| <= 1, no overflow even for subnormal s), then scale to the code range
        fb.div_(div[:, None]).mul_(127.0).round_()
        codes = torch.empty(n, dtype=torch.int8, device=fb.device)
        codes.copy_(fb.view(-1)[:n])
        return [codes, s_wire]

    def decode(self, parts: Sequence[torch.Tensor], numel: int, out: torch.Tensor | None = None) -> torch.Tensor:
        self._check_parts(parts, numel, numel, torch.int8)
        out = _out_buffer(out, numel, self.name, parts[0].device)
        out.copy_(parts[0])
        self._scale_blocks(out, numel, parts[1].to(torch.float32) / 127.0)
        return out


def _int4_table() -> torch.Tensor:
    b = torch.arange(256)
    return torch.stack([(b & 15) - 8, (b >> 4) - 8], dim=1).to(torch.float32)


def _e3m0_table() -> torch.Tensor:
    def value(c: torch.Tensor) -> torch.Tensor:
        k = (c - 7).abs()
        mag = torch.where((k > 0) & (c < 15), torch.pow(2.0, (k - 7).to(torch.float32)), torch.zeros(()))
        return torch.where(c < 7, -mag, mag)  # code 15 is never produced; it decodes to 0

    b = torch.arange(256)
    return torch.stack([value(b & 15), value(b >> 4)], dim=1).to(torch.float32)


class Int4Codec(_BlockCodec):
    """Blockwise absmax 4-bit integers: q = round(7 x / s) in [-7, 7], stored as q + 8; error <= s/14."""

    name = "int4"
    _table = _int4_table()

    def encode(self, x: torch.Tensor) -> list[torch.Tensor]:
        n = x.numel()
        fb, s_wire, _, div = self._prepare(x)
        fb.div_(div[:, None]).mul_(7.0).round_().add_(8.0)  # codes 1..15 (padding: 0 -> 8)
        return [self._pack_pairs(fb.view(-1), n), s_wire]

    def decode(self, parts: Sequence[torch.Tensor], numel: int, out: torch.Tensor | None = None) -> torch.Tensor:
        self._check_parts(parts, numel, (numel + 1) // 2, torch.uint8)
        out = _out_buffer(out, numel, self.name, parts[0].device)
        self._decode_pairs(parts[0], numel, out, self._table)
        self._scale_blocks(out, numel, parts[1].to(torch.float32) / 7.0)
        return out


class E3M0Codec(_BlockCodec):
    """Streaming DiLoCo's 4-bit float: sign + 3-bit exponent, no mantissa, per-block scale (module docstring)."""

    name = "e3m0"
    _table = _e3m0_table()

    def encode(self, x: torch.Tensor) -> list[torch.Tensor]:
        n = x.numel()
        fb, s_wire, _, div = self._prepare(x)
        f = fb.view(-1)
        fb.div_(div[:, None])  # r = x / s in [-1, 1]
        g = self._scratch.get("g", f.numel(), torch.float32, f.device)
        torch.abs(f, out=g)
        bits = g.view(torch.int32)  # |r| >= 0, so its int32 view orders like the float
        # 1 where |r| >= 2**-7 (nearer s/64 than 0): an arithmetic shift of (bits - bits(2**-7)) is -1 or 0
        low = self._scratch.get("low", f.numel(), torch.int32, f.device)
        torch.sub(bits, 0x3C000000, out=low).bitwise_right_shift_(31).add_(1)
        # biased exponent of |r| rounded to the nearest power of two (the carry happens exactly when
        # the mantissa is >= 1.5); 2**0 has biased exponent 127 -> k = 7, 2**-6 -> k = 1
        bits.add_(0x400000).bitwise_right_shift_(23).sub_(120).clamp_(0, 7)
        torch.maximum(bits, low, out=bits)
        k = self._scratch.get("k", f.numel(), torch.float32, f.device)
        k.copy_(bits)  # an explicit cast: a mixed int/float mul_ converts through a slow path
        f.sign_().mul_(k).add_(7.0)  # code = 7 + sign(r) * k, in 0..14
        return [self._pack_pairs(f, n), s_wire]

    def decode(self, parts: Sequence[torch.Tensor], numel: int, out: torch.Tensor | None = None) -> torch.Tensor:
        self._check_parts(parts, numel, (numel + 1) // 2, torch.uint8)
        out = _out_buffer(out, numel, self.name, parts[0].device)
        self._decode_pairs(parts[0], numel, out, self._table)
        self._scale_blocks(out, numel, parts[1].to(torch.float32))
        return out


class ErrorFeedback:
    """Keeps what the codec dropped and adds it to the next input (error feedback / EF-SGD).

    Usage around one collective: ``y = ef.compensate_(x)`` (x += carried error, in place), then
    ``ef.residual(y, shards)`` computes ``y - decode(encode(y))`` with the same shard layout the
    quantized all-reduce uses (each of ``shards`` contiguous pieces is encoded on its own, see
    :func:`lowcomm.shards.shard_bounds`), into a pending buffer; ``ef.commit()`` makes it the
    carried error once the sync succeeded (a failed sync keeps the old error).
    The carried error stays within one step's codec bound, so it cannot drift.
    """

    def __init__(self, codec: Codec | str | None, numel: int, device: torch.device | str | None = None):
        self.codec = get_codec(codec)
        self.numel = int(numel)
        self.device = torch.device("cpu" if device is None else device)  # the parameters' device
        self.error = torch.zeros(self.numel, device=self.device)
        self._pending: torch.Tensor | None = None
        self._decoded = torch.empty(0, device=self.device)

    def compensate_(self, x: torch.Tensor) -> torch.Tensor:
        if x.numel() != self.numel or x.dtype != torch.float32:
            raise ValueError(f"error feedback holds {self.numel} fp32 values, got {x.numel()} {x.dtype}")
        return x.add_(self.error)

    @torch.no_grad()
    def residual(self, y: torch.Tensor, shards: int = 1, out: torch.Tensor | None = None) -> torch.Tensor:
        y = y.reshape(-1)
        if y.numel() != self.numel:
            raise ValueError(f"error feedback holds {self.numel} values, got {y.numel()}")
        if self._decoded.numel() < self.numel:
            self._decoded = torch.empty(self.numel, device=self.device)
        dec = self._decoded[:self.numel]
        for s, e in shard_bounds(self.numel, max(1, int(shards))):
            self.codec.decode(self.codec.encode(y[s:e]), e - s, out=dec[s:e])
        pending = out if out is not None else torch.empty(self.numel, device=self.device)
        torch.sub(y, dec, out=pending)
        self._pending = pending
        return pending

    def commit(self) -> None:
        """The sync succeeded: the pending residual becomes the carried error."""
        if self._pending is not None:
            self.error.copy_(self._pending)
            self._pending = None

    def discard(self) -> None:
        """The sync failed: keep the old carried error."""
        self._pending = None

    def set_pending(self, pending: torch.Tensor) -> None:
        """Make ``pending`` (a residual saved with a sync in flight, e.g. from a checkpoint) the pending one."""
        if pending.numel() != self.numel:
            raise ValueError(f"error feedback holds {self.numel} values, got a pending residual of {pending.numel()}")
        self._pending = pending.reshape(-1)

    def state_dict(self) -> dict[str, Any]:
        return {"error": self.error}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        e = sd["error"]
        if e.numel() != self.numel:
            raise ValueError(f"error feedback state has {e.numel()} values, expected {self.numel}")
        self.error.copy_(e.reshape(-1))
        self._pending = None


CODECS: dict[str, Callable[..., Codec]] = {
    "identity": IdentityCodec, "none": IdentityCodec, "fp32": IdentityCodec,
    "bf16": BF16Codec, "fp16": FP16Codec,
    "int8": Int8Codec, "int4": Int4Codec, "e3m0": E3M0Codec,
}


def wire_codec(codec: str | Codec | None) -> Codec | None:
    """The codec to put on the wire, or None for "no codec" (full precision, the exact path).

    ``None``, ``"identity"``, ``"none"`` and ``"fp32"`` all mean no codec; strategies and
    transports normalise their ``codec=`` argument through this one function.
    """
    c = get_codec(codec)
    return None if c.name == "identity" else c


def register_codec(name: str, factory: Callable[..., Codec]) -> None:
    """Make ``factory`` available as ``get_codec(name)`` (options in a spec become keyword arguments)."""
    CODECS[name] = factory


def _parse_spec(spec: str) -> tuple[str, dict[str, Any]]:
    name, *opts = spec.split(":")
    kwargs: dict[str, Any] = {}
    for o in opts:
        k, sep, v = o.partition("=")
        if not sep or not k:
            raise ValueError(f"codec spec {spec!r}: options are key=value, e.g. 'int4:block=64:scale=bf16'")
        kwargs[k] = int(v) if v.isdigit() else v
    return name, kwargs


def get_codec(codec: str | Codec | None) -> Codec:
    """A codec instance from a name or spec (``"int4:block=64:scale=bf16"``), an instance, or None (identity)."""
    if codec is None:
        return IdentityCodec()
    if isinstance(codec, Codec):
        return codec
    if isinstance(codec, str):
        name, kwargs = _parse_spec(codec)
        if name in CODECS:
            try:
                return CODECS[name](**kwargs)
            except TypeError as e:
                raise ValueError(f"codec spec {codec!r}: {e}") from None
    raise ValueError(f"unknown codec {codec!r}; choose one of {sorted(CODECS)} (options like "
                     f"'int4:block=64:scale=bf16') or pass a lowcomm.codecs.Codec")
