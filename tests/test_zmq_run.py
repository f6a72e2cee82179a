"""ZeroMQ runs with real peer processes on loopback: equivalence with the local transport,
peers killed (SIGKILL) or stopped (SIGSTOP) mid-all-reduce, joining (and a donor dying
mid-transfer), a coordinator restart. Every process is killed in ``finally``; every wait is bounded.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time

import pytest
import torch

from lowcomm.comm.local import Fault, run_local
from lowcomm.comm.zmq import Coordinator

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _zmq_worker as worker  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKER = os.path.join(ROOT, "tests", "_zmq_worker.py")
HB = 0.2  # heartbeat seconds; the coordinator drops a peer silent for HB_TIMEOUT
HB_TIMEOUT = 3.0
TRANSPORT = {"heartbeat": HB, "progress_timeout": 8.0, "join_timeout": 60.0}

pytestmark = pytest.mark.timeout(300)


@contextlib.contextmanager
def coordinator(port: int | str = "*", **kw):
    kw.setdefault("heartbeat", HB)
    kw.setdefault("heartbeat_timeout", HB_TIMEOUT)
    kw.setdefault("barrier_timeout", 30.0)
    c = Coordinator(f"tcp://127.0.0.1:{port}", **kw)
    th = threading.Thread(target=c.serve, daemon=True)
    th.start()
    try:
        yield c
    finally:
        c.stop()
        th.join(5)


class Peers:
    """Peer processes of one test; all killed on exit."""

    def __init__(self, tmp_path):
        self.tmp = tmp_path
        self.procs: list[subprocess.Popen] = []
        self.outs: list[str] = []

    def spawn(self, coord: str, **cfg) -> int:
        i = len(self.procs)
        out = str(self.tmp / f"peer{i}.json")
        cfg = {"coordinator": coord, "out": out, "steps": 6, "transport": dict(TRANSPORT), **cfg}
        log = open(self.tmp / f"peer{i}.log", "w")
        # Same environment as this process: OMP_NUM_THREADS alone changes float results (kernel choice),
        # and the peers must do the arithmetic of the local reference computed here.
        env = {**os.environ, "PYTHONPATH": ROOT}
        self.procs.append(subprocess.Popen([sys.executable, WORKER, json.dumps(cfg)], stdout=log,
                                           stderr=subprocess.STDOUT, env=env))
        self.outs.append(out)
        return i

    def wait(self, idx, timeout=120.0):
        end = time.monotonic() + timeout
        for i in idx:
            self.procs[i].wait(max(0.1, end - time.monotonic()))
        res = []
        for i in idx:
            if not os.path.exists(self.outs[i]):
                raise AssertionError(f"peer {i} wrote no result (rc {self.procs[i].returncode}):\n" + self.log(i))
            with open(self.outs[i]) as f:
                res.append(json.load(f))
        return res

    def log(self, i) -> str:
        with open(self.tmp / f"peer{i}.log") as f:
            return f.read()[-4000:]

    def kill_all(self):
        for p in self.procs:
            if p.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(p.pid, signal.SIGKILL)
                p.wait(10)


@pytest.fixture
def peers(tmp_path):
    p = Peers(tmp_path)
    try:
        yield p
    finally:
        p.kill_all()


def params_of(res, key="params"):
    return torch.frombuffer(bytearray.fromhex(res[key]), dtype=torch.float32)


def local_reference(world, steps, faults=None, knobs=None):
    def fn(t):
        model, opt = worker.train(t, "diloco", steps, knobs)
        return worker.flat(model.parameters())
    return run_local(world, fn, faults=faults, timeout=30)


def test_diloco_4_peers_equal_local_and_ring_bytes(peers):
    W, steps = 4, 6
    with coordinator(min_peers=W, audit=0.0) as c:  # an audit moves more bytes (on its op's record)
        for _ in range(W):
            peers.spawn(c.endpoint, steps=steps)
        res = peers.wait(range(W))
    ref = local_reference(W, steps)
    by_member = {r["member"]: r for r in res}
    assert sorted(by_member) == list(range(W))
    for m, r in by_member.items():
        p = params_of(r)
        assert torch.equal(p, params_of(by_member[0]))  # bit-identical across peers
        assert (p - ref[m]).abs().max() <= 1e-6  # equal to the local transport
        assert r["sync_count"] == steps // 2 and r["failed_syncs"] == 0
        n_bytes = p.numel() * 4
        ring = 2 * (W - 1) / W * n_bytes
        for rec in r["ledger"]:
            if rec["kind"] == "all_reduce":
                # header + payload frames actually sent: the ring's payload plus < 200 header bytes a message
                assert ring <= rec["bytes_sent"] <= ring + 200 * rec["messages"], rec


def _survivors_match_local(res, fault_rank_local, fault, W, steps):
    ref = local_reference(W, steps, faults={fault_rank_local: fault})
    first = params_of(res[0])
    for r in res:
        assert torch.equal(params_of(r), first)
        assert r["failed_syncs"] == 1
        failed = [x for x in r["ledger"] if x["ok"] is False]
        assert len(failed) == 1 and failed[0]["kind"] == "all_reduce"
    # the survivors did the same arithmetic as the local transport's survivors
    for r in res:
        assert (params_of(r) - ref[r["member"]]).abs().max() <= 1e-6


@pytest.mark.parametrize("sig", ["KILL", "STOP"])
def test_peer_lost_mid_allreduce(peers, tmp_path, sig):
    """Member 2 sends itself SIGKILL/SIGSTOP during the 2nd sync (op 2) after 1 message."""
    W, steps = 3, 6
    ledger = str(tmp_path / "victim_ledger.json")
    fault = {"op": 2, "after_messages": 1, "signal": sig, "ledger_file": ledger, "member": 2}
    with coordinator(min_peers=W) as c:
        for _ in range(W):
            peers.spawn(c.endpoint, steps=steps, transport={**TRANSPORT, "fault": fault})
        # the survivors are the two processes that are not member 2; find them once they finish
        deadline = time.monotonic() + 120
        while not os.path.exists(ledger) and time.monotonic() < deadline:
            time.sleep(0.1)
        victim = json.load(open(ledger))
        assert victim["member"] == 2
        op2 = [r for r in victim["records"] if r["op_id"] == 2][0]
        assert op2["bytes_sent"] > 0  # part of the all-reduce had moved when it died
        done = []
        end = time.monotonic() + 120
        while len(done) < W - 1 and time.monotonic() < end:
            done = [i for i in range(W) if os.path.exists(peers.outs[i])]
            time.sleep(0.1)
        res = peers.wait(done)
    assert sorted(r["member"] for r in res) == [0, 1]
    _survivors_match_local(res, 2, Fault(op=2, after_messages=1), W, steps)
    for r in res:
        assert r["members"] == [0, 1]


def test_join_mid_run_ends_bit_identical(peers):
    """Two founders; a third peer joins after the 2nd sync from a snapshot and ends bit-identical."""
    steps = 8
    with coordinator(min_peers=2) as c:
        for _ in range(2):
            peers.spawn(c.endpoint, steps=steps, waits=[[4, 2]])
        end = time.monotonic() + 60
        while not c.started and time.monotonic() < end:
            time.sleep(0.05)
        j = peers.spawn(c.endpoint, steps=steps)
        res = peers.wait([0, 1, j])
    by_member = {r["member"]: r for r in res}
    assert sorted(by_member) == [0, 1, 2]
    first = params_of(by_member[0])
    for r in res:
        assert torch.equal(params_of(r), first)
        assert torch.equal(params_of(r, "anchors"), params_of(by_member[0], "anchors"))
        assert r["failed_syncs"] == 0 and r["local_step"] == steps
    assert by_member[2]["sync_count"] == steps // 2  # the counters came with the snapshot


def test_donor_dies_mid_transfer_joiner_uses_another(peers):
    """Three founders; member 0 (the first donor asked) dies after serving 3 snapshot chunks."""
    steps = 8
    fault = {"serve_chunks": 3, "member": 0}
    with coordinator(min_peers=3) as c:
        for _ in range(3):
            peers.spawn(c.endpoint, steps=steps, waits=[[4, 3]], transport={**TRANSPORT, "fault": fault})
        end = time.monotonic() + 60
        while not c.started and time.monotonic() < end:
            time.sleep(0.05)
        j = peers.spawn(c.endpoint, steps=steps, transport={**TRANSPORT, "progress_timeout": 3.0})
        done = []
        end = time.monotonic() + 120
        while len(done) < 3 and time.monotonic() < end:
            done = [i for i in range(4) if os.path.exists(peers.outs[i])]
            time.sleep(0.1)
        res = peers.wait(done)
        assert j in done
        assert "trying another donor" in peers.log(j)
    by_member = {r["member"]: r for r in res}
    assert sorted(by_member) == [1, 2, 3]
    first = params_of(by_member[1])
    for r in res:
        assert torch.equal(params_of(r), first)


def test_slow_peer_misses_then_is_dropped_and_rejoins(peers):
    """Member 2 is slow before two syncs: it misses the first (catches up from a snapshot), is
    dropped as too slow at the second (max_misses=2), joins again, and all end bit-identical."""
    W, steps = 3, 12
    slow = [[3, 4.0, 2], [5, 4.0, 2]]  # member 2 sleeps 4 s before steps 4 and 6 (barrier deadline 1.5 s)
    waits = [[4, 2], [6, 2]]  # the others wait for it to be back before steps 5 and 7
    with coordinator(min_peers=W, barrier_timeout=1.5, max_misses=2) as c:
        for _ in range(W):
            peers.spawn(c.endpoint, steps=steps, pauses=slow, waits=waits)
        res = peers.wait(range(W), timeout=150)
        events = [(e["event"], e["member"], e["misses"]) for e in c.events if e["event"] != "left"]
    assert events == [("missed", 2, 1), ("dropped", 2, 2)], c.events
    by_member = {r["member"]: r for r in res}
    assert sorted(by_member) == [0, 1, 2]
    for r in res:
        assert torch.equal(params_of(r), params_of(by_member[0]))
        assert r["sync_count"] == steps // 2 and r["members"] == [0, 1, 2]
    assert by_member[0]["failed_syncs"] == by_member[1]["failed_syncs"] == 0  # they went on without it
    slow_log = peers.log(next(i for i in range(W) if res[i]["member"] == 2))
    assert "missed: did not reach the start" in slow_log and "miss 1 of 2" in slow_log
    assert "dropped: too slow: missed 2 sync(s) in a row" in slow_log


def test_coordinator_restart_mid_run(peers, tmp_path):
    W, steps = 3, 8
    state = str(tmp_path / "coord.json")
    with coordinator(min_peers=W, state_file=state) as c:
        port = c.endpoint.rsplit(":", 1)[1]
        for _ in range(W):
            peers.spawn(c.endpoint, steps=steps, pauses=[[4, 3.0]])
        end = time.monotonic() + 150
        while 2 not in c.released and time.monotonic() < end:  # op 2 = the 2nd sync
            time.sleep(0.02)
        epoch_before = c.epoch
        assert 2 in c.released, peers.log(0)
    # the first coordinator is gone while the peers pause at step 4; a new one takes its port
    with coordinator(port, min_peers=W, state_file=state) as c2:
        assert c2.epoch > epoch_before
        res = peers.wait(range(W))
    ref = local_reference(W, steps)
    for r in res:
        assert r["failed_syncs"] == 0 and r["sync_count"] == steps // 2
        assert torch.equal(params_of(r), params_of(res[0]))
        assert (params_of(r) - ref[r["member"]]).abs().max() <= 1e-6


@pytest.mark.parametrize("strategy, W, knobs", [
    ("noloco", 4, {"sync_every": 2}),
    ("demo", 3, {"topk": 2, "chunk": 4}),
])
def test_strategy_over_zmq_equals_local(peers, strategy, W, knobs):
    """NoLoCo (group_reduce, no barrier) and DeMo (all_gather every step) end as on the local transport."""
    from lowcomm.outer.registry import available

    if strategy not in available():
        pytest.skip(f"{strategy} is not registered")
    steps = 6
    with coordinator(min_peers=W) as c:
        for _ in range(W):
            peers.spawn(c.endpoint, steps=steps, strategy=strategy, knobs=knobs)
        res = peers.wait(range(W))

    def fn(t):
        model, _ = worker.train(t, strategy, steps, knobs)
        return worker.flat(model.parameters())
    ref = run_local(W, fn, timeout=30)
    assert sorted(r["member"] for r in res) == list(range(W))
    for r in res:
        assert r["failed_syncs"] == 0
        assert (params_of(r) - ref[r["member"]]).abs().max() <= 1e-6


def test_streaming_over_zmq_bit_identical_to_local(peers):
    """Streaming DiLoCo (F=2 fragments, overlap 1, 4-bit E3M0) over ZeroMQ: the same bits as the local
    transport (the quantized all-reduce sums at the owners in member order on both), and the payload of
    every all-reduce equals the local ledger's, about 1/7 of the fp32 bytes."""
    from lowcomm.outer.registry import available

    if "streaming" not in available():
        pytest.skip("streaming is not registered")
    W, steps = 3, 9  # fragment syncs launched at steps 2, 4, 6, 8 finish one step later
    knobs = {"sync_every": 4, "fragments": 2, "overlap": 1, "codec": "e3m0", "width": 64}
    with coordinator(min_peers=W, audit=0.0) as c:  # exact bytes per op
        for _ in range(W):
            peers.spawn(c.endpoint, steps=steps, strategy="streaming", knobs=knobs)
        res = peers.wait(range(W))

    def fn(t):
        model, opt = worker.train(t, "streaming", steps, dict(knobs))
        numel = {u.name: sum(p.numel() for p in u.params) for u in opt.units}
        op_numel = {op: numel[rec.unit] for rec in opt.sync_log for op in rec.op_ids}
        return worker.flat(model.parameters()), [r.bytes_sent for r in t.ledger.records], op_numel
    ref = run_local(W, fn, timeout=30)
    for r in res:
        params, local_bytes, op_numel = ref[r["member"]]
        assert torch.equal(params_of(r), params)
        reduces = [x for x in r["ledger"] if x["kind"] == "all_reduce"]
        assert len(reduces) == 4 and all(x["ok"] for x in reduces)
        for x in reduces:
            payload = x["bytes_sent"] - r["header_bytes"][str(x["op_id"])]
            assert payload == local_bytes[x["op_id"]]
            fp32 = 2 * (W - 1) / W * 4 * op_numel[x["op_id"]]
            assert 1 / 9 < payload / fp32 < 1 / 5, payload / fp32
