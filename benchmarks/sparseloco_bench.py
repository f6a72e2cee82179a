"""SparseLoCo against DiLoCo, Streaming DiLoCo and DeMo; MuLoCo against DiLoCo-AdamW (issue 16).

Everything runs on the simulator (``run_strategy``: the default ``lowcomm sim`` model, the
stdlib corpus, one seed, every worker on its own shard, the held-out loss of the workers'
averaged model; each strategy with its registry defaults except what is listed here).

Part ``sparse``, W workers (default 4), batch 16 per worker, for every step count of ``--steps``:
SparseLoCo (templar's settings: alpha 0.6, beta 0.95, top 64 of each 64x64 block, 2-bit values),
DiLoCo (Nesterov outer, lr 0.7, momentum 0.9) and Streaming DiLoCo (F = 3 fragments so that both
H divide, tau 1, E3M0 4-bit) at every H of ``--syncs``, and DeMo once (it syncs every step).
Reported: held-out loss, its gap to DiLoCo at the same H, and the sync bytes per worker (the
ledger after the initial broadcast, mean over workers) with how many times fewer than DiLoCo's.

Part ``muloco``, ``--muloco-steps`` steps at H = ``--muloco-sync``: DiLoCo with AdamW inner and
MuLoCo (the same DiLoCo around Muon on the 2-D hidden weights + AdamW on the rest) at every W of
``--muloco-workers``, at a fixed global batch (``--global-batch`` sequences per step, split
evenly over the workers, so every W sees the same tokens). Reported: held-out loss and its gap
to the same strategy's single-worker run (MuLoCo's claim: Muon's gap grows more slowly with W).

Every finished run is appended to ``OUT/runs.jsonl``; a rerun with the same settings reuses it.
Writes ``OUT/sparseloco_bench.md`` (the tables). The full measurement::

    nice -n 10 python3 benchmarks/sparseloco_bench.py --steps 300,1000 --out benchmarks/results/sparseloco

A smoke test (seconds)::

    python3 benchmarks/sparseloco_bench.py --steps 8 --syncs 4 --fragments 2 --muloco-steps 4 --muloco-sync 2 \\
        --muloco-workers 1,2 --global-batch 4 --tiny --out /tmp/sparseloco_smoke
"""

from __future__ import annotations

import argparse
import json
import os
import time

from lowcomm.models import GPTConfig
from lowcomm.sim.cli import DEFAULT_MODEL
from lowcomm.sim.runner import SimConfig, run_strategy

TINY_MODEL = GPTConfig(n_layer=3, n_embd=16, n_head=2, seq_len=16)


def ints(s: str) -> list[int]:
    return [int(x) for x in s.split(",") if x]


class Runs:
    """Runs the simulator, or takes a finished run from OUT/runs.jsonl."""

    def __init__(self, a: argparse.Namespace):
        self.a = a
        os.makedirs(a.out, exist_ok=True)
        self.path = os.path.join(a.out, "runs.jsonl")
        self.done: list[dict] = []
        if os.path.exists(self.path):
            with open(self.path) as f:
                self.done = [json.loads(line) for line in f if line.strip()]

    def __call__(self, name: str, steps: int, workers: int, batch: int, overrides: dict) -> dict:
        key = {"strategy": name, "steps": steps, "workers": workers, "batch": batch, "overrides": overrides,
               "seed": self.a.seed, "tiny": self.a.tiny}
        for r in self.done:
            if all(r.get(k) == v for k, v in key.items()):
                print(f"  {name} {overrides} W={workers} {steps} steps: {r['loss']:.4f} (from {self.path})", flush=True)
                return r
        cfg = SimConfig(workers=workers, steps=steps, batch_size=batch, seed=self.a.seed,
                        model=TINY_MODEL if self.a.tiny else DEFAULT_MODEL, warmup_steps=max(1, steps // 15),
                        eval_every=max(1, steps // 4), eval_sequences=4 if self.a.tiny else 64,
                        threads=self.a.threads)
        t0 = time.monotonic()
        r = run_strategy(name, cfg, overrides)
        start = r.curve[0]["bytes"] if r.curve and r.curve[0]["step"] == 0 else 0.0  # the initial broadcast
        out = {**key, "loss": r.final_eval_loss, "sync_bytes_per_worker": r.bytes_sent - start,
               "bytes_per_worker": r.bytes_sent, "syncs": r.syncs, "params": r.params, "tokens": r.tokens,
               "real_seconds": time.monotonic() - t0}
        print(f"  {name} {overrides} W={workers} {steps} steps: held-out {out['loss']:.4f}, "
              f"{out['sync_bytes_per_worker'] / 1e6:.3f} MB/worker in syncs, {out['real_seconds']:.0f} s", flush=True)
        with open(self.path, "a") as f:
            f.write(json.dumps(out) + "\n")
        self.done.append(out)
        return out


def _mb(b: float) -> str:
    return f"{b / 1e6:.3f} MB"


def sparse_part(a: argparse.Namespace, run: Runs) -> list[str]:
    lines = ["| steps | strategy | H | held-out loss | vs DiLoCo, same H | sync bytes per worker | fewer than DiLoCo |",
             "|---|---|---|---|---|---|---|"]
    for steps in a.steps:
        print(f"sparse part, {steps} steps, W={a.workers}:", flush=True)
        for h in a.syncs:
            dl = run("diloco", steps, a.workers, a.batch, {"sync_every": h})
            rows = [("DiLoCo", dl),
                    ("SparseLoCo", run("sparseloco", steps, a.workers, a.batch, {"sync_every": h})),
                    (f"Streaming DiLoCo (F={a.fragments})", run("streaming", steps, a.workers, a.batch,
                                                   {"sync_every": h, "fragments": a.fragments}))]
            for label, r in rows:
                gap = 100 * (r["loss"] / dl["loss"] - 1)
                fewer = dl["sync_bytes_per_worker"] / r["sync_bytes_per_worker"] if r["sync_bytes_per_worker"] else 0
                lines.append(f"| {steps} | {label} | {h} | {r['loss']:.4f} | {gap:+.2f}% | "
                             f"{_mb(r['sync_bytes_per_worker'])} | {fewer:.1f}x |")
        dm = run("demo", steps, a.workers, a.batch, {})
        lines.append(f"| {steps} | DeMo (every step) | - | {dm['loss']:.4f} | | {_mb(dm['sync_bytes_per_worker'])} | |")
    return lines


def muloco_part(a: argparse.Namespace, run: Runs) -> list[str]:
    lines = ["| strategy | workers | batch per worker | held-out loss | gap to its 1-worker run |",
             "|---|---|---|---|---|"]
    print(f"muloco part, {a.muloco_steps} steps, H={a.muloco_sync}, global batch {a.global_batch}:", flush=True)
    for name, label in (("diloco", "DiLoCo (AdamW)"), ("muloco", "MuLoCo (Muon + AdamW)")):
        base = None
        for w in a.muloco_workers:
            if a.global_batch % w:
                raise SystemExit(f"--global-batch {a.global_batch} is not divisible by {w} workers")
            r = run(name, a.muloco_steps, w, a.global_batch // w, {"sync_every": a.muloco_sync})
            base = r if base is None else base
            gap = 100 * (r["loss"] / base["loss"] - 1)
            lines.append(f"| {label} | {w} | {a.global_batch // w} | {r['loss']:.4f} | {gap:+.2f}% |")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--part", choices=("all", "sparse", "muloco"), default="all")
    ap.add_argument("--steps", type=ints, default=[300, 1000], help="step counts of the sparse part")
    ap.add_argument("--syncs", type=ints, default=[15, 30], help="H values of the sparse part")
    ap.add_argument("--workers", type=int, default=4)
    ap.add_argument("--batch", type=int, default=16, help="sequences per worker per step (sparse part)")
    ap.add_argument("--fragments", type=int, default=3, help="Streaming DiLoCo fragments (must divide every H)")
    ap.add_argument("--muloco-steps", type=int, default=300)
    ap.add_argument("--muloco-sync", type=int, default=30)
    ap.add_argument("--muloco-workers", type=ints, default=[1, 4, 8])
    ap.add_argument("--global-batch", type=int, default=16, help="sequences per step over all workers (muloco)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tiny", action="store_true", help="a 3-layer width-16 model, for smoke tests")
    ap.add_argument("--out", default="runs/sparseloco_bench")
    a = ap.parse_args()
    run = Runs(a)
    out = []
    if a.part in ("all", "sparse"):
        out += ["### SparseLoCo vs DiLoCo vs Streaming DiLoCo vs DeMo", "", *sparse_part(a, run), ""]
    if a.part in ("all", "muloco"):
        out += ["### MuLoCo vs DiLoCo-AdamW", "", *muloco_part(a, run), ""]
    text = "\n".join(out)
    with open(os.path.join(a.out, "sparseloco_bench.md"), "w") as f:
        f.write(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
