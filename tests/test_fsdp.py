"""Sharded replicas (issue 18): FSDP2 inside a replica under torchrun on CPU/gloo, 2 replicas x 2 ranks.

One launch of tests/_fsdp_worker.py runs every scenario (process start-up dominates on a small machine).
"""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    pytest.importorskip("torch.distributed.fsdp")
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path_factory.mktemp("fsdp")
    corpus = out / "text.txt"  # a small text corpus, loaded in milliseconds
    corpus.write_bytes(b"".join(open(m.__file__, "rb").read() for m in (json, os, socket, subprocess)))
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "4", "--master-addr",
                           "127.0.0.1", "--master-port", str(port), os.path.join(ROOT, "tests", "_fsdp_worker.py"),
                           str(out), str(corpus)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return [json.load(open(out / f"rank{r}.json")) for r in range(4)]


@pytest.mark.parametrize("name", ["diloco", "streaming", "noloco"])
def test_fsdp_replicas_equal_ddp_replicas(results, name):
    for res in results:
        assert res[f"{name}_sharded"] and res[f"{name}_syncs"] > 0
        assert res[f"{name}_moved"] > 1e-3  # the weights trained
        assert res[f"{name}_rel_diff"] <= 1e-5, res[f"{name}_rel_diff"]
        # lowcomm's global weights on each rank: its shard only (the embedding rows split unevenly)
        assert res[f"{name}_anchor_elems"] < 0.6 * res["params"]


def test_state_dict_round_trip_resumes_bitwise(results):
    for res in results:
        assert res["resume_bitwise"]
        assert "replicas of 4 ranks" in res["resume_other_replica_size"]


@pytest.mark.parametrize("case,words", [
    ("demo", "top-k"), ("sparseloco", "SparseLoCo does not accept DTensor"), ("robust", "robust aggregation"),
    ("muon", "orthogonalises"), ("mesh_mismatch", "sharded over global ranks [0, 1, 2, 3]"),
    ("hierarchical", "hierarchical=True")])
def test_configurations_lowcomm_cannot_serve_fail_at_construction(results, case, words):
    for res in results:
        assert words in res[case], res[case]


def test_lowcomm_train_parallel_fsdp(results):
    """lowcomm's own loop: parallel=fsdp equals parallel=ddp, a resume from its per-rank checkpoint is bitwise,
    and resuming that run with parallel=ddp is a ValueError."""
    for res in results:
        assert res["train_rel_diff"] <= 1e-5, res["train_rel_diff"]
        assert res["train_resumed_from"] == 4 and res["train_resume_bitwise"]
        assert "parallel='fsdp'" in res["train_resume_ddp"]
