"""One loop: the simulator and `lowcomm train` give the same numbers for the same settings."""

import math

import pytest
import torch
from safetensors.torch import load_file

from lowcomm.models import GPTConfig
from lowcomm.sim.runner import SimConfig, run_strategy
from lowcomm.train import ModelConfig, TrainConfig, train

SHAPE = dict(n_layer=1, n_embd=16, n_head=2, seq_len=16)


@pytest.mark.parametrize("strategy,knobs", [("diloco", {"sync_every": 2, "nesterov": False}),
                                            ("demo", {"topk": 4, "chunk": 8})])
def test_sim_and_train_agree(tmp_path, strategy, knobs):
    steps, lr = 5, 3e-3
    sim = SimConfig(workers=1, steps=steps, batch_size=4, model=GPTConfig(**SHAPE), lr=lr, warmup_steps=2,
                    eval_every=2, eval_sequences=4, threads=1, save_state=str(tmp_path / "sim.safetensors"))
    r = run_strategy(strategy, sim, {**knobs, "lr": lr})
    cfg = TrainConfig(name="t", strategy=strategy, knobs=dict(knobs), lr=lr, warmup_steps=2, steps=steps,
                      batch_size=4, grad_clip=0.0, model=ModelConfig(**SHAPE), eval_every=2, eval_sequences=4,
                      log_every=100, out_dir=str(tmp_path / "train"), tensorboard=False, device="cpu")
    if strategy == "demo":
        from lowcomm.sim.presets import preset

        cfg.knobs["decay"] = preset("demo")["decay"]  # the simulator's preset, stated for train too
    res = train(cfg, progress=None)
    sim_curve = [(int(p["step"]), p["eval_loss"]) for p in r.curve if p["step"] > 0]
    assert sim_curve == res.eval_curve and all(math.isfinite(v) for _, v in sim_curve)
    sim_params = load_file(str(tmp_path / "sim.safetensors"))
    train_params = load_file(str(tmp_path / "train" / "final" / "replica_0.safetensors"))
    for k, v in train_params.items():  # tied embedding: saved as head.weight by one, tok_emb.weight by the other
        assert torch.equal(v, sim_params[k] if k in sim_params else sim_params["head.weight"]), k
    assert r.syncs == res.syncs


def test_train_connects_as_main_does(monkeypatch):
    """train() without a transport asks torchrun runs for the hierarchical sync when cfg.hierarchical (as main())."""
    import lowcomm.comm
    from lowcomm.train import _connect

    seen = []
    monkeypatch.setattr(lowcomm.comm, "connect", lambda *a, **k: seen.append((a, k)))
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.delenv("LOWCOMM_COORDINATOR", raising=False)
    _connect(TrainConfig(replica_size=2, hierarchical=True))
    _connect(TrainConfig(replica_size=2, hierarchical=False))
    assert seen == [((2,), {"hierarchical": True}), ((2,), {"hierarchical": False})]
    monkeypatch.delenv("RANK")
    _connect(TrainConfig())
    assert seen[-1] == ((1,), {})
