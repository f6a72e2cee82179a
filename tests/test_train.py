"""The training loop: torchrun (2 replicas x 2 ranks) = local transport, resume = uninterrupted, recipes."""

import json
import math
import os
import shutil
import socket
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from lowcomm.comm.local import run_local
from lowcomm.train import ModelConfig, TrainConfig, apply_overrides, load_recipe, newest_complete_checkpoint, train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

RECIPE = '''
from lowcomm.train import ModelConfig, TrainConfig


def config():
    return TrainConfig(name="t", strategy="diloco", knobs={{"sync_every": 3}}, lr=3e-3, warmup_steps=2,
                       steps=8, batch_size=4, model=ModelConfig(n_layer=1, n_embd=32, n_head=2, seq_len=32),
                       data={data!r}, eval_every=4, eval_sequences=4, log_every=4, tensorboard={tb})
'''


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A small text corpus (a few stdlib files), so every process loads it in milliseconds."""
    import textwrap as _textwrap

    d = tmp_path_factory.mktemp("corpus")
    with open(d / "text.txt", "wb") as f:
        for mod in (json, _textwrap, socket, shutil, subprocess):
            f.write(open(mod.__file__, "rb").read())
    return str(d / "text.txt")


def _recipe(tmp_path, corpus, tb=False):
    p = tmp_path / "recipe.py"
    p.write_text(RECIPE.format(data=corpus, tb=tb))
    return str(p)


def _local(recipe, out, *sets, replicas=2, resume=False):
    def work(transport):
        cfg = apply_overrides(load_recipe(recipe), [f"out_dir={out}", *sets])
        return train(cfg, transport=transport, resume=resume, progress=None)

    return run_local(replicas, work, timeout=60, join_timeout=120)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(args, timeout=120):
    """Start one torchrun launch (a process group leader, so the test can end all of it)."""
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    return subprocess.Popen([sys.executable, "-m", "torch.distributed.run", *args], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)


def _finish(procs, timeout=150):
    end = time.monotonic() + timeout
    outs = []
    try:
        for p in procs:
            out, _ = p.communicate(timeout=max(1.0, end - time.monotonic()))
            outs.append(out)
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, 9)
                p.wait(timeout=10)
    for p, out in zip(procs, outs):
        assert p.returncode == 0, out[-4000:]
    return outs


def _final(out, replica):
    return load_file(os.path.join(out, "final", f"replica_{replica}.safetensors"))


def _assert_close(a, b, tol):
    assert a.keys() == b.keys()
    worst = max(float((a[k] - b[k]).abs().max()) for k in a)
    assert worst <= tol, f"max abs difference {worst} > {tol}"
    return worst


def test_recipes_load_and_overrides(tmp_path, corpus):
    for name in sorted(os.listdir(os.path.join(ROOT, "recipes"))):
        if name.endswith(".py") and name != "train.py":
            cfg = load_recipe(os.path.join(ROOT, "recipes", name))
            cfg.validate()
            assert cfg.description, f"recipe {name} must say what it is for"
    cfg = apply_overrides(load_recipe(_recipe(tmp_path, corpus)),
                          ["steps=5", "model.n_layer=3", "knobs.sync_every=7", "amp=false"])
    assert (cfg.steps, cfg.model.n_layer, cfg.knobs["sync_every"], cfg.amp) == (5, 3, 7, False)
    with pytest.raises(ValueError, match="unknown config field"):
        apply_overrides(TrainConfig(), ["nope=1"])
    with pytest.raises(ValueError, match="key=value"):
        apply_overrides(TrainConfig(), ["steps"])
    with pytest.raises(ValueError, match="unknown strategy"):
        apply_overrides(TrainConfig(), ["strategy=bogus"]).validate()
    with pytest.raises(ValueError, match="is not a file"):
        load_recipe(str(tmp_path / "missing.py"))


def test_resume_equals_uninterrupted(tmp_path, corpus):
    recipe = _recipe(tmp_path, corpus, tb=True)
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    full = _local(recipe, a, "checkpoint_every=4")
    # What an interrupted run leaves behind: the checkpoint at step 4. Fresh workers resume from it.
    assert newest_complete_checkpoint(a, 2)[0] == 4
    shutil.copytree(os.path.join(a, "checkpoints"), os.path.join(b, "checkpoints"))
    resumed = _local(recipe, b, "checkpoint_every=4", resume=True)
    for r in range(2):
        assert resumed[r].steps == full[r].steps == 8
        for x, y in zip(full[r].params, resumed[r].params):
            assert torch.equal(x, y)
    assert full[0].eval_curve == resumed[0].eval_curve
    assert full[0].syncs == resumed[0].syncs == 2
    # The resumed workers counted the bytes sent before the checkpoint, plus their own start-up
    # broadcast of the initial weights (rank 0 sends every parameter once, then loads the checkpoint).
    n = sum(p.numel() for p in full[0].params)
    assert resumed[0].bytes_sent - full[0].bytes_sent == 4 * n
    assert full[0].final_eval_loss < 5.545  # below ln 256: it learned something in 8 steps
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(os.path.join(a, "tb")))


def test_torchrun_2x2_equals_local_transport(tmp_path, corpus):
    pytest.importorskip("lowcomm.comm.torchdist")
    recipe = _recipe(tmp_path, corpus)
    ref_dir, tr_dir, nn_dir = (str(tmp_path / n) for n in ("ref", "torchrun", "nnodes"))
    common = ["-m", "lowcomm.train", "--recipe", recipe, "--set", "replica_size=2"]
    # All launches start at once (process start-up dominates on a small machine) and are ended by _finish.
    # One launch of 4 ranks: 2 replicas x 2 ranks, DDP inside each replica, hierarchical sync across.
    procs = [_torchrun(["--nproc-per-node", "4", "--master-addr", "127.0.0.1", "--master-port", str(_free_port()),
                        *common, "--out", tr_dir])]
    # The multi-node path: two launches on localhost, one node (= one replica) each.
    port = str(_free_port())
    procs += [_torchrun(["--nnodes", "2", "--node-rank", str(n), "--nproc-per-node", "2", "--master-addr",
                         "127.0.0.1", "--master-port", port, *common, "--out", nn_dir]) for n in range(2)]
    try:
        # Local reference: 2 replicas of one rank each, the replica's batch in 2 micro-batches.
        _local(recipe, ref_dir, "grad_accum=2")
    finally:
        _finish(procs)
    ref = [_final(ref_dir, r) for r in range(2)]
    for r in range(2):
        print(f"replica {r}: torchrun vs local max abs diff {_assert_close(ref[r], _final(tr_dir, r), 1e-6):.3g}, "
              f"2 nodes vs local {_assert_close(ref[r], _final(nn_dir, r), 1e-6):.3g}")
    # Hierarchical sync: rank 0 of a replica sends the initial broadcast (4n bytes, as the reference does)
    # but only its half of every cross-replica all-reduce.
    n = sum(t.numel() for t in ref[0].values())
    sent = {d: json.load(open(os.path.join(d, "result.json")))["bytes_sent"] for d in (ref_dir, tr_dir, nn_dir)}
    assert sent[tr_dir] == sent[nn_dir] == (sent[ref_dir] + 4 * n) // 2, (sent, n)
    for r in range(2):
        # Within one transport the two launch layouts compute the same thing in the same order.
        _assert_close(_final(tr_dir, r), _final(nn_dir, r), 0.0)


def test_gpt125m_recipe_builds_and_runs_two_steps_on_cpu(tmp_path):
    import numpy as np

    from lowcomm.models import GPT, GPTConfig

    cfg = load_recipe(os.path.join(ROOT, "recipes", "gpt125m_diloco.py"))
    m = cfg.model
    with torch.device("meta"):
        model = GPT(GPTConfig(vocab_size=m.vocab_size, n_layer=m.n_layer, n_embd=m.n_embd, n_head=m.n_head,
                              seq_len=m.seq_len))
    n = sum(p.numel() for p in model.parameters())
    assert 120e6 <= n <= 130e6, n  # "125M-class" (GPT-2 small: 124M)
    tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, 200_000).astype("<u2")
    tokens.tofile(tmp_path / "train.bin")
    # Two steps on CPU: the full model, a tiny batch and context so it takes seconds.
    apply_overrides(cfg, [f"data={tmp_path / 'train.bin'}", "steps=2", "batch_size=1", "grad_accum=1",
                          "model.seq_len=16", "eval_sequences=1", "checkpoint_every=0", "device=cpu",
                          f"out_dir={tmp_path / 'out'}", "tensorboard=false"])
    res = run_local(1, lambda t: train(cfg, transport=t, progress=None), timeout=120)[0]
    assert res.steps == 2 and np.isfinite(res.final_eval_loss)
    assert sum(p.numel() for p in res.params) == n - (1024 - 16) * 768  # only the position table shrank


class _TrainEval(torch.utils.data.Dataset):
    """A user's own map-style dataset: ``split`` picks the part, items are seq_len + 1 token ids."""

    def __init__(self, seq_len, split):
        g = torch.Generator().manual_seed(0 if split == "train" else 1)
        self.rows = torch.randint(0, 50, (400 if split == "train" else 40, seq_len + 1), generator=g)

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        return self.rows[i]


def test_recipe_with_its_own_dataset(tmp_path, monkeypatch):
    """dataset="module:Name" trains through the StatefulDataLoader; without model.vocab_size it is a ValueError."""
    import types

    mod = types.ModuleType("my_recipe_data")
    mod.TrainEval = _TrainEval
    monkeypatch.setitem(sys.modules, "my_recipe_data", mod)
    cfg = TrainConfig(name="own", strategy="diloco", steps=6, batch_size=4, eval_every=3, eval_sequences=8,
                      model=ModelConfig(n_layer=1, n_embd=16, n_head=2, seq_len=8), dataset="my_recipe_data:TrainEval",
                      out_dir=str(tmp_path / "own"), tensorboard=False, knobs={"sync_every": 3})
    with pytest.raises(ValueError, match="vocab_size"):
        cfg.validate()
    cfg.model.vocab_size = 50
    r = train(cfg)
    assert r.steps == 6 and math.isfinite(r.final_eval_loss) and r.final_eval_loss < math.log(50) + 0.5
    doc = json.loads((tmp_path / "own" / "result.json").read_text())
    assert doc["environment"]["threads"] >= 1 and doc["environment"]["torch"] == torch.__version__
    assert 'id="data"' in (tmp_path / "own" / "report.html").read_text()
