"""Per-rank bytes of lowcomm's own state with FSDP2 inside each replica, for replica sizes R (issue 18).

lowcomm's own state is everything a strategy holds besides the model and the inner optimizer: global
weights, outer optimizer state, in-flight and scratch buffers, error feedback. With FSDP each rank keeps it
for its own shard only, so it falls as 1/R. For each R this launches ``torchrun`` with ``replicas x R``
ranks on CPU/gloo, builds the GPT sharded over each replica, wraps AdamW in each strategy, takes two
inner steps (a sync after each) and counts the bytes of every tensor the strategy holds on every rank.

    python benchmarks/fsdp_memory.py                       # R = 1, 2, 4; 2 replicas (8 processes at R=4)
    python benchmarks/fsdp_memory.py --sizes 1,2 --replicas 1 --n-layer 2 --n-embd 32   # a smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STRATEGIES = {"diloco": {"sync_every": 1},
              "streaming": {"sync_every": 2, "fragments": 2, "overlap": 0, "codec": "e3m0", "error_feedback": True},
              "noloco": {"sync_every": 1}}


def lowcomm_bytes(opt) -> int:
    """Bytes of the distinct tensors a strategy holds, leaving out the model and the inner optimizer."""
    import torch

    seen, storages, total = set(), set(), 0
    stack = [v for k, v in vars(opt).items() if k not in ("inner", "transport")]
    while stack:
        obj = stack.pop()
        if id(obj) in seen:
            continue
        seen.add(id(obj))
        if isinstance(obj, torch.Tensor):
            st = obj.untyped_storage()
            if (st.data_ptr(), st.nbytes()) not in storages:
                storages.add((st.data_ptr(), st.nbytes()))
                total += st.nbytes()
        elif isinstance(obj, dict):
            stack.extend(obj.values())
        elif isinstance(obj, (list, tuple)):
            stack.extend(obj)
        elif isinstance(obj, torch.optim.Optimizer):
            stack.append(obj.state)
        elif hasattr(obj, "__dict__") and type(obj).__module__.startswith("lowcomm"):
            stack.extend(v for k, v in vars(obj).items() if k != "params")  # a unit's params are the model's
    return total


def worker(args) -> None:
    import torch
    import torch.distributed as dist
    from torch.distributed.device_mesh import DeviceMesh
    from torch.distributed.fsdp import fully_shard

    from lowcomm.comm.torchdist import TorchDistTransport
    from lowcomm.models import GPT, GPTConfig
    from lowcomm.outer.placement import local_tensor
    from lowcomm.outer.registry import get_strategy

    t = TorchDistTransport.from_env(replica_size=args.bench_r, timeout=120)
    cfg = GPTConfig(vocab_size=256, n_layer=args.n_layer, n_embd=args.n_embd, n_head=4, seq_len=16)
    out = {}
    for name, knobs in STRATEGIES.items():
        torch.manual_seed(0)
        model = GPT(cfg)
        if args.bench_r > 1:
            mesh = DeviceMesh.from_group(t.replica_group, "cpu")
            for block in model.blocks:
                fully_shard(block, mesh=mesh)
            fully_shard(model, mesh=mesh)
        opt = get_strategy(name).build(torch.optim.AdamW(model.parameters(), lr=1e-3), t, model,
                                       **{**knobs, "anchor_device": args.anchor_device})
        for step in range(2):
            g = torch.Generator().manual_seed(step * 100 + t.replica_id)
            x = torch.randint(0, 256, (2, 17), generator=g)
            model(x[:, :-1], x[:, 1:])[1].backward()
            opt.step()
            opt.zero_grad()
        opt.flush()
        out[name] = lowcomm_bytes(opt)
        out["model_bytes"] = sum(local_tensor(p).numel() * p.element_size() for p in model.parameters())
    with open(os.path.join(args.bench_out, f"rank{dist.get_rank()}.json"), "w") as f:
        json.dump(out, f)
    t.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="1,2,4", help="replica sizes R to measure")
    ap.add_argument("--replicas", type=int, default=2, help="replicas (torchrun starts replicas x R processes)")
    ap.add_argument("--n-layer", type=int, default=4)
    ap.add_argument("--n-embd", type=int, default=128)
    ap.add_argument("--anchor-device", default=None, help="e.g. cpu (the same numbers on a CPU-only machine)")
    ap.add_argument("--bench-worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--bench-r", type=int, default=1, help=argparse.SUPPRESS)
    ap.add_argument("--bench-out", default="", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.bench_worker:
        return worker(args)
    rows = []
    for r in (int(x) for x in args.sizes.split(",")):
        with tempfile.TemporaryDirectory() as d, socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
            s.close()
            n = args.replicas * r
            cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(n), "--master-addr",
                   "127.0.0.1", "--master-port", str(port), os.path.abspath(__file__), "--bench-worker",
                   "--bench-r", str(r), "--bench-out", d, "--n-layer", str(args.n_layer), "--n-embd", str(args.n_embd)]
            if args.anchor_device:
                cmd += ["--anchor-device", args.anchor_device]
            env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
                       OMP_NUM_THREADS="1")
            subprocess.run(cmd, check=True, env=env, cwd=ROOT, stdout=subprocess.DEVNULL)
            res = [json.load(open(os.path.join(d, f"rank{k}.json"))) for k in range(n)]
        rows.append((r, {k: max(x[k] for x in res) for k in res[0]}))
    print(f"per-rank bytes of lowcomm's own state (largest rank), GPT {args.n_layer}x{args.n_embd}, "
          f"{args.replicas} replica(s) x R FSDP2 ranks, CPU/gloo")
    names = list(STRATEGIES)
    print("| R | model (per rank) | " + " | ".join(names) + " | " + " | ".join(f"{n} x R / R=1" for n in names) + " |")
    print("|---" * (2 + 2 * len(names)) + "|")
    base = rows[0][1]
    for r, v in rows:
        ratios = [f"{v[n] * r / (base[n] * rows[0][0]):.3f}" for n in names]
        print(f"| {r} | {v['model_bytes']:,} | " + " | ".join(f"{v[n]:,}" for n in names) + " | "
              + " | ".join(ratios) + " |")


if __name__ == "__main__":
    main()
