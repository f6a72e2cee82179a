"""What goes on the wire: codecs that turn an fp32 vector into a few raw tensors and back.

Pure tensor code: no transport, no optimizer. A codec's ``encode(x)`` takes a 1-D fp32
tensor and returns a list of tensors (codes, scales, ...) whose raw bytes are exactly what
a transport sends and counts; ``decode(parts, numel)`` returns a 1-D fp32 tensor.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

__all__ = ["Codec", "IdentityCodec", "get_codec", "register_codec", "CODECS"]


class Codec:
    """Base class: subclass, set ``name``, implement ``encode`` / ``decode``."""

    name = "base"

    def encode(self, x: torch.Tensor) -> list[torch.Tensor]:
        raise NotImplementedError

    def decode(self, parts: Sequence[torch.Tensor], numel: int) -> torch.Tensor:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class IdentityCodec(Codec):
    """fp32 as is (transports treat it as no codec at all)."""

    name = "identity"

    def encode(self, x: torch.Tensor) -> list[torch.Tensor]:
        return [x.detach().to(torch.float32).reshape(-1)]

    def decode(self, parts: Sequence[torch.Tensor], numel: int) -> torch.Tensor:
        (x,) = parts
        if x.numel() != numel:
            raise ValueError(f"identity codec: payload has {x.numel()} values, expected {numel}")
        return x.to(torch.float32)


CODECS: dict[str, Callable[[], Codec]] = {"identity": IdentityCodec, "none": IdentityCodec}


def register_codec(name: str, factory: Callable[[], Codec]) -> None:
    """Make ``factory`` available as ``get_codec(name)``."""
    CODECS[name] = factory


def get_codec(codec: str | Codec | None) -> Codec:
    """A codec instance from a name, an instance, or None (identity)."""
    if codec is None:
        return IdentityCodec()
    if isinstance(codec, Codec):
        return codec
    if isinstance(codec, str) and codec in CODECS:
        return CODECS[codec]()
    raise ValueError(f"unknown codec {codec!r}; choose one of {sorted(CODECS)} or pass a lowcomm.codecs.Codec")
