"""The simulator: clock arithmetic, ledger bytes against closed forms, knobs, and an end-to-end run."""

import json
import math
import os
import subprocess
import sys

import pytest
from _browser import chromium, dump_dom

from lowcomm.comm.p2p import shard_bounds
from lowcomm.models import GPTConfig
from lowcomm.outer.registry import register_strategy
from lowcomm.sim import CommEvent, Network, Projection, SimConfig, build_knobs, rounds, run_strategy, simulate_clock

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = GPTConfig(n_layer=1, n_embd=16, n_head=2, seq_len=16)


def allreduce_bytes(P, W, elem=4):
    b = shard_bounds(P, W)
    return [elem * (sum(e - s for j, (s, e) in enumerate(b) if j != r) + (W - 1) * (b[r][1] - b[r][0]))
            for r in range(W)]


def test_clock_hand_computed():
    # 4 steps of 1 s. A 0.5 s transfer launched and needed at step 1 is exposed: t = 1.5.
    # A 2.5 s transfer launched at step 2 (t = 2.5) and needed at step 4 runs until 5.0 while
    # steps 3 and 4 compute until 4.5: 0.5 s of it stays exposed.
    r = simulate_clock([1.0] * 4, [CommEvent(1, 1, 0.5), CommEvent(2, 4, 2.5)])
    assert r.total == 5.0 and r.compute == 4.0 and r.exposed_comm == 1.0
    # The link is shared: a second transfer waits for the first.
    r = simulate_clock([1.0] * 3, [CommEvent(1, 3, 1.5), CommEvent(2, 2, 1.0)])
    assert r.total == 4.5  # second starts at 2.5 (link busy), ends 3.5 at step 2; step 3 ends at 4.5
    # Network: 8 MB over 100 Mbit/s with 4 workers and 10 ms per round.
    net = Network(100e6, 0.01)
    assert rounds("all_reduce", 4) == 6 and rounds("all_gather", 4) == 3 and rounds("group_reduce", 2) == 1
    assert net.seconds("all_reduce", 4, 8_000_000) == pytest.approx(6 * 0.01 + 0.64, abs=1e-12)
    assert net.seconds("group_reduce", 2, 1_000_000) == pytest.approx(0.01 + 0.08, abs=1e-12)
    assert net.seconds("all_reduce", 1, 123) == 0.0
    with pytest.raises(ValueError):
        simulate_clock([1.0], [CommEvent(2, 1, 0.1)])
    with pytest.raises(ValueError, match="bandwidth"):
        Network(0)
    # A link whose payload gets 80% of its rate (headers, ACKs, shared TCP flows): 0.64 s -> 0.8 s.
    assert Network(100e6, 0.01, 0.8).seconds("all_reduce", 4, 8_000_000) == pytest.approx(0.06 + 0.8, abs=1e-12)
    for bad in (0.0, 1.5, -0.2):
        with pytest.raises(ValueError, match="efficiency"):
            Network(1e6, 0.0, bad)


@pytest.mark.parametrize("strategy,syncs", [("ddp", 6), ("diloco", 2)])
def test_bytes_match_closed_form(strategy, syncs):
    W, steps = 3, 6
    proj = Projection(params=1e9, flops=1e15, mfu=0.5, tokens_per_step=1000)
    cfg = SimConfig(workers=W, steps=steps, batch_size=2, model=TINY, eval_every=3, eval_sequences=4,
                    threads=1, bandwidths=(1e6, 1e9), latency=0.01, warmup_steps=1, projection=proj)
    r = run_strategy(strategy, cfg, {"sync_every": 3})
    P = r.params
    per_sync = allreduce_bytes(P, W)
    assert sum(per_sync) == 2 * (W - 1) * P * 4
    bcast = [(W - 1) * P * 4, 0, 0]  # the initial broadcast from rank 0
    per_worker = [syncs * per_sync[k] + bcast[k] for k in range(W)]
    assert r.syncs == syncs
    assert r.bytes_sent == sum(per_worker) / W
    assert r.bytes_sent_max == max(per_worker)
    assert r.peak_bytes == max(per_sync)
    assert r.tokens == steps * W * 2 * TINY.seq_len
    # Every transfer here is exposed (launched and finished in the same step): the clock is
    # compute + broadcast + syncs * all-reduce, each sized by the busiest worker.
    for b, label in ((1e6, "1Mbit"), (1e9, "1Gbit")):
        net = Network(b, 0.01)
        expect = (r.compute_seconds + net.seconds("broadcast", W, bcast[0])
                  + syncs * net.seconds("all_reduce", W, max(per_sync)))
        assert r.sim_seconds[label] == pytest.approx(expect, rel=1e-12)
    assert r.sim_seconds["1Mbit"] > r.sim_seconds["1Gbit"]
    # The projection: 6 * params * tokens / (flops * mfu) per step, the ledger's bytes scaled by 1e9 / P.
    assert proj.step_seconds == pytest.approx(6 * 1e9 * 1000 / 5e14)
    net = Network(1e9, 0.01)
    scale = 1e9 / P
    expect = (steps * proj.step_seconds + net.seconds("broadcast", W, int(bcast[0] * scale))
              + syncs * net.seconds("all_reduce", W, int(max(per_sync) * scale)))
    assert r.projection["sim_seconds"]["1Gbit"] == pytest.approx(expect, rel=1e-12)
    assert r.projection["label"] == "projection"


def test_knobs_go_only_to_strategies_that_take_them():
    def build(inner, transport, model=None, *, alpha=0.5):
        from lowcomm.outer.ddp import DDP

        assert model is not None  # the simulator passes the model
        return DDP(inner, transport=transport)

    register_strategy("test_plugin", build, {"alpha": 0.5, "inner": "sgd", "lr": 0.05}, "test", replace=True,
                      default_run=False)
    inner, knobs = build_knobs("test_plugin", {"sync_every": 7, "alpha": 0.25})
    assert inner == {"inner": "sgd", "lr": 0.05} and knobs == {"alpha": 0.25}
    inner, knobs = build_knobs("diloco", {"sync_every": 7, "alpha": 0.25})
    assert knobs["sync_every"] == 7 and "alpha" not in knobs and inner == {}
    cfg = SimConfig(workers=2, steps=2, batch_size=2, model=TINY, eval_every=2, eval_sequences=2, threads=1)
    r = run_strategy("test_plugin", cfg, {"alpha": 0.25})
    assert r.knobs == {"alpha": 0.25} and math.isfinite(r.final_eval_loss)
    with pytest.raises(ValueError, match="unknown strategy"):
        run_strategy("no_such_strategy", cfg)


def test_cli_end_to_end(tmp_path, request):
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    cmd = [sys.executable, "-m", "lowcomm", "sim", "--strategies", "ddp,diloco", "--workers", "2", "--steps", "40",
           "--layers", "1", "--width", "32", "--heads", "2", "--context", "32", "--batch-size", "8",
           "--eval-every", "10", "--sync-every", "10", "--lr", "3e-3", "--threads", "1", "--out", str(out),
           "--projection", "params=1e9"]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env)
    assert p.returncode == 0, p.stderr
    assert "held-out loss" in p.stdout and "PROJECTION" in p.stdout
    doc = json.loads((out / "results.json").read_text())
    assert [r["strategy"] for r in doc["runs"]] == ["ddp", "diloco"]
    for r in doc["runs"]:
        for key in ("final_eval_loss", "tokens", "bytes_sent", "peak_bytes", "sim_seconds", "curve"):
            assert key in r
        assert set(r["sim_seconds"]) == {"10Mbit", "100Mbit", "1Gbit", "10Gbit"}
        losses = [pt["eval_loss"] for pt in r["curve"]]
        assert losses[-1] < losses[0] and losses[-1] < math.log(256)
        assert r["projection"]["label"] == "projection"
    assert doc["runs"][1]["bytes_sent"] < doc["runs"][0]["bytes_sent"]
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    dom = dump_dom(chromium(request), (out / "report.html").as_uri())  # the report page draws its charts
    assert 'data-row="ddp"' in dom and 'data-row="diloco"' in dom
    assert 'id="chart-loss-tokens"' in dom and dom.count("<polyline") == 4
    events = [f for _, _, fs in os.walk(out / "tensorboard") for f in fs if f.startswith("events.out.tfevents")]
    assert events
    # Wrong arguments: a clear message, exit status 2.
    bad = subprocess.run([sys.executable, "-m", "lowcomm", "sim", "--strategies", "nope", "--out", str(out)],
                         capture_output=True, text=True, timeout=120, env=env)
    assert bad.returncode == 2 and "unknown strategy" in bad.stderr


def test_configured_step_seconds_replace_measured_compute():
    W, steps = 2, 4
    cfg = SimConfig(workers=W, steps=steps, batch_size=2, model=TINY, eval_every=4, eval_sequences=2,
                    threads=1, bandwidths=(1e6,), latency=0.01, warmup_steps=1, step_seconds=0.5)
    r = run_strategy("diloco", cfg, {"sync_every": 2})
    assert r.compute_seconds == pytest.approx(steps * 0.5)
    net = Network(1e6, 0.01)
    P = r.params
    per_sync = allreduce_bytes(P, W)
    expect = (steps * 0.5 + net.seconds("broadcast", W, (W - 1) * P * 4)
              + 2 * net.seconds("all_reduce", W, max(per_sync)))
    assert r.sim_seconds["1Mbit"] == pytest.approx(expect, rel=1e-12)
    with pytest.raises(ValueError, match="step_seconds"):
        SimConfig(step_seconds=0)


def test_uneven_speeds_clock_and_token_syncs():
    """--speeds: the clock advances by the slowest worker of each phase; sync_tokens runs to the budget."""
    W = 2
    kw = dict(workers=W, batch_size=2, model=TINY, eval_every=2, eval_sequences=2, threads=1, bandwidths=(1e6,),
              latency=0.01, warmup_steps=1, step_seconds=1.0, speeds="1,0.5")
    net = Network(1e6, 0.01)
    r = run_strategy("diloco", SimConfig(steps=4, **kw), {"sync_every": 2})
    P = r.params
    sync = net.seconds("all_reduce", W, max(allreduce_bytes(P, W)))
    setup = net.seconds("broadcast", W, (W - 1) * P * 4)
    # waiting for the slowest: 2 phases of 2 steps at half speed
    assert r.sim_seconds["1Mbit"] == pytest.approx(setup + 2 * (4.0 + sync), rel=1e-12)
    # by tokens (3 steps' worth of the group's tokens): the sync is called at T = 2 (2 fast steps + 1 slow);
    # the budget of 6 fast steps holds 3 such phases
    t = run_strategy("diloco", SimConfig(steps=6, **kw), {"sync_tokens": 3 * 2 * TINY.seq_len})
    assert t.syncs == 3 and t.tokens == (6 + 3) * 2 * TINY.seq_len
    assert t.sim_seconds["1Mbit"] == pytest.approx(setup + 3 * (2.0 + sync), rel=1e-12)
    with pytest.raises(ValueError, match="one relative speed per worker"):
        SimConfig(workers=3, speeds="1,1")
