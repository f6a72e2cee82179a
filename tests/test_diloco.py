"""DiLoCo and the OuterOptimizer: equivalences, golden values, state, failures, bad input."""

import copy
import logging

import pytest
import torch
from _common import batch, loss_of, make_model

import lowcomm
from lowcomm.comm.local import Fault, LocalTransport, LocalWorld, run_local
from lowcomm.outer.base import OuterOptimizer
from lowcomm.outer.diloco import sgd_outer

FEDAVG_SGD = sgd_outer(1.0, 0.0, False)


def world_of_one():
    return LocalTransport(LocalWorld(1), 0)


def flat(params):
    return torch.cat([p.detach().reshape(-1).float() for p in params])


def test_world_of_one_equals_inner_optimizer():
    ref = make_model()
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=1e-2)
    m = make_model()
    t = world_of_one()
    opt = lowcomm.DiLoCo(torch.optim.AdamW(m.parameters(), lr=1e-2), transport=t, sync_every=1,
                         outer_optimizer=FEDAVG_SGD)
    for step in range(20):
        for model, o in ((ref, ref_opt), (m, opt)):
            o.zero_grad()
            loss_of(model, *batch(0, step)).backward()
            o.step()
    assert (flat(ref.parameters()) - flat(m.parameters())).abs().max() <= 1e-6
    # the real path: one initial broadcast plus one all-reduce per sync
    assert t.ledger.ops == 1 + 20
    assert t.ledger.count("all_reduce") == 20 and t.ledger.count("broadcast") == 1
    assert t.ledger.bytes_sent == 0 and opt.sync_count == 20


def test_h1_sgd_equals_data_parallel():
    W, steps, lr = 4, 20, 0.05

    def worker(t):
        m = make_model()
        opt = lowcomm.DiLoCo(torch.optim.SGD(m.parameters(), lr=lr), transport=t, sync_every=1,
                             outer_optimizer=FEDAVG_SGD)
        for step in range(steps):
            opt.zero_grad()
            loss_of(m, *batch(t.rank, step)).backward()
            opt.step()
        return flat(m.parameters())

    out = run_local(W, worker)
    ref = make_model()
    for step in range(steps):
        grads = []
        for r in range(W):
            ref.zero_grad()
            loss_of(ref, *batch(r, step)).backward()
            grads.append([p.grad.clone() for p in ref.parameters()])
        with torch.no_grad():
            for i, p in enumerate(ref.parameters()):
                p -= lr * torch.stack([g[i] for g in grads]).mean(0)
    for r in range(W):
        assert torch.equal(out[r], out[0])
        assert (out[r] - flat(ref.parameters())).abs().max() <= 1e-6


def _golden_worker(t, syncs=3, record=None):
    p = torch.nn.Parameter(torch.ones(3))
    opt = lowcomm.DiLoCo(torch.optim.SGD([p], lr=0.1), transport=t, sync_every=2)
    g = 1.0 if t.rank == 0 else 3.0
    out = []
    for _ in range(syncs * 2):
        p.grad = torch.full_like(p, g)
        opt.step()
        if opt.local_step % 2 == 0:
            out.append(opt.units[0].anchors[0].clone())
    return out


def test_golden_nesterov_trajectory():
    out = run_local(2, _golden_worker)
    expected = [0.468, -0.2908, -1.25372]
    for r in range(2):
        for got, want in zip(out[r], expected):
            assert torch.allclose(got, torch.full((3,), want), atol=1e-6), (got, want)
        assert all(torch.equal(a, b) for a, b in zip(out[r], out[0]))


def test_state_dict_resume_is_exact():
    W, steps, half = 2, 12, 5

    def run(t, checkpoint_at=None, resume_from=None):
        m = make_model()
        opt = lowcomm.DiLoCo(torch.optim.AdamW(m.parameters(), lr=1e-2), transport=t, sync_every=3)
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=4, gamma=0.5)
        start = 0
        if resume_from is not None:
            sd = resume_from[t.rank]
            m.load_state_dict(sd["model"])
            opt.load_state_dict(sd["opt"])
            sched.load_state_dict(sd["sched"])
            start = opt.local_step
        ckpt = None
        for step in range(start, steps):
            if step == checkpoint_at:
                ckpt = copy.deepcopy({"model": m.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict()})
            opt.zero_grad()
            loss_of(m, *batch(t.rank, step)).backward()
            opt.step()
            sched.step()
        return flat(m.parameters()), flat(opt.units[0].anchors), ckpt

    full = run_local(W, run, checkpoint_at=half)
    ckpts = [r[2] for r in full]
    resumed = run_local(W, run, resume_from=ckpts)
    for r in range(W):
        assert torch.equal(full[r][0], resumed[r][0])
        assert torch.equal(full[r][1], resumed[r][1])


def test_lr_scheduler_drives_inner_lr():
    m = make_model()
    inner = torch.optim.SGD(m.parameters(), lr=1.0)
    opt = lowcomm.DiLoCo(inner, transport=world_of_one(), sync_every=10)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 ** s)
    for _ in range(3):
        loss_of(m, *batch(0, 0)).backward()
        opt.step()
        opt.zero_grad()
        sched.step()
    assert inner.param_groups[0]["lr"] == pytest.approx(0.125)
    assert opt.param_groups is inner.param_groups


def test_fault_mid_sync_rolls_back_and_survivors_continue(caplog):
    """Worker 3 dies during the 2nd sync after sending 2 of its shards."""
    W = 4
    # op 0 = initial broadcast, op 1 = first sync, op 2 = second sync
    faults = {3: Fault(op=2, after_messages=2)}

    def worker(t):
        p = torch.nn.Parameter(torch.zeros(10))
        opt = lowcomm.DiLoCo(torch.optim.SGD([p], lr=1.0), transport=t, sync_every=1, outer_optimizer=FEDAVG_SGD)
        snaps = []
        for step in range(3):
            p.grad = torch.full_like(p, -float(t.rank + 1) * (step + 1))
            before = (opt.units[0].anchors[0].clone(), copy.deepcopy(opt.units[0].outer.state_dict()))
            opt.step()
            snaps.append((before, opt.units[0].anchors[0].clone(), copy.deepcopy(opt.units[0].outer.state_dict()),
                          opt.failed_syncs, list(opt.sync_log[-1:])))
        return snaps, t.members()

    with caplog.at_level(logging.WARNING):
        out = run_local(W, worker, faults=faults, timeout=30)
    assert out[3] is None
    for r in range(3):
        snaps, members = out[r]
        assert members == [0, 1, 2]
        # sync 1 fine: mean of 1..4 = 2.5
        assert torch.allclose(snaps[0][1], torch.full((10,), 2.5))
        # sync 2 failed: global params and outer state unchanged
        (before, _), after, outer_after, failed, log = snaps[1]
        assert failed == 1 and torch.equal(before, after)
        assert str(outer_after) == str(snaps[0][2])
        assert log[0].committed is False and "3" in log[0].error
        # sync 3 among the survivors: the closed-form mean of their steps 3*(1,2,3)/3 = 6, from 2.5
        assert torch.allclose(snaps[2][1], torch.full((10,), 2.5 + 6.0))
    assert any("failed and was rolled back" in r.message for r in caplog.records)


def test_strict_raises():
    def worker(t):
        p = torch.nn.Parameter(torch.zeros(4))
        opt = lowcomm.DiLoCo(torch.optim.SGD([p], lr=1.0), transport=t, sync_every=1, strict=True)
        p.grad = torch.ones_like(p)
        try:
            opt.step()
        except lowcomm.PeerLost as e:
            return e.lost
        return "no error"

    out = run_local(2, worker, faults={1: Fault(op=1, after_messages=0)}, timeout=30)
    assert out[0] == [1]


def test_stalled_peer_times_out_and_rolls_back():
    def worker(t):
        p = torch.nn.Parameter(torch.zeros(4))
        opt = lowcomm.DiLoCo(torch.optim.SGD([p], lr=1.0), transport=t, sync_every=1)
        p.grad = torch.ones_like(p)
        opt.step()
        return opt.failed_syncs, torch.equal(p.detach(), torch.zeros(4))

    out = run_local(3, worker, faults={2: Fault(op=1, after_messages=1, stall=True)}, timeout=2)
    assert out[0] == (1, True) and out[1] == (1, True)


def test_bad_arguments():
    m = make_model()
    t = world_of_one()
    with pytest.raises(ValueError, match="sync_every"):
        lowcomm.DiLoCo(torch.optim.SGD(m.parameters(), lr=0.1), transport=t, sync_every=0)
    frozen = torch.nn.Parameter(torch.zeros(2), requires_grad=False)
    with pytest.raises(ValueError, match="require grad"):
        lowcomm.DiLoCo(torch.optim.SGD([frozen], lr=0.1), transport=t)
    with pytest.raises(ValueError, match="transport protocol"):
        lowcomm.DiLoCo(torch.optim.SGD(m.parameters(), lr=0.1), transport=object())
    with pytest.raises(ValueError, match="torch.optim.Optimizer"):
        lowcomm.DiLoCo(torch.optim.SGD(m.parameters(), lr=0.1), transport=t, outer_optimizer=lambda ps: "nope")
    with pytest.raises(ValueError, match="torch.optim.Optimizer"):
        lowcomm.DiLoCo("adam", transport=t)
    with pytest.raises(ValueError, match="transport is required"):
        lowcomm.DiLoCo(torch.optim.SGD(m.parameters(), lr=0.1), transport=None)
    with pytest.raises(ValueError):
        lowcomm.DiLoCo(torch.optim.SGD(m.parameters(), lr=0.1), transport=t, sync_every=2.5)


def test_integer_parameter_rejected():
    # torch refuses integer nn.Parameters that require grad, so build the optimizer by hand
    p = torch.zeros(3, dtype=torch.int64)
    inner = torch.optim.SGD([torch.zeros(2, requires_grad=True)], lr=0.1)
    inner.param_groups[0]["params"].append(p)
    with pytest.raises(ValueError, match="floating-point"):
        lowcomm.DiLoCo(inner, transport=world_of_one())


@pytest.mark.parametrize("make_inner", [
    lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9),
    lambda ps: torch.optim.Adam(ps, lr=1e-2),
    lambda ps: torch.optim.Adagrad(ps, lr=0.05),
    lambda ps: torch.optim.AdamW(ps, lr=1e-2, foreach=True),
    lambda ps: torch.optim.AdamW(ps, lr=1e-2, fused=True),
    lambda ps: torch.optim.SGD(ps, lr=0.05, foreach=False),
], ids=["sgd-momentum", "adam", "adagrad", "adamw-foreach", "adamw-fused", "sgd-loop"])
def test_inner_optimizers_world_of_one(make_inner):
    ref = make_model()
    m = make_model()
    ref_opt = make_inner(ref.parameters())
    opt = lowcomm.DiLoCo(make_inner(m.parameters()), transport=world_of_one(), sync_every=1,
                         outer_optimizer=FEDAVG_SGD)
    for step in range(10):
        for model, o in ((ref, ref_opt), (m, opt)):
            o.zero_grad()
            loss_of(model, *batch(0, step)).backward()
            o.step()
    assert (flat(ref.parameters()) - flat(m.parameters())).abs().max() <= 1e-6


def test_param_groups_bf16_and_unused_params():
    def worker(t):
        m = make_model(dtype=torch.bfloat16)
        unused = torch.nn.Parameter(torch.ones(4, dtype=torch.bfloat16))
        inner = torch.optim.AdamW([{"params": m[0].parameters(), "lr": 1e-2},
                                   {"params": list(m[2].parameters()) + [unused], "lr": 5e-3}])
        opt = lowcomm.DiLoCo(inner, transport=t, sync_every=2)
        losses = []
        for step in range(8):
            opt.zero_grad()
            loss = loss_of(m, *batch(t.rank, step, torch.bfloat16))
            loss.backward()
            opt.step()
            losses.append(loss.item())
        return flat(m.parameters()), unused.detach().clone(), losses

    out = run_local(2, worker)
    assert torch.equal(out[0][0], out[1][0])
    assert torch.equal(out[0][1], torch.ones(4, dtype=torch.bfloat16))
    assert all(torch.isfinite(torch.tensor(x)) for x in out[0][2])


class ModelAveraging(OuterOptimizer):
    """A strategy written outside lowcomm: average parameters pairwise every `every` steps."""

    def __init__(self, inner, *, transport, every=2):
        super().__init__(inner, transport=transport)
        self.every = every
        self.broadcast_initial()

    def after_inner_step(self):
        if self.local_step % self.every == 0:
            members = self.transport.members()
            self.transport.all_reduce(self.params, op="mean").wait()
            self.sync_count += 1
            assert members


def test_custom_strategy_subclass():
    def worker(t):
        p = torch.nn.Parameter(torch.zeros(2))
        opt = ModelAveraging(torch.optim.SGD([p], lr=1.0), transport=t, every=2)
        for _ in range(2):
            p.grad = torch.full_like(p, float(t.rank))
            opt.step()
        return p.detach().clone(), opt.sync_count

    out = run_local(3, worker)
    for p, n in out:
        assert n == 1 and torch.allclose(p, torch.full((2,), -2.0))


def test_partial_group_reduce_keeps_everyone_in_step():
    """A group_reduce among some members must not desynchronise the others' next collective."""

    def worker(t):
        x = torch.full((4,), float(t.rank))
        if t.rank < 2:
            t.group_reduce([0, 1], [x]).wait(10)
        y = torch.full((5,), float(t.rank))
        t.all_reduce([y]).wait(10)
        return x, y

    out = run_local(3, worker, timeout=10)
    assert torch.equal(out[0][0], torch.full((4,), 0.5)) and torch.equal(out[2][0], torch.full((4,), 2.0))
    assert all(torch.equal(y, torch.ones(5)) for _, y in out)
