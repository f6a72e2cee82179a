#!/usr/bin/env python3
"""A network lab: N Linux network namespaces on shaped links, for real runs on one machine.

Topology (a star around a bridge)::

    <name>-n0 [eth0 10.250.0.1] --veth-- [v0]\\
    <name>-n1 [eth0 10.250.0.2] --veth-- [v1]-- br0 in <name>-hub [10.250.0.254]
    ...                                   [vN]/

Every veth is created directly inside the namespaces it joins (``ip link add ... netns``),
so nothing is added to the host's own namespace and lab traffic never leaves the lab.
Each node's link is shaped in both directions with a token bucket filter
(``tc qdisc add dev X root tbf rate R burst B latency L``): on the node's ``eth0`` (its
uplink) and on the hub's ``vI`` (its downlink). ``netem`` is not available on these machines,
so there is no added delay; a transport that needs latency adds it itself.

Cleanup: namespaces are named ``<prefix><pid>-<tag>``. Deleting a namespace destroys the
veths inside it (and their peers), so removing the namespaces removes everything. The
lab removes them on leaving its ``with`` block, from an ``atexit`` hook, and on
SIGINT/SIGTERM (turned into ``SystemExit`` so ``with`` blocks unwind); :func:`cleanup_stale`
removes labs whose creating process is gone (e.g. after a SIGKILL).

Usage as a library::

    from tools.netlab import NetLab
    with NetLab(4, rate="100mbit") as lab:
        server = lab.popen("hub", ["python3", "-m", "http.server"])
        lab.run(0, ["python3", "client.py", lab.hub_addr])

From the shell (root needed)::

    python3 tools/netlab.py run --nodes 4 --rate 100mbit \\
        --hub-cmd 'python3 -m lowcomm.cli coordinator --bind tcp://{hub}:5555 --min-peers 4' \\
        --cmd 'python3 -m lowcomm.cli peer --coordinator tcp://{hub}:5555 --recipe R --bind tcp://{addr}:6000'
    python3 tools/netlab.py cleanup        # remove labs left by killed processes
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import ipaddress
import logging
import os
import re
import selectors
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence

__all__ = ["NetLab", "available", "cleanup_stale", "effective_rate", "lab_namespaces", "link_efficiency",
           "measure_all_to_all", "measure_throughput", "parse_rate"]

log = logging.getLogger("netlab")

PREFIX = "lcnl"
"""Every lab namespace starts with this (then the creating pid), so stale ones can be found."""

_UNITS = {"bit": 1, "kbit": 1e3, "mbit": 1e6, "gbit": 1e9, "tbit": 1e12,
          "bps": 8, "kbps": 8e3, "mbps": 8e6, "gbps": 8e9}


def parse_rate(rate: str) -> float:
    """A ``tc`` rate string ("100mbit", "1gbit", "12.5mbps") in bits per second."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]+)\s*", str(rate))
    if not m or m.group(2).lower() not in _UNITS:
        raise ValueError(f"rate must look like '100mbit', '1gbit' or '500kbit' (tc units: {', '.join(_UNITS)}); "
                         f"got {rate!r}")
    bits = float(m.group(1)) * _UNITS[m.group(2).lower()]
    if bits <= 0:
        raise ValueError(f"rate must be positive, got {rate!r}")
    return bits


def available() -> str | None:
    """None if this process can build a lab, else the reason it cannot."""
    if sys.platform != "linux":
        return "network namespaces need Linux"
    if os.geteuid() != 0:
        return "creating network namespaces needs root"
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            return f"the '{tool}' command (iproute2) is not installed"
    r = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True)
    if r.returncode != 0:
        return f"'ip netns' does not work here: {r.stderr.strip()}"
    return None


def _sh(args: Sequence[str], check: bool = True) -> subprocess.CompletedProcess:
    r = subprocess.run(list(args), capture_output=True, text=True, timeout=30)
    if check and r.returncode != 0:
        raise RuntimeError(f"command failed ({r.returncode}): {shlex.join(args)}\n{r.stderr.strip()}")
    return r


def lab_namespaces(prefix: str = PREFIX) -> list[str]:
    """Names of existing namespaces that belong to some lab."""
    out = _sh(["ip", "netns", "list"], check=False).stdout
    names = [line.split()[0] for line in out.splitlines() if line.strip()]
    return [n for n in names if n.startswith(prefix)]


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def cleanup_stale(prefix: str = PREFIX, all_labs: bool = False) -> list[str]:
    """Delete lab namespaces whose creating process is gone (every lab's with ``all_labs``).

    Returns the names deleted. Idempotent: deleting what is already gone is not an error.
    """
    removed = []
    for ns in lab_namespaces(prefix):
        m = re.match(re.escape(prefix) + r"(\d+)-", ns)
        if not all_labs and m and _pid_alive(int(m.group(1))):
            continue
        if _sh(["ip", "netns", "del", ns], check=False).returncode == 0:
            removed.append(ns)
    return removed


class NetLab:
    """N namespaces around a bridge, each link shaped with tbf (see the module docstring).

    Args:
        nodes: number of node namespaces (>= 1).
        rate: bandwidth of each node's link, each direction, in tc units ("100mbit").
            None leaves links unshaped.
        burst: tbf bucket size (tc units, e.g. "64kb"); default max(32 KiB, rate x 4 ms), enough
            for the kernel timer granularity at that rate.
        latency: tbf's queueing limit (how long a packet may wait in the bucket), not added delay.
        subnet: an IPv4 /24 or larger used only inside the lab; nodes get the first
            addresses, the hub the last usable one.
        prefix: namespace name prefix (stale-lab cleanup keys on it).
        handle_signals: on SIGINT/SIGTERM raise SystemExit so ``with`` blocks unwind and the
            lab is removed (only installed from the main thread).
    """

    def __init__(self, nodes: int, rate: str | None = "100mbit", burst: str | None = None, latency: str = "50ms",
                 subnet: str = "10.250.0.0/24", prefix: str = PREFIX, handle_signals: bool = True):
        if isinstance(nodes, bool) or not isinstance(nodes, int) or nodes < 1:
            raise ValueError(f"nodes must be an integer >= 1, got {nodes!r}")
        self.rate_bits = None if rate is None else parse_rate(rate)
        self.rate = rate
        if burst is None and self.rate_bits is not None:
            burst = f"{max(32 * 1024, int(self.rate_bits / 8 * 0.004))}b"
        self.burst = burst
        if not re.fullmatch(r"[0-9.]+(us|ms|s)", latency):
            raise ValueError(f"latency must be a tc time such as '50ms', got {latency!r}")
        self.latency = latency
        try:
            net = ipaddress.ip_network(subnet)
        except ValueError:
            raise ValueError(f"subnet must be an IPv4 network such as '10.250.0.0/24', got {subnet!r}") from None
        hosts = list(net.hosts())
        if net.version != 4 or not net.is_private or len(hosts) < nodes + 1:
            raise ValueError(f"subnet {subnet} must be a private IPv4 network with room for {nodes} nodes and a hub")
        self.prefixlen = net.prefixlen
        self.addrs = [str(h) for h in hosts[:nodes]]
        self.hub_addr = str(hosts[-1])
        self.nodes = nodes
        self.prefix = prefix
        self.name = f"{prefix}{os.getpid()}-{id(self) % 10000:04d}"
        self.hub = f"{self.name}-hub"
        self.namespaces = [f"{self.name}-n{i}" for i in range(nodes)]
        self._handle_signals = handle_signals
        self._old_handlers: dict[int, object] = {}
        self._procs: list[subprocess.Popen] = []
        self._up = False

    # ---- lifecycle ----------------------------------------------------------------------------
    def __enter__(self) -> NetLab:
        self.up()
        return self

    def __exit__(self, *exc) -> None:
        self.down()

    def up(self) -> None:
        """Create the namespaces, links, addresses and shapers."""
        why = available()
        if why:
            raise RuntimeError(f"cannot build a network lab: {why}")
        atexit.register(self.down)
        if self._handle_signals and threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old_handlers[sig] = signal.signal(sig, self._on_signal)
        self._up = True
        try:
            self._build()
        except BaseException:
            self.down()
            raise

    def _build(self) -> None:
        _sh(["ip", "netns", "add", self.hub])
        _sh(["ip", "-n", self.hub, "link", "set", "lo", "up"])
        _sh(["ip", "-n", self.hub, "link", "add", "br0", "type", "bridge"])
        _sh(["ip", "-n", self.hub, "addr", "add", f"{self.hub_addr}/{self.prefixlen}", "dev", "br0"])
        _sh(["ip", "-n", self.hub, "link", "set", "br0", "up"])
        for i, ns in enumerate(self.namespaces):
            _sh(["ip", "netns", "add", ns])
            _sh(["ip", "-n", ns, "link", "set", "lo", "up"])
            # Both ends are born inside their namespaces: the host namespace never sees them.
            _sh(["ip", "link", "add", "eth0", "netns", ns, "type", "veth", "peer", "name", f"v{i}", "netns", self.hub])
            _sh(["ip", "-n", ns, "addr", "add", f"{self.addrs[i]}/{self.prefixlen}", "dev", "eth0"])
            _sh(["ip", "-n", ns, "link", "set", "eth0", "up"])
            _sh(["ip", "-n", self.hub, "link", "set", f"v{i}", "master", "br0"])
            _sh(["ip", "-n", self.hub, "link", "set", f"v{i}", "up"])
            if self.rate is not None:
                for where, dev in ((ns, "eth0"), (self.hub, f"v{i}")):
                    _sh(["ip", "netns", "exec", where, "tc", "qdisc", "add", "dev", dev, "root", "tbf",
                         "rate", self.rate, "burst", str(self.burst), "latency", self.latency])

    def _on_signal(self, signum, frame) -> None:
        raise SystemExit(128 + signum)

    def down(self) -> None:
        """Stop the processes started here and delete every namespace of this lab (idempotent)."""
        for p in self._procs:
            if p.poll() is None:
                p.terminate()
        for p in self._procs:
            try:
                p.wait(timeout=5)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(timeout=5)
        self._procs.clear()
        if self._up:
            existing = set(lab_namespaces(self.name))
            for ns in [*self.namespaces, self.hub]:
                if ns in existing:
                    _sh(["ip", "netns", "del", ns], check=False)
            self._up = False
        for sig, h in self._old_handlers.items():
            signal.signal(sig, h)
        self._old_handlers.clear()
        atexit.unregister(self.down)

    # ---- running things inside --------------------------------------------------------------
    def _ns(self, node: int | str) -> str:
        if node == "hub":
            return self.hub
        if isinstance(node, int) and 0 <= node < self.nodes:
            return self.namespaces[node]
        raise ValueError(f"node must be 0..{self.nodes - 1} or 'hub', got {node!r}")

    def addr(self, node: int | str) -> str:
        """The IPv4 address of a node (or of the hub)."""
        self._ns(node)  # validates
        return self.hub_addr if node == "hub" else self.addrs[node]

    def wrap(self, node: int | str, argv: Sequence[str]) -> list[str]:
        """``argv`` prefixed so it runs inside ``node``'s namespace."""
        return ["ip", "netns", "exec", self._ns(node), *argv]

    def run(self, node: int | str, argv: Sequence[str], timeout: float = 600, **kw) -> subprocess.CompletedProcess:
        """Run ``argv`` inside ``node`` to completion (with a deadline)."""
        kw.setdefault("capture_output", True)
        kw.setdefault("text", True)
        return subprocess.run(self.wrap(node, argv), timeout=timeout, **kw)

    def popen(self, node: int | str, argv: Sequence[str], **kw) -> subprocess.Popen:
        """Start ``argv`` inside ``node``; it is terminated when the lab goes down."""
        p = subprocess.Popen(self.wrap(node, argv), **kw)
        self._procs.append(p)
        return p

    def describe(self) -> str:
        shape = "unshaped" if self.rate is None else f"tbf rate {self.rate} burst {self.burst} latency {self.latency}"
        lines = [f"lab {self.name}: hub {self.hub} ({self.hub_addr}), links {shape} each way"]
        lines += [f"  node {i}: {ns} {a}" for i, (ns, a) in enumerate(zip(self.namespaces, self.addrs))]
        return "\n".join(lines)


_SERVER = """
import socket, sys
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], int(sys.argv[2]))); s.listen(1); s.settimeout(60)
print("ready", flush=True)
c, _ = s.accept(); c.settimeout(60)
n = 0
while True:
    b = c.recv(1 << 16)
    if not b:
        break
    n += len(b)
c.sendall(str(n).encode()); c.close()
"""

_CLIENT = """
import socket, sys, time
n = int(sys.argv[3])
c = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=60)
t = time.monotonic()
c.sendall(b"x" * n); c.shutdown(socket.SHUT_WR)
got = int(c.recv(64).decode())
print(got, time.monotonic() - t)
"""


def measure_throughput(lab: NetLab, nbytes: int, src: int = 0, dst: int = 1, port: int = 7000) -> float:
    """Send ``nbytes`` over TCP from node ``src`` to node ``dst``; payload MB/s (time until the receiver
    acknowledged the last byte)."""
    server = lab.popen(dst, [sys.executable, "-c", _SERVER, lab.addr(dst), str(port)],
                       stdout=subprocess.PIPE, text=True)
    if server.stdout.readline().strip() != "ready":
        raise RuntimeError("throughput server in the lab did not start")
    r = lab.run(src, [sys.executable, "-c", _CLIENT, lab.addr(dst), str(port), str(nbytes)], timeout=600)
    server.wait(timeout=30)
    if r.returncode != 0:
        raise RuntimeError(f"throughput client failed: {r.stderr.strip()}")
    got, secs = r.stdout.split()
    if int(got) != nbytes:
        raise RuntimeError(f"sent {nbytes} bytes but the receiver counted {got}")
    return nbytes / float(secs) / 1e6


_A2A = """
import socket, sys, threading, time
me, addrs, n, port, phases = (int(sys.argv[1]), sys.argv[2].split(","), int(sys.argv[3]), int(sys.argv[4]),
                              int(sys.argv[5]))
limit = float(sys.argv[6])  # seconds any one wait may take
srv = socket.socket(); srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind((addrs[me], port)); srv.listen(len(addrs)); srv.settimeout(120)
got, failed, cv = [0], [], threading.Condition()
def read(c):
    c.settimeout(limit)
    while True:
        b = c.recv(1 << 16)
        if not b:
            break
        with cv:
            got[0] += len(b); cv.notify_all()
def accept():
    for _ in range(len(addrs) - 1):
        c, _ = srv.accept()
        threading.Thread(target=read, args=(c,), daemon=True).start()
threading.Thread(target=accept, daemon=True).start()
print("ready", flush=True)
sys.stdin.readline()  # every node listens by now: connect (like a transport's standing connections)
out = {j: socket.create_connection((addrs[j], port), timeout=limit) for j in range(len(addrs)) if j != me}
print("connected", flush=True)
t0 = float(sys.stdin.readline())  # start together
time.sleep(max(0.0, t0 - time.time()))
def send(j):
    try:
        out[j].sendall(b"x" * n)
    except OSError as e:
        with cv:
            failed.append(f"to node {j}: {e}"); cv.notify_all()
senders = []
for ph in range(1, phases + 1):  # a phase starts when this node has received all of the previous one
    for j in out:
        senders.append(threading.Thread(target=send, args=(j,), daemon=True))
        senders[-1].start()
    with cv:
        if not cv.wait_for(lambda: failed or got[0] >= ph * n * (len(addrs) - 1), timeout=limit) or failed:
            sys.exit(f"all-to-all failed: {failed or 'timed out'}")
print(time.time() - t0, flush=True)
for th in senders:  # what this node sends may still be on its way: the others wait for it
    th.join(limit)
for s in out.values():
    s.close()
"""


def _line_by(p: subprocess.Popen, deadline: float) -> str:
    """The next line of ``p``'s stdout (one line at a time is all the probe ever has pending)."""
    with selectors.DefaultSelector() as sel:
        sel.register(p.stdout, selectors.EVENT_READ)
        if not sel.select(max(0.0, deadline - time.monotonic())):
            raise RuntimeError("all-to-all probe: a node did not start in time")
    return p.stdout.readline().strip()


def measure_all_to_all(lab: NetLab, per_pair_bytes: int, repeats: int = 3, phases: int = 1,
                       port: int = 7100) -> list[float]:
    """Every node sends ``per_pair_bytes`` over standing TCP connections to every other node at
    once, ``phases`` times, a node starting a phase once it has received all of the previous one
    (2 phases: the traffic of an all-reduce's reduce-scatter and all-gather); per repeat, the
    seconds until the last node has received everything."""
    if per_pair_bytes < 1 or repeats < 1 or phases < 1:
        raise ValueError("per_pair_bytes, repeats and phases must be >= 1")
    if lab.nodes < 2:
        raise ValueError("an all-to-all needs at least 2 nodes")
    addrs = ",".join(lab.addrs)
    # A deadline for every wait: 10x the time at the nominal rate (or at 10 Mbit/s unshaped), >= 60 s.
    nominal = 8.0 * per_pair_bytes * (lab.nodes - 1) * phases / (lab.rate_bits or 10e6)
    limit = max(60.0, 10 * nominal)
    out = []
    for r in range(repeats):
        procs = [lab.popen(i, [sys.executable, "-c", _A2A, str(i), addrs, str(per_pair_bytes), str(port + r),
                               str(phases), repr(limit)],
                           stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                 for i in range(lab.nodes)]
        try:
            deadline = time.monotonic() + limit
            for want in ("ready", "connected"):
                for p in procs:
                    if _line_by(p, deadline) != want:
                        raise RuntimeError(f"all-to-all probe: a node failed to start (rc {p.poll()})")
                if want == "ready":
                    for p in procs:
                        p.stdin.write("go\n")
                        p.stdin.flush()
            t0 = time.time() + 0.2  # a common start: the namespaces share the host's clock
            for p in procs:
                p.stdin.write(f"{t0!r}\n")
                p.stdin.flush()
            times = []
            for p in procs:
                so, se = p.communicate(timeout=3 * limit)
                if p.returncode != 0:
                    raise RuntimeError(f"all-to-all probe failed: {se.strip()[-500:]}")
                times.append(float(so.split()[-1]))
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    p.wait(5)
                for f in (p.stdin, p.stdout, p.stderr):
                    with contextlib.suppress(OSError):
                        f.close()
        out.append(max(times))
    return out


def effective_rate(lab: NetLab, per_pair_bytes: int, repeats: int = 3, phases: int = 1) -> float:
    """Payload bits/s each node's uplink delivers in :func:`measure_all_to_all` (headers, ACKs and
    TCP flows sharing a link lower it; a token bucket's burst raises it for transfers that fit in
    the bucket): phases x (N-1) x ``per_pair_bytes`` over the median time of the repeats."""
    secs = sorted(measure_all_to_all(lab, per_pair_bytes, repeats, phases))[repeats // 2]
    return 8.0 * phases * per_pair_bytes * (lab.nodes - 1) / secs


def link_efficiency(lab: NetLab, per_pair_bytes: int, repeats: int = 3, phases: int = 1) -> float:
    """:func:`effective_rate` as a share of the nominal rate, at most 1 (the simulator's
    :class:`~lowcomm.sim.clock.Network` ``efficiency``)."""
    if lab.rate_bits is None:
        raise ValueError("the lab's links are unshaped: there is no nominal rate to compare with")
    return min(1.0, effective_rate(lab, per_pair_bytes, repeats, phases) / lab.rate_bits)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="netlab", description="Network namespaces on tbf-shaped links.")
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="build a lab, run a command in every node (and the hub), tear down")
    r.add_argument("--nodes", type=int, default=4)
    r.add_argument("--rate", default="100mbit", help="per-link rate each way, tc units; 'none' for unshaped")
    r.add_argument("--burst", default=None)
    r.add_argument("--latency", default="50ms")
    r.add_argument("--subnet", default="10.250.0.0/24")
    r.add_argument("--hub-cmd", default=None, help="command run in the hub namespace first ({hub} = hub address)")
    r.add_argument("--cmd", required=True,
                   help="command run in each node; {i} = node index, {addr} = its address, {hub} = hub address, "
                        "{n} = number of nodes")
    r.add_argument("--timeout", type=float, default=900, help="seconds before the node commands are killed")
    c = sub.add_parser("cleanup", help="remove labs left behind by processes that are gone")
    c.add_argument("--all", action="store_true", help="remove every lab, including ones whose creator still runs")
    sub.add_parser("list", help="list lab namespaces")
    b = sub.add_parser("speed", help="measure TCP payload throughput between two nodes of a shaped lab")
    b.add_argument("--rate", default="100mbit")
    b.add_argument("--mb", type=float, default=50.0, help="megabytes to send")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.cmd == "list":
        print("\n".join(lab_namespaces()))
        return 0
    if args.cmd == "cleanup":
        gone = cleanup_stale(all_labs=args.all)
        print(f"removed {len(gone)} namespace(s)" + (": " + " ".join(gone) if gone else ""))
        return 0
    cleanup_stale()
    if args.cmd == "speed":
        with NetLab(2, rate=args.rate) as lab:
            mbs = measure_throughput(lab, int(args.mb * 1e6))
        print(f"tbf rate {args.rate}: {mbs:.2f} MB/s of TCP payload "
              f"({100 * mbs * 8e6 / parse_rate(args.rate):.1f}% of the rate)")
        return 0
    rate = None if args.rate.lower() == "none" else args.rate
    with NetLab(args.nodes, rate=rate, burst=args.burst, latency=args.latency, subnet=args.subnet) as lab:
        print(lab.describe(), flush=True)
        fmt = {"hub": lab.hub_addr, "n": args.nodes}
        if args.hub_cmd:
            lab.popen("hub", shlex.split(args.hub_cmd.format(**fmt)))
            time.sleep(1.0)  # let a coordinator bind before peers dial it
        procs = [lab.popen(i, shlex.split(args.cmd.format(i=i, addr=lab.addrs[i], **fmt)))
                 for i in range(args.nodes)]
        end = time.monotonic() + args.timeout
        rcs = []
        for p in procs:
            try:
                rcs.append(p.wait(timeout=max(0.0, end - time.monotonic())))
            except subprocess.TimeoutExpired:
                p.kill()
                rcs.append(p.wait(timeout=5))
        print(f"node exit codes: {rcs}", flush=True)
        return 0 if all(rc == 0 for rc in rcs) else 1


if __name__ == "__main__":
    sys.exit(main())
