"""Snapshots of a training run for joining peers, serialised without pickle.

A snapshot is a nested structure (the model's ``state_dict()`` and the outer optimizer's
``state_dict()``: dicts with int or str keys, lists, tuples, numbers, strings, None and
tensors). :func:`flatten_state` turns it into msgpack *metadata*, in which every tensor is
replaced by ``{"__t": index}``, plus the list of tensors, which travel as raw frames (see
:mod:`lowcomm.comm.zmq.wire`). Anything else (a torch.dtype, an arbitrary object) is refused
with a ValueError rather than pickled. :func:`unflatten_state` reverses it, checking the
metadata's shape as strictly as the wire decoder does.
"""

from __future__ import annotations

import hashlib
from typing import Any

import msgpack
import torch

from .wire import MAX_CONTROL_BYTES, WireError, dtype_name, unpack

__all__ = ["flatten_state", "global_state_hash", "snapshot_hash", "unflatten_state"]

_MAX_DEPTH = 32


def flatten_state(obj: Any) -> tuple[bytes, list[torch.Tensor]]:
    """``(metadata bytes, tensors)`` for a nested state; tensors are referenced, not copied."""
    tensors: list[torch.Tensor] = []

    def walk(x: Any, depth: int) -> Any:
        if depth > _MAX_DEPTH:
            raise ValueError("state is nested too deeply to serialise")
        if isinstance(x, torch.Tensor):
            tensors.append(x.detach())
            return {"__t": len(tensors) - 1}
        if isinstance(x, dict):
            items = []
            for k, v in x.items():
                if type(k) not in (int, str):
                    raise ValueError(f"state dict key {k!r} must be int or str to be serialised without pickle")
                items.append([k, walk(v, depth + 1)])
            return {"__d": items}
        if isinstance(x, tuple):
            return {"__tu": [walk(v, depth + 1) for v in x]}
        if isinstance(x, list):
            return [walk(v, depth + 1) for v in x]
        if x is None or type(x) in (bool, int, float, str):
            return x
        raise ValueError(f"cannot serialise a {type(x).__name__} in a snapshot (only tensors, numbers, strings, "
                         f"None, lists, tuples and dicts; lowcomm never pickles)")

    meta = msgpack.packb(walk(obj, 0), use_bin_type=True)
    return meta, tensors


def unflatten_state(meta: bytes, tensors: list[torch.Tensor]) -> Any:
    """Rebuild what :func:`flatten_state` flattened; raises WireError on malformed metadata."""
    used = set()

    def walk(x: Any, depth: int) -> Any:
        if depth > _MAX_DEPTH:
            raise WireError("snapshot metadata nested too deeply")
        if isinstance(x, dict):
            if set(x) == {"__t"}:
                i = x["__t"]
                if type(i) is not int or not 0 <= i < len(tensors) or i in used:
                    raise WireError(f"snapshot metadata refers to tensor {i!r} that does not exist")
                used.add(i)
                return tensors[i]
            if set(x) == {"__d"} and isinstance(x["__d"], list):
                out = {}
                for kv in x["__d"]:
                    if not (isinstance(kv, list) and len(kv) == 2 and type(kv[0]) in (int, str)):
                        raise WireError("snapshot metadata has a malformed dict entry")
                    out[kv[0]] = walk(kv[1], depth + 1)
                return out
            if set(x) == {"__tu"} and isinstance(x["__tu"], list):
                return tuple(walk(v, depth + 1) for v in x["__tu"])
            raise WireError("snapshot metadata has an unknown map")
        if isinstance(x, list):
            return [walk(v, depth + 1) for v in x]
        if x is None or type(x) in (bool, int, float, str):
            return x
        raise WireError(f"snapshot metadata holds a {type(x).__name__}")

    out = walk(unpack(meta, MAX_CONTROL_BYTES), 0)
    if len(used) != len(tensors):
        raise WireError(f"snapshot has {len(tensors)} tensors but its metadata uses {len(used)}")
    return out


def _update_tensor(h: Any, t: torch.Tensor) -> None:
    t = t.detach().contiguous()
    h.update(f"{dtype_name(t.dtype)}{tuple(t.shape)}".encode())
    if t.numel():
        h.update(t.reshape(-1).view(torch.uint8).numpy().data)


def snapshot_hash(meta: bytes, tensors: list[torch.Tensor]) -> str:
    """blake2b over the metadata and every tensor's dtype, shape and bytes (what the donor vouches for)."""
    h = hashlib.blake2b(digest_size=32)
    h.update(meta)
    for t in tensors:
        _update_tensor(h, t)
    return h.hexdigest()


def global_state_hash(opt: Any) -> str | None:
    """Hash of what every member of a DiLoCo-style run holds identically after a committed sync:
    the global (anchor) parameters and outer optimizer state of every sync unit, and the count of
    committed syncs. None for optimizers without sync units."""
    units = getattr(opt, "units", None)
    if not units:
        return None
    state = {"sync_count": int(opt.sync_count), "units": [u.state_dict() for u in units]}
    meta, tensors = flatten_state(state)
    return snapshot_hash(meta, tensors)
