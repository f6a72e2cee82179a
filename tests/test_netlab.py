"""The network lab: namespaces connected, links shaped, everything removed afterwards."""

import os
import subprocess
import sys
import time

import pytest

from tools import netlab

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

pytestmark = pytest.mark.skipif(netlab.available() is not None, reason=f"no network lab: {netlab.available()}")

def test_rate_parsing_and_arguments():
    assert netlab.parse_rate("100mbit") == 100e6
    assert netlab.parse_rate("1.5gbit") == 1.5e9
    assert netlab.parse_rate("1mbps") == 8e6
    with pytest.raises(ValueError, match="rate must look like"):
        netlab.parse_rate("fast")
    with pytest.raises(ValueError, match="nodes"):
        netlab.NetLab(0)
    with pytest.raises(ValueError, match="private"):
        netlab.NetLab(2, subnet="8.8.8.0/24")


def test_two_namespaces_connect_shaped_and_cleaned_up():
    size = 1_000_000
    with netlab.NetLab(2, rate="8mbit", burst="32kb", handle_signals=False) as lab:
        names = set(netlab.lab_namespaces(lab.name))
        assert names == {lab.hub, *lab.namespaces}
        # The node sees its own address and nothing of the host's interfaces.
        links = lab.run(0, ["ip", "-o", "addr"]).stdout
        assert lab.addr(0) in links and "192.0.2" not in links
        qd = lab.run(0, ["tc", "qdisc", "show", "dev", "eth0"]).stdout
        assert "tbf" in qd and "8Mbit" in qd
        mbs = netlab.measure_throughput(lab, size)
        # Loose sanity bound only: a token bucket can never deliver faster than its rate (plus one
        # burst); a slow machine only makes it slower, so this upper bound does not depend on load.
        assert mbs * 1e6 <= 2 * 8e6 / 8 * size / (size - 32 * 1024)
    assert netlab.lab_namespaces(lab.name) == []
    lab.down()  # idempotent


def test_all_to_all_probe_and_link_efficiency():
    per_pair = 200_000
    with netlab.NetLab(3, rate="16mbit", burst="4kb", handle_signals=False) as lab:
        secs = netlab.measure_all_to_all(lab, per_pair, repeats=2, phases=2)
        assert len(secs) == 2
        # Each uplink carries 2 phases x 2 peers x 200 kB at 2 MB/s: never faster than 0.4 s (load
        # only slows it; the 4 kB bucket cannot carry a meaningful part of it).
        assert min(secs) >= 0.95 * 2 * 2 * per_pair / 2e6
        eff = netlab.link_efficiency(lab, per_pair, repeats=1)
        assert 0 < eff <= 1.0
    with pytest.raises(ValueError, match="unshaped"):
        netlab.link_efficiency(netlab.NetLab(2, rate=None), 1)


def test_failure_inside_the_lab_still_cleans_up():
    with pytest.raises(RuntimeError, match="boom"):
        with netlab.NetLab(1, rate=None, handle_signals=False) as lab:
            assert netlab.lab_namespaces(lab.name)
            raise RuntimeError("boom")
    assert netlab.lab_namespaces(lab.name) == []


def test_killed_creator_leaves_a_stale_lab_that_cleanup_removes():
    code = ("import sys, time; sys.path.insert(0, '.'); from tools.netlab import NetLab; "
            "lab = NetLab(1, rate=None); lab.up(); print(lab.name, flush=True); time.sleep(60)")
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        name = p.stdout.readline().strip()
        assert netlab.lab_namespaces(name)
        # A live creator's lab is left alone ...
        assert not [n for n in netlab.cleanup_stale() if n.startswith(name)]
        p.kill()  # SIGKILL: no handler runs
        p.wait(timeout=10)
        deadline = time.monotonic() + 10
        while netlab._pid_alive(p.pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        # ... and removed once it is gone.
        removed = netlab.cleanup_stale()
        assert {n for n in removed if n.startswith(name)} == {f"{name}-hub", f"{name}-n0"}
        assert netlab.lab_namespaces(name) == []
    finally:
        if p.poll() is None:
            p.kill()
            p.wait(timeout=10)


def test_sigterm_removes_the_lab():
    code = ("import sys, time; sys.path.insert(0, '.'); from tools.netlab import NetLab\n"
            "with NetLab(1, rate=None) as lab:\n"
            "    print(lab.name, flush=True); time.sleep(60)\n")
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        name = p.stdout.readline().strip()
        assert netlab.lab_namespaces(name)
        p.terminate()
        assert p.wait(timeout=20) == 128 + 15
        assert netlab.lab_namespaces(name) == []
    finally:
        if p.poll() is None:
            p.kill()
            p.wait(timeout=10)
