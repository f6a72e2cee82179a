"""Scenarios for tests/test_torchdist.py, run both on the local transport (threads) and as
torch.distributed processes (``python tests/_torchdist_worker.py SCENARIO OUTDIR`` with
torchrun's variables set). Each scenario returns a dict of tensors plus a dict of JSON
values; the process entry point writes them to OUTDIR/rank{R}.safetensors / .json."""

from __future__ import annotations

import json
import os
import sys
import threading
import time

import torch

import lowcomm
from lowcomm.codecs import Codec

# ---- small codecs written for the tests (the real ones live in lowcomm.codecs) -------------------


class Bf16Cast(Codec):
    """Round to bfloat16 on the wire."""

    name = "test-bf16"

    def encode(self, x):
        return [x.to(torch.bfloat16)]

    def decode(self, parts, numel):
        return parts[0].to(torch.float32)


class BlockInt8(Codec):
    """Blockwise absmax int8: one fp32 scale per block of 16 values."""

    name = "test-int8"
    block = 16

    def encode(self, x):
        n = x.numel()
        pad = (-n) % self.block
        xp = torch.cat([x, x.new_zeros(pad)]).view(-1, self.block)
        scale = xp.abs().amax(dim=1).clamp_min(1e-12) / 127.0
        codes = torch.round(xp / scale[:, None]).clamp(-127, 127).to(torch.int8)
        return [codes.view(-1), scale]

    def decode(self, parts, numel):
        codes, scale = parts
        return (codes.view(-1, self.block).to(torch.float32) * scale[:, None]).view(-1)[:numel]


# ---- models and data shared by both runs ---------------------------------------------------------


_INIT_LOCK = threading.Lock()  # local workers are threads sharing torch's global RNG


def make_model(seed=0):
    with _INIT_LOCK:
        torch.manual_seed(seed)
        return torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))


def batch(replica, part, step, n=5):
    g = torch.Generator().manual_seed(100_000 * step + 100 * replica + part)
    return torch.randn(n, 6, generator=g), torch.randn(n, 3, generator=g)


def flat(params):
    return torch.cat([p.detach().reshape(-1).float() for p in params])


def ledger_rows(ledger):
    return [[r.kind, r.bytes_sent, {str(k): v for k, v in sorted(r.bytes_by_peer.items())}] for r in ledger.records]


STEPS, H = 12, 3


def diloco_run(t, model, get_batch, tag, inner_cls=torch.optim.AdamW):
    """AdamW inner, default Nesterov outer, H=3, 4 syncs; records the global params after every sync."""
    opt = lowcomm.DiLoCo(inner_cls(model.parameters(), lr=1e-2), transport=t, sync_every=H, strict=True)
    out = {}
    for step in range(STEPS):
        opt.zero_grad()
        x, y = get_batch(step)
        ((model(x) - y) ** 2).mean().backward()
        opt.step()
        if opt.local_step % H == 0:
            out[f"{tag}/anchors{opt.sync_count}"] = flat(opt.units[0].anchors)
    out[f"{tag}/params"] = flat(model.parameters())
    return out


def sparseloco_run(t, model, get_batch):
    """SparseLoCo (2-bit top-3 of chunks of 4), H=3: all-gathers only, so gloo gives the local bits."""
    opt = lowcomm.SparseLoCo(torch.optim.AdamW(model.parameters(), lr=1e-2), transport=t, sync_every=H, topk=3,
                             chunk=4, strict=True)
    for step in range(STEPS):
        opt.zero_grad()
        x, y = get_batch(step)
        ((model(x) - y) ** 2).mean().backward()
        opt.step()
    return {"sparse/params": flat(model.parameters()), "sparse/error": opt._error.clone()}


# ---- scenarios -----------------------------------------------------------------------------------


def scenario_two(t):
    """2 members: DiLoCo, all_gather of variable sizes, codecs, broadcast, bf16 sum."""
    r = t.rank
    out = diloco_run(t, make_model(), lambda step: batch(r, 0, step), "diloco")
    out.update(sparseloco_run(t, make_model(), lambda step: batch(r, 0, step)))
    meta = {"ledger": ledger_rows(t.ledger)}
    payload = [torch.arange(r + 2, dtype=torch.float32) * (r + 1), torch.full((r + 1, 2), r, dtype=torch.int64)]
    got = t.all_gather(payload).wait(60)
    for m, parts in enumerate(got):
        for i, p in enumerate(parts):
            out[f"gather/{m}/{i}"] = p
    g = torch.Generator().manual_seed(7 + r)
    for codec in (Bf16Cast(), BlockInt8(), "int8", "int4"):  # test codecs, then lowcomm's own
        name = codec if isinstance(codec, str) else codec.name
        x = [torch.randn(37, generator=g), torch.randn(3, 5, generator=g).to(torch.bfloat16)]
        t.all_reduce(x, op="mean", codec=codec).wait(60)
        out[f"q/{name}/0"], out[f"q/{name}/1"] = x
    b = [torch.full((4,), float(r)), torch.full((2,), r, dtype=torch.int32)]
    t.broadcast(b, src=1).wait(60)
    out["bcast/0"], out["bcast/1"] = b
    s = [torch.randn(33, generator=g).to(torch.bfloat16)]
    t.all_reduce(s, op="sum").wait(60)
    out["sum/bf16"] = s[0]
    for rule, codec in (("clip", None), ("centered_clip", None), ("clip", "int8")):  # robust aggregation
        x = [torch.randn(37, generator=g) * (1 + 5 * r), torch.randn(3, 5, generator=g).to(torch.bfloat16)]
        center = [torch.full((37,), 0.5), torch.zeros(3, 5, dtype=torch.bfloat16)]
        t.all_reduce(x, codec=codec, aggregate=rule, center=center if rule == "centered_clip" else None).wait(60)
        out[f"robust/{rule}/{codec}/0"], out[f"robust/{rule}/{codec}/1"] = x
    meta["ledger_all"] = ledger_rows(t.ledger)
    return out, meta


def scenario_four_members(t):
    """4 members: group_reduce in two disjoint pairs and a triple, int8 codec all_reduce, all_gather."""
    r = t.rank
    out = {}
    x = [torch.full((5,), float(r + 1)), torch.arange(3, dtype=torch.float64) * r]
    pair = [0, 2] if r in (0, 2) else [1, 3]
    t.group_reduce(pair, x, op="mean").wait(60)
    out["pair/0"], out["pair/1"] = x
    y = [torch.full((4,), float(r) ** 2)]
    # member 2 reduces in a group of its own, so that all members keep issuing operations in step
    t.group_reduce([0, 1, 3] if r != 2 else [2], y, op="sum").wait(60)
    out["triple"] = y[0]
    g = torch.Generator().manual_seed(11 + r)
    q = [torch.randn(103, generator=g)]
    t.all_reduce(q, op="mean", codec=BlockInt8()).wait(60)
    out["q4"] = q[0]
    q = [torch.randn(1000, generator=g)]
    t.all_reduce(q, op="mean", codec="int8").wait(60)
    out["q4int8"] = q[0]
    got = t.all_gather([torch.randn(r * 3, generator=g)]).wait(60)
    for m, parts in enumerate(got):
        out[f"gather4/{m}"] = parts[0]
    return out, {"ledger": ledger_rows(t.ledger)}


def replica_batch(replica, step):
    """The batch a whole replica sees: its two ranks' batches concatenated."""
    xs, ys = zip(*(batch(replica, part, step) for part in range(2)))
    return torch.cat(xs), torch.cat(ys)


def scenario_local_replicas(t):
    """The local reference for 2 replicas x 2 ranks: one worker per replica on the concatenated batch."""
    return diloco_run(t, make_model(), lambda step: replica_batch(t.rank, step), "ddp"), {}


def ddp_run(t, tag):
    """Data parallelism inside the replica by hand (what DDP does: average the gradients over
    ``replica_group``; DDP itself works too but importing it costs seconds per process)."""
    import torch.distributed as dist

    model = make_model()
    rid, rr = t.replica_id, t.replica_rank

    class AveragingAdamW(torch.optim.AdamW):
        def step(self, closure=None):
            grads = [p.grad for g in self.param_groups for p in g["params"]]
            buf = torch.cat([g.reshape(-1) for g in grads])
            dist.all_reduce(buf, group=t.replica_group)
            buf /= t.replica_size
            torch._foreach_copy_(grads, [b.view_as(g) for b, g in zip(buf.split([g.numel() for g in grads]), grads)])
            return super().step(closure)

    return diloco_run(t, model, lambda step: batch(rid, rr, step), tag, inner_cls=AveragingAdamW)


# ---- process entry point -------------------------------------------------------------------------


def main(scenario, outdir):
    from lowcomm.comm.base import CommError
    from lowcomm.comm.torchdist import TorchDistTransport

    rank = int(os.environ["RANK"])
    out, meta = {}, {}
    if scenario == "two":
        t = lowcomm.connect(timeout=60)
        out, meta = scenario_two(t)
        meta["repr"] = repr(t)
        native = TorchDistTransport(1, timeout=60, native_all_reduce=True)
        native_vs_p2p(t, native, out, meta)
        for name, tr in (("native", native), ("hierarchical", TorchDistTransport(1, timeout=60, hierarchical=True))):
            try:  # a robust rule where the transport cannot apply it: ValueError at construction, no collective
                lowcomm.DiLoCo(torch.optim.SGD(make_model().parameters(), lr=0.1), transport=tr, aggregate="clip")
                meta[f"{name}_robust"] = "accepted"
            except ValueError as e:
                meta[f"{name}_robust"] = str(e)
        save(outdir, rank, out, meta)
        # a member that stalls: rank 0 times out at its deadline, then rank 1 fails too
        meta["stall"] = stall_run(TorchDistTransport(1, timeout=3), rank, outdir)
        save(outdir, rank, out, meta)
        # then rank 1 dies mid-run on a fresh transport: rank 0 must fail clearly, not hang
        meta["die"] = die_run(TorchDistTransport(1, timeout=20), rank)
    elif scenario == "four":
        t = TorchDistTransport.from_env(replica_size=2, timeout=60)
        out.update(ddp_run(t, "ddp"))
        meta["flat_ledger"] = ledger_rows(t.ledger)
        th = TorchDistTransport(2, timeout=60, hierarchical=True)
        out.update(ddp_run(th, "hier"))
        meta["hier_ledger"] = ledger_rows(th.ledger)
        meta["hier_replica_ledger"] = ledger_rows(th.replica_ledger)
        # mixed dtypes and a codec on the hierarchical path (same tensors inside a replica)
        g = torch.Generator().manual_seed(5 + t.replica_id)
        xs = [torch.randn(41, generator=g), torch.randn(3, 7, generator=g).to(torch.bfloat16)]
        for name, tr, codec in (("flat", t, None), ("hier", th, None), ("hierq", th, "int8")):
            ys = [x.clone() for x in xs]
            tr.all_reduce(ys, codec=codec).wait(60)
            out[f"hmix/{name}/0"], out[f"hmix/{name}/1"] = ys
        t1 = TorchDistTransport(1, timeout=60)
        o, m = scenario_four_members(t1)
        native_vs_p2p(t1, TorchDistTransport(1, timeout=60, native_all_reduce=True), out, meta)
        # member 2 sits a group_reduce out; the next collective still lines up
        z = [torch.full((2,), float(t1.rank))]
        if t1.rank != 2:
            t1.group_reduce([0, 1, 3], z, op="sum").wait(60)  # 0 + 1 + 3 = 4
        t1.all_reduce(z, op="sum").wait(60)  # 4 + 4 + 2 + 4 = 14
        out["skip"] = z[0]
        out.update(o)
        meta["members4"] = m
        meta["ids"] = [t.rank, t.replica_id, t.replica_rank, t.num_replicas, t.world_size, t1.rank, t1.world_size]
    elif scenario == "init-timeout":
        t0 = time.monotonic()
        try:
            TorchDistTransport.from_env(timeout=3)
            meta["error"] = None
        except CommError as e:
            meta.update(error=type(e).__name__, message=str(e), seconds=time.monotonic() - t0)
        os.makedirs(outdir, exist_ok=True)
        with open(os.path.join(outdir, f"rank{rank}.json"), "w") as f:
            json.dump(meta, f)
        os._exit(0)  # do not wait for a store that nobody joins
    else:
        raise SystemExit(f"unknown scenario {scenario}")
    save(outdir, rank, out, meta)


def native_vs_p2p(t, tn, out, meta):
    """The same mixed-dtype mean through lowcomm's p2p all_reduce and through gloo's ring."""
    g = torch.Generator().manual_seed(3 + t.rank)
    xs = [torch.randn(37, generator=g), torch.randn(3, 5, generator=g).to(torch.bfloat16)]
    for name, tr in (("p2p", t), ("ring", tn)):
        ys = [x.clone() for x in xs]
        tr.all_reduce(ys).wait(60)
        out[f"native/{name}/0"], out[f"native/{name}/1"] = ys
    meta["native_ledger"] = ledger_rows(tn.ledger)


def save(outdir, rank, out, meta):
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in out.items()}, os.path.join(outdir, f"rank{rank}.safetensors"))
    with open(os.path.join(outdir, f"rank{rank}.json"), "w") as f:
        json.dump(meta, f)


def stall_run(t, rank, outdir):
    from lowcomm.comm.base import CommError

    flag = os.path.join(outdir, "rank0-timed-out")
    t0 = time.monotonic()
    if rank == 1:  # take no part until rank 0 has given up (bounded wait)
        while not os.path.exists(flag) and time.monotonic() - t0 < 60:
            time.sleep(0.05)
    t0 = time.monotonic()
    try:
        t.all_reduce([torch.ones(4)]).wait(30)
        res = {"error": None}
    except CommError as e:
        res = {"error": type(e).__name__, "message": str(e), "seconds": time.monotonic() - t0}
    if rank == 0:
        open(flag, "w").close()
    return res


def die_run(t, rank):
    from lowcomm.comm.base import CommError
    from lowcomm.comm.torchdist import TransportFailed

    meta = {}
    model = make_model()
    opt = lowcomm.DiLoCo(torch.optim.SGD(model.parameters(), lr=0.1), transport=t, sync_every=2)
    t0 = time.monotonic()
    try:
        for step in range(6):
            if rank == 1 and step == 3:
                os._exit(3)  # dies between the first and the second sync
            t0 = time.monotonic()
            opt.zero_grad()
            x, y = batch(rank, 0, step)
            ((model(x) - y) ** 2).mean().backward()
            opt.step()
        meta["error"] = None
    except (TransportFailed, CommError) as e:
        meta.update(error=type(e).__name__, message=str(e), cause=repr(e.__cause__),
                    seconds=time.monotonic() - t0, failed_syncs=opt.failed_syncs, sync_count=opt.sync_count)
        try:
            t.all_reduce([torch.zeros(2)])
            meta["after"] = "no error"
        except TransportFailed as e2:
            meta["after"] = type(e2).__name__
    return meta


if __name__ == "__main__":
    torch.set_num_threads(1)
    main(sys.argv[1], sys.argv[2])
