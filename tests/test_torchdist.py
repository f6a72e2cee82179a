"""The torch.distributed transport against the local one: gloo processes launched here.

Each launch starts N processes with torchrun's variables on a free localhost port, runs a
scenario of tests/_torchdist_worker.py, and is killed on failure or after LAUNCH_TIMEOUT
seconds. The same scenario code runs on the local transport for the reference.
"""

import json
import os
import socket
import subprocess
import sys
import time

import _torchdist_worker as W
import pytest
import torch

from lowcomm.comm.local import run_local

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAUNCH_TIMEOUT = 120

pytestmark = pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                                reason="torch.distributed with gloo is not available")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(scenario, nprocs, outdir, world_size=None):
    """Run ``scenario`` in ``nprocs`` processes; return {rank: (returncode, output)}."""
    port = free_port()
    procs = []
    env0 = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world_size or nprocs),
                GLOO_SOCKET_IFNAME="lo", OMP_NUM_THREADS="1",
                PYTHONPATH=ROOT + os.pathsep + os.path.join(ROOT, "tests"))
    try:
        for r in range(nprocs):
            env = dict(env0, RANK=str(r), LOCAL_RANK=str(r), LOCAL_WORLD_SIZE=str(nprocs))
            procs.append(subprocess.Popen([sys.executable, os.path.join(ROOT, "tests", "_torchdist_worker.py"),
                                           scenario, str(outdir)], env=env, stdout=subprocess.PIPE,
                                          stderr=subprocess.STDOUT, text=True))
        end = time.monotonic() + LAUNCH_TIMEOUT
        results = {}
        for r, p in enumerate(procs):
            try:
                out, _ = p.communicate(timeout=max(1.0, end - time.monotonic()))
            except subprocess.TimeoutExpired:
                pytest.fail(f"scenario {scenario}: rank {r} still running after {LAUNCH_TIMEOUT}s")
            results[r] = (p.returncode, out)
        return results
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait(10)


def load(outdir, rank):
    from safetensors.torch import load_file

    tensors = load_file(os.path.join(outdir, f"rank{rank}.safetensors"))
    with open(os.path.join(outdir, f"rank{rank}.json")) as f:
        return tensors, json.load(f)


def launch_ok(scenario, nprocs, outdir):
    res = launch(scenario, nprocs, outdir)
    for r, (rc, out) in res.items():
        assert rc == 0, f"rank {r} of scenario {scenario} exited with {rc}:\n{out[-3000:]}"
    return [load(outdir, r) for r in range(nprocs)]


@pytest.fixture(scope="module")
def two(tmp_path_factory):
    outdir = tmp_path_factory.mktemp("two")
    res = launch("two", 2, outdir)
    assert res[0][0] == 0, f"rank 0 exited with {res[0][0]}:\n{res[0][1][-3000:]}"
    assert res[1][0] == 3, f"rank 1 should have died with 3, exited with {res[1][0]}:\n{res[1][1][-3000:]}"
    return [load(outdir, r) for r in range(2)]


@pytest.fixture(scope="module")
def four(tmp_path_factory):
    return launch_ok("four", 4, tmp_path_factory.mktemp("four"))


@pytest.fixture(scope="module")
def two_local():
    return run_local(2, W.scenario_two, timeout=60)


def maxdiff(a, b):
    return (a.double() - b.double()).abs().max().item()


def test_diloco_two_processes_equals_local(two, two_local):
    local = two_local
    for r in range(2):
        got, meta = two[r]
        ref, ref_meta = local[r]
        for k in ref:
            if k.startswith("diloco/"):
                assert maxdiff(got[k], ref[k]) <= 1e-6, k
        # one gloo run: every worker holds bit-identical global parameters after every sync
        for s in range(1, W.STEPS // W.H + 1):
            assert torch.equal(got[f"diloco/anchors{s}"], two[0][0][f"diloco/anchors{s}"])
        # the same algorithm on the same bytes: the ledgers agree operation by operation
        assert meta["ledger_all"] == ref_meta["ledger_all"]
        assert meta["repr"].startswith("TorchDistTransport(replica")


def test_collectives_bit_identical_to_local(two, two_local):
    local = two_local
    for r in range(2):
        got, _ = two[r]
        ref, _ = local[r]
        for k in ref:
            if not k.startswith("diloco/"):
                assert got[k].dtype == ref[k].dtype and got[k].shape == ref[k].shape, k
                assert torch.equal(got[k], ref[k]), k
    got = two[0][0]
    # variable sizes and shapes come back per member
    assert got["gather/0/0"].tolist() == [0.0, 1.0] and got["gather/1/0"].tolist() == [0.0, 2.0, 4.0]
    assert got["gather/1/1"].shape == (2, 2) and got["gather/1/1"].dtype == torch.int64
    assert got["bcast/0"].tolist() == [1.0] * 4 and got["bcast/1"].tolist() == [1, 1]
    # SparseLoCo over gloo: the local run's bits (checked above), the same on both members
    assert torch.equal(two[0][0]["sparse/params"], two[1][0]["sparse/params"])
    # every member ends with the same bits, for the test codecs and lowcomm's own
    for name in ("test-bf16", "test-int8", "int8", "int4"):
        assert torch.equal(two[0][0][f"q/{name}/0"], two[1][0][f"q/{name}/0"])


def test_four_members_group_reduce_codec_gather(four):
    local = run_local(4, W.scenario_four_members, timeout=60)
    for r in range(4):
        got, meta = four[r]
        ref, ref_meta = local[r]
        assert {k for k in got if k.startswith(("pair", "triple", "q4", "gather4"))} == set(ref)
        for k in ref:
            assert torch.equal(got[k], ref[k]), k
        assert meta["members4"]["ledger"] == ref_meta["ledger"]
    # closed forms: pairs {0,2} and {1,3}; the triple sums 0 + 1 + 9
    assert four[0][0]["pair/0"].tolist() == [2.0] * 5 and four[1][0]["pair/0"].tolist() == [3.0] * 5
    assert four[3][0]["triple"].tolist() == [10.0] * 4
    assert [four[0][0][f"gather4/{m}"].numel() for m in range(4)] == [0, 3, 6, 9]
    # a member left out of a group_reduce stays in step with the others for the next collective
    assert all(four[g][0]["skip"].tolist() == [14.0, 14.0] for g in range(4))


def test_replicas_with_ddp_equal_local_on_concatenated_batches(four):
    local = run_local(2, W.scenario_local_replicas, timeout=60)
    assert four[0][1]["ids"] == [0, 0, 0, 2, 2, 0, 4] and four[3][1]["ids"] == [1, 1, 1, 2, 2, 3, 4]
    for g in range(4):
        replica = g // 2
        got = four[g][0]
        ref = local[replica][0]
        for k in ref:
            assert maxdiff(got[k], ref[k]) <= 1e-6, (g, k, maxdiff(got[k], ref[k]))
        for s in range(1, W.STEPS // W.H + 1):
            assert torch.equal(got[f"ddp/anchors{s}"], four[0][0][f"ddp/anchors{s}"])


def test_hierarchical_equals_flat_with_one_replica_copy_across(four):
    for g in range(4):
        got = four[g][0]
        for k in got:
            if k.startswith("ddp/"):
                # uncompressed sums are elementwise in member order: the same bits
                assert torch.equal(got[k], got["hier/" + k[4:]]), k
    for g in range(4):
        meta = four[g][1]
        flat_ar = [row for row in meta["flat_ledger"] if row[0] == "all_reduce"]
        hier_ar = [row for row in meta["hier_ledger"] if row[0] == "all_reduce"]
        assert len(flat_ar) == len(hier_ar) == W.STEPS // W.H
        mate = four[g ^ 1][1]  # the other rank of the same replica
        mate_ar = [row for row in mate["hier_ledger"] if row[0] == "all_reduce"]
        for f, h, m in zip(flat_ar, hier_ar, mate_ar):
            # the replica's two ranks together send one copy over the cross-replica links,
            # each about half of what every rank sends on the flat path
            assert h[1] + m[1] == f[1]
            assert abs(h[1] - f[1] / 2) <= 8
        # mixed dtypes: the same bits as the flat path; with int8 every rank holds the same
        # bits, close to the exact mean
        for i in range(2):
            assert torch.equal(four[g][0][f"hmix/flat/{i}"], four[g][0][f"hmix/hier/{i}"])
            assert torch.equal(four[g][0][f"hmix/hierq/{i}"], four[0][0][f"hmix/hierq/{i}"])
            assert maxdiff(four[g][0][f"hmix/hierq/{i}"], four[g][0][f"hmix/flat/{i}"]) < 0.05
        # and the shards travel inside the replica instead
        intra = meta["hier_replica_ledger"]
        assert len(intra) == W.STEPS // W.H and all(row[1] > 0 for row in intra)


def test_lost_rank_fails_survivor_clearly(two):
    """Rank 1 exits between two syncs: rank 0's sync fails naming it, is rolled back, and the
    fail-stop error ends opt.step(); later operations refuse to run."""
    meta = two[0][1]["die"]
    assert meta["error"] == "TransportFailed", meta
    assert "member 1 (global rank 1)" in meta["message"] and "restart" in meta["message"], meta
    assert "PeerLost" in meta["cause"]
    assert meta["failed_syncs"] == 1 and meta["sync_count"] == 1
    assert meta["after"] == "TransportFailed"


def test_native_ring_all_reduce_matches_p2p(two, four):
    for runs, w in ((two, 2), (four, 4)):
        for got, meta in runs:
            # fp32: a different summation order only; bf16: summed in fp32, rounded once
            assert maxdiff(got["native/ring/0"], got["native/p2p/0"]) <= 1e-6
            assert got["native/ring/1"].dtype == torch.bfloat16
            assert maxdiff(got["native/ring/1"], got["native/p2p/1"]) <= (0 if w == 2 else 2 ** -7)
            # the ledger holds the ring's framing of the fp32 buffer: 2 (W-1)/W of (37 + 15) * 4 bytes
            (kind, nbytes, _), = meta["native_ledger"]
            assert kind == "all_reduce" and nbytes == 2 * (w - 1) * 52 * 4 // w


def test_robust_rules_refused_where_they_cannot_run(two):
    for _, meta in two:
        for name in ("native", "hierarchical"):
            assert "cannot aggregate with 'clip'" in meta[f"{name}_robust"], meta[f"{name}_robust"]
    # (the robust all-reduces of scenario_two are bit-identical to the local transport's:
    # test_collectives_bit_identical_to_local compares every robust/ key too)
    assert torch.equal(two[0][0]["robust/clip/int8/0"], two[1][0]["robust/clip/int8/0"])


def test_stalled_member_times_out(two):
    """Rank 1 stays away from an all_reduce: rank 0 fails at its 3 s deadline naming member 1;
    rank 1, arriving later, fails too instead of hanging."""
    s0, s1 = two[0][1]["stall"], two[1][1]["stall"]
    # (the p2p layer reports every failed operation as PeerLost; the cause says it was the deadline)
    assert s0["error"] in ("PeerLost", "CommTimeout"), s0
    assert "member 1 (global rank 1) before the deadline (3s)" in s0["message"], s0
    assert s1["error"] in ("PeerLost", "CommTimeout"), s1


def test_init_timeout_raises(tmp_path):
    res = launch("init-timeout", 1, tmp_path, world_size=2)
    assert res[0][0] == 0, res[0][1][-3000:]
    with open(tmp_path / "rank0.json") as f:
        meta = json.load(f)
    assert meta["error"] == "CommTimeout" and "did not complete within 3" in meta["message"], meta


def test_bad_arguments():
    from lowcomm.comm.torchdist import TorchDistTransport

    with pytest.raises(ValueError, match="replica_size"):
        TorchDistTransport.from_env(replica_size=0)
    with pytest.raises(ValueError, match="not initialised"):
        TorchDistTransport(1)
