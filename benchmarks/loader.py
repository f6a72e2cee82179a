"""Loader throughput: lowcomm's StatefulDataLoader path against the hand-written stream it replaced.

    python3 benchmarks/loader.py [--batches 3000] [--reps 7] [--batch-size 16] [--seq-len 64]

Batches per second of one worker's stream of the default corpus (``num_workers=0``), each
figure a median over ``--reps`` interleaved rounds; the ratio (torchdata / hand-written) is
the stable figure on a shared machine. The reference is the draw of the ``BatchStream`` that
lowcomm used before torchdata (a counter-seeded generator, a fancy-index gather of the
windows): the same batches, as the first check below asserts.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import numpy as np
import torch

from lowcomm.data import Corpus, load_corpus


class HandWritten:
    """The pre-torchdata stream (lowcomm main at ab7d13c), kept here as the benchmark's reference."""

    def __init__(self, corpus: Corpus, rank: int, world: int, batch: int, seed: int):
        self.tokens, self.L = corpus.train_tokens, corpus.seq_len
        self.lo, self.hi = corpus.shard(rank, world)
        self.key, self.batch, self.step = (seed, rank, world), batch, 0
        self.off = np.arange(self.L + 1)

    def __next__(self):
        rng = np.random.default_rng([*self.key, self.step])
        starts = rng.integers(self.lo, self.hi - self.L, size=self.batch)
        self.step += 1
        w = torch.from_numpy(self.tokens[starts[:, None] + self.off].astype(np.int64))
        return w[:, :-1], w[:, 1:]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batches", type=int, default=3000)
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--json", default=None, help="also write the figures here")
    a = ap.parse_args()
    corpus = Corpus(load_corpus(None), a.seq_len)
    make = {"hand-written": lambda: HandWritten(corpus, 0, 4, a.batch_size, 1),
            "StatefulDataLoader": lambda: corpus.stream(0, 4, a.batch_size, seed=1)}
    ref, new = make["hand-written"](), make["StatefulDataLoader"]()
    for _ in range(20):
        x0, x1 = next(ref)[0], next(new)[0]
        assert torch.equal(x0, x1), "the loader's batches differ from the hand-written stream's"
    rates: dict[str, list[float]] = {k: [] for k in make}
    for _ in range(a.reps):
        for name, mk in make.items():
            s = mk()
            for _ in range(50):
                next(s)
            t = time.perf_counter()
            for _ in range(a.batches):
                next(s)
            rates[name].append(a.batches / (time.perf_counter() - t))
    med = {k: statistics.median(v) for k, v in rates.items()}
    ratio = [n / h for n, h in zip(rates["StatefulDataLoader"], rates["hand-written"])]
    print(f"load average {os.getloadavg()[0]:.2f}; batch {a.batch_size} x {a.seq_len}; {a.reps} interleaved reps")
    for k, v in rates.items():
        print(f"{k:>20}: {med[k]:8.0f} batches/s (min {min(v):.0f}, max {max(v):.0f})")
    print(f"{'ratio':>20}: {statistics.median(ratio):.2f}x (min {min(ratio):.2f}, max {max(ratio):.2f})")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"rates": rates, "ratio": ratio, "load": os.getloadavg()[0]}, f, indent=1)


if __name__ == "__main__":
    main()
