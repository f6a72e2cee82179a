"""All-reduce bus bandwidth on loopback: lowcomm's ZeroMQ transport next to torch.distributed gloo.

W peer processes (2 and 4) each hold a gloo process group and two ZeroMQ transports (CURVE
off and on, each with its own in-process coordinator in the parent). For every size
(fp32, MiB) and repeat, the configurations run interleaved in the same processes: gloo
``all_reduce`` (sum), ZeroMQ fp32 (sum), ZeroMQ with CURVE, and ZeroMQ with the int8 and 4-bit
codecs. Every timed operation starts after a gloo barrier; its time is the slowest rank's.

Bus bandwidth follows nccl-tests: ``busbw = 2 (W-1)/W * bytes / time`` with ``bytes`` the fp32
tensor's size (for the codecs too, so their figure is the fp32 bandwidth they stand in for).
The table reports the median over repeats and the ZeroMQ/gloo ratio of medians.

    nice -n 10 python benchmarks/transport.py --worlds 2 4 --sizes 1 4 16 64 256 --repeats 3
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def worker(cfg: dict) -> None:
    import torch
    import torch.distributed as dist

    from lowcomm.comm.zmq import CurveConfig, ZmqTransport

    torch.set_num_threads(1)
    rank, world = cfg["rank"], cfg["world"]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{cfg['port']}", rank=rank, world_size=world)
    plain = ZmqTransport(cfg["coord"], heartbeat=1.0, progress_timeout=120)
    curve = ZmqTransport(cfg["coord_curve"], heartbeat=1.0, progress_timeout=120,
                         curve=CurveConfig(cfg["keys"][rank], cfg["allow"], cfg["coord_key"]))
    configs = {
        "gloo": lambda x: dist.all_reduce(x),
        "zmq": lambda x: plain.all_reduce([x], op="sum").wait(600),
        "zmq+curve": lambda x: curve.all_reduce([x], op="sum").wait(600),
    }
    for codec in cfg["codecs"]:
        configs[f"zmq {codec}"] = (lambda c: lambda x: plain.all_reduce([x], op="sum", codec=c).wait(600))(codec)
    results = []
    for mib in cfg["sizes"]:
        n = int(mib * (1 << 20)) // 4
        x = torch.randn(n)
        for fn in configs.values():  # warm-up (buffers, connections)
            fn(x.clone())
        for rep in range(cfg["repeats"]):
            for name, fn in configs.items():
                y = x.clone()
                dist.barrier()
                t0 = time.perf_counter()
                fn(y)
                dt = torch.tensor([time.perf_counter() - t0], dtype=torch.float64)
                dist.all_reduce(dt, op=dist.ReduceOp.MAX)
                results.append({"world": world, "mib": mib, "config": name, "rep": rep, "seconds": dt.item()})
        if rank == 0:
            print(f"  W={world} {mib} MiB done", flush=True)
    if rank == 0:
        with open(cfg["out"], "w") as f:
            json.dump(results, f)
    dist.barrier()
    plain.close()
    curve.close()
    dist.destroy_process_group()


def run_world(world: int, args, tmp: str) -> list[dict]:
    from lowcomm.comm.zmq import Coordinator, CurveConfig, generate_keypair

    keys = os.path.join(tmp, "keys")
    allow = os.path.join(tmp, "allow")
    os.makedirs(allow, exist_ok=True)
    secrets = []
    for name in ["coord"] + [f"p{i}" for i in range(world)]:
        pub, sec = generate_keypair(keys, name)
        with open(pub, "rb") as a, open(os.path.join(allow, os.path.basename(pub)), "wb") as b:
            b.write(a.read())
        secrets.append(sec)
    coords = [Coordinator("tcp://127.0.0.1:*", min_peers=world, heartbeat=1.0, barrier_timeout=600),
              Coordinator("tcp://127.0.0.1:*", min_peers=world, heartbeat=1.0, barrier_timeout=600,
                          curve=CurveConfig(secrets[0], allow))]
    threads = [threading.Thread(target=c.serve, daemon=True) for c in coords]
    for t in threads:
        t.start()
    out = os.path.join(tmp, f"w{world}.json")
    port = _free_port()
    procs = []
    try:
        for r in range(world):
            cfg = {"rank": r, "world": world, "port": port, "coord": coords[0].endpoint,
                   "coord_curve": coords[1].endpoint, "keys": secrets[1:], "allow": allow,
                   "coord_key": os.path.join(keys, "coord.key"), "sizes": args.sizes, "repeats": args.repeats,
                   "codecs": args.codecs, "out": out}
            procs.append(subprocess.Popen([sys.executable, __file__, "--worker", json.dumps(cfg)],
                                          env={**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}))
        for p in procs:
            p.wait(args.timeout)
        with open(out) as f:
            return json.load(f)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
        for c in coords:
            c.stop()


def table(results: list[dict]) -> str:
    lines = []
    worlds = sorted({r["world"] for r in results})
    configs = list(dict.fromkeys(r["config"] for r in results))
    for w in worlds:
        lines.append(f"\nW = {w} peers, bus bandwidth GB/s (median of repeats; [min-max]); ratio = ZeroMQ / gloo\n")
        lines.append("| MiB | " + " | ".join(configs) + " | zmq/gloo | zmq+curve/gloo |")
        lines.append("|---:|" + "---:|" * (len(configs) + 2))
        for mib in sorted({r["mib"] for r in results if r["world"] == w}):
            med = {}
            cells = []
            for c in configs:
                bws = [2 * (w - 1) / w * mib * (1 << 20) / r["seconds"] / 1e9 for r in results
                       if r["world"] == w and r["mib"] == mib and r["config"] == c]
                med[c] = statistics.median(bws)
                cells.append(f"{med[c]:.2f} [{min(bws):.2f}-{max(bws):.2f}]")
            lines.append(f"| {mib:g} | " + " | ".join(cells) + f" | {med['zmq'] / med['gloo']:.2f} | "
                         f"{med['zmq+curve'] / med['gloo']:.2f} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--worlds", type=int, nargs="+", default=[2, 4])
    ap.add_argument("--sizes", type=float, nargs="+", default=[1, 4, 16, 64, 256], help="fp32 tensor sizes, MiB")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--codecs", nargs="*", default=["int8", "int4"])
    ap.add_argument("--timeout", type=float, default=1800)
    ap.add_argument("--json", default=None, help="also write the raw timings here")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(json.loads(args.worker))
        return
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for w in args.worlds:
            print(f"W={w}: {args.sizes} MiB x {args.repeats} repeats", flush=True)
            results += run_world(w, args, tmp)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f)
    print(table(results))


if __name__ == "__main__":
    main()
