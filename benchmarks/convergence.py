"""Convergence benchmark: held-out loss, bytes and simulated wall-clock of strategies vs ``ddp``.

Runs the simulator (:func:`lowcomm.sim.run_strategy`) on the DESIGN 9 calibration setting
(0.84M-parameter GPT: 4 layers, width 128, 4 heads, context 128; batch 16 per worker; AdamW
1e-3 with warmup and cosine decay; the stdlib corpus) for a list of run specs and seeds, and
appends one JSON line per finished run to ``OUT/runs.jsonl`` (so a long sweep can be cut
into several commands and resumed). ``--report`` turns any number of those files into the
Markdown table of benchmarks/README.md and a plot.

Run specs (``--runs``, comma-separated; knobs after a colon, joined with ``+``):

* ``ddp``, ``diloco``, ``fedavg``, ``noloco``, ... any registered strategy, e.g.
  ``diloco:sync_every=25``, ``diloco:sync_every=50+outer_lr=0.5+outer_momentum=0.8``
* ``single``: one worker alone (``ddp`` with W=1), the same number of steps and batch.

``--warm-start N`` first trains ``ddp`` for N steps, saves its model, and starts every run
from it (the DiLoCo paper starts from a pretrained checkpoint).

Examples::

    nice -n 10 python3 benchmarks/convergence.py --steps 400 --seeds 0 \\
        --runs ddp,single,diloco:sync_every=50,fedavg:sync_every=50 --out benchmarks/results/s400
    python3 benchmarks/convergence.py --report benchmarks/results/s400
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import lowcomm  # noqa: E402,F401 - registers the built-in strategies
from lowcomm.models import GPTConfig  # noqa: E402
from lowcomm.sim.report import format_bytes, format_seconds  # noqa: E402
from lowcomm.sim.runner import Projection, SimConfig, run_strategy  # noqa: E402

CALIBRATION = GPTConfig(n_layer=4, n_embd=128, n_head=4, seq_len=128)
MODELS = {
    "calibration": CALIBRATION,  # DESIGN 9: 0.84M parameters
    "small": GPTConfig(n_layer=4, n_embd=64, n_head=4, seq_len=64),  # lowcomm sim's default: 0.22M, ~4x cheaper
}


def parse_spec(spec: str) -> tuple[str, str, dict]:
    """``"diloco:sync_every=25+outer_lr=0.5"`` -> (label, strategy, knobs)."""
    name, _, rest = spec.partition(":")
    knobs = {}
    for kv in filter(None, rest.split("+")):
        k, _, v = kv.partition("=")
        if not _:
            raise ValueError(f"bad knob {kv!r} in run spec {spec!r}; use key=value")
        knobs[k] = v  # parsed against the knob's type by the strategy's config
    return spec, name, knobs


def run(args: argparse.Namespace) -> None:
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "runs.jsonl")
    done = set()
    if os.path.exists(path):
        with open(path) as f:
            for line in f:
                d = json.loads(line)
                done.add((d["spec"], d["seed"], d["steps"], d.get("warm_start", 0)))
    for seed in [int(s) for s in args.seeds.split(",")]:
        init = None
        if args.warm_start:
            init = os.path.join(args.out, f"warm_ddp_{args.warm_start}_seed{seed}.safetensors")
            if not os.path.exists(init):
                print(f"warm start: ddp for {args.warm_start} steps (seed {seed})", flush=True)
                cfg = make_cfg(args, seed, args.warm_start, 4)
                cfg.save_state = init
                run_strategy("ddp", cfg)
        for spec in args.runs.split(","):
            label, name, knobs = parse_spec(spec)
            if (label, seed, args.steps, args.warm_start) in done:
                print(f"skip {label} seed {seed} (already in {path})", flush=True)
                continue
            workers = 1 if name == "single" else args.workers
            strategy = "ddp" if name == "single" else name
            cfg = make_cfg(args, seed, args.steps, workers)
            cfg.init_state = init
            t0 = time.monotonic()
            r = run_strategy(strategy, cfg, knobs,
                             progress=(lambda s, lab=label, sd=seed: print(f"{lab} seed {sd}: {s}", flush=True)))
            d = r.to_dict()
            d.update(spec=label, seed=seed, warm_start=args.warm_start, model=args.model, wall=time.monotonic() - t0,
                     machine=machine())
            with open(path, "a") as f:
                f.write(json.dumps(d) + "\n")
            print(f"{label} seed {seed}: final held-out {r.final_eval_loss:.4f} ({d['wall']:.0f} s)", flush=True)


def make_cfg(args, seed, steps, workers) -> SimConfig:
    return SimConfig(workers=workers, steps=steps, batch_size=16, model=MODELS[args.model], lr=args.lr,
                     warmup_steps=max(1, steps // 20), seed=seed, data=args.data, eval_every=args.eval_every,
                     eval_sequences=128, threads=2, projection=Projection(params=1e9))


def machine() -> str:
    import platform

    import torch

    return f"{platform.machine()} {os.cpu_count()} cpu, torch {torch.__version__}, {platform.python_version()}"


def report(dirs: list[str], plot_path: str | None) -> str:
    rows = []
    for d in dirs:
        with open(os.path.join(d, "runs.jsonl")) as f:
            rows += [json.loads(line) for line in f]
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        r.setdefault("model", "calibration")
        groups.setdefault((r["model"], r["steps"], r.get("warm_start", 0), r["spec"]), []).append(r)
    ddp = {(r["model"], r["steps"], r.get("warm_start", 0), r["seed"]): r for r in rows if r["spec"] == "ddp"}
    out = ["| model | steps | warm start | run | seeds | held-out loss (mean) | vs ddp, same seed | bytes/worker | "
           "vs ddp | time @10 Mbit/s | vs ddp | time @100 Mbit/s | 1B projection @100 Mbit/s |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for (model, steps, warm, spec), rs in sorted(groups.items(), key=lambda kv: (kv[0][0], kv[0][1], kv[0][2],
                                                                                 kv[0][3] != "ddp", kv[0][3])):
        seeds = sorted(r["seed"] for r in rs)
        loss = statistics.mean(r["final_eval_loss"] for r in rs)
        rel = [100 * (r["final_eval_loss"] / ddp[(model, steps, warm, r["seed"])]["final_eval_loss"] - 1)
               for r in rs if (model, steps, warm, r["seed"]) in ddp]
        base = [ddp[(model, steps, warm, r["seed"])] for r in rs if (model, steps, warm, r["seed"]) in ddp]
        b = statistics.mean(r["bytes_sent"] for r in rs)
        t10 = statistics.mean(r["sim_seconds"]["10Mbit"] for r in rs)
        t100 = statistics.mean(r["sim_seconds"]["100Mbit"] for r in rs)
        proj = [r["projection"]["sim_seconds"]["100Mbit"] for r in rs if r.get("projection")]
        rel_s = "" if spec == "ddp" or not rel else (
            f"{statistics.mean(rel):+.1f}% ({', '.join(f'{x:+.1f}' for x in rel)})")
        bratio = "" if spec == "ddp" or not base or b == 0 else \
            f"{statistics.mean(x['bytes_sent'] for x in base) / b:.0f}x fewer"
        tratio = "" if spec == "ddp" or not base else \
            f"{statistics.mean(x['sim_seconds']['10Mbit'] for x in base) / t10:.1f}x shorter"
        out.append(f"| {model} | {steps} | {warm or ''} | {spec} | {','.join(map(str, seeds))} | {loss:.4f} | "
                   f"{rel_s} | {format_bytes(b)} | {bratio} | {format_seconds(t10)} | {tratio} | "
                   f"{format_seconds(t100)} | {format_seconds(statistics.mean(proj)) if proj else ''} |")
    if plot_path:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(8, 5))
        for i, ((model, steps, warm, spec), rs) in enumerate(sorted(groups.items())):
            r = min(rs, key=lambda x: x["seed"])
            pts = [p for p in r["curve"] if p["step"] > 0 and math.isfinite(p["eval_loss"])]
            # distinct colours; dashed: warm start, dotted: the calibration model
            style = ":" if model == "calibration" else ("--" if warm else "-")
            ax.plot([p["step"] for p in pts], [p["eval_loss"] for p in pts], style, color=plt.cm.tab20(i % 20),
                    label=f"{spec} ({model}, {steps} steps{', warm' if warm else ''}, seed {r['seed']})")
        ax.set_xlabel("inner steps per worker")
        ax.set_ylabel("held-out loss (nats/byte)")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(plot_path, dpi=110)
    return "\n".join(out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", default="ddp,single,diloco:sync_every=25,diloco:sync_every=50,diloco:sync_every=100,"
                                     "fedavg:sync_every=50")
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--model", choices=sorted(MODELS), default="calibration",
                   help="calibration: 0.84M GPT (4x128, context 128); small: 0.22M (4x64, context 64)")
    p.add_argument("--seeds", default="0,1")
    p.add_argument("--workers", type=int, default=4)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--eval-every", type=int, default=50)
    p.add_argument("--warm-start", type=int, default=0, help="start every run from ddp trained this many steps")
    p.add_argument("--data", default=None)
    p.add_argument("--out", default="benchmarks/results/convergence")
    p.add_argument("--report", nargs="+", metavar="DIR", help="print the table of these result folders and exit")
    p.add_argument("--plot", default=None, help="with --report: write a PNG of the loss curves here")
    args = p.parse_args()
    if args.report:
        print(report(args.report, args.plot))
        return
    run(args)


if __name__ == "__main__":
    main()
