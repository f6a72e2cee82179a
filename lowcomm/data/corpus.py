"""Corpus loading, the held-out split and per-worker shards (batches: :mod:`lowcomm.data.loader`).

The whole corpus lives in one flat numpy array (about 12 MB for the default), loaded once
per process and cached, so a batch is a fancy-index slice of that array and never a Python
file read. Byte-level text has vocabulary 256 (every byte is a token, nothing to train or
download); pre-tokenized corpora are flat little-endian ``uint16`` token files (the format
nanoGPT-style pipelines write), read with their vocabulary size.
"""

from __future__ import annotations

import logging
import os
import sysconfig
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..shards import shard_bounds
from .loader import ShardLoader, TokenWindows

__all__ = ["DEFAULT_CORPUS", "Corpus", "TokenArray", "load_corpus", "stdlib_files"]

log = logging.getLogger(__name__)

DEFAULT_CORPUS = "stdlib"
"""Name of the embedded default corpus: the running interpreter's standard-library source."""

# Directories of the stdlib that are not "the library": its test suites and installed packages.
_STDLIB_EXCLUDE = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"}

_cache: dict[tuple, TokenArray] = {}
_cache_lock = threading.Lock()


@dataclass(frozen=True)
class TokenArray:
    """A corpus as one flat token array."""

    tokens: np.ndarray  # 1-D, uint8 (bytes) or uint16 (token ids)
    vocab_size: int
    source: str  # what was read (path or "stdlib:<dir>")
    files: int  # how many files it came from

    def __len__(self) -> int:
        return int(self.tokens.shape[0])


def stdlib_files() -> list[Path]:
    """The ``.py`` files of the running interpreter's standard library, tests and site-packages excluded."""
    root = Path(sysconfig.get_paths()["stdlib"])
    out: list[Path] = []
    for d, dirs, files in os.walk(root):
        # Sorted walk: the corpus (and so every shard and batch) is the same on every run.
        dirs[:] = sorted(x for x in dirs if x not in _STDLIB_EXCLUDE and not x.startswith("."))
        out.extend(Path(d) / f for f in sorted(files) if f.endswith(".py"))
    return out


def _read_files(files: list[Path]) -> bytes:
    parts = []
    for f in files:
        try:
            parts.append(f.read_bytes())
        except OSError as e:
            raise ValueError(f"cannot read {f}: {e}; pass --data a readable text file or folder") from None
    # A newline between files so one file's last line does not run into the next one's first.
    return b"\n".join(parts)


def _text_files(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    files: list[Path] = []
    for d, dirs, names in os.walk(path):
        dirs[:] = sorted(x for x in dirs if not x.startswith(".") and x != "__pycache__")
        files.extend(Path(d) / n for n in sorted(names) if not n.startswith("."))
    return files


def load_corpus(path: str | os.PathLike | None = None, vocab_size: int | None = None) -> TokenArray:
    """Load a corpus as one flat token array (cached per process).

    Args:
        path: ``None`` or ``"stdlib"`` for the default corpus (the ``.py`` files of this
            interpreter's standard library); a text file or a folder of text files (read as
            bytes, vocabulary 256); or, with ``vocab_size``, a pre-tokenized ``uint16`` token
            file or a folder of them (``*.bin``).
        vocab_size: vocabulary of a pre-tokenized corpus; ``None`` for byte-level text.
    """
    if vocab_size is not None and (isinstance(vocab_size, bool) or not isinstance(vocab_size, int)
                                   or not 1 < vocab_size <= 65536):
        raise ValueError(f"vocab_size must be an integer in [2, 65536] for uint16 token files, got {vocab_size!r}")
    default = path is None or str(path) == DEFAULT_CORPUS
    p = None if default else Path(path).expanduser().resolve()
    key = (DEFAULT_CORPUS if p is None else str(p), vocab_size)
    with _cache_lock:
        hit = _cache.get(key)
    if hit is not None:
        return hit
    if p is None:
        if vocab_size is not None:
            raise ValueError("the default corpus is byte-level text; pass vocab_size only with a token file")
        files = stdlib_files()
        if not files:
            raise ValueError(f"found no .py files under the stdlib at {sysconfig.get_paths()['stdlib']}; "
                             f"pass --data PATH to a text file or folder")
        raw = _read_files(files)
        arr = TokenArray(np.frombuffer(raw, dtype=np.uint8), 256, f"stdlib:{sysconfig.get_paths()['stdlib']}",
                         len(files))
    else:
        if not p.exists():
            raise ValueError(f"data path {path} does not exist; pass a text file, a folder of text files, "
                             f"or a uint16 token file with its vocab size")
        if vocab_size is None:
            files = _text_files(p)
            raw = _read_files(files) if files else b""
            arr = TokenArray(np.frombuffer(raw, dtype=np.uint8), 256, str(p), len(files))
        else:
            files = [p] if p.is_file() else sorted(p.rglob("*.bin"))
            chunks = []
            for f in files:
                try:
                    if f.stat().st_size % 2:
                        raise ValueError(f"{f} has an odd number of bytes; a uint16 token file has 2 bytes per token")
                    chunks.append(np.fromfile(f, dtype="<u2"))
                except OSError as e:
                    raise ValueError(f"cannot read token file {f}: {e}") from None
            toks = np.concatenate(chunks) if chunks else np.zeros(0, np.uint16)
            if toks.size and int(toks.max()) >= vocab_size:
                raise ValueError(f"{p} holds token id {int(toks.max())} >= vocab_size {vocab_size}; "
                                 f"pass the tokenizer's vocabulary size")
            arr = TokenArray(toks, vocab_size, str(p), len(files))
        if len(arr) == 0:
            raise ValueError(f"data path {path} holds no data (no readable, non-empty files); "
                             f"pass a text file or folder with some text in it")
    log.info("loaded corpus %s: %d tokens from %d files", arr.source, len(arr), arr.files)
    with _cache_lock:
        _cache[key] = arr
    return arr


class Corpus:
    """A token array split into a training part and a held-out part.

    The array is cut into blocks; every ``period``-th block (``period = round(1 / eval_fraction)``)
    is held out, so the held-out text is spread over the whole corpus rather than being its
    last files. Training shards are contiguous, disjoint ranges of the training part.

    Args:
        data: a :class:`TokenArray` (see :func:`load_corpus`).
        seq_len: tokens per training sequence (the model's context).
        eval_fraction: share of the corpus held out (default 5%).
        block: tokens per split block (smaller for small corpora, so both parts are non-empty).
    """

    def __init__(self, data: TokenArray, seq_len: int, eval_fraction: float = 0.05, block: int = 65536):
        if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 1:
            raise ValueError(f"seq_len must be a positive integer, got {seq_len!r}")
        if not 0.0 < eval_fraction <= 0.5:
            raise ValueError(f"eval_fraction must be in (0, 0.5], got {eval_fraction!r}")
        self.data = data
        self.seq_len = seq_len
        self.vocab_size = data.vocab_size
        n = len(data)
        period = max(2, round(1.0 / eval_fraction))
        block = max(seq_len + 1, min(block, n // (4 * period)))
        nblocks = n // block
        if nblocks < period or n < 8 * (seq_len + 1):
            raise ValueError(f"corpus {data.source} has {n} tokens, too few for sequences of {seq_len} "
                             f"with a {eval_fraction:.0%} held-out split; use a bigger corpus or a shorter context")
        idx = np.arange(n // block * block).reshape(nblocks, block)
        held = (np.arange(nblocks) % period) == period - 1
        toks = data.tokens
        self.eval_tokens = toks[idx[held].reshape(-1)]
        # The tail that does not fill a block stays in training.
        self.train_tokens = np.concatenate([toks[idx[~held].reshape(-1)], toks[nblocks * block:]])

    def shard(self, rank: int, world_size: int) -> tuple[int, int]:
        """[start, end) of worker ``rank``'s contiguous, disjoint range of the training tokens."""
        if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
            raise ValueError(f"world_size must be a positive integer, got {world_size!r}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, {world_size}), got {rank!r}")
        lo, hi = shard_bounds(len(self.train_tokens), world_size)[rank]
        if hi - lo < self.seq_len + 1:
            raise ValueError(f"shard {rank} of {world_size} has {hi - lo} tokens, fewer than one sequence of "
                             f"{self.seq_len}+1; use fewer workers, a shorter context or a bigger corpus")
        return lo, hi

    def dataset(self) -> TokenWindows:
        """The training part as a map-style Dataset of ``seq_len + 1``-token windows."""
        return TokenWindows(self.train_tokens, self.seq_len)

    def stream(self, rank: int, world_size: int, batch_size: int, seed: int = 0) -> ShardLoader:
        """Worker ``rank``'s resumable stream of training batches: a ``StatefulDataLoader`` over its shard.

        Batch ``k`` depends only on ``(seed, rank, world_size, k)`` (see :class:`ShardBatchSampler`).
        """
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        self.shard(rank, world_size)  # the clear error for a shard shorter than one sequence
        return ShardLoader(self.dataset(), rank, world_size, batch_size, seed)

    def eval_batches(self, batch_size: int, max_sequences: int = 64) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Fixed held-out batches: up to ``max_sequences`` non-overlapping windows spread evenly."""
        L = self.seq_len
        n = len(self.eval_tokens)
        count = max(1, min(max_sequences, (n - 1) // L))
        starts = np.linspace(0, n - L - 1, count).astype(np.int64)
        windows = torch.from_numpy(self.eval_tokens[starts[:, None] + np.arange(L + 1)].astype(np.int64))
        return [(windows[i:i + batch_size, :-1], windows[i:i + batch_size, 1:])
                for i in range(0, count, batch_size)]
