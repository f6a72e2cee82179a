"""Training checkpoints: safetensors for tensors, JSON for everything else, never pickle.

A checkpoint is a directory holding two files:

- ``tensors.safetensors``: every tensor of the state, each under a key that spells its path in
  the nested state (``optimizer/inner/state/3/exp_avg``), dtype kept exactly (bf16 included);
- ``state.json``: the structure of the state, with each tensor replaced by a reference to its
  key, and every other value (ints, floats, strings, bools, None, lists, tuples, dicts with
  string *or integer* keys, as torch optimizer state dicts have) encoded so that it is rebuilt
  with the same types. Floats are written by Python's ``repr``, which round-trips exactly
  (NaN and infinities too).

Writes are atomic: the files go into a temporary directory beside the target, are flushed to
disk, and the directory is renamed into place, so a crash leaves either the old checkpoint or the
new one, never half of one. Nothing here executes code from the file on load (no pickle), so a
checkpoint from an untrusted source can at worst fail to load.

:func:`rng_state` / :func:`set_rng_state` capture the torch (CPU and CUDA), numpy and Python
``random`` generators as JSON-able values, so a resumed run draws the same numbers.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

__all__ = ["latest_checkpoint", "load_checkpoint", "rng_state", "save_checkpoint", "set_rng_state"]

TENSORS = "tensors.safetensors"
STATE = "state.json"
FORMAT = "lowcomm-checkpoint-1"


# ---- encoding the structure ------------------------------------------------------------------
class _Flattener:
    def __init__(self) -> None:
        self.tensors: dict[str, torch.Tensor] = {}
        self._storages: set[tuple[int, int]] = set()

    def key(self, path: list[str]) -> str:
        base = "/".join(path) or "root"
        k, n = base, 1
        while k in self.tensors:  # keys only need to be unique; the JSON side holds the reference
            k, n = f"{base}#{n}", n + 1
        return k

    def tensor(self, t: torch.Tensor, path: list[str]) -> dict[str, Any]:
        t = t.detach()
        if t.device.type != "cpu":
            t = t.cpu()
        if not t.is_contiguous():
            t = t.contiguous()
        # safetensors refuses tensors sharing memory (it cannot express aliasing); a state dict
        # may hold the same tensor twice, so later sharers are copied. Loading gives separate tensors.
        if t.numel() > 0:
            sid = (t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
            if sid in self._storages:
                t = t.clone()
            else:
                self._storages.add(sid)
        k = self.key(path)
        self.tensors[k] = t
        return {"__tensor__": k}

    def encode(self, obj: Any, path: list[str]) -> Any:
        if isinstance(obj, torch.Tensor):
            return self.tensor(obj, path)
        if obj is None or isinstance(obj, (bool, str)):
            return obj
        if isinstance(obj, int):
            return int(obj)
        if isinstance(obj, float):
            return obj if np.isfinite(obj) else {"__float__": repr(obj)}
        if isinstance(obj, np.ndarray):
            return {"__ndarray__": obj.tolist(), "dtype": str(obj.dtype), "shape": list(obj.shape)}
        if isinstance(obj, np.generic):
            return self.encode(obj.item(), path)
        if isinstance(obj, torch.dtype):
            return {"__dtype__": str(obj).removeprefix("torch.")}
        if isinstance(obj, tuple):
            return {"__tuple__": [self.encode(v, [*path, str(i)]) for i, v in enumerate(obj)]}
        if isinstance(obj, list):
            return [self.encode(v, [*path, str(i)]) for i, v in enumerate(obj)]
        if isinstance(obj, dict):
            if all(isinstance(k, str) for k in obj) and not any(k.startswith("__") for k in obj):
                return {k: self.encode(v, [*path, k]) for k, v in obj.items()}
            # Integer (or mixed) keys, as in torch optimizer state: keep each key's type.
            items = []
            for k, v in obj.items():
                if isinstance(k, bool) or not isinstance(k, (str, int)):
                    raise ValueError(f"checkpoint dict keys must be str or int; {'/'.join(path)} has key {k!r}")
                items.append([k, self.encode(v, [*path, str(k)])])
            return {"__items__": items}
        raise ValueError(f"cannot checkpoint a {type(obj).__name__} at {'/'.join(path) or 'the root'}; "
                         f"use tensors, numbers, strings, None, lists, tuples and dicts")


def _decode(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, list):
        return [_decode(v, tensors) for v in obj]
    if not isinstance(obj, dict):
        return obj
    if "__tensor__" in obj:
        return tensors[obj["__tensor__"]]
    if "__float__" in obj:
        return float(obj["__float__"])
    if "__ndarray__" in obj:
        return np.array(obj["__ndarray__"], dtype=np.dtype(obj["dtype"])).reshape(obj["shape"])
    if "__dtype__" in obj:
        return getattr(torch, obj["__dtype__"])
    if "__tuple__" in obj:
        return tuple(_decode(v, tensors) for v in obj["__tuple__"])
    if "__items__" in obj:
        return {k: _decode(v, tensors) for k, v in obj["__items__"]}
    return {k: _decode(v, tensors) for k, v in obj.items()}


# ---- files -------------------------------------------------------------------------------------
def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def save_checkpoint(path: str | os.PathLike, state: dict[str, Any]) -> str:
    """Write ``state`` (a nested dict of tensors and plain values) to the directory ``path``, atomically.

    An existing checkpoint at ``path`` is replaced. Returns the path.
    """
    if not isinstance(state, dict):
        raise ValueError(f"state must be a dict, got {type(state).__name__}")
    path = os.path.abspath(os.fspath(path))
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    flat = _Flattener()
    structure = {"format": FORMAT, "state": flat.encode(state, [])}
    tmp = tempfile.mkdtemp(prefix=".tmp-" + os.path.basename(path) + "-", dir=parent)
    try:
        save_file(flat.tensors, os.path.join(tmp, TENSORS), metadata={"format": FORMAT})
        with open(os.path.join(tmp, STATE), "w") as f:
            json.dump(structure, f, allow_nan=False)
            f.flush()
            os.fsync(f.fileno())
        with open(os.path.join(tmp, TENSORS), "rb") as f:
            os.fsync(f.fileno())
        _fsync_dir(tmp)
        if os.path.exists(path):
            # rename() cannot replace a non-empty directory: move the old one aside first, so the
            # window without a checkpoint at ``path`` is two renames long and never half-written.
            old = tempfile.mkdtemp(prefix=".old-" + os.path.basename(path) + "-", dir=parent)
            os.rename(path, os.path.join(old, "ckpt"))
            os.rename(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, path)
        _fsync_dir(parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def load_checkpoint(path: str | os.PathLike, device: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint written by :func:`save_checkpoint`; tensors are placed on ``device``."""
    path = os.fspath(path)
    sf, js = os.path.join(path, TENSORS), os.path.join(path, STATE)
    if not (os.path.isfile(sf) and os.path.isfile(js)):
        raise ValueError(f"{path} is not a lowcomm checkpoint (expected {TENSORS} and {STATE} in it)")
    with open(js) as f:
        structure = json.load(f)
    if structure.get("format") != FORMAT:
        raise ValueError(f"{js} has format {structure.get('format')!r}, expected {FORMAT!r}")
    tensors = load_file(sf, device=str(device))
    return _decode(structure["state"], tensors)


def latest_checkpoint(directory: str | os.PathLike, prefix: str = "step_") -> str | None:
    """The checkpoint under ``directory`` named ``<prefix><number>`` with the highest number, or None."""
    directory = os.fspath(directory)
    if not os.path.isdir(directory):
        return None
    best, best_n = None, -1
    for name in os.listdir(directory):
        if name.startswith(prefix) and name[len(prefix):].isdigit():
            full = os.path.join(directory, name)
            if os.path.isfile(os.path.join(full, STATE)) and int(name[len(prefix):]) > best_n:
                best, best_n = full, int(name[len(prefix):])
    return best


# ---- random number generators ------------------------------------------------------------------
def rng_state() -> dict[str, Any]:
    """The state of torch's (CPU, and CUDA if present), numpy's and Python's global generators."""
    st: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": np.random.get_state(),
        "python": random.getstate(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def set_rng_state(st: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` captured (e.g. after :func:`load_checkpoint`)."""
    torch.set_rng_state(st["torch"].cpu().to(torch.uint8))
    np.random.set_state(st["numpy"])
    py = st["python"]
    # JSON has no tuples inside lists of a tuple; random.setstate wants (int, tuple, float|None).
    random.setstate((py[0], tuple(py[1]), py[2]))
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([t.cpu().to(torch.uint8) for t in st["cuda"]])
