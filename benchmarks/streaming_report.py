"""Tables for the Streaming DiLoCo section of benchmarks/README.md, from ``lowcomm sim`` results.

    python3 benchmarks/streaming_report.py runs/stream/main_s0 runs/stream/main_s1 -- runs/stream/tau0 ...

Arguments before ``--`` are the DiLoCo-vs-Streaming runs (one per seed, both strategies in
each); after it, single-strategy runs of a tau sweep. Bytes are the ledgers' counts
(``results.json``): "sync bytes" subtract what had been sent at step 0, which is the one-time
initial broadcast of the model from worker 0 (the same for every strategy).
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path


def load(d: str) -> list[dict]:
    return json.loads((Path(d) / "results.json").read_text())["runs"]


def sync_bytes(r: dict) -> float:
    return r["bytes_sent"] - r["curve"][0]["bytes"]


def main(argv: list[str]) -> None:
    main_dirs = argv[: argv.index("--")] if "--" in argv else argv
    sweep_dirs = argv[argv.index("--") + 1:] if "--" in argv else []
    by: dict[str, list[dict]] = {}
    for d in main_dirs:
        for r in load(d):
            by.setdefault(r["strategy"], []).append(r)
    print("| strategy | seed losses | mean held-out loss | vs DiLoCo | bytes/worker (all) | sync bytes/worker | "
          "peak bytes per sync | time@100Mbit |")
    print("|---|---|---|---|---|---|---|---|")
    base = statistics.mean(r["final_eval_loss"] for r in by.get("diloco", [])) if "diloco" in by else None
    base_b = statistics.mean(sync_bytes(r) for r in by["diloco"]) if "diloco" in by else None
    base_all = statistics.mean(r["bytes_sent"] for r in by["diloco"]) if "diloco" in by else None
    base_p = statistics.mean(r["peak_bytes"] for r in by["diloco"]) if "diloco" in by else None
    for name, rs in by.items():
        loss = statistics.mean(r["final_eval_loss"] for r in rs)
        rel = "" if base is None else f"{100 * (loss / base - 1):+.2f}%"
        b_all = statistics.mean(r["bytes_sent"] for r in rs)
        b = statistics.mean(sync_bytes(r) for r in rs)
        p = statistics.mean(r["peak_bytes"] for r in rs)
        t = statistics.mean(r["sim_seconds"].get("100Mbit", float("nan")) for r in rs)
        ratio = "" if base_b is None or name == "diloco" else f" ({base_b / b:.1f}x less)"
        ratio_all = "" if base_all is None or name == "diloco" else f" ({base_all / b_all:.1f}x less)"
        pr = "" if base_p is None or name == "diloco" else f" ({base_p / p:.1f}x lower)"
        seeds = ", ".join(f"{r['final_eval_loss']:.4f}" for r in rs)
        print(f"| {name} | {seeds} | {loss:.4f} | {rel} | "
              f"{b_all / 1e6:.2f} MB{ratio_all} | {b / 1e6:.2f} MB{ratio} | {p / 1e3:.1f} kB{pr} | {t:.1f} s |")
    if sweep_dirs:
        print()
        print("| overlap tau | held-out loss | sync bytes/worker | peak bytes per sync | time@10Mbit | time@100Mbit | "
              "util@10Mbit |")
        print("|---|---|---|---|---|---|---|")
        rows = []
        for d in sweep_dirs:
            for r in load(d):
                if r["strategy"] == "streaming":
                    rows.append((r["knobs"]["overlap"], r))
        for tau, r in sorted(rows, key=lambda x: x[0]):
            print(f"| {tau} | {r['final_eval_loss']:.4f} | {sync_bytes(r) / 1e6:.2f} MB | "
                  f"{r['peak_bytes'] / 1e3:.1f} kB"
                  f" | {r['sim_seconds'].get('10Mbit', float('nan')):.1f} s | "
                  f"{r['sim_seconds'].get('100Mbit', float('nan')):.1f} s | "
                  f"{100 * r['utilisation'].get('10Mbit', float('nan')):.0f}% |")


if __name__ == "__main__":
    main(sys.argv[1:])
