"""Batches through torchdata's ``StatefulDataLoader``: datasets, per-worker shards, resumable samplers.

Every training batch in lowcomm comes from a :class:`torchdata.stateful_dataloader.StatefulDataLoader`
over a ``torch.utils.data.Dataset``:

* the built-in corpus is a map-style :class:`TokenWindows` dataset (item ``i`` is the window of
  ``seq_len + 1`` tokens starting at training token ``i``), and so is any dataset a recipe names;
* a map-style dataset is sharded per worker by index with :func:`lowcomm.shards.shard_bounds`
  (the same split the transports use); :class:`ShardBatchSampler` draws batch ``k`` of worker
  ``rank`` from a counter-based generator seeded with ``(seed, rank, world_size, k)``, so the
  loader's position is just ``k``, it resumes exactly (the sampler is ``Stateful``: torchdata
  saves and restores it), and a joiner can seek to any step;
* an ``IterableDataset`` shards and orders itself, and must carry ``state_dict`` /
  ``load_state_dict`` (else a resume could not be exact): one without them is a ``ValueError``.

A dataset item is a 1-D integer sequence of ``seq_len + 1`` tokens or an ``(inputs, targets)``
pair; a dataset may define ``__getitems__(indices)`` returning the whole batch at once, as
:class:`TokenWindows` does (one fancy-index gather instead of one item at a time).
"""

from __future__ import annotations

import importlib
import inspect
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, IterableDataset
from torchdata.stateful_dataloader import StatefulDataLoader

from ..shards import shard_bounds

__all__ = ["ShardBatchSampler", "ShardLoader", "TokenWindows", "collate_tokens", "held_out_batches", "load_dataset"]


# numpy's SeedSequence (O'Neill's seed_seq_fe; numpy.random.bit_generator) and PCG64's seeding, vectorised
# over a block of steps: ``default_rng([seed, rank, world, k])`` costs ~25-50 us per call, most of it
# building the SeedSequence one key at a time; this gives the same PCG64 state for 256 keys at once.
# tests/test_loader.py checks the states against numpy's for many keys.
_U32 = np.uint32
_INIT_A, _MULT_A, _INIT_B, _MULT_B = _U32(0x43B0D7E5), _U32(0x931E8875), _U32(0x8B51F9DD), _U32(0x58F38DED)
_MIX_L, _MIX_R, _SHIFT = _U32(0xCA01F9DD), _U32(0x4973F715), _U32(16)
_PCG_MULT = (2549297995355413924 << 64) + 4865540595714422341
_MASK128 = (1 << 128) - 1


def _seed_words(entropy: np.ndarray) -> np.ndarray:
    """``SeedSequence(e).generate_state(4, uint64)`` for each column ``e`` of a (4, N) uint32 array: (N, 4)."""
    with np.errstate(over="ignore"):
        h = _INIT_A

        def hashmix(v: np.ndarray) -> np.ndarray:
            nonlocal h
            v = v ^ h
            h = _U32(h * _MULT_A)
            v = v * h
            return v ^ (v >> _SHIFT)

        pool = [hashmix(entropy[i]) for i in range(4)]
        for src in range(4):
            for dst in range(4):
                if src != dst:
                    r = _MIX_L * pool[dst] - _MIX_R * hashmix(pool[src])
                    pool[dst] = r ^ (r >> _SHIFT)
        hb, out = _INIT_B, []
        for i in range(8):
            v = pool[i % 4] ^ hb
            hb = _U32(hb * _MULT_B)
            v = v * hb
            out.append(v ^ (v >> _SHIFT))
    return np.ascontiguousarray(np.stack(out, axis=1).astype(np.uint32)).view(np.uint64)


def _pcg64_state(words: np.ndarray) -> dict[str, Any]:
    """PCG64's ``state`` after seeding with four uint64 words (numpy's pcg64_set_seed)."""
    seed = (int(words[0]) << 64) | int(words[1])
    inc = ((((int(words[2]) << 64) | int(words[3])) << 1) | 1) & _MASK128
    state = (((inc + seed) & _MASK128) * _PCG_MULT + inc) & _MASK128
    return {"bit_generator": "PCG64", "state": {"state": state, "inc": inc}, "has_uint32": 0, "uinteger": 0}


class TokenWindows(Dataset):
    """Map-style dataset of overlapping token windows: item ``i`` is ``tokens[i : i + seq_len + 1]``.

    ``span = seq_len`` tells the sampler that an item reads ``span`` indices past its own, so
    a worker's windows never cross its shard's end and workers never see each other's tokens.
    """

    def __init__(self, tokens: np.ndarray, seq_len: int):
        self.tokens = tokens
        self.seq_len = seq_len
        self.span = seq_len
        self._offsets = np.arange(seq_len + 1)

    def __len__(self) -> int:
        return int(self.tokens.shape[0])

    def __getitem__(self, i: int) -> torch.Tensor:
        return torch.from_numpy(self.tokens[int(i):int(i) + self.seq_len + 1].astype(np.int64))

    def __getitems__(self, idx) -> torch.Tensor:
        starts = np.asarray(idx, dtype=np.int64)
        return torch.from_numpy(self.tokens[starts[:, None] + self._offsets].astype(np.int64))


def collate_tokens(batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """``(inputs, targets)`` from a ``(B, L+1)`` tensor, a list of 1-D sequences or a list of pairs."""
    if isinstance(batch, torch.Tensor) and batch.dim() == 2 and batch.shape[1] >= 2:
        return batch[:, :-1], batch[:, 1:]  # the fast path: a dataset's __getitems__ gave the whole batch
    if isinstance(batch, torch.Tensor):
        w = batch
    else:
        first = batch[0]
        if isinstance(first, (tuple, list)) and len(first) == 2:
            return (torch.stack([torch.as_tensor(b[0]) for b in batch]).long(),
                    torch.stack([torch.as_tensor(b[1]) for b in batch]).long())
        w = torch.stack([torch.as_tensor(b) for b in batch])
    if w.dim() != 2 or w.shape[1] < 2:
        raise ValueError(f"a dataset item must be a 1-D token sequence of seq_len + 1 tokens or an (inputs, targets) "
                         f"pair; got a batch of shape {tuple(w.shape)}")
    w = w.long()
    return w[:, :-1], w[:, 1:]


class ShardBatchSampler:
    """Batches of indices from worker ``rank``'s contiguous shard of a map-style dataset; ``Stateful``.

    Batch ``k`` holds ``batch_size`` indices drawn uniformly from ``[lo, hi - span)`` by
    ``numpy.random.default_rng([seed, rank, world_size, k])`` (computed 256 steps at a time, see
    ``_seed_words``), where ``[lo, hi)`` is
    ``shard_bounds(len(dataset), world_size)[rank]`` and ``span`` how far past its index an item
    reads (``dataset.span``, 0 for independent items). Infinite: a training run draws as many
    batches as it has steps.
    """

    def __init__(self, n: int, rank: int, world_size: int, batch_size: int, seed: int = 0, span: int = 0,
                 min_items: int = 1):
        for name, v, lo in (("world_size", world_size, 1), ("batch_size", batch_size, 1), ("span", span, 0)):
            if isinstance(v, bool) or not isinstance(v, int) or v < lo:
                raise ValueError(f"{name} must be an integer >= {lo}, got {v!r}")
        if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, {world_size}), got {rank!r}")
        self.lo, self.hi = shard_bounds(n, world_size)[rank]
        if self.hi - self.lo - span < min_items:
            raise ValueError(f"shard {rank} of {world_size} has {self.hi - self.lo} items, fewer than one sample "
                             f"(needs {span + min_items}); use fewer workers, a shorter context or a bigger dataset")
        self.rank, self.world_size, self.batch_size, self.span = rank, world_size, batch_size, span
        self.seed = int(seed)
        self.step = 0
        self._rng = np.random.Generator(np.random.PCG64(0))
        self._block_start, self._block = -1, np.zeros((0, 4), np.uint64)

    def __iter__(self) -> Iterator[np.ndarray]:
        return self

    def __next__(self) -> np.ndarray:
        k = self.step
        self.step += 1
        if not 0 <= self.seed < 2**32 or k >= 2**32 - 256:  # keys of one uint32 word each only; else numpy's own
            rng = np.random.default_rng([self.seed, self.rank, self.world_size, k])
            return rng.integers(self.lo, self.hi - self.span, size=self.batch_size)
        if not self._block_start <= k < self._block_start + len(self._block):
            self._block_start = k
            ent = np.empty((4, 256), np.uint32)
            ent[0], ent[1], ent[2] = self.seed, self.rank, self.world_size
            ent[3] = np.arange(k, k + 256, dtype=np.uint32)
            self._block = _seed_words(ent)
        self._rng.bit_generator.state = _pcg64_state(self._block[k - self._block_start])
        return self._rng.integers(self.lo, self.hi - self.span, size=self.batch_size)

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step, "seed": self.seed, "rank": self.rank, "world_size": self.world_size,
                "batch_size": self.batch_size}

    def checked_step(self, sd: Any) -> int:
        """The step saved in ``sd`` if it was saved by a sampler with this one's settings, else a ValueError."""
        if not isinstance(sd, dict):
            raise ValueError(f"sampler state must be a dict, got {type(sd).__name__}")
        for k in ("seed", "rank", "world_size", "batch_size"):
            if k in sd and sd[k] != getattr(self, k):
                raise ValueError(f"loader state was saved with {k}={sd[k]!r}, this loader has "
                                 f"{getattr(self, k)!r}; build the loader with the same settings")
        step = sd.get("step")
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise ValueError(f"loader state has an invalid step {step!r}")
        return step

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        self.step = self.checked_step(sd)


def _require_stateful_iterable(ds: IterableDataset) -> None:
    if not (callable(getattr(ds, "state_dict", None)) and callable(getattr(ds, "load_state_dict", None))):
        raise ValueError(f"{type(ds).__name__} is an IterableDataset without state_dict()/load_state_dict(): a "
                         f"resumed run could not continue where it stopped; add both methods (torchdata's "
                         f"Stateful protocol) or use a map-style Dataset, which lowcomm shards and samples itself")


class ShardLoader:
    """One worker's endless, resumable stream of ``(inputs, targets)`` batches, through ``StatefulDataLoader``.

    ``state_dict()`` is the loader's (torchdata's format, JSON-serialisable for lowcomm's
    datasets); ``load_state_dict()`` resumes so that the next batch is the one the uninterrupted
    run would have drawn. ``step`` is the number of batches drawn; assigning it seeks (map-style
    datasets only: a joiner continues the schedule where the run is).
    """

    def __init__(self, dataset: Dataset, rank: int, world_size: int, batch_size: int, seed: int = 0,
                 collate_fn: Callable[[Any], Any] = collate_tokens):
        self.dataset = dataset
        self._iterable = isinstance(dataset, IterableDataset)
        if self._iterable:
            _require_stateful_iterable(dataset)
            self.sampler = None
            loader_args = {"batch_size": batch_size}
        else:
            if not hasattr(dataset, "__len__"):
                raise ValueError(f"map-style dataset {type(dataset).__name__} needs __len__ to be sharded per worker")
            self.sampler = ShardBatchSampler(len(dataset), rank, world_size, batch_size, seed,
                                             span=int(getattr(dataset, "span", 0)))
            loader_args = {"batch_sampler": self.sampler}
        with warnings.catch_warnings():  # torchdata 0.11 calls a torch API that torch 2.13 deprecates
            warnings.filterwarnings("ignore", message=".*set_vital.*", category=UserWarning)
            # A private generator: a DataLoader iterator draws its base seed from ``generator``, which
            # would otherwise be torch's global RNG, shared with worker threads building their models.
            self.loader = StatefulDataLoader(dataset, collate_fn=collate_fn, generator=torch.Generator().manual_seed(0),
                                             **loader_args)
        self._it: Iterator = self._iter()

    def __iter__(self) -> ShardLoader:
        return self

    def _iter(self) -> Iterator:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*set_vital.*", category=UserWarning)
            return iter(self.loader)

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        return next(self._it)

    @property
    def step(self) -> int:
        """Batches drawn so far (the sampler's counter; torchdata's count for an IterableDataset)."""
        return self.sampler.step if self.sampler is not None else int(self._it._num_yielded)

    @step.setter
    def step(self, k: int) -> None:
        if self.sampler is None:
            raise ValueError("an IterableDataset's loader cannot seek; resume it with load_state_dict()")
        self.sampler.step = int(k)

    def state_dict(self) -> dict[str, Any]:
        return self.loader.state_dict()

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        if not isinstance(sd, dict):
            raise ValueError(f"loader state must be a dict, got {type(sd).__name__}")
        if "step" in sd and "_num_yielded" not in sd:  # a checkpoint from before the torchdata loader
            if self.sampler is None:
                raise ValueError("an old-format loader state cannot resume an IterableDataset")
            self.sampler.load_state_dict(sd)
            return
        if self.sampler is not None:  # check before torchdata takes it, so a bad state changes nothing
            self.sampler.checked_step(sd.get("_index_sampler_state"))
        self.loader.load_state_dict(sd)
        self._it = self._iter()
        if self.sampler is not None:
            # torchdata restores our sampler object in place; read back what it restored.
            self.sampler = self.loader.batch_sampler


def load_dataset(spec: str | Callable[..., Dataset], **kwargs: Any) -> Dataset:
    """A user's dataset from ``"module:Name"`` (a Dataset class or a factory) or a callable, called with ``kwargs``.

    ``kwargs`` are what lowcomm knows about the run (``seq_len``, ``split``: ``"train"`` or ``"eval"``);
    a factory takes the ones it needs by name. The module must be importable (on ``PYTHONPATH``).
    """
    if isinstance(spec, str):
        mod, sep, name = spec.partition(":")
        if not sep or not mod or not name:
            raise ValueError(f"dataset must be 'module:Name' (a Dataset class or factory), got {spec!r}")
        try:
            obj = getattr(importlib.import_module(mod), name)
        except (ImportError, AttributeError) as e:
            raise ValueError(f"cannot load dataset {spec!r}: {e}; put its module on PYTHONPATH") from None
    else:
        obj = spec
    if not callable(obj):
        raise ValueError(f"dataset {spec!r} is not a class or factory")
    try:
        params = inspect.signature(obj).parameters
        if not any(p.kind is p.VAR_KEYWORD for p in params.values()):
            kwargs = {k: v for k, v in kwargs.items() if k in params}
    except (TypeError, ValueError):
        pass
    ds = obj(**kwargs)
    if not isinstance(ds, Dataset):
        raise ValueError(f"dataset {spec!r} returned {type(ds).__name__}, not a torch.utils.data.Dataset")
    if isinstance(ds, IterableDataset):
        _require_stateful_iterable(ds)
    return ds


def held_out_batches(dataset: Dataset, batch_size: int, sequences: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The first ``sequences`` items of a held-out dataset, in order, as fixed ``(inputs, targets)`` batches."""
    items: list[Any] = []
    if isinstance(dataset, IterableDataset):
        for item in dataset:
            items.append(item)
            if len(items) >= sequences:
                break
    else:
        items = [dataset[i] for i in range(min(sequences, len(dataset)))]
    if not items:
        raise ValueError(f"the held-out dataset {type(dataset).__name__} is empty; give split='eval' some items")
    return [collate_tokens(items[i:i + batch_size]) for i in range(0, len(items), batch_size)]
