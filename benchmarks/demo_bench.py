"""DeMo against AdamW data parallel on the simulator (issue 6; DeMo: arXiv 2411.19870).

What it runs, all with W simulated workers on the default corpus at equal tokens:

1. ``ddp`` (AdamW, the simulator's default lr and schedule) for every seed;
2. DeMo with k=32 at every lr of ``--lrs`` on the first seed, keeping the lr with the lowest
   held-out loss (tuned on one seed, reported on all);
3. DeMo at that lr for every k of ``--ks`` and every seed;
4. in the same process, DeMo's own compute per step (momentum, DCT, top-k, error feedback,
   decode, inverse DCT; ``opt.timings``) on the same model with real gradients and W workers
   (one at a time, so they do not contend), against a plain ``torch.optim.AdamW`` step on
   that model and the forward+backward.

Writes ``OUT/demo_bench.json`` and prints a markdown table. Example (what
benchmarks/README.md reports)::

    nice -n 10 python3 benchmarks/demo_bench.py --steps 300 --seeds 0,1 --lrs 2e-3,3e-3,5e-3 --ks 4,8,32
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import threading
import time
from contextlib import contextmanager

import torch

from lowcomm.comm.local import run_local
from lowcomm.data import Corpus, load_corpus
from lowcomm.models import GPT, GPTConfig
from lowcomm.sim.cli import DEFAULT_MODEL
from lowcomm.sim.runner import SimConfig, run_strategy


def floats(s: str) -> list[float]:
    return [float(x) for x in s.split(",") if x]


def ints(s: str) -> list[int]:
    return [int(x) for x in s.split(",") if x]


def sim(name: str, steps: int, seed: int, workers: int, overrides: dict) -> dict:
    cfg = SimConfig(workers=workers, steps=steps, seed=seed, model=DEFAULT_MODEL, warmup_steps=max(1, steps // 15),
                    eval_every=max(1, steps // 4))
    t0 = time.monotonic()
    r = run_strategy(name, cfg, overrides)
    out = {"strategy": name, "seed": seed, "overrides": overrides, "loss": r.final_eval_loss,
           "bytes_per_worker": r.bytes_sent, "syncs": r.syncs, "params": r.params, "tokens": r.tokens,
           "compute_seconds": r.compute_seconds, "sim_seconds": r.sim_seconds, "real_seconds": time.monotonic() - t0}
    print(f"  {name} {overrides} seed {seed}: held-out {r.final_eval_loss:.4f}, {r.bytes_sent / 1e6:.2f} MB/worker, "
          f"{out['real_seconds']:.0f} s", flush=True)
    return out


def overhead(workers: int, ks: list[int], lr: float, reps: int = 20, threads: int = 2) -> dict:
    """Seconds per step of DeMo's own compute and of a plain AdamW step, same model, same gradients.

    W workers (threads) each train the simulator's GPT on their shard with DeMo; every step each
    worker also steps a copy of its model with ``torch.optim.AdamW`` on the same gradients. The
    forward+backward, the AdamW step and DeMo's compute (``opt.compute_guard``) each run under
    one lock, so the timings interleave under the same machine load and never overlap.
    """
    import copy

    import lowcomm

    torch.set_num_threads(threads)
    data = load_corpus(None)
    mcfg = GPTConfig(**{**DEFAULT_MODEL.__dict__, "vocab_size": data.vocab_size})
    corpus = Corpus(data, mcfg.seq_len)
    lock = threading.Lock()

    @contextmanager
    def alone():
        with lock:
            yield

    res: dict = {"demo": {}}
    for k in ks:
        def worker(t, k=k):
            with lock:
                torch.manual_seed(0)
                m = GPT(mcfg)
            twin = copy.deepcopy(m)
            adamw = torch.optim.AdamW(twin.parameters(), lr=1e-3, betas=(0.9, 0.95), weight_decay=0.1)
            opt = lowcomm.DeMo(torch.optim.SGD(m.parameters(), lr=lr), transport=t, topk=k)
            opt.compute_guard = alone
            s = corpus.stream(t.rank, workers, 16, 0)
            fb, ad, de = [], [], []
            for i in range(reps + 3):
                opt.zero_grad(set_to_none=False)
                x, y = next(s)
                with lock:
                    t0 = time.perf_counter()
                    _, loss = m(x, y)
                    loss.backward()
                    t1 = time.perf_counter()
                    for p, q in zip(m.parameters(), twin.parameters()):
                        q.grad = p.grad.clone()
                    t2 = time.perf_counter()
                    adamw.step()
                    t3 = time.perf_counter()
                before = opt.timings["encode"] + opt.timings["decode"]
                opt.step()
                if i >= 3:  # after warm-up
                    fb.append(t1 - t0)
                    ad.append(t3 - t2)
                    de.append(opt.timings["encode"] + opt.timings["decode"] - before)
            return statistics.median(fb), statistics.median(ad), statistics.median(de)

        out = run_local(workers, worker)
        fb, ad, de = (statistics.mean(o[j] for o in out) for j in range(3))
        res["demo"][str(k)] = {"demo_compute_s": de, "adamw_step_s": ad, "forward_backward_s": fb,
                               "ratio_to_adamw_step": de / ad, "ratio_to_forward_backward": de / fb}
        print(f"  overhead k={k}: DeMo {de * 1e3:.1f} ms/step, AdamW step {ad * 1e3:.1f} ms "
              f"(ratio {de / ad:.2f}), fwd+bwd {fb * 1e3:.1f} ms", flush=True)
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--workers", type=int, default=4)
    ap.add_argument("--seeds", type=ints, default=[0, 1])
    ap.add_argument("--lrs", type=floats, default=[2e-3, 3e-3, 5e-3], help="DeMo lrs tried on the first seed")
    ap.add_argument("--ks", type=ints, default=[4, 8, 32])
    ap.add_argument("--k-seeds", type=ints, default=None, help="seeds for the k other than 32 (default: --seeds)")
    ap.add_argument("--decay", type=float, default=0.999, help="DeMo's momentum decay (paper 0.999)")
    ap.add_argument("--extra", action="append", default=[], metavar="K=V,...",
                    help="an extra DeMo configuration at the tuned lr on every seed, e.g. inner=adamw,sign=0")
    ap.add_argument("--out", default="runs/demo_bench")
    a = ap.parse_args()
    os.makedirs(a.out, exist_ok=True)
    # Every finished run is appended to OUT/runs.jsonl; a rerun with the same settings reuses it.
    log_path = os.path.join(a.out, "runs.jsonl")
    done: list[dict] = []
    if os.path.exists(log_path):
        with open(log_path) as f:
            done = [json.loads(line) for line in f if line.strip()]
    runs: list[dict] = []

    def run(name: str, seed: int, ov: dict) -> dict:
        for r in done:
            if (r["strategy"], r["seed"], r["overrides"], r.get("steps", a.steps)) == (name, seed, ov, a.steps):
                print(f"  {name} {ov} seed {seed}: held-out {r['loss']:.4f} (from {log_path})", flush=True)
                runs.append(r)
                return r
        r = {**sim(name, a.steps, seed, a.workers, ov), "steps": a.steps}
        with open(log_path, "a") as f:
            f.write(json.dumps(r) + "\n")
        runs.append(r)
        return r

    print("ddp (AdamW data parallel):", flush=True)
    for seed in a.seeds:
        run("ddp", seed, {})
    print("DeMo lr sweep, k=32, seed", a.seeds[0], flush=True)
    sweep = [run("demo", a.seeds[0], {"lr": lr, "topk": 32, "decay": a.decay}) for lr in a.lrs]
    best = min(sweep, key=lambda r: r["loss"])["overrides"]["lr"]
    print(f"tuned lr {best:g}", flush=True)
    # k=32 on every seed first (the headline comparison), then the other k on --k-seeds.
    for seed in a.seeds[1:]:
        run("demo", seed, {"lr": best, "topk": 32, "decay": a.decay})
    for seed in (a.k_seeds if a.k_seeds is not None else a.seeds):
        for k in a.ks:
            if k != 32:
                run("demo", seed, {"lr": best, "topk": k, "decay": a.decay})
    for spec in a.extra:
        ov: dict = {"lr": best, "decay": a.decay}
        for kv in spec.split(","):
            key, v = kv.split("=")
            ov[key] = v if key in ("inner", "values") else (float(v) if "." in v or "e" in v else int(v))
        for seed in a.seeds:
            run("demo", seed, ov)
    print("compute overhead:", flush=True)
    ovh = overhead(a.workers, sorted(set(a.ks)), best)

    ddp = [r for r in runs if r["strategy"] == "ddp"]
    ddp_loss = statistics.mean(r["loss"] for r in ddp)
    ddp_bytes = statistics.mean(r["bytes_per_worker"] for r in ddp)
    rows = [("ddp (AdamW)", "-", "-", [r["loss"] for r in ddp], ddp_bytes)]
    configs: dict[str, list[dict]] = {}
    for r in runs:
        if r["strategy"] == "demo" and r["overrides"]["lr"] == best:
            configs.setdefault(json.dumps(r["overrides"], sort_keys=True), []).append(r)
    for key, rs in configs.items():
        ov = json.loads(key)
        label = "DeMo" + "".join(f" {k}={v}" for k, v in ov.items() if k not in ("lr", "topk", "decay"))
        rows.append((label, ov.get("topk", 32), f"{ov['lr']:g}", [r["loss"] for r in rs],
                     statistics.mean(r["bytes_per_worker"] for r in rs)))
    lines = ["| strategy | k | lr | held-out loss per seed | mean | vs ddp | MB sent per worker | fewer bytes |",
             "|---|---|---|---|---|---|---|---|"]
    for label, k, lr, losses, b in rows:
        m = statistics.mean(losses)
        lines.append(f"| {label} | {k} | {lr} | {', '.join(f'{x:.4f}' for x in losses)} | {m:.4f} | "
                     f"{100 * (m / ddp_loss - 1):+.1f}% | {b / 1e6:.2f} | {ddp_bytes / b:.0f}x |")
    lines += ["", "| k | DeMo compute per step (ms) | AdamW step (ms) | ratio | forward+backward (ms) |",
              "|---|---|---|---|---|"]
    for k, d in ovh["demo"].items():
        lines.append(f"| {k} | {d['demo_compute_s'] * 1e3:.1f} | {d['adamw_step_s'] * 1e3:.1f} | "
                     f"{d['ratio_to_adamw_step']:.2f}x | {d['forward_backward_s'] * 1e3:.1f} |")
    sweep_line = ", ".join(f"lr {r['overrides']['lr']:g}: {r['loss']:.4f}" for r in sweep)
    table = ("\n".join(lines) + f"\n\nDeMo decay {a.decay}; lr sweep (k=32, seed {a.seeds[0]}): {sweep_line}; "
             f"tuned lr {best:g}\n")
    print(table)
    with open(os.path.join(a.out, "demo_bench.json"), "w") as f:
        json.dump({"args": vars(a), "runs": runs, "tuned_lr": best, "overhead": ovh, "table": table}, f, indent=1)


if __name__ == "__main__":
    main()
