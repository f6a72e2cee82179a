"""Sharded replicas under torchrun (``torchrun --nproc-per-node 4 tests/_fsdp_worker.py OUTDIR``).

2 replicas x 2 ranks. Each scenario runs the small GPT for a few fp32 steps with FSDP2 inside the
replica and with DistributedDataParallel inside the replica, on one flat torch.distributed transport,
and records the relative max |diff| of the final weights; then a state_dict round trip mid-run (through
local shards, as a checkpoint file stores them), and the configurations lowcomm must refuse. Each rank
writes OUTDIR/rank{R}.json; tests/test_fsdp.py checks them.
"""

from __future__ import annotations

import copy
import json
import os
import sys

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import fully_shard
from torch.nn.parallel import DistributedDataParallel

import lowcomm
from lowcomm.comm.torchdist import TorchDistTransport
from lowcomm.models import GPT, GPTConfig
from lowcomm.outer.placement import localize, shard_inner_states, shard_like
from lowcomm.outer.registry import get_strategy

STEPS = 20
CFG = GPTConfig(vocab_size=32, n_layer=2, n_embd=16, n_head=2, seq_len=8)
KNOBS = {"diloco": {"sync_every": 5},
         "streaming": {"sync_every": 4, "fragments": 2, "overlap": 1, "alpha": 0.5, "codec": None},
         "noloco": {"sync_every": 5}}


def sharded_model(t, mesh=None):
    torch.manual_seed(0)
    model = GPT(CFG)
    mesh = mesh or DeviceMesh.from_group(t.replica_group, "cpu")  # the replica's ranks
    for block in model.blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def build(t, name, parallel, mesh=None, **extra):
    if parallel == "fsdp":
        model = fwd = sharded_model(t, mesh)
    else:
        torch.manual_seed(0)
        model = GPT(CFG)
        fwd = DistributedDataParallel(model, process_group=t.replica_group)
    inner = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.1)
    opt = get_strategy(name).build(inner, t, model, **{**KNOBS[name], **extra})
    return model, fwd, opt


def train(t, model, fwd, opt, steps):
    for _ in range(steps):
        g = torch.Generator().manual_seed(1000 * opt.local_step + 10 * t.replica_id + t.replica_rank)
        x = torch.randint(0, CFG.vocab_size, (2, CFG.seq_len + 1), generator=g)
        _, loss = fwd(x[:, :-1], x[:, 1:])
        loss.backward()
        opt.step()
        opt.zero_grad()


def full(model):
    return [p.full_tensor() if hasattr(p, "full_tensor") else p.detach() for p in model.parameters()]


def rel_diff(a, b):
    return max(((x - y).abs().max() / y.abs().max().clamp_min(1e-30)).item() for x, y in zip(a, b))


def refuses(fn):
    try:
        fn()
    except ValueError as e:
        return str(e)
    return ""


def main(out):
    t = TorchDistTransport.from_env(replica_size=2, timeout=60)
    res = {}
    for name in KNOBS:
        ddp = full(train_run(t, name, "ddp", STEPS))
        m, f, o = build(t, name, "fsdp")
        start = [p.clone() for p in full(m)]
        train(t, m, f, o, STEPS)
        res[f"{name}_rel_diff"] = rel_diff(full(m), ddp)
        res[f"{name}_moved"] = rel_diff(full(m), start)
        res[f"{name}_syncs"] = o.sync_count
        res[f"{name}_sharded"] = o.sharded
        # lowcomm's state is this rank's shard: half of the global weights
        res[f"{name}_anchor_elems"] = sum(a.numel() for u in o.units for a in u.anchors)
        res["params"] = sum(p.numel() for p in m.parameters())

    # A state_dict round trip mid-run (a Streaming fragment in flight at step 9), through local shards.
    m, f, o = build(t, "streaming", "fsdp")
    train(t, m, f, o, 9)
    saved = copy.deepcopy(localize({"model": m.state_dict(), "opt": o.state_dict()}))
    train(t, m, f, o, STEPS - 9)
    straight = full(m)
    m2, f2, o2 = build(t, "streaming", "fsdp")
    m2.load_state_dict(shard_like(saved["model"], m2.state_dict()))
    sd = dict(saved["opt"], inner=shard_inner_states(saved["opt"]["inner"], o2.inners))
    o2.load_state_dict(sd)
    train(t, m2, f2, o2, STEPS - 9)
    res["resume_bitwise"] = all(torch.equal(a, b) for a, b in zip(full(m2), straight))
    res["resume_other_replica_size"] = refuses(
        lambda: o2.load_state_dict(dict(sd, placement={"replica_size": 4})))

    # What lowcomm cannot serve fails at construction.
    sharded = sharded_model(t)
    res["demo"] = refuses(lambda: get_strategy("demo").build(torch.optim.SGD(sharded.parameters(), lr=0.1), t, None))
    res["sparseloco"] = refuses(lambda: get_strategy("sparseloco").build(
        torch.optim.AdamW(sharded.parameters(), lr=0.1), t, None))
    res["robust"] = refuses(lambda: lowcomm.DiLoCo(torch.optim.AdamW(sharded.parameters()), transport=t,
                                                   aggregate="clip"))
    res["muon"] = refuses(lambda: lowcomm.DiLoCo(torch.optim.Muon(
        [p for p in sharded.blocks[0].parameters() if p.dim() == 2], lr=0.1), transport=t))
    world = DeviceMesh("cpu", list(range(dist.get_world_size())))
    res["mesh_mismatch"] = refuses(lambda: build(t, "diloco", "fsdp", mesh=world))
    hier = TorchDistTransport(2, timeout=60, hierarchical=True)
    res["hierarchical"] = refuses(lambda: build(hier, "diloco", "fsdp"))
    hier.close()
    if len(sys.argv) > 2:
        res.update(train_scenario(t, sys.argv[2], out))
    # every rank has finished (no stray collectives) before the transport goes
    dist.barrier()
    with open(os.path.join(out, f"rank{dist.get_rank()}.json"), "w") as fh:
        json.dump(res, fh)
    t.close()


def train_scenario(t, corpus, out):
    """lowcomm's own loop with parallel=fsdp: equal to parallel=ddp, and a checkpoint resume is bitwise."""
    import shutil

    from lowcomm.train import TrainConfig, train
    from lowcomm.train_config import ModelConfig

    # No clipping: under FSDP the global norm is summed shard by shard (another order, so the runs
    # differ by rounding, which AdamW's first steps amplify to ~3e-5 relative in this test).
    def cfg(parallel, out_dir, steps=8, grad_clip=0.0):
        return TrainConfig(name="t", strategy="diloco", knobs={"sync_every": 3}, lr=2e-3, steps=steps,
                           batch_size=4, model=ModelConfig(n_layer=2, n_embd=16, n_head=2, seq_len=8), data=corpus,
                           eval_every=0, eval_sequences=4, checkpoint_every=4, keep_checkpoints=1, grad_clip=grad_clip,
                           replica_size=2, parallel=parallel, out_dir=out_dir, tensorboard=False, device="cpu")

    res = {}
    a = train(cfg("fsdp", os.path.join(out, "fsdp")), transport=t, progress=None).params
    b = train(cfg("ddp", os.path.join(out, "ddp")), transport=t, progress=None).params
    res["train_rel_diff"] = rel_diff(a, b)
    # resume from the step-4 checkpoint in a copy of the run folder
    if dist.get_rank() == 0:
        shutil.copytree(os.path.join(out, "fsdp", "checkpoints"), os.path.join(out, "resumed", "checkpoints"))
        shutil.copy(os.path.join(out, "fsdp", "config.json"), os.path.join(out, "resumed", "config.json"))
    dist.barrier()
    c = train(cfg("fsdp", os.path.join(out, "resumed")), transport=t, resume=True, progress=None)
    res["train_resumed_from"] = c.first_step
    res["train_resume_bitwise"] = all(torch.equal(x, y) for x, y in zip(a, c.params))
    res["train_resume_ddp"] = refuses(lambda: train(cfg("ddp", os.path.join(out, "resumed")), transport=t,
                                                    resume=True, progress=None))
    return res


def train_run(t, name, parallel, steps):
    m, f, o = build(t, name, parallel)
    train(t, m, f, o, steps)
    return m


if __name__ == "__main__":
    main(sys.argv[1])
