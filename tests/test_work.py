"""Syncs called by work done (sync_tokens=): equivalence with DiLoCo, determinism, weights, caps."""

import pytest
import torch
from _common import batch, loss_of, make_model

from lowcomm.comm.local import LocalTransport, LocalWorld, run_local
from lowcomm.comm.tokens import contribution_factors, parse_speeds, token_weights
from lowcomm.outer import DiLoCo, SparseLoCo, StreamingDiLoCo

TPS = 5  # tokens per step: batch() has 5 rows


def _train(steps, speeds=None, syncs=None, cls=DiLoCo, **kw):
    W = 4 if speeds is None else len(speeds)

    def worker(t):
        model = make_model()
        if cls is StreamingDiLoCo:
            kw.update(model=model, fragments=[[model[0]], [model[2]]], codec=None)
        opt = cls(torch.optim.AdamW(model.parameters(), lr=1e-2), transport=t, **kw)
        # with uneven speeds every worker stops after the same number of syncs
        s = 0
        while s < steps if syncs is None else len(opt.sync_log) < syncs:
            x, y = batch(t.rank, s)
            loss_of(model, x, y).backward()
            opt.count_tokens(TPS)
            opt.step()
            opt.zero_grad()
            s += 1
        return [p.detach().clone() for p in model.parameters()], opt.sync_log, opt

    return run_local(W, worker, world=LocalWorld(W, 30, speeds=speeds))


@pytest.mark.parametrize("cls", [DiLoCo, StreamingDiLoCo, SparseLoCo])
def test_equal_speeds_is_sync_every_bitwise(cls):
    H, W = 4, 4
    ref = _train(12, cls=cls, sync_every=H)
    tok = _train(12, cls=cls, sync_tokens=W * H * TPS)
    for (a, la, _), (b, lb, _) in zip(ref, tok):
        assert len(la) == len(lb) == (5 if cls is StreamingDiLoCo else 3)  # the 6th fragment sync is in flight
        assert [(r.launch_step, r.finish_step) for r in la] == [(r.launch_step, r.finish_step) for r in lb]
        assert all(r.committed for r in lb)
        for p, q in zip(a, b):
            assert torch.equal(p, q)
        if cls is StreamingDiLoCo:  # a fragment's first sync: the first H / F steps' tokens
            assert lb[0].tokens == {m: H // 2 * TPS for m in range(W)}
            assert lb[2].tokens == {m: H * TPS for m in range(W)}
        else:
            assert lb[0].tokens == {m: H * TPS for m in range(W)}
        assert lb[0].weights == {m: 0.25 for m in range(W)}


def test_slow_worker_contributes_weighted_and_repeats_bitwise():
    speeds = [1, 1, 1, 0.33]
    N = 4 * 6 * TPS  # about 6 fast steps per sync
    runs = [_train(0, speeds=speeds, syncs=3, sync_tokens=N) for _ in range(2)]
    for (a, la, _), (b, lb, _) in zip(*runs):
        assert [r.tokens for r in la] == [r.tokens for r in lb]
        for p, q in zip(a, b):
            assert torch.equal(p, q)
    logs = [r[1] for r in runs[0]]
    assert all(len(lg) == 3 for lg in logs)  # everyone in every sync
    for rec in logs[0]:
        assert rec.committed and set(rec.tokens) == {0, 1, 2, 3}
        ratio = rec.weights[3] / rec.weights[0]
        assert 0.2 <= ratio <= 0.45, rec
    # N is 24 steps' worth. At T = 7: 3 x 7 fast + 2 slow steps (ending 3.03, 6.06) = 23; at T = 8: 26, so
    # the sync is called at T = 8 and the slow worker finishes its third step (started 6.06) into it
    assert logs[0][0].tokens == {0: 8 * TPS, 1: 8 * TPS, 2: 8 * TPS, 3: 3 * TPS}
    # every worker ends a sync with the same parameters
    final = [r[0] for r in runs[0]]
    for ps in final[1:]:
        for p, q in zip(final[0], ps):
            assert torch.equal(p, q)


def test_weights_cap_and_factors():
    w = token_weights({0: 10, 1: 10, 2: 10, 3: 10_000})
    assert w[3] == pytest.approx(0.5) and sum(w.values()) == pytest.approx(1.0)
    assert w[0] == pytest.approx(0.5 / 3)
    assert token_weights({0: 0, 1: 0}) == {0: 0.5, 1: 0.5}
    assert contribution_factors({0: 7, 1: 7}) == {0: 1.0, 1: 1.0}
    f = contribution_factors({0: 30, 1: 10})
    assert f[0] == pytest.approx(1.5) and f[1] == pytest.approx(0.5)


def test_bad_arguments():
    with pytest.raises(ValueError, match="one relative speed per worker"):
        parse_speeds("1,1", 3)
    with pytest.raises(ValueError, match="> 0"):
        parse_speeds([1, 0], 2)
    model = make_model()
    t = LocalTransport(LocalWorld(1), 0)
    with pytest.raises(ValueError, match="not both"):
        DiLoCo(torch.optim.SGD(model.parameters(), lr=0.1), transport=t, sync_every=2, sync_tokens=10)
    with pytest.raises(ValueError, match="sync_tokens must be"):
        DiLoCo(torch.optim.SGD(model.parameters(), lr=0.1), transport=t, sync_tokens=0)
    opt = DiLoCo(torch.optim.SGD(model.parameters(), lr=0.1), transport=t, sync_tokens=10)
    with pytest.raises(ValueError, match="count_tokens"):
        opt.step()


def test_transport_without_token_syncs_refused():
    model = make_model()
    t = LocalTransport(LocalWorld(1), 0)
    t.token_syncs = False  # as the ZeroMQ and torch.distributed transports today
    with pytest.raises(ValueError, match="cannot: use sync_every"):
        DiLoCo(torch.optim.SGD(model.parameters(), lr=0.1), transport=t, sync_tokens=10)
    with pytest.raises(ValueError, match="multiple of the number of fragments"):
        StreamingDiLoCo(torch.optim.SGD(model.parameters(), lr=0.1), transport=LocalTransport(LocalWorld(1), 0),
                        model=model, fragments=[[model[0]], [model[2]]], sync_tokens=11)


def test_killed_worker_does_not_stall_the_tally():
    """A worker that dies mid-phase is left out of the tally; the others sync and go on."""
    from lowcomm.comm.local import Fault

    W = 3

    def worker(t):
        model = make_model()
        opt = DiLoCo(torch.optim.SGD(model.parameters(), lr=0.1), transport=t, sync_tokens=W * 2 * TPS,
                     tokens_per_step=TPS)
        for s in range(6):
            x, y = batch(t.rank, s)
            loss_of(model, x, y).backward()
            opt.step()
            opt.zero_grad()
        return opt.sync_log

    # worker 2 dies in its op 1 (the first sync's all-reduce; op 0 is the initial broadcast)
    out = run_local(W, worker, faults={2: Fault(op=1)}, timeout=20)
    assert out[2] is None
    for log in out[:2]:  # the second phase needs 3 steps of each survivor
        assert [r.committed for r in log] == [False, True]
        assert log[1].tokens == {0: 3 * TPS, 1: 3 * TPS} and log[1].finish_step == 5


def test_streaming_by_tokens_resumes_exactly():
    """A checkpoint at a sync call keeps the fragment turn and the tallies: resumed == uninterrupted."""
    W, H = 2, 4

    def run(t, stop=None, resume=None):
        model = make_model()
        opt = StreamingDiLoCo(torch.optim.AdamW(model.parameters(), lr=1e-2), transport=t, model=model,
                              fragments=[[model[0]], [model[2]]], codec=None, sync_tokens=W * H * TPS,
                              tokens_per_step=TPS)
        start = 0
        if resume is not None:
            model.load_state_dict(resume[t.rank][0])
            opt.load_state_dict(resume[t.rank][1])
            start = opt.local_step
        for s in range(start, 12 if stop is None else stop):
            x, y = batch(t.rank, s)
            loss_of(model, x, y).backward()
            opt.step()
            opt.zero_grad()
        if stop is not None:
            import copy
            return copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())
        opt.flush()
        return [p.detach().clone() for p in model.parameters()], [r.unit for r in opt.sync_log]

    full = run_local(W, run)
    ckpt = run_local(W, run, stop=6)  # step 6 launches fragment 0's second sync
    resumed = run_local(W, run, resume=ckpt)
    for (a, _), (b, units) in zip(full, resumed):
        assert units[-1] == "fragment1"
        for p, q in zip(a, b):
            assert torch.equal(p, q)
