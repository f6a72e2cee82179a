"""Batches through torchdata's StatefulDataLoader: the corpus's schedule, user datasets, resume, errors."""

import json
import sys
import types

import numpy as np
import pytest
import torch
from torch.utils.data import Dataset, IterableDataset

from lowcomm.data import Corpus, ShardLoader, TokenArray, load_dataset
from lowcomm.shards import shard_bounds


def _corpus(n=60_000, L=16):
    toks = (np.arange(n) * 7919 % 251).astype(np.uint8)
    return Corpus(TokenArray(toks, 256, "test", 1), L)


def test_batches_follow_the_counter_schedule():
    """Batch k of worker r is the windows at starts drawn by default_rng([seed, r, W, k]) in r's shard."""
    c = _corpus()
    s = c.stream(1, 3, 5, seed=7)
    lo, hi = shard_bounds(len(c.train_tokens), 3)[1]
    for k in range(4):
        starts = np.random.default_rng([7, 1, 3, k]).integers(lo, hi - c.seq_len, size=5)
        w = torch.from_numpy(c.train_tokens[starts[:, None] + np.arange(c.seq_len + 1)].astype(np.int64))
        x, y = next(s)
        assert torch.equal(x, w[:, :-1]) and torch.equal(y, w[:, 1:])
    assert s.step == 4


def test_state_is_json_and_resumes_exactly():
    c = _corpus()
    s = c.stream(0, 2, 4, seed=1)
    for _ in range(5):
        next(s)
    sd = json.loads(json.dumps(s.state_dict()))
    want = [next(s) for _ in range(3)]
    r = c.stream(0, 2, 4, seed=1)
    r.load_state_dict(sd)
    got = [next(r) for _ in range(3)]
    assert all(torch.equal(a[0], b[0]) for a, b in zip(want, got))
    old = c.stream(0, 2, 4, seed=1)  # a checkpoint written before the torchdata loader
    old.load_state_dict({"step": 5, "seed": 1, "rank": 0, "world_size": 2, "batch_size": 4})
    assert torch.equal(next(old)[0], want[0][0])
    bad = c.stream(0, 2, 4, seed=2)
    with pytest.raises(ValueError, match="seed"):
        bad.load_state_dict(sd)
    assert bad.step == 0 and torch.equal(next(bad)[0], c.stream(0, 2, 4, seed=2).__next__()[0])


def test_seek_for_a_joiner():
    c = _corpus()
    a, b = c.stream(1, 2, 3, seed=0), c.stream(1, 2, 3, seed=0)
    for _ in range(6):
        next(a)
    b.step = 6
    assert torch.equal(next(a)[0], next(b)[0])


class Seqs(Dataset):
    def __init__(self, n=20, seq_len=8, pairs=False):
        self.data = torch.arange(n * (seq_len + 1)).reshape(n, seq_len + 1) % 200
        self.pairs = pairs

    def __len__(self):
        return len(self.data)

    def __getitem__(self, i):
        return (self.data[i, :-1], self.data[i, 1:]) if self.pairs else self.data[i]


@pytest.mark.parametrize("pairs", [False, True])
def test_user_map_dataset_sharded_by_index(pairs):
    ds = Seqs(pairs=pairs)
    seen = []
    for r in range(4):
        lo, hi = shard_bounds(len(ds), 4)[r]
        s = ShardLoader(ds, r, 4, 6, seed=3)
        for _ in range(5):
            x, y = next(s)
            assert x.shape == (6, 8) and torch.equal(x[:, 1:], y[:, :-1])
            rows = (x[:, 0] // 9).tolist()
            assert all(lo <= i < hi for i in rows)
            seen.append(set(rows))
    assert len(set().union(*seen)) > 10


class Counting(IterableDataset):
    def __init__(self, stateful):
        self.i = 0
        if stateful:
            self.state_dict = lambda: {"i": self.i}
            self.load_state_dict = lambda sd: setattr(self, "i", sd["i"])

    def __iter__(self):
        while True:
            self.i += 1
            yield torch.full((5,), self.i)


def test_iterable_dataset_needs_state():
    with pytest.raises(ValueError, match="state_dict"):
        ShardLoader(Counting(False), 0, 1, 2)
    s = ShardLoader(Counting(True), 0, 1, 2)
    next(s), next(s)
    sd = s.state_dict()
    want = next(s)
    r = ShardLoader(Counting(True), 0, 1, 2)
    r.load_state_dict(sd)
    assert torch.equal(next(r)[0], want[0])
    with pytest.raises(ValueError, match="seek"):
        r.step = 3


def test_load_dataset_by_name(monkeypatch):
    mod = types.ModuleType("user_data_mod")
    mod.Seqs = Seqs
    mod.make = lambda seq_len, split: Seqs(seq_len=seq_len) if split == "train" else Seqs(10, seq_len)
    mod.notds = lambda: [1, 2]
    monkeypatch.setitem(sys.modules, "user_data_mod", mod)
    assert len(load_dataset("user_data_mod:Seqs", seq_len=8, split="train")) == 20
    assert len(load_dataset("user_data_mod:make", seq_len=8, split="eval")) == 10
    for spec, msg in (("nocolon", "module:Name"), ("user_data_mod:nope", "cannot load"),
                      ("no_such_module_x:Y", "cannot load"), ("user_data_mod:notds", "not a torch")):
        with pytest.raises(ValueError, match=msg):
            load_dataset(spec)
    with pytest.raises(ValueError, match="state_dict"):
        load_dataset(lambda: Counting(False))


def test_vectorised_seeding_equals_numpy():
    """The sampler's block-wise SeedSequence/PCG64 seeding gives default_rng([seed, rank, W, k])'s draws."""
    from lowcomm.data.loader import ShardBatchSampler

    for seed, rank, world, start in ((0, 0, 1, 0), (7, 3, 5, 250), (2**32 - 1, 1, 2, 1000), (5, 0, 3, 2**32 - 300),
                                     (2**40, 0, 1, 0)):
        s = ShardBatchSampler(10**6, rank, world, 7, seed)
        s.step = start
        for k in range(start, start + 300, 37):
            s.step = k
            want = np.random.default_rng([seed, rank, world, k]).integers(s.lo, s.hi, size=7)
            assert np.array_equal(next(s), want), (seed, rank, world, k)


def test_loader_never_touches_the_global_rng():
    """Making and iterating a loader leaves torch's global RNG alone (worker threads seed and build models with it)."""
    c = _corpus()
    torch.manual_seed(123)
    want = torch.rand(3)
    torch.manual_seed(123)
    s = c.stream(0, 2, 4, seed=1)
    next(s)
    s.load_state_dict(s.state_dict())
    next(s)
    assert torch.equal(torch.rand(3), want)
