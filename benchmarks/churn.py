#!/usr/bin/env python3
"""Churn soak: N volunteer peers on loopback, killed and restarted at random, for a bounded time.

DiLoCo (Douillard et al. 2023, arXiv 2311.08105) over the ZeroMQ transport: a coordinator runs in
this process (a thread), N ``lowcomm peer`` processes train ``recipes/tiny_diloco.py`` (with a short
H), and every ``--kill-every`` seconds (random, uniform in [0.5x, 1.5x]) one live peer is killed,
with SIGKILL (a crash) or SIGTERM (a clean leave) at random, and a fresh peer is started a few
seconds later; it joins by fetching a donor's state. At the end it reports:

- syncs committed and rolled back (the coordinator's commit verdicts, all ops counted once);
- the longest stall: the longest time without a committed sync once the run had started;
- global-parameter agreement: after every committed sync each live peer reports a hash of its
  global parameters, outer state and sync count to the coordinator; every sync whose reports
  disagree is counted (should be 0);
- held-out loss over time (every peer evaluates every ``eval_every`` steps): the median of the
  evaluations in each quarter of the run, which should keep falling.

    nice -n 10 python3 benchmarks/churn.py --peers 4 --minutes 5
"""

from __future__ import annotations

import argparse
import os
import random
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


class Peer:
    def __init__(self, n: int, coordinator: str, args, workdir: str, t0: float):
        self.n = n
        env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
                   OMP_NUM_THREADS="1")
        cmd = [sys.executable, "-m", "lowcomm.peer", "--coordinator", coordinator, "--recipe", args.recipe,
               "--bind", "tcp://127.0.0.1:*", "--out", os.path.join(workdir, f"peer{n}"),
               "--progress-timeout", "20", "--set", "steps=100000000", "--set", f"knobs.sync_every={args.sync_every}",
               "--set", f"eval_every={args.eval_every}", "--set", "log_every=1000000", "--set", "tensorboard=false",
               "--set", "checkpoint_every=0", "--set", "threads=1"]
        self.proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     text=True)
        self.evals: list[tuple[float, int, float]] = []  # (seconds since start, step, held-out loss)
        self.joined = False  # it printed its start line: it joined the run (fetched state) and trains
        self.lines: list[str] = []
        self.t0 = t0
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        pat = re.compile(r"step (\d+): held-out loss ([0-9.]+)")
        for line in self.proc.stdout:
            self.lines.append(line)
            if " parameters, " in line:
                self.joined = True
            m = pat.search(line)
            if m:
                self.evals.append((time.monotonic() - self.t0, int(m.group(1)), float(m.group(2))))

    def alive(self) -> bool:
        return self.proc.poll() is None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--peers", type=int, default=4)
    ap.add_argument("--minutes", type=float, default=5.0, help="how long the soak runs")
    ap.add_argument("--kill-every", type=float, default=25.0, help="mean seconds between kills")
    ap.add_argument("--restart-after", type=float, default=5.0, help="seconds before a killed peer is replaced")
    ap.add_argument("--sync-every", type=int, default=10, help="DiLoCo H for the soak")
    ap.add_argument("--eval-every", type=int, default=40)
    ap.add_argument("--recipe", default=os.path.join(ROOT, "recipes", "tiny_diloco.py"))
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if args.peers < 2:
        raise SystemExit("--peers must be at least 2")
    import logging

    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s")
    from lowcomm.comm.zmq import Coordinator

    rng = random.Random(args.seed)
    coord = Coordinator("tcp://127.0.0.1:*", min_peers=args.peers, heartbeat=2.0, heartbeat_timeout=20,
                        barrier_timeout=60, recovery=0)
    server = threading.Thread(target=coord.serve, daemon=True)
    server.start()
    workdir = tempfile.mkdtemp(prefix="lowcomm-churn-")
    t0 = time.monotonic()
    peers: list[Peer] = []
    launched = 0
    kills = {"KILL": 0, "TERM": 0}
    verdicts: dict[tuple, tuple[bool, float]] = {}
    hash_reports: dict[int, dict[int, str]] = {}
    pending_restarts: list[float] = []
    end = t0 + args.minutes * 60
    next_kill = None
    try:
        for _ in range(args.peers):
            peers.append(Peer(launched, coord.endpoint, args, workdir, t0))
            launched += 1
        while time.monotonic() < end:
            now = time.monotonic()
            # Poll the coordinator's verdicts and hash reports (it truncates old ones, so keep our own copy).
            for key, (ok, _lost) in list(coord.verdicts.items()):
                if key not in verdicts:
                    verdicts[key] = (ok, now - t0)
            for sync, reports in list(coord.hashes.items()):
                hash_reports.setdefault(sync, {}).update(dict(reports))
            committed = [t for ok, t in verdicts.values() if ok]
            if next_kill is None and committed:  # start the churn once the run is under way
                next_kill = now + args.kill_every * rng.uniform(0.5, 1.5)
            if next_kill is not None and now >= next_kill:
                # Kill only peers that joined and train (a peer still starting up is no churn of the run),
                # and leave at least two of them.
                live = [p for p in peers if p.alive() and p.joined]
                if len(live) > 2:
                    victim = rng.choice(live)
                    sig = rng.choice(["KILL", "TERM"])
                    victim.proc.send_signal(getattr(signal, "SIG" + sig))
                    kills[sig] += 1
                    pending_restarts.append(now + args.restart_after)
                    print(f"[{now - t0:6.1f}s] SIG{sig} -> peer {victim.n}", flush=True)
                next_kill = now + args.kill_every * rng.uniform(0.5, 1.5)
            for due in [d for d in pending_restarts if d <= now]:
                pending_restarts.remove(due)
                peers.append(Peer(launched, coord.endpoint, args, workdir, t0))
                print(f"[{now - t0:6.1f}s] started peer {launched}", flush=True)
                launched += 1
            time.sleep(0.1)
    finally:
        for p in peers:
            if p.alive():
                p.proc.send_signal(signal.SIGTERM)
        # A peer still joining (fetching a snapshot) only checks the stop flag once it trains: give
        # every peer 30 s in all to leave cleanly, then end the rest.
        stop_by = time.monotonic() + 30
        for p in peers:
            try:
                p.proc.wait(timeout=max(0.1, stop_by - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.proc.kill()
                p.proc.wait(timeout=10)
        for sync, reports in list(coord.hashes.items()):
            hash_reports.setdefault(sync, {}).update(dict(reports))
        coord.stop()
        server.join(10)

    commits = sorted(t for ok, t in verdicts.values() if ok)
    failed = sum(1 for ok, _ in verdicts.values() if not ok)
    gaps = [b - a for a, b in zip(commits, commits[1:])]
    disagree = [s for s, r in hash_reports.items() if len(set(r.values())) > 1]
    checked = [s for s, r in hash_reports.items() if len(r) >= 2]
    evals = sorted(e for p in peers for e in p.evals)
    print(f"\nchurn soak: {args.peers} peers, {args.minutes:g} min, H={args.sync_every}, "
          f"{kills['KILL']} SIGKILL + {kills['TERM']} SIGTERM, {launched} peer processes in all")
    print(f"  ops committed: {len(commits)}, rolled back: {failed}")
    print(f"  longest stall between committed ops: {max(gaps) if gaps else float('nan'):.1f} s "
          f"(median {statistics.median(gaps) if gaps else float('nan'):.2f} s)")
    print(f"  global-state hashes: {len(checked)} syncs reported by 2+ peers, {len(disagree)} disagreeing")
    if evals:
        span = evals[-1][0] - evals[0][0] + 1e-9
        quarters = [[loss for t, _s, loss in evals if q * span / 4 <= t - evals[0][0] < (q + 1) * span / 4 + 1e-6]
                    for q in range(4)]
        meds = [statistics.median(q) if q else float("nan") for q in quarters]
        print("  held-out loss, median per quarter of the run: " + ", ".join(f"{m:.3f}" for m in meds))
        falling = all(b < a for a, b in zip(meds, meds[1:]) if a == a and b == b)
        print(f"  held-out loss keeps falling: {'yes' if falling else 'NO'}")
    joined = sum(1 for p in peers if p.joined)
    print(f"  peer processes that joined and trained: {joined} of {launched}")
    print(f"  peer logs under {workdir}")
    return 0 if not disagree else 1


if __name__ == "__main__":
    sys.exit(main())
