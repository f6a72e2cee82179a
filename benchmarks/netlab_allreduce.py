#!/usr/bin/env python3
"""Network lab: the ZeroMQ all-reduce against raw TCP sockets carrying the same traffic.

N processes, one per namespace of :mod:`tools.netlab` (links shaped with ``tc tbf`` to
``--rate`` each way, the coordinator in the hub), all-reduce a float32 tensor of ``--numel``
elements ``--repeats`` times, ``--gap`` seconds apart; each prints the seconds of each
all-reduce. Then :func:`tools.netlab.measure_all_to_all` sends the same traffic over raw
sockets: two all-to-all phases of numel x 4 / N bytes per pair (reduce-scatter, then
all-gather). The difference is what the transport adds to what the links allow.

    sudo python3 benchmarks/netlab_allreduce.py --rate 500kbit --numel 120000
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def peer(coordinator: str, bind: str, numel: int, repeats: int, gap: float) -> None:
    """One member: ``repeats`` all-reduces of ``numel`` float32, printing their seconds."""
    import torch

    from lowcomm.comm.zmq import connect_zmq

    t = connect_zmq(coordinator, bind=bind, insecure=True)  # lab network: trusted, no CURVE
    try:
        x = torch.randn(numel)
        secs = []
        for _ in range(repeats):
            time.sleep(gap)
            t0 = time.monotonic()
            t.all_reduce([x]).wait(600)
            secs.append(time.monotonic() - t0)
        print(" ".join(f"{s:.2f}" for s in secs), t.ledger.records[-1].bytes_sent, flush=True)
    finally:
        t.close()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rate", default="500kbit", help="each link's rate, each direction (tc units)")
    ap.add_argument("--nodes", type=int, default=4)
    ap.add_argument("--numel", type=int, default=120_000, help="float32 elements all-reduced")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--gap", type=float, default=1.0, help="seconds between all-reduces")
    ap.add_argument("--peer", nargs=2, metavar=("COORDINATOR", "BIND"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.peer:
        peer(*args.peer, args.numel, args.repeats, args.gap)
        return 0
    if args.nodes < 2 or args.numel < args.nodes or args.repeats < 1:
        ap.error("--nodes >= 2, --numel >= --nodes and --repeats >= 1")
    from tools.netlab import NetLab, cleanup_stale, measure_all_to_all

    cleanup_stale()
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    with NetLab(args.nodes, rate=args.rate) as lab:
        print(lab.describe(), flush=True)
        coord = f"tcp://{lab.hub_addr}:5555"
        code = ("from lowcomm.comm.zmq import run_coordinator; "
                f"run_coordinator('{coord}', min_peers={args.nodes}, heartbeat=2.0, heartbeat_timeout=60, "
                "recovery=0, insecure=True)")  # the lab network is trusted: no CURVE
        lab.popen("hub", [sys.executable, "-c", code], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        procs = [lab.popen(i, [sys.executable, os.path.abspath(__file__), "--peer", coord,
                               f"tcp://{lab.addr(i)}:7000", "--numel", str(args.numel), "--repeats",
                               str(args.repeats), "--gap", str(args.gap)], env=env, stdout=subprocess.PIPE, text=True)
                 for i in range(args.nodes)]
        outs = [p.communicate(timeout=900)[0].split() for p in procs]
        if any(p.returncode for p in procs) or not all(outs):
            raise SystemExit("a peer failed")
        per_op = [max(float(o[k]) for o in outs) for k in range(args.repeats)]
        per_pair = args.numel * 4 // args.nodes
        raw = measure_all_to_all(lab, per_pair, repeats=args.repeats, phases=2)
    print(f"all-reduce of {args.numel * 4 / 1e6:.2f} MB among {args.nodes} at {args.rate} "
          f"({int(outs[0][-1]) / 1e3:.0f} kB sent per peer):")
    print("  ZeroMQ transport  s:", " ".join(f"{s:.2f}" for s in per_op))
    print("  raw TCP, 2 phases s:", " ".join(f"{s:.2f}" for s in raw))
    return 0


if __name__ == "__main__":
    sys.exit(main())
