"""Time lowcomm's torch.distributed all_reduce against gloo's own, and count its bytes.

    python3 benchmarks/torchdist_bench.py --procs 4 --mib 1 16 --reps 5

Starts ``--procs`` local processes with torchrun's variables (gloo on loopback). Each size is
reduced ``--reps`` times (the methods interleaved, so that a busy machine slows them alike;
"x ring" is the median of the per-rep time ratios to gloo's ring) by (a)
``torch.distributed.all_reduce`` on a gloo group (a ring: the baseline), (b)
:class:`lowcomm.comm.torchdist.TorchDistTransport` with replica_size 1 (every rank is a member:
reduce-scatter to shard owners over gloo send/recv, all-gather, then a small commit vote), and,
the same with ``native_all_reduce=True`` (gloo's ring inside lowcomm's op), and when ``--procs``
is 4 or more and even, (c) 2-rank replicas, flat and ``hierarchical=True``.
Rank 0 prints the median seconds, the algorithm bandwidth (buffer bytes / seconds) and the
bytes its ledger counted per operation.
"""

from __future__ import annotations

import argparse
import datetime
import os
import socket
import statistics
import subprocess
import sys
import time


def worker(mibs: list[float], reps: int) -> None:
    import torch
    import torch.distributed as dist

    from lowcomm.comm.torchdist import TorchDistTransport

    torch.set_num_threads(1)
    t1 = TorchDistTransport.from_env(replica_size=1, timeout=600)
    tn = TorchDistTransport(1, timeout=600, native_all_reduce=True)
    W, rank = dist.get_world_size(), dist.get_rank()
    ring = dist.new_group(list(range(W)), backend="gloo", timeout=datetime.timedelta(seconds=600))
    pairs = []
    if W % 2 == 0 and W >= 4:
        pairs = [("2-rank replicas, flat", TorchDistTransport(2, timeout=600)),
                 ("2-rank replicas, hierarchical", TorchDistTransport(2, timeout=600, hierarchical=True))]
    rows = []
    for mib in mibs:
        n = int(mib * (1 << 20) / 4)
        # every method reduces its own buffer in place, again and again (values do not matter)
        y = torch.randn(n)
        methods = [("gloo dist.all_reduce (ring)", None, lambda y=y: dist.all_reduce(y, group=ring)),
                   (f"lowcomm TorchDistTransport, {W} members", t1, lambda y=y: t1.all_reduce([y]).wait(600)),
                   ("lowcomm native_all_reduce=True", tn, lambda y=y: tn.all_reduce([y]).wait(600))]
        methods += [(f"lowcomm {name}", tr, lambda tr=tr, y=y: tr.all_reduce([y]).wait(600)) for name, tr in pairs]
        times = {name: [] for name, _, _ in methods}
        before = {name: (tr.ledger.bytes_sent if tr else 0) for name, tr, _ in methods}
        # Interleaved: rep k of every method runs back to back, so a busy machine slows all alike.
        for _ in range(reps):
            for name, _, fn in methods:
                dist.barrier(group=ring)
                t0 = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t0)
        base = times[methods[0][0]]
        for name, tr, _ in methods:
            ratio = statistics.median(a / b for a, b in zip(times[name], base))
            led = None if tr is None else (tr.ledger.bytes_sent - before[name]) // reps
            rows.append((mib, name, statistics.median(times[name]), ratio, led))
    if rank == 0:
        print(f"world {W}, {reps} reps, median of each; ledger = bytes rank 0 counted per operation "
              f"(cross-replica only for replicas)")
        print(f"{'MiB':>6}  {'method':<42} {'seconds':>9} {'GB/s':>7} {'x ring':>7} {'ledger bytes':>14} "
              f"{'/ buffer':>8}")
        for mib, name, sec, ratio, led in rows:
            nbytes = int(mib * (1 << 20) / 4) * 4
            print(f"{mib:6g}  {name:<42} {sec:9.4f} {nbytes / sec / 1e9:7.3f} {ratio:7.2f} "
                  f"{'' if led is None else led:>14} {'' if led is None else f'{led / nbytes:.3f}':>8}")
    dist.barrier(group=ring)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--procs", type=int, default=4)
    ap.add_argument("--mib", type=float, nargs="+", default=[1.0, 16.0])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        worker(a.mib, a.reps)
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(a.procs),
               GLOO_SOCKET_IFNAME="lo", OMP_NUM_THREADS="1", PYTHONPATH=root)
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", "--reps", str(a.reps), "--mib", *map(str, a.mib)]
    procs = [subprocess.Popen(cmd, env=dict(env, RANK=str(r), LOCAL_RANK=str(r))) for r in range(a.procs)]
    try:
        for p in procs:
            p.wait(timeout=900)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    sys.exit(max(p.returncode or 0 for p in procs))


if __name__ == "__main__":
    main()
