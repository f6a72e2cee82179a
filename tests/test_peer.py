"""Volunteer peers over ZeroMQ: SIGINT to one peer lets the others finish with no rolled-back sync."""

import json
import os
import signal
import subprocess
import sys
import threading
import time

import pytest

zmq_transport = pytest.importorskip("lowcomm.comm.zmq")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

RECIPE = '''
from lowcomm.train import ModelConfig, TrainConfig


def config():
    return TrainConfig(name="peers", strategy="diloco", knobs={{"sync_every": 4}}, lr=3e-3, steps={steps},
                       batch_size=4, model=ModelConfig(n_layer=1, n_embd=32, n_head=2, seq_len=32),
                       data={data!r}, eval_every=0, eval_sequences=4, log_every=2, tensorboard=False, threads=1)
'''


class _Peer:
    """One ``lowcomm peer`` process; its output is collected by a thread so the pipe never fills."""

    def __init__(self, coordinator, recipe, out):
        env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
        self.out = out
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "lowcomm.cli", "peer", "--coordinator", coordinator, "--recipe", recipe,
             "--bind", "tcp://127.0.0.1:*", "--out", out, "--progress-timeout", "20"],
            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.lines = []
        self._t = threading.Thread(target=self._read, daemon=True)
        self._t.start()

    def _read(self):
        for line in self.proc.stdout:
            self.lines.append(line)

    def wait_for(self, text, timeout):
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if any(text in line for line in self.lines):
                return
            if self.proc.poll() is not None:
                break
            time.sleep(0.1)
        raise AssertionError(f"peer never printed {text!r}:\n{''.join(self.lines[-40:])}")

    def result(self):
        with open(os.path.join(self.out, "peer.json")) as f:
            return json.load(f)


def test_sigint_to_one_peer_lets_the_others_finish_without_rollback(tmp_path):
    import json as _json

    corpus = tmp_path / "text.txt"
    corpus.write_bytes(open(_json.__file__, "rb").read() * 3 + open(subprocess.__file__, "rb").read())
    recipe = tmp_path / "recipe.py"
    recipe.write_text(RECIPE.format(steps=40, data=str(corpus)))
    coord = zmq_transport.Coordinator("tcp://127.0.0.1:*", min_peers=3, heartbeat=2.0,
                                       heartbeat_timeout=30, barrier_timeout=60, recovery=0)
    serve = threading.Thread(target=coord.serve, daemon=True)
    serve.start()
    peers = []
    try:
        peers = [_Peer(coord.endpoint, str(recipe), str(tmp_path / f"p{i}")) for i in range(3)]
        victim = peers[2]
        victim.wait_for("step 10/40", timeout=120)  # two syncs (H=4) behind it
        victim.proc.send_signal(signal.SIGINT)
        for p in peers:
            p.proc.wait(timeout=120)
        out = {i: p.result() for i, p in enumerate(peers)}
        for p in peers:
            assert p.proc.returncode == 0, "".join(p.lines[-40:])
        v = out[2]
        assert v["left_early"] and 10 <= v["steps"] < 40 and v["failed_syncs"] == 0, v
        for i in (0, 1):
            assert out[i]["steps"] == 40 and out[i]["syncs"] == 10, out[i]
            assert out[i]["failed_syncs"] == 0, "".join(peers[i].lines[-40:])
        # The coordinator's verdicts agree: every sync committed, none rolled back.
        assert coord.verdicts and all(ok for ok, _ in list(coord.verdicts.values()))
    finally:
        for p in peers:
            if p.proc.poll() is None:
                p.proc.kill()
                p.proc.wait(timeout=10)
        coord.stop()
        serve.join(10)
