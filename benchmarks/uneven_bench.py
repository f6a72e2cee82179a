"""Uneven workers (issue 14's benchmark): 4 DiLoCo workers, one 3x slower, equal simulated wall-clock.

Each worker's step takes ``--step-seconds / speed`` simulated seconds (speeds ``1,1,1,0.33``); every
variant gets the wall-clock of ``--budget`` steps of a fast worker (``lowcomm.sim.uneven``):

(a) ``tokens``: ``sync_tokens = W x H x tokens per step`` (the N of DiLoCo with H); syncs are called
    by the group's tokens and each worker's pseudo-gradient is weighted by its tokens (cap 2/W).
(b) ``miss``: today's miss-and-catch-up over ZeroMQ. The slow worker needs 3H fast-step times for
    its H steps, so it misses every sync and each catch-up from a snapshot throws its work away:
    the model is trained by the three fast workers alone, which is (d). The simulator's local
    transport has no misses, so (b) is reported as (d)'s figures (said so in the output).
(c) ``wait``: DiLoCo with H, everyone waits for the slowest at every sync: ``budget x 0.33`` steps.
(d) ``drop``: the three fast workers alone, DiLoCo with H, ``budget`` steps.

Held-out loss of the final model, mean and standard deviation over ``--seeds``; the simulated
wall-clock of each run at 1 Gbit/s is printed beside it (each at most the budget plus communication).

Full run (on an idle machine; the model is ``lowcomm sim``'s default):

    PYTHONPATH=. nice -n 10 python3 benchmarks/uneven_bench.py --budget 300 --sync-every 30 --seeds 0 1 2 \\
        --out runs/uneven.json

Smoke (seconds): ``PYTHONPATH=. python3 benchmarks/uneven_bench.py --budget 12 --sync-every 3 --seeds 0 1 --tiny``
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from typing import Any

from lowcomm.models import GPTConfig
from lowcomm.sim.cli import DEFAULT_MODEL
from lowcomm.sim.runner import SimConfig, run_strategy

TINY = GPTConfig(n_layer=1, n_embd=16, n_head=2, seq_len=16)
SLOW = 0.33


def run(args, variant: str, seed: int) -> dict[str, Any]:
    model = TINY if args.tiny else DEFAULT_MODEL
    batch = 2 if args.tiny else 16
    workers, speeds, steps = 4, (1, 1, 1, SLOW), args.budget
    knobs: dict[str, Any] = {"sync_every": args.sync_every}
    if variant == "tokens":
        knobs = {"sync_tokens": 4 * args.sync_every * batch * model.seq_len}
    elif variant == "wait":
        steps = max(1, int(args.budget * SLOW))
    elif variant == "drop":
        workers, speeds = 3, None
    cfg = SimConfig(workers=workers, steps=steps, batch_size=batch, model=model, seed=seed,
                    eval_every=max(1, steps), eval_sequences=8 if args.tiny else 64, threads=args.threads,
                    bandwidths=(1e9,), warmup_steps=max(1, steps // 15), step_seconds=args.step_seconds,
                    speeds=speeds)
    t0 = time.monotonic()
    r = run_strategy("diloco", cfg, knobs)
    row = {"variant": variant, "seed": seed, "final_eval_loss": r.final_eval_loss, "syncs": r.syncs,
           "tokens": r.tokens, "sim_seconds": r.sim_seconds["1Gbit"], "seconds": time.monotonic() - t0}
    print(f"  {variant:6s} seed {seed}: held-out {r.final_eval_loss:.4f}  syncs {r.syncs}  tokens {r.tokens:,}  "
          f"simulated {row['sim_seconds']:.1f} s ({row['seconds']:.0f} s)", flush=True)
    return row


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--budget", type=int, default=300, help="wall-clock budget in fast-worker steps (default 300)")
    p.add_argument("--sync-every", type=int, default=30, help="H of DiLoCo (default 30)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--step-seconds", type=float, default=1.0, help="simulated compute of a fast step (default 1)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--tiny", action="store_true", help="a tiny model (smoke)")
    p.add_argument("--out", default=None, help="write the rows and the summary as JSON here")
    args = p.parse_args(argv)
    rows = [run(args, v, s) for v in ("tokens", "wait", "drop") for s in args.seeds]
    summary = {}
    print("\n| variant | held-out loss (mean +- std over seeds) | simulated s |\n|---|---|---|")
    for v, label in (("tokens", "(a) token-weighted syncs"), ("miss", "(b) miss and catch up (= (d), see doc)"),
                     ("wait", "(c) wait for the slowest"), ("drop", "(d) leave the slow worker out")):
        got = [r for r in rows if r["variant"] == ("drop" if v == "miss" else v)]
        losses = [r["final_eval_loss"] for r in got]
        sd = statistics.stdev(losses) if len(losses) > 1 else 0.0
        summary[v] = {"mean": statistics.fmean(losses), "std": sd,
                      "sim_seconds": statistics.fmean(r["sim_seconds"] for r in got)}
        print(f"| {label} | {summary[v]['mean']:.4f} +- {sd:.4f} | {summary[v]['sim_seconds']:.1f} |")
    best = min(("tokens", "wait", "drop"), key=lambda v: summary[v]["mean"])
    for v in ("wait", "drop"):
        margin = summary[v]["mean"] - summary["tokens"]["mean"]
        spread = max(summary[v]["std"], summary["tokens"]["std"])
        print(f"(a) vs {v}: {margin:+.4f} nats (largest seed std {spread:.4f})")
    print(f"best: {best}")
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump({"args": vars(args), "rows": rows, "summary": summary}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
