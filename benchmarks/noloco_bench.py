"""NoLoCo against DiLoCo on the simulator (issue 5's benchmark; results in benchmarks/README.md).

Trains, for each seed, on the default corpus with W simulated workers and equal tokens:
DiLoCo, NoLoCo, and NoLoCo without its consensus term (``consensus_lr=0``), all at the same
H. Reports the held-out loss of the averaged model and of the worst worker, the spread
between workers (RMS of ``theta_i - mean_j theta_j`` over all parameters, at every
evaluation point, which is set to the sync points), and the simulated time of one sync at
100 Mbit/s for W = 8, 64, 512: NoLoCo's pairwise exchange against DiLoCo's ring all-reduce.
Per-sync bytes come from the byte ledger of real exchanges (the model's P at W=8 and 64);
W=512 uses the ring formula those measurements confirm.

    PYTHONPATH=. nice -n 10 python3 benchmarks/noloco_bench.py --steps 300 --sync-every 25 --seeds 0 1
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time

import torch

from lowcomm.comm.local import run_local
from lowcomm.models import GPTConfig
from lowcomm.outer.noloco import noloco_groups
from lowcomm.sim.clock import Network
from lowcomm.sim.runner import SimConfig, run_strategy

RUNS = [("diloco", "diloco", {}), ("noloco", "noloco", {}), ("noloco-no-consensus", "noloco", {"consensus_lr": 0.0})]


def measure_sync_bytes(W: int, P: int) -> dict[str, int]:
    """Bytes one worker puts on the wire for one DiLoCo all-reduce and one NoLoCo pair exchange of P fp32."""

    def fn(t):
        x = torch.ones(P)
        t.all_reduce([x], op="mean").wait(600)
        group = next(g for g in noloco_groups(t.members(), 2, 0, 1) if t.rank in g)
        t.group_reduce(group, [x], op="mean").wait(600)
        return {r.kind: r.bytes_sent for r in t.ledger.records}

    out = run_local(W, fn, timeout=600)
    return {"all_reduce": max(o["all_reduce"] for o in out), "group_reduce": max(o["group_reduce"] for o in out)}


def sync_time_table(P: int, bandwidth: float, latency: float, measure: tuple[int, ...], formula: tuple[int, ...],
                    project_params: float) -> list[dict]:
    net = Network(bandwidth, latency)
    rows = []
    for W in (*measure, *formula):
        # Ring all-reduce as the ledger counts it: a worker sends the W-1 shards it does not own
        # (reduce-scatter) and its own reduced shard to W-1 peers (all-gather); the busiest owns
        # a shard of ceil(P/W): 4 * (P + (W-2) * ceil(P/W)) bytes, i.e. about 2(W-1)/W * 4P.
        ring = 4 * (P + (W - 2) * math.ceil(P / W))
        if W in measure:
            b = measure_sync_bytes(W, P)
            assert b["all_reduce"] == ring and b["group_reduce"] == 4 * P, (W, b, ring)
            src = "ledger"
        else:
            b = {"all_reduce": ring, "group_reduce": 4 * P}
            src = "formula"
        scale = project_params / P
        rows.append({
            "W": W, "bytes_source": src,
            "diloco_bytes": b["all_reduce"], "noloco_bytes": b["group_reduce"],
            "diloco_s": net.seconds("all_reduce", W, b["all_reduce"]),
            "noloco_s": net.seconds("group_reduce", 2, b["group_reduce"]),
            "diloco_s_proj": net.seconds("all_reduce", W, int(b["all_reduce"] * scale)),
            "noloco_s_proj": net.seconds("group_reduce", 2, int(b["group_reduce"] * scale)),
        })
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workers", type=int, default=8)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--sync-every", type=int, default=25)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--n-layer", type=int, default=2)
    ap.add_argument("--n-embd", type=int, default=64)
    ap.add_argument("--n-head", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--eval-sequences", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--latency", type=float, default=0.01, help="seconds per round (the simulator's default)")
    ap.add_argument("--project-params", type=float, default=1e9, help="model size for the projected sync time")
    ap.add_argument("--runs", nargs="+", default=[r[0] for r in RUNS], help="subset of " + str([r[0] for r in RUNS]))
    ap.add_argument("--skip-train", action="store_true", help="only the sync-time table")
    ap.add_argument("--out", default="runs/noloco_bench.json")
    args = ap.parse_args(argv)

    model = GPTConfig(n_layer=args.n_layer, n_embd=args.n_embd, n_head=args.n_head, seq_len=args.seq_len)
    results: dict[str, list[dict]] = {}
    P = None
    t0 = time.monotonic()
    if not args.skip_train:
        for seed in args.seeds:
            for label, strat, extra in RUNS:
                if label not in args.runs:
                    continue
                cfg = SimConfig(workers=args.workers, steps=args.steps, batch_size=args.batch_size, model=model,
                                lr=args.lr, seed=seed, eval_every=args.sync_every,
                                eval_sequences=args.eval_sequences, threads=args.threads,
                                bandwidths=(100e6,), latency=args.latency, warmup_steps=min(20, args.steps // 10))
                # the lr is the benchmark's for every strategy (equal settings), H the same for all
                res = run_strategy(strat, cfg, {"sync_every": args.sync_every, "lr": args.lr, **extra})
                P = res.params
                row = {"seed": seed, "final_eval_loss": res.final_eval_loss,
                       "worst_worker_eval_loss": res.worst_worker_eval_loss, "syncs": res.syncs,
                       "peak_bytes": res.peak_bytes, "bytes_sent": res.bytes_sent,
                       "sim_seconds_100Mbit": res.sim_seconds.get("100Mbit"),
                       "curve": [{k: pt.get(k) for k in ("step", "eval_loss", "spread")} for pt in res.curve]}
                results.setdefault(label, []).append(row)
                print(f"[{time.monotonic() - t0:.0f}s] seed {seed} {label}: held-out {res.final_eval_loss:.4f} "
                      f"worst worker {res.worst_worker_eval_loss:.4f} peak bytes/sync {res.peak_bytes}",
                      flush=True)
    if P is None:
        from lowcomm.models import GPT

        P = sum(p.numel() for p in GPT(GPTConfig(**{**model.__dict__, "vocab_size": 256})).parameters())
    table = sync_time_table(P, 100e6, args.latency, (8, 64), (512,), args.project_params)

    # ---- report ----
    print(f"\nW={args.workers}, {args.steps} steps, H={args.sync_every}, P={P}, seeds {args.seeds}, "
          f"batch {args.batch_size} x {args.seq_len} tokens per worker step")
    if results:
        print("\n| run | held-out loss, averaged model | worst worker | vs DiLoCo (avg / worst) |")
        print("|---|---|---|---|")
        base = results.get("diloco")
        for label, rows in results.items():
            avg = statistics.mean(r["final_eval_loss"] for r in rows)
            worst = statistics.mean(r["worst_worker_eval_loss"] for r in rows)
            rel = ""
            if base:
                bavg = statistics.mean(r["final_eval_loss"] for r in base)
                bworst = statistics.mean(r["worst_worker_eval_loss"] for r in base)
                rel = f"{100 * (avg / bavg - 1):+.2f}% / {100 * (worst / bworst - 1):+.2f}%"
            per_seed = ", ".join(f"{r['final_eval_loss']:.4f}/{r['worst_worker_eval_loss']:.4f}" for r in rows)
            print(f"| {label} | {avg:.4f} | {worst:.4f} | {rel} |  (per seed avg/worst: {per_seed})")
        print("\nspread between workers (RMS of theta_i - mean), mean over seeds, at sync points:")
        labels = list(results)
        steps = [pt["step"] for pt in results[labels[0]][0]["curve"]]
        print("| step | " + " | ".join(labels) + " |")
        print("|---|" + "---|" * len(labels))
        for i, st in enumerate(steps):
            cells = []
            for lab in labels:
                vals = [r["curve"][i].get("spread") for r in results[lab] if i < len(r["curve"])]
                vals = [v for v in vals if v is not None]
                cells.append(f"{statistics.mean(vals):.2e}" if vals else "n/a")
            print(f"| {st} | " + " | ".join(cells) + " |")
    print(f"\none sync at 100 Mbit/s, {args.latency * 1e3:g} ms per round (simulator's network model); "
          f"P={P} fp32, and projected to {args.project_params:g} parameters:")
    print("| W | bytes from | DiLoCo ring bytes/worker | NoLoCo pair bytes/worker | DiLoCo s | NoLoCo s | "
          f"DiLoCo s ({args.project_params:g}) | NoLoCo s ({args.project_params:g}) |")
    print("|---|---|---|---|---|---|---|---|")
    for r in table:
        print(f"| {r['W']} | {r['bytes_source']} | {r['diloco_bytes']} | {r['noloco_bytes']} | {r['diloco_s']:.3f} | "
              f"{r['noloco_s']:.3f} | {r['diloco_s_proj']:.1f} | {r['noloco_s_proj']:.1f} |")
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"args": vars(args), "params": P, "runs": results, "sync_time": table}, f, indent=1)
    print(f"\nwrote {args.out} ({time.monotonic() - t0:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
