"""Checkpoints: exact round trips of optimizer state (no pickle), atomic writes, exact resume."""

import math
import os
import random

import numpy as np
import pytest
import torch

import lowcomm
from lowcomm.checkpoint import latest_checkpoint, load_checkpoint, rng_state, save_checkpoint, set_rng_state
from lowcomm.comm.local import run_local


def _model(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))


def _data(step, rank):
    g = torch.Generator().manual_seed(1000 * rank + step)
    return torch.randn(5, 6, generator=g), torch.randn(5, 3, generator=g)


def _train(model, opt, steps, rank, start=0):
    for s in range(start, start + steps):
        x, y = _data(s, rank)
        # Dropout-like use of the global RNG, so the test also covers RNG state.
        noise = torch.rand(1).item() * 1e-3
        loss = ((model(x) - y) ** 2).mean() + noise
        loss.backward()
        opt.step()
        opt.zero_grad()


def _assert_same(a, b, path="root"):
    if isinstance(a, dict):  # an OrderedDict comes back as a dict with the same key order
        assert isinstance(b, dict), path
    elif isinstance(a, torch.Tensor):  # a Parameter comes back as a plain tensor
        assert isinstance(b, torch.Tensor), path
    else:
        assert type(a) is type(b), f"{path}: {type(a)} vs {type(b)}"
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape, path
        # Compare bits, not values (NaN != NaN, -0.0 == 0.0 would hide differences).
        assert torch.equal(a.detach().flatten().view(torch.uint8), b.flatten().view(torch.uint8)), path
    elif isinstance(a, dict):
        assert list(a) == list(b), f"{path}: keys {list(a)} vs {list(b)}"
        for k in a:
            _assert_same(a[k], b[k], f"{path}/{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same(x, y, f"{path}/{i}")
    elif isinstance(a, np.ndarray):
        assert a.dtype == b.dtype and np.array_equal(a, b), path
    elif isinstance(a, float) and math.isnan(a):
        assert math.isnan(b), path
    else:
        assert a == b, path


def test_diloco_adamw_state_round_trips_bitwise(tmp_path):
    def work(transport):
        model = _model()
        inner = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
        opt = lowcomm.DiLoCo(inner, transport=transport, sync_every=3)
        _train(model, opt, 7, transport.rank)
        return model, opt

    model, opt = run_local(2, work)[0]
    state = {
        "model": model.state_dict(),
        "optimizer": opt.state_dict(),
        "counters": {"step": 7, "tokens": 7 * 5},
        "bf16": torch.randn(4, 3).to(torch.bfloat16),
        "shared": [model[0].weight, model[0].weight],  # the same tensor twice
        "misc": {"none": None, "nan": float("nan"), "inf": -math.inf, "tiny": 5e-324, "flag": True,
                 "tuple": (1, "a", 2.5), "empty": torch.zeros(0, 3, dtype=torch.float16), 7: "int key"},
        "rng": rng_state(),
    }
    save_checkpoint(tmp_path / "ck", state)
    back = load_checkpoint(tmp_path / "ck")
    _assert_same(state, back)
    # Integer keys of the torch optimizer state survive as ints, so load_state_dict accepts them.
    assert all(isinstance(k, int) for k in back["optimizer"]["inner"][0]["state"])
    # No pickle anywhere: the files are a safetensors file and plain JSON.
    assert sorted(os.listdir(tmp_path / "ck")) == ["state.json", "tensors.safetensors"]


def test_atomic_replace_and_latest(tmp_path):
    save_checkpoint(tmp_path / "step_00000010", {"a": torch.ones(2)})
    save_checkpoint(tmp_path / "step_00000002", {"a": torch.zeros(2)})
    assert latest_checkpoint(tmp_path).endswith("step_00000010")
    save_checkpoint(tmp_path / "step_00000010", {"a": torch.full((2,), 3.0)})
    assert torch.equal(load_checkpoint(tmp_path / "step_00000010")["a"], torch.full((2,), 3.0))
    assert sorted(os.listdir(tmp_path)) == ["step_00000002", "step_00000010"]  # no temporaries left

    class Unsaveable:
        pass

    with pytest.raises(ValueError, match="cannot checkpoint a Unsaveable"):
        save_checkpoint(tmp_path / "bad", {"x": Unsaveable()})
    assert sorted(os.listdir(tmp_path)) == ["step_00000002", "step_00000010"]
    with pytest.raises(ValueError, match="not a lowcomm checkpoint"):
        load_checkpoint(tmp_path)
    assert latest_checkpoint(tmp_path / "missing") is None


def test_rng_state_round_trip(tmp_path):
    torch.manual_seed(3)
    np.random.seed(3)
    random.seed(3)
    np.random.randn()  # leaves a cached gaussian in numpy's legacy state
    save_checkpoint(tmp_path / "r", {"rng": rng_state()})
    want = (torch.rand(3), np.random.randn(3), random.random())
    set_rng_state(load_checkpoint(tmp_path / "r")["rng"])
    got = (torch.rand(3), np.random.randn(3), random.random())
    assert torch.equal(want[0], got[0]) and np.array_equal(want[1], got[1]) and want[2] == got[2]


def test_resume_equals_uninterrupted(tmp_path):
    """Train 9 steps straight vs 5 steps, checkpoint, rebuild everything, load, 4 more: same bits.

    World of one: the training loop draws from the global RNG, which threads would share.
    """

    def build(transport):
        model = _model()
        inner = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
        return model, lowcomm.DiLoCo(inner, transport=transport, sync_every=3)

    def straight(transport):
        torch.manual_seed(11)
        model, opt = build(transport)
        _train(model, opt, 9, 0)
        return [p.detach().clone() for p in model.parameters()], opt.state_dict()

    def first_half(transport):
        torch.manual_seed(11)
        model, opt = build(transport)
        _train(model, opt, 5, 0)
        save_checkpoint(tmp_path / "ck", {"model": model.state_dict(), "optimizer": opt.state_dict(),
                                          "rng": rng_state()})

    def second_half(transport):
        torch.manual_seed(999)  # a fresh process's RNG; the checkpoint's must override it
        model, opt = build(transport)
        ck = load_checkpoint(tmp_path / "ck")
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["optimizer"])
        set_rng_state(ck["rng"])
        _train(model, opt, 4, 0, start=5)
        return [p.detach().clone() for p in model.parameters()], opt.state_dict()

    ref_params, ref_state = run_local(1, straight)[0]
    run_local(1, first_half)
    params, state = run_local(1, second_half)[0]
    assert ref_state["counters"]["sync_count"] == 3
    for a, b in zip(ref_params, params):
        assert torch.equal(a, b)
    _assert_same(ref_state, state)
