"""Streaming DiLoCo: equivalence with DiLoCo, golden schedule, bit-identical fragments, bytes, failures, state."""

import copy
import threading

import pytest
import torch
from torch import nn

import lowcomm
from lowcomm.comm.local import Fault, LocalTransport, LocalWorld, run_local
from lowcomm.outer.diloco import sgd_outer

SGD1 = sgd_outer(1.0, 0.0, False)


class Block(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.lin = nn.Linear(d, d)

    def forward(self, x):
        return x + torch.tanh(self.lin(x))


_INIT_LOCK = threading.Lock()  # run_local's workers are threads sharing torch's global RNG


class Net(nn.Module):
    def __init__(self, layers=4, d=6, seed=0):
        super().__init__()
        with _INIT_LOCK:
            torch.manual_seed(seed)
            self.inp = nn.Linear(5, d)
            self.blocks = nn.ModuleList(Block(d) for _ in range(layers))
            self.out = nn.Linear(d, 3)

    def forward(self, x):
        x = self.inp(x)
        for b in self.blocks:
            x = b(x)
        return self.out(x)


def batch(rank, step):
    g = torch.Generator().manual_seed(1000 * step + rank)
    return torch.randn(4, 5, generator=g), torch.randn(4, 3, generator=g)


def train(opt, model, rank, steps, start=0, each=None):
    for step in range(start, steps):
        opt.zero_grad()
        x, y = batch(rank, step)
        ((model(x) - y) ** 2).mean().backward()
        opt.step()
        if each is not None:
            each(step)


def finish(opt):
    # land the sync still in flight: a worker that returns with its collective unstarted
    # would leave its peers waiting for it until their deadline
    if getattr(opt, "in_flight", None) is not None:
        opt.flush()


def flat(ts):
    return torch.cat([t.detach().reshape(-1).float() for t in ts])


def test_f1_tau0_alpha0_identity_is_diloco_bitwise():
    W, H, steps = 3, 3, 13

    def worker(t, streaming):
        m = Net()
        inner = torch.optim.AdamW(m.parameters(), lr=1e-2)
        if streaming:
            opt = lowcomm.StreamingDiLoCo(inner, transport=t, model=m, sync_every=H, fragments=1, overlap=0,
                                          alpha=0.0, codec=None)
        else:
            opt = lowcomm.DiLoCo(inner, transport=t, sync_every=H)
        train(opt, m, t.rank, steps)
        finish(opt)
        return flat(m.parameters()), flat(opt.units[0].anchors), str(opt.units[0].outer.state_dict()["state"])

    ref = run_local(W, worker, False)
    got = run_local(W, worker, True)
    for r in range(W):
        assert torch.equal(ref[r][0], got[r][0]) and torch.equal(ref[r][1], got[r][1])
        assert ref[r][2] == got[r][2]


class TwoBlocks(nn.Module):
    """Two blocks of one 2-vector each: fragment 0 = block 0, fragment 1 = block 1."""

    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList(nn.Linear(1, 2, bias=False) for _ in range(2))
        with torch.no_grad():
            for b in self.blocks:
                b.weight.zero_()


def test_golden_schedule():
    """W=3, F=2, H=4, tau=1, alpha=0.5, inner SGD lr 1 on constant gradients, outer SGD lr 1.

    Worker r's gradient is g_r = r + 1 everywhere (mean 2); theta and phi start at 0.
    Fragment 0 is launched after steps 2, 6, ... and lands after 3, 7, ...;
    fragment 1 is launched after steps 4, 8, ... and lands after 5, 9, ...

    Fragment 0: steps 1-2 give theta_r = -2 g_r; Delta_r = phi - theta_r = 2 g_r, mean 4.
      Step 3: theta_r = -3 g_r; the sync lands: phi = 0 - 1 * 4 = -4;
      theta_r = 0.5 (-3 g_r) + 0.5 (-4) = -1.5 g_r - 2  -> (-3.5, -5, -6.5).
      Steps 4-6: theta_r = -4.5 g_r - 2; Delta_r = -4 - theta_r = 4.5 g_r - 2, mean 7.
      Step 7: theta_r = -5.5 g_r - 2; phi = -4 - 7 = -11; theta_r = -2.75 g_r - 6.5 -> (-9.25, -12, -14.75).
    Fragment 1: steps 1-4 give theta_r = -4 g_r; Delta mean 8. Step 5: theta_r = -5 g_r; phi = -8;
      theta_r = -2.5 g_r - 4 -> (-6.5, -9, -11.5). Steps 6-8: theta_r = -5.5 g_r - 4;
      Delta_r = -8 - theta_r = 5.5 g_r - 4, mean 7. Step 9: theta_r = -6.5 g_r - 4; phi = -15;
      theta_r = -3.25 g_r - 9.5 -> (-12.75, -16, -19.25).
    """
    def worker(t):
        m = TwoBlocks()
        opt = lowcomm.StreamingDiLoCo(torch.optim.SGD(m.parameters(), lr=1.0), transport=t, model=m, sync_every=4,
                                      fragments=2, overlap=1, alpha=0.5, codec=None, outer_optimizer=SGD1)
        g = float(t.rank + 1)
        seen = {}
        for step in range(1, 10):
            for b in m.blocks:
                b.weight.grad = torch.full_like(b.weight, g)
            opt.step()
            seen[step] = (opt.in_flight, [b.weight[0, 0].item() for b in m.blocks],
                          [u.anchors[0][0, 0].item() for u in opt.units])
        log = [(r.unit, r.launch_step, r.finish_step, r.committed) for r in opt.sync_log]
        return seen, log

    out = run_local(3, worker)
    for r in range(3):
        seen, log = out[r]
        assert log == [("fragment0", 2, 3, True), ("fragment1", 4, 5, True), ("fragment0", 6, 7, True),
                       ("fragment1", 8, 9, True)]
        g = r + 1
        assert [seen[s][0] for s in range(1, 10)] == [None, 0, None, 1, None, 0, None, 1, None]
        assert seen[2][1] == [-2 * g, -2 * g] and seen[2][2] == [0.0, 0.0]
        assert seen[3][1] == [-1.5 * g - 2, -3 * g] and seen[3][2] == [-4.0, 0.0]
        assert seen[5][1] == [-3.5 * g - 2, -2.5 * g - 4] and seen[5][2] == [-4.0, -8.0]
        assert seen[7][1] == [-2.75 * g - 6.5, -4.5 * g - 4] and seen[7][2] == [-11.0, -8.0]
        assert seen[9][1] == [-4.75 * g - 6.5, -3.25 * g - 9.5] and seen[9][2] == [-11.0, -15.0]


def test_workers_bit_identical_after_every_fragment_sync():
    W, steps = 3, 24

    def worker(t):
        m = Net(layers=4)
        opt = lowcomm.StreamingDiLoCo(torch.optim.AdamW(m.parameters(), lr=1e-2), transport=t, model=m,
                                      sync_every=8, fragments=4, overlap=1, alpha=0.5, codec="e3m0",
                                      error_feedback=True)
        snaps = []

        def each(step):
            if opt.sync_log and opt.sync_log[-1].finish_step == opt.local_step:
                u = next(u for u in opt.units if u.name == opt.sync_log[-1].unit)
                snaps.append((u.name, flat(u.anchors)))
        train(opt, m, t.rank, steps, each=each)
        finish(opt)
        return snaps, flat(m.parameters())

    out = run_local(W, worker)
    assert len(out[0][0]) == steps // 2 - 1  # a fragment lands every 2 steps from step 3 on
    for r in range(1, W):
        for (n0, a0), (n1, a1) in zip(out[0][0], out[r][0]):
            assert n0 == n1 and torch.equal(a0, a1)
        assert not torch.equal(out[0][1], out[r][1])  # locals keep alpha of their own work


def _bytes_run(W, F, codec, streaming=True, steps=8):
    def worker(t):
        m = Net(layers=4, d=64)
        inner = torch.optim.SGD(m.parameters(), lr=1e-3)
        if streaming:
            opt = lowcomm.StreamingDiLoCo(inner, transport=t, model=m, sync_every=4, fragments=F, overlap=0,
                                          codec=codec)
        else:
            opt = lowcomm.DiLoCo(inner, transport=t, sync_every=4, codec=codec)
        train(opt, m, t.rank, steps)
        recs = [r for r in t.ledger.records if r.kind == "all_reduce"]
        return max(r.bytes_sent for r in recs), sum(r.bytes_sent for r in recs), len(recs)

    return run_local(W, worker)[0]


def test_ledger_peak_and_four_bit_totals():
    W = 4
    d_peak, d_total, d_n = _bytes_run(W, 1, None, streaming=False)
    s_peak, s_total, s_n = _bytes_run(W, 4, None)
    assert d_n == 2 and s_n == 8
    assert s_total == pytest.approx(d_total, rel=1e-3)  # same bytes, spread over 4x the syncs
    assert 0.23 < s_peak / d_peak < 0.3  # ~1/F (the 4 fragments are equal up to the outside params)
    _, q_total, _ = _bytes_run(W, 4, "e3m0")
    assert 7.0 < s_total / q_total < 8.0  # 4 bits + one fp32 scale per 128 values: 32/4.25 = 7.5


def test_failed_fragment_sync_rolls_back_that_fragment_alone():
    """Worker 2 dies in fragment 1's first sync (op 2: op 0 is the broadcast, op 1 fragment 0's sync)."""
    def worker(t):
        m = TwoBlocks()
        opt = lowcomm.StreamingDiLoCo(torch.optim.SGD(m.parameters(), lr=1.0), transport=t, model=m, sync_every=4,
                                      fragments=2, overlap=1, alpha=0.5, codec=None, outer_optimizer=SGD1)
        g = float(t.rank + 1)
        seen = {}
        for step in range(1, 8):
            for b in m.blocks:
                b.weight.grad = torch.full_like(b.weight, g)
            opt.step()
            seen[step] = ([b.weight[0, 0].item() for b in m.blocks], [u.anchors[0][0, 0].item() for u in opt.units])
        return seen, [(r.unit, r.committed) for r in opt.sync_log], opt.failed_syncs, t.members()

    out = run_local(3, worker, faults={2: Fault(op=2, after_messages=1)}, timeout=20)
    assert out[2] is None
    for r in range(2):
        seen, log, failed, members = out[r]
        g = r + 1
        assert members == [0, 1] and failed == 1
        assert log == [("fragment0", True), ("fragment1", False), ("fragment0", True)]
        # fragment 1 rolled back after step 5: local = global = 0; fragment 0 untouched by it
        assert seen[5] == ([-3.5 * g - 2, 0.0], [-4.0, 0.0])
        # fragment 0's next sync among the 2 survivors: theta_r after step 6 = -4.5 g_r - 2, mean g 1.5
        # Delta mean = -4 + 4.5 * 1.5 + 2 = 4.75 -> phi = -8.75; step 7 theta = -5.5 g - 2 mixed
        assert seen[7][1] == [-8.75, 0.0]
        assert seen[7][0][0] == pytest.approx(0.5 * (-5.5 * g - 2) + 0.5 * -8.75)
        assert seen[7][0][1] == -2.0 * g


@pytest.mark.parametrize("ef", [False, True])
def test_state_dict_resume_mid_flight_is_exact(ef):
    W, steps = 2, 14
    ckpt_after = 6  # fragment 0 launched after step 6, in flight until step 7

    def run(t, resume=None):
        m = Net(layers=2)
        opt = lowcomm.StreamingDiLoCo(torch.optim.AdamW(m.parameters(), lr=1e-2), transport=t, model=m,
                                      sync_every=4, fragments=2, overlap=1, codec="int4", error_feedback=ef)
        start, saved = 0, {}
        if resume is not None:
            m.load_state_dict(resume[t.rank]["model"])
            opt.load_state_dict(resume[t.rank]["opt"])
            start = opt.local_step
            assert opt.in_flight == 0

        def each(step):
            if step + 1 == ckpt_after and resume is None:
                assert opt.in_flight == 0
                saved["ck"] = copy.deepcopy({"model": m.state_dict(), "opt": opt.state_dict()})
        train(opt, m, t.rank, steps, start=start, each=each)
        finish(opt)
        return flat(m.parameters()), flat(a for u in opt.units for a in u.anchors), saved.get("ck")

    full = run_local(W, run)
    resumed = run_local(W, run, [f[2] for f in full])
    for r in range(W):
        assert torch.equal(full[r][0], resumed[r][0]) and torch.equal(full[r][1], resumed[r][1])


def test_flush_and_registry():
    from lowcomm.sim.presets import preset

    def worker(t):
        m = Net(layers=2)
        s = lowcomm.get_strategy("streaming")
        opt = s.build(torch.optim.SGD(m.parameters(), lr=0.01), t, m, **{**s.defaults, **preset("streaming")})
        assert (opt.sync_every, opt.num_fragments, opt.overlap, opt.alpha, opt.codec.name) == (50, 2, 1, 0.5, "e3m0")
        train(opt, m, t.rank, 25)
        assert opt.in_flight == 0
        assert opt.flush() is True and opt.in_flight is None
        return flat(opt.units[0].anchors)

    out = run_local(2, worker)
    assert torch.equal(out[0], out[1])


def test_bad_arguments():
    m = Net(layers=4)
    t = LocalTransport(LocalWorld(1), 0)

    def make(**kw):
        return lowcomm.StreamingDiLoCo(torch.optim.SGD(m.parameters(), lr=0.1), transport=t, **kw)

    with pytest.raises(ValueError, match="multiple of the number of fragments"):
        make(model=m, sync_every=10, fragments=4)
    with pytest.raises(ValueError, match="overlap"):
        make(model=m, sync_every=8, fragments=4, overlap=2)
    with pytest.raises(ValueError, match="only 4 blocks"):
        make(model=m, sync_every=10, fragments=5)
    with pytest.raises(ValueError, match="needs model"):
        make(sync_every=8, fragments=2)
    with pytest.raises(ValueError, match="alpha"):
        make(model=m, sync_every=8, alpha=1.5)
    with pytest.raises(ValueError, match="error_feedback"):
        make(model=m, sync_every=8, codec=None, error_feedback=True)
    with pytest.raises(ValueError, match="unknown codec"):
        make(model=m, sync_every=8, codec="int3")
    with pytest.raises(ValueError, match="overlap"):
        make(model=m, sync_every=8, overlap=-1)
    opt = make(model=m, sync_every=8, fragments=2)
    other = make(model=m, sync_every=8, fragments=4)
    with pytest.raises(ValueError, match="sync units|same"):
        other.load_state_dict(opt.state_dict())
