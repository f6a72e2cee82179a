"""Time lowcomm's torch.distributed all_reduce against gloo's own, and count its bytes.

    python3 benchmarks/torchdist_bench.py --procs 4 --mib 1 16 --reps 5

Starts ``--procs`` local processes with torchrun's variables (gloo on loopback). Each size is
reduced ``--reps`` times by (a) ``torch.distributed.all_reduce`` on a gloo group (a ring: the
baseline), (b) :class:`lowcomm.comm.torchdist.TorchDistTransport` (replica_size 1: every rank
is a member; reduce-scatter to shard owners over gloo send/recv, then all-gather, plus a
one-byte-per-member commit vote), and, when ``--procs`` is even, (c) the same with 2-rank
replicas, flat and ``hierarchical=True``. Rank 0 prints the median seconds, the algorithm
bandwidth (bytes of the buffer / seconds) and the bytes its ledger counted per operation.
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
    W, rank = dist.get_world_size(), dist.get_rank()
    ring = dist.new_group(list(range(W)), backend="gloo", timeout=datetime.timedelta(seconds=600))
    pairs = []
    if W % 2 == 0 and W >= 4:
        pairs = [("2-rank replicas, flat", TorchDistTransport(2, timeout=600)),
                 ("2-rank replicas, hierarchical", TorchDistTransport(2, timeout=600, hierarchical=True))]
    rows = []
    for mib in mibs:
        n = int(mib * (1 << 20) / 4)
        x = torch.randn(n)

        def timed(fn):
            ts = []
            for _ in range(reps):
                dist.barrier(group=ring)
                t0 = time.perf_counter()
                fn()
                ts.append(time.perf_counter() - t0)
            return statistics.median(ts)

        # every method reduces its own buffer in place, again and again (values do not matter)
        y = x.clone()
        rows.append((mib, "gloo dist.all_reduce (ring)", timed(lambda y=y: dist.all_reduce(y, group=ring)), None))
        before = t1.ledger.bytes_sent
        s = timed(lambda y=y: t1.all_reduce([y]).wait(600))
        rows.append((mib, f"lowcomm TorchDistTransport, {W} members", s, (t1.ledger.bytes_sent - before) // reps))
        for name, tr in pairs:
            before = tr.ledger.bytes_sent
            s = timed(lambda tr=tr, y=y: tr.all_reduce([y]).wait(600))
            rows.append((mib, f"lowcomm {name}", s, (tr.ledger.bytes_sent - before) // reps))
    if rank == 0:
        print(f"world {W}, {reps} reps, median of each; ledger = bytes rank 0 counted per operation "
              f"(cross-replica only for replicas)")
        print(f"{'MiB':>6}  {'method':<42} {'seconds':>9} {'GB/s':>7} {'ledger bytes':>14} {'/ buffer':>8}")
        for mib, name, sec, led in rows:
            nbytes = int(mib * (1 << 20) / 4) * 4
            print(f"{mib:6g}  {name:<42} {sec:9.4f} {nbytes / sec / 1e9:7.3f} "
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
