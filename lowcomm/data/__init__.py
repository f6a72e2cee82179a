"""Data for lowcomm's recipes, simulator and benchmarks.

* :func:`load_corpus` reads a corpus into one flat numpy token array, once per process:
  byte-level text (vocabulary 256) from any file or folder, pre-tokenized ``uint16`` token
  files (vocabulary given), or by default the Python standard library's own source.
* :class:`Corpus` splits it into a training part and a held-out part and cuts the training
  part into deterministic, disjoint per-worker shards.
* :class:`ShardLoader` yields one worker's ``(inputs, targets)`` batches through torchdata's
  ``StatefulDataLoader`` over any ``torch.utils.data.Dataset`` (the corpus's :class:`TokenWindows`,
  or a user's, loaded with :func:`load_dataset`); resumable with ``state_dict()`` /
  ``load_state_dict()``.
"""

from .corpus import DEFAULT_CORPUS, Corpus, TokenArray, load_corpus, stdlib_files
from .loader import ShardBatchSampler, ShardLoader, TokenWindows, collate_tokens, held_out_batches, load_dataset

__all__ = ["DEFAULT_CORPUS", "Corpus", "ShardBatchSampler", "ShardLoader", "TokenArray", "TokenWindows",
           "collate_tokens", "held_out_batches", "load_corpus", "load_dataset", "stdlib_files"]
