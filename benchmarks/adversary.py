"""The ZeroMQ trust model against a live group: attacks from an allowlisted key that is not a member.

A CURVE coordinator and W honest peers run in this process (threads); the attacker is a separate
process holding an allowlisted key (``evil``). Its messages are the table's attacks that a stranger can
send: forged ``leave``/``done``/``ready`` for every member id (pre-seeded verdicts, far-future barriers)
to the coordinator; forged data chunks for future ops, forged aborts and snapshot requests to peer 0.
(Attacks that need a member's cooperation, overflows and malformed payloads, are in
``tests/test_zmq_adversary.py``.) Phase 1 sends short bursts at the coordinator and at peer 0 while
the honest peers keep all-reducing; every honest result is checked against the exact mean. Phase 2 is
the flood: for ``--flood-seconds`` the attacker sends ``--rate`` messages/s of every kind (forged
controls to the coordinator; forged data for future ops, aborts and snapshot requests to peer 0),
first at a sink socket (the control: what the attacker's own CPU costs on this machine), then at
the group. It prints attacks tried, ops committed, wrong results (must be 0), RSS growth of this
process (coordinator and peers together) during the flood, the longest stall of an honest op, and
the honest op rate under the flood as a fraction of the rate with the flood at the sink (target
>= 0.8; RSS growth target <= 50 MB). Smoke run:

    python benchmarks/adversary.py --peers 2 --flood-seconds 1 --rate 500 --ops 3

The issue's scenario (10 s of 10,000 msgs/s):

    nice -n 10 python benchmarks/adversary.py --peers 3 --flood-seconds 10 --rate 10000 --json out.json
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def flood(keys: str, targets: list[tuple[str, str, str]], ids: list[int], rate: int, seconds: float, ready) -> None:
    """The attacker: ``rate`` msgs/s for ``seconds`` at every target (endpoint, server key file, role)."""
    import torch
    import zmq

    from lowcomm.comm.zmq import CurveConfig
    from lowcomm.comm.zmq.wire import encode_control, encode_header

    cfg = CurveConfig(os.path.join(keys, "evil.key_secret"), os.path.join(keys, "allow"))
    ctx = zmq.Context()
    socks = []
    for endpoint, key_file, role in targets:
        s = ctx.socket(zmq.DEALER)
        s.setsockopt(zmq.LINGER, 0)
        s.setsockopt(zmq.SNDHWM, 1000)
        cfg.make_client(s, zmq.auth.load_certificate(key_file)[0])
        s.connect(endpoint)
        socks.append((s, role))
    chunk = torch.zeros(1024).numpy()
    msgs = {"coord": [[encode_control("leave", id=i)] for i in ids]
            + [[encode_control("done", id=i, op=o, group=ids, ok=True, why="")] for i in ids for o in range(4)]
            + [[encode_control("ready", id=i, op=10**6)] for i in ids],
            "peer": [[encode_header("data", i, 0, o, "rs", 0, 0, 1, "float32", [1 << 20], 0), chunk]
                     for i in ids for o in range(8)]
            + [[encode_control("abort", id=i, op=o)] for i in ids for o in range(8)]
            + [[encode_control("fetch", id=i, snap=None, tensor=-1)] for i in ids]}
    ready.wait()
    sent, start, k = 0, time.monotonic(), 0
    while time.monotonic() - start < seconds:
        due = int((time.monotonic() - start) * rate)
        while sent < due:
            s, role = socks[k % len(socks)]
            m = msgs[role][k % len(msgs[role])]
            k += 1
            try:
                s.send_multipart(m, flags=zmq.NOBLOCK, copy=False)
            except zmq.Again:
                pass
            sent += 1
        time.sleep(0.001)
    for s, _ in socks:
        s.close(0)
    ctx.term()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--peers", type=int, default=3)
    ap.add_argument("--ops", type=int, default=5, help="honest all-reduces per attack in phase 1")
    ap.add_argument("--size", type=int, default=1 << 16, help="elements per honest all-reduce")
    ap.add_argument("--flood-seconds", type=float, default=10.0)
    ap.add_argument("--rate", type=int, default=10000, help="attacker messages per second")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    import torch
    import zmq

    from lowcomm.comm.zmq import Coordinator, CurveConfig, ZmqTransport, generate_keypair

    torch.set_num_threads(1)
    keys = tempfile.mkdtemp(prefix="lowcomm-adv-")
    allow = os.path.join(keys, "allow")
    os.makedirs(allow)
    names = ["coord", "sink", "evil"] + [f"p{i}" for i in range(args.peers)]
    for n in names:
        pub, _ = generate_keypair(keys, n)
        if n != "coord":
            with open(pub, "rb") as src, open(os.path.join(allow, f"{n}.key"), "wb") as dst:
                dst.write(src.read())
    cfg = lambda n: CurveConfig(os.path.join(keys, f"{n}.key_secret"), allow, os.path.join(keys, "coord.key"))  # noqa: E731
    c = Coordinator("tcp://127.0.0.1:*", min_peers=args.peers, heartbeat=0.5, barrier_timeout=30.0,
                    curve=CurveConfig(os.path.join(keys, "coord.key_secret"), allow))
    threading.Thread(target=c.serve, daemon=True).start()
    ts: list = [None] * args.peers

    def mk(i):
        ts[i] = ZmqTransport(c.endpoint, heartbeat=0.5, progress_timeout=30.0, curve=cfg(f"p{i}"))
    th = [threading.Thread(target=mk, args=(i,)) for i in range(args.peers)]
    for t in th:
        t.start()
    for t in th:
        t.join(120)
    ts.sort(key=lambda t: t.rank)
    ids = [t.rank for t in ts]
    stats = {"attacks": 0, "ops_committed": 0, "wrong_results": 0, "failed_ops": 0, "longest_stall_s": 0.0}

    def honest_op() -> float:
        t0 = time.monotonic()
        hs = [t.all_reduce([torch.full((args.size,), float(t.rank))]) for t in ts]
        want = torch.full((args.size,), sum(ids) / len(ids))
        for h in hs:
            try:
                out = h.wait(120)[0]
                stats["wrong_results"] += int(not torch.equal(out, want))
            except Exception:  # noqa: BLE001 - a failed op is counted, never a wrong result
                stats["failed_ops"] += 1
                return time.monotonic() - t0
        stats["ops_committed"] += 1
        dt = time.monotonic() - t0
        stats["longest_stall_s"] = max(stats["longest_stall_s"], dt)
        return dt

    def run_flood(targets, seconds) -> float:
        ready = mp.Event()
        p = mp.Process(target=flood, args=(keys, targets, ids, args.rate, seconds, ready))
        p.start()
        time.sleep(1.0)  # connections and handshakes
        ready.set()
        n, t0 = 0, time.monotonic()
        while time.monotonic() - t0 < seconds:
            honest_op()
            n += 1
        rate = n / (time.monotonic() - t0)
        p.join(seconds + 30)
        return rate

    # phase 1: a burst at the coordinator, then one at peer 0, honest ops meanwhile
    coord_key, peer0_key = os.path.join(keys, "coord.key"), os.path.join(keys, f"p{0}.key")
    for role, endpoint, key in (("coord", c.endpoint, coord_key), ("peer", ts[0].address, peer0_key)):
        stats["attacks"] += 1
        run_flood([(endpoint, key, role)], max(0.5, args.ops * 0.05))
    # phase 2: the flood, first at a sink (control), then at the group
    sink_ctx = zmq.Context()
    sink_cfg = CurveConfig(os.path.join(keys, "sink.key_secret"), allow)
    sink_auth = sink_cfg.start_authenticator(sink_ctx)
    sink = sink_ctx.socket(zmq.ROUTER)
    sink_cfg.make_server(sink)
    port = sink.bind_to_random_port("tcp://127.0.0.1")
    stop = threading.Event()

    def drain():
        while not stop.is_set():
            if sink.poll(100):
                sink.recv_multipart()
    threading.Thread(target=drain, daemon=True).start()
    sink_key = os.path.join(keys, "sink.key")
    control = run_flood([(f"tcp://127.0.0.1:{port}", sink_key, "peer")], args.flood_seconds)
    rss0 = rss_mb()
    attacked = run_flood([(c.endpoint, coord_key, "coord"), (ts[0].address, peer0_key, "peer")], args.flood_seconds)
    stats["attacks"] += 1
    stats["rss_growth_mb"] = round(rss_mb() - rss0, 1)
    stats["honest_rate_control"] = round(control, 2)
    stats["honest_rate_flooded"] = round(attacked, 2)
    stats["rate_ratio"] = round(attacked / control, 3) if control else None
    stats["rejected_at_coordinator"] = c.rejects.total
    stats["rejected_at_peer0"] = ts[0].rejects.total
    stop.set()
    for t in ts:
        t.close()
    c.stop()
    sink.close(0)
    sink_auth.stop()
    sink_ctx.term()
    print("attacks tried {attacks}, ops committed {ops_committed}, wrong results {wrong_results}, failed ops "
          "{failed_ops}, RSS growth {rss_growth_mb} MB, longest stall {longest_stall_s:.2f} s, honest rate "
          "{honest_rate_flooded}/s flooded vs {honest_rate_control}/s with the flood at a sink (ratio {rate_ratio}); "
          "rejected: coordinator {rejected_at_coordinator}, peer 0 {rejected_at_peer0}".format(**stats))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), **stats}, f, indent=1)
    if stats["wrong_results"]:
        raise SystemExit("wrong results under attack")


if __name__ == "__main__":
    main()
