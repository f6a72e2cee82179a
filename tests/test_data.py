"""Data: the default corpus, disjoint deterministic shards, resumable streams, token files, errors."""

import math

import numpy as np
import pytest
import torch

from lowcomm.data import Corpus, ShardLoader, load_corpus, stdlib_files


@pytest.fixture(scope="module")
def text_corpus(tmp_path_factory):
    d = tmp_path_factory.mktemp("txt")
    rng = np.random.default_rng(0)
    words = [b"alpha", b"beta", b"gamma", b"delta", b"epsilon"]
    for i in range(3):
        (d / f"f{i}.txt").write_bytes(b" ".join(words[j] for j in rng.integers(0, 5, 8000)))
    return d


def test_stdlib_default_corpus_excludes_tests():
    files = stdlib_files()
    assert len(files) > 100
    for f in files:
        assert f.suffix == ".py"
        assert not {"test", "tests", "idle_test", "site-packages"} & set(f.parts)
    data = load_corpus()
    assert data.vocab_size == 256 and data.tokens.dtype == np.uint8 and len(data) > 1_000_000
    assert load_corpus() is data  # cached: read once per process


def test_shards_disjoint_and_deterministic(text_corpus):
    c = Corpus(load_corpus(text_corpus), seq_len=16)
    W = 4
    bounds = [c.shard(r, W) for r in range(W)]
    assert bounds[0][0] == 0 and bounds[-1][1] == len(c.train_tokens)
    for (_, b), (a2, _) in zip(bounds, bounds[1:]):
        assert b == a2  # contiguous, no overlap
    seen = []
    for r in range(W):
        s = c.stream(r, W, batch_size=8, seed=3)
        pos = set()
        for _ in range(20):
            x, y = next(s)
            assert x.shape == (8, 16) and y.shape == (8, 16)
            assert torch.equal(x[:, 1:], y[:, :-1])  # targets are the inputs shifted by one
        # Windows stay inside the shard: reproduce the draws and check their ranges.
        for k in range(20):
            starts = np.random.default_rng([3, r, W, k]).integers(s.sampler.lo, s.sampler.hi - 16, size=8)
            assert (starts >= bounds[r][0]).all() and (starts + 17 <= bounds[r][1]).all()
            pos.update(starts.tolist())
        seen.append(pos)
    # Same seed, same batches; another seed, other batches.
    a = [next(c.stream(1, W, 8, seed=3)) for _ in range(1)][0]
    b = next(c.stream(1, W, 8, seed=3))
    d = next(c.stream(1, W, 8, seed=4))
    assert torch.equal(a[0], b[0]) and not torch.equal(a[0], d[0])
    # Train and held-out parts partition the corpus.
    assert len(c.train_tokens) + len(c.eval_tokens) == len(c.data)
    assert len(c.eval_tokens) > 0


def test_resume_gives_same_next_batch(text_corpus):
    c = Corpus(load_corpus(text_corpus), seq_len=16)
    s = c.stream(2, 4, 4, seed=0)
    for _ in range(7):
        next(s)
    state = s.state_dict()
    expected = next(s)
    s2 = c.stream(2, 4, 4, seed=0)
    s2.load_state_dict(state)
    got = next(s2)
    assert torch.equal(expected[0], got[0]) and torch.equal(expected[1], got[1])
    with pytest.raises(ValueError, match="rank"):
        c.stream(1, 4, 4, seed=0).load_state_dict(state)


def test_eval_batches_fixed(text_corpus):
    c = Corpus(load_corpus(text_corpus), seq_len=16)
    a, b = c.eval_batches(8, 20), c.eval_batches(8, 20)
    assert sum(x.shape[0] for x, _ in a) == 20
    assert all(torch.equal(x1, x2) for (x1, _), (x2, _) in zip(a, b))


def test_token_file(tmp_path):
    toks = (np.arange(50_000) * 7919 % 1000).astype("<u2")
    p = tmp_path / "train.bin"
    toks.tofile(p)
    data = load_corpus(p, vocab_size=1000)
    assert data.vocab_size == 1000 and np.array_equal(data.tokens, toks)
    c = Corpus(data, seq_len=32)
    x, _ = next(c.stream(0, 2, 4))
    assert x.dtype == torch.int64 and int(x.max()) < 1000
    with pytest.raises(ValueError, match="vocab_size"):
        load_corpus(p, vocab_size=500)


def test_bad_paths(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        load_corpus(tmp_path / "nope")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="no data"):
        load_corpus(empty)
    (tmp_path / "small.txt").write_bytes(b"abc")
    with pytest.raises(ValueError, match="too few"):
        Corpus(load_corpus(tmp_path / "small.txt"), seq_len=16)
    odd = tmp_path / "odd.bin"
    odd.write_bytes(b"\x00\x01\x02")
    with pytest.raises(ValueError, match="odd number"):
        load_corpus(odd, vocab_size=300)


def test_unreadable_file(tmp_path):
    import os

    p = tmp_path / "secret.txt"
    p.write_bytes(b"x" * 100)
    os.chmod(p, 0)
    try:
        if os.access(p, os.R_OK):  # root reads anything
            pytest.skip("running as a user that can read mode-000 files")
        with pytest.raises(ValueError, match="cannot read"):
            load_corpus(p)
    finally:
        os.chmod(p, 0o600)


def test_stream_type_is_resumable_iterator(text_corpus):
    s = Corpus(load_corpus(text_corpus), seq_len=8).stream(0, 1, 2)
    assert isinstance(s, ShardLoader) and iter(s) is s
    assert math.isfinite(float(next(s)[0].float().mean()))
