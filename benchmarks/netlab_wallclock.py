#!/usr/bin/env python3
"""Network lab: real DiLoCo / Streaming DiLoCo wall-clock on shaped links vs the simulator's clock.

DiLoCo (Douillard et al. 2023, arXiv 2311.08105) and Streaming DiLoCo (Douillard et al. 2025,
arXiv 2501.18512) run as ``lowcomm peer`` processes over the ZeroMQ transport, one peer per
network namespace of :mod:`tools.netlab` (each link shaped with ``tc tbf`` to ``--rate`` in both
directions; the coordinator sits in the hub namespace). Each peer records, per step, the seconds
of forward/backward and of ``opt.step()``, its sync log and its ledger.

The prediction is the simulator's: :func:`lowcomm.sim.clock.simulate_clock` with
:class:`lowcomm.sim.clock.Network` at the lab's rate (no added latency, as the lab has none),
twice: with the nominal rate, and with the rate TCP payload really gets on these links for
transfers of this run's size, measured after the run in the same lab with raw TCP sockets
(:func:`tools.netlab.effective_rate`): the traffic of one of the run's all-reduces, two
all-to-all phases of its per-pair size, the second starting as the first arrives (headers,
ACKs and TCP flows sharing a link lower it; tbf's burst raises it for
transfers that fit in the bucket),
fed this run's own measured compute per step (4 peers share the machine's cores, so compute is
measured in the lab, not alone) and this run's own sync schedule and ledger bytes. Compute of a
step = forward/backward + the inner-optimizer part of ``opt.step()`` (the median ``opt.step()``
of steps that did not communicate). Measured wall-clock is each peer's training-loop time.
Utilisation = compute / wall-clock.

    sudo python3 benchmarks/netlab_wallclock.py --rate 500kbit --steps 100
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from lowcomm.sim.clock import CommEvent, Network, simulate_clock  # noqa: E402
from tools.netlab import NetLab, cleanup_stale, effective_rate, parse_rate  # noqa: E402

STRATEGY_SETS = {
    "diloco": ["strategy=diloco"],
    "streaming": ["strategy=streaming", "knobs.fragments=2", "knobs.overlap=2", "knobs.alpha=0.5",
                  'knobs.codec="e3m0"'],
}


def _compute(tl: dict) -> list[float]:
    """Per-step compute of one peer: forward/backward + the inner-optimizer part of opt.step()."""
    steps = tl["timeline"]
    quiet = [t_opt for _fb, t_opt, synced in steps if not synced]
    inner = statistics.median(quiet) if quiet else 0.0
    return [fb + (t_opt if not synced else inner) for fb, t_opt, synced in steps]


def _events(tl: dict, net: Network) -> tuple[list[CommEvent], int]:
    first = tl["first_step"]
    ops = {op_id: (kind, n, nbytes) for op_id, kind, n, nbytes in tl["ops"]}
    events, nbytes = [], 0
    for _unit, launch, finish, op_ids, _ok in tl["syncs"]:
        if launch <= first:
            continue  # before this session's loop (the initial broadcast)
        secs = sum(net.seconds(ops[i][0], ops[i][1], ops[i][2]) for i in op_ids if i in ops)
        nbytes += sum(ops[i][2] for i in op_ids if i in ops)
        events.append(CommEvent(launch - first, finish - first, secs))
    return events, nbytes


def predict(tls: list[dict], bandwidth: float) -> dict:
    """The simulator's clock for the recorded run of all peers.

    Peers meet at every sync, so between two consecutive sync points the run moves at the pace of
    the peer that computed longest in that stretch: the compute fed to the clock takes, for each
    stretch, the per-step times of that peer (4 processes sharing 2 cores do not compute evenly).
    """
    net = Network(bandwidth, 0.0)
    comp = [_compute(tl) for tl in tls]
    n = min(len(c) for c in comp)
    evs = [_events(tl, net) for tl in tls]
    bounds = sorted({min(e.finish_step, n) for e in evs[0][0]} | {n})
    combined, start = [], 0
    for b in bounds:
        if b <= start:
            continue
        slowest = max(range(len(comp)), key=lambda p: sum(comp[p][start:b]))
        combined += comp[slowest][start:b]
        start = b
    clocks = [simulate_clock(combined, ev) for ev, _ in evs]
    worst = max(clocks, key=lambda c: c.total)
    return {"predicted": worst.total, "compute": worst.compute, "pred_util": worst.utilisation,
            "bytes": statistics.mean(b for _, b in evs)}


def run_one(strategy: str, args, workdir: str) -> tuple[list[dict], dict]:
    """Run one strategy in a fresh lab: each peer's row, and the predictions for the run."""
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    out = os.path.join(workdir, strategy)
    with NetLab(args.peers, rate=args.rate, burst=args.burst, latency=args.tbf_latency) as lab:
        port = 5555
        # The lab is a private network of namespaces (trusted), so no CURVE: lab addresses need insecure.
        coord_code = ("from lowcomm.comm.zmq import run_coordinator; "
                      f"run_coordinator('tcp://{lab.hub_addr}:{port}', min_peers={args.peers}, heartbeat=2.0, "
                      "heartbeat_timeout=60, barrier_timeout=600, recovery=0, insecure=True)")
        lab.popen("hub", [sys.executable, "-c", coord_code], env=env, cwd=ROOT,
                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(2.0)
        sets = [f"steps={args.steps}", f"knobs.sync_every={args.sync_every}", "eval_every=0", "log_every=10",
                "tensorboard=false", "checkpoint_every=0", "threads=1", *STRATEGY_SETS[strategy]]
        procs = []
        for i in range(args.peers):
            cmd = [sys.executable, "-m", "lowcomm.peer", "--coordinator", f"tcp://{lab.hub_addr}:{port}",
                   "--recipe", args.recipe, "--bind", f"tcp://{lab.addr(i)}:7000", "--out", os.path.join(out, str(i)),
                   "--progress-timeout", "120",
                   "--insecure"]  # the lab's namespaces are a network we trust: no CURVE
            for s in sets:
                cmd += ["--set", s]
            log = open(os.path.join(workdir, f"{strategy}-{i}.log"), "w")
            procs.append(lab.popen(i, cmd, env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT))
        deadline = time.monotonic() + args.timeout
        for p in procs:
            p.wait(timeout=max(1.0, deadline - time.monotonic()))
        if any(p.returncode for p in procs):
            raise SystemExit(f"a peer failed; logs in {workdir}")
        tls, rows = [], []
        for i in range(args.peers):
            with open(os.path.join(out, str(i), "timeline.json")) as f:
                tls.append(json.load(f))
            with open(os.path.join(out, str(i), "peer.json")) as f:
                pj = json.load(f)
            rows.append({"peer": i, "measured": tls[-1]["seconds"], "syncs": pj["syncs"],
                         "failed": pj["failed_syncs"]})
        # The links' payload share for transfers of this run's size: one all-reduce phase sends
        # bytes / 2 from each peer, (n - 1) equal pieces.
        sync_ops = [nbytes for _op, kind, n, nbytes in tls[0]["ops"] if kind == "all_reduce" and n > 1]
        if not sync_ops:
            raise SystemExit(f"{strategy}: the run made no all-reduce among peers; nothing to compare (logs in "
                             f"{workdir})")
        per_pair = max(1, int(statistics.median(sync_ops) / (2 * (args.peers - 1))))
        eff = effective_rate(lab, per_pair, args.probe_repeats, phases=2)
    pred = predict(tls, parse_rate(args.rate))
    pred.update(predicted_eff=predict(tls, eff)["predicted"], rate_eff=eff, probe_bytes=per_pair)
    return rows, pred


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rate", default="2mbit", help="each link's rate, each direction (tc units)")
    ap.add_argument("--burst", default=None, help="tbf bucket (default: tools/netlab.py's, 32 KiB at these rates)")
    ap.add_argument("--probe-repeats", type=int, default=3, help="repeats of the all-to-all link probe")
    ap.add_argument("--tbf-latency", default="50ms",
                    help="tbf's queue limit in time (not an added delay): longer queues drop fewer packets")
    ap.add_argument("--peers", type=int, default=4)
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--sync-every", type=int, default=20)
    ap.add_argument("--strategies", default="diloco,streaming")
    ap.add_argument("--recipe", default=os.path.join(ROOT, "recipes", "tiny_diloco.py"))
    ap.add_argument("--timeout", type=float, default=900)
    args = ap.parse_args(argv)
    if args.peers < 2 or args.steps < 1 or args.sync_every < 1 or args.probe_repeats < 1:
        ap.error("--peers must be >= 2; --steps, --sync-every and --probe-repeats >= 1")
    cleanup_stale()
    workdir = tempfile.mkdtemp(prefix="lowcomm-netlab-")
    print(f"{args.peers} peers, links tbf {args.rate} (burst {args.burst or 'netlab default'}, "
          f"latency {args.tbf_latency}) each way, {args.steps} steps, "
          f"H={args.sync_every}; "
          f"logs in {workdir}", flush=True)
    print(f"{'strategy':10} {'measured s':>10} {'pred nominal':>12} {'ratio':>5} {'probe kbit':>10} "
          f"{'pred eff':>8} {'ratio':>5} {'MB sent':>7} {'comm share':>10} {'util meas':>9} {'util pred':>9} "
          f"{'syncs':>5} {'failed':>6}")
    for strategy in args.strategies.split(","):
        rows, p = run_one(strategy, args, workdir)
        meas = max(r["measured"] for r in rows)  # the run ends when its last peer does
        util = min(1.0, p["compute"] / meas)
        pn, pe = p["predicted"], p["predicted_eff"]
        print(f"{strategy:10} {meas:10.1f} {pn:12.1f} {pn / meas:5.2f} {p['rate_eff'] / 1e3:10.0f} {pe:8.1f} "
              f"{pe / meas:5.2f} {p['bytes'] / 1e6:7.2f} {max(0.0, 1 - util):10.0%} "
              f"{util:9.0%} {p['pred_util']:9.0%} {rows[0]['syncs']:5d} {sum(r['failed'] for r in rows):6d}",
              flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
