"""Data for lowcomm's recipes, simulator and benchmarks.

* :func:`load_corpus` reads a corpus into one flat numpy token array, once per process:
  byte-level text (vocabulary 256) from any file or folder, pre-tokenized ``uint16`` token
  files (vocabulary given), or by default the Python standard library's own source.
* :class:`Corpus` splits it into a training part and a held-out part and cuts the training
  part into deterministic, disjoint per-worker shards.
* :class:`BatchStream` yields ``(inputs, targets)`` batches from one shard; its position is
  resumable with ``state_dict()`` / ``load_state_dict()``.
"""

from .corpus import (
    DEFAULT_CORPUS,
    BatchStream,
    Corpus,
    TokenArray,
    load_corpus,
    stdlib_files,
)

__all__ = ["DEFAULT_CORPUS", "BatchStream", "Corpus", "TokenArray", "load_corpus", "stdlib_files"]
