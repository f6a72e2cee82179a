"""Codec throughput: encode + decode of a 64 MiB fp32 vector, next to a plain tensor copy.

    nice -n 10 python3 benchmarks/codecs.py [--mib 64] [--reps 7] [--threads 2]

Every figure is GB/s of fp32 *input* (bytes of the fp32 vector / seconds). The copy
(``dst.copy_(src)`` into a reused buffer) is measured in the same run, interleaved with the
codecs, because this machine is shared and absolute speeds swing 20-50% (DESIGN section 9);
the ratio to the copy is the stable figure. Each codec is timed on its hot path: encode
(which reuses its scratch buffers after the first call) and decode into a reused output
(``decode(parts, n, out=buf)``). Medians over ``--reps`` rounds.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lowcomm.codecs import get_codec  # noqa: E402

CODECS = ["bf16", "fp16", "int8", "int4", "e3m0"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mib", type=int, default=64, help="input size in MiB of fp32 (default 64)")
    ap.add_argument("--reps", type=int, default=7, help="timed rounds (default 7)")
    ap.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    ap.add_argument("--json", default=None, help="also write the figures here")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    n = args.mib * 1024 * 1024 // 4
    x = torch.randn(n, generator=torch.Generator().manual_seed(0)) * 0.01
    dst = torch.empty(n)
    out = torch.empty(n)
    codecs = {name: get_codec(name) for name in CODECS}
    parts = {name: c.encode(x) for name, c in codecs.items()}  # warm: scratch buffers allocated
    for name, c in codecs.items():
        c.decode(parts[name], n, out=out)
    dst.copy_(x)

    times: dict[str, list[float]] = {"copy": []}
    for name in CODECS:
        times[f"{name} encode"] = []
        times[f"{name} decode"] = []
    for _ in range(args.reps):
        t0 = time.perf_counter()
        dst.copy_(x)
        times["copy"].append(time.perf_counter() - t0)
        for name, c in codecs.items():
            t0 = time.perf_counter()
            p = c.encode(x)
            t1 = time.perf_counter()
            c.decode(p, n, out=out)
            t2 = time.perf_counter()
            times[f"{name} encode"].append(t1 - t0)
            times[f"{name} decode"].append(t2 - t1)

    nbytes = n * 4
    med = {k: statistics.median(v) for k, v in times.items()}
    copy_gbs = nbytes / med["copy"] / 1e9
    rows = [("copy (reused dst)", copy_gbs, None, None, 1.0, 4.0)]
    for name in CODECS:
        e, d = med[f"{name} encode"], med[f"{name} decode"]
        wire = sum(t.numel() * t.element_size() for t in parts[name])
        both = nbytes / (e + d) / 1e9
        rows.append((name, both, nbytes / e / 1e9, nbytes / d / 1e9, both / copy_gbs, wire * 8 / n))
    print(f"{args.mib} MiB fp32, {args.threads} threads, median of {args.reps} rounds (GB/s of fp32 input)")
    print(f"{'codec':<18} {'enc+dec':>8} {'encode':>8} {'decode':>8} {'vs copy':>8} {'bits/value':>10}")
    for name, both, e, d, ratio, bits in rows:
        fe = "" if e is None else f"{e:.2f}"
        fd = "" if d is None else f"{d:.2f}"
        print(f"{name:<18} {both:>8.2f} {fe:>8} {fd:>8} {ratio:>8.2f} {bits:>10.3f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"mib": args.mib, "threads": args.threads, "reps": args.reps,
                                               "median_seconds": med}, indent=2))


if __name__ == "__main__":
    main()
