"""NoLoCo: closed forms, groups without coordination, no global collective, bytes, failures, state."""

import copy
import threading
import time

import pytest
import torch
from _common import batch, loss_of, make_model

import lowcomm
from lowcomm.comm.local import Fault, LocalTransport, LocalWorld, run_local
from lowcomm.outer.noloco import noloco_groups

P_SHAPE = (3,)


def flat(params):
    return torch.cat([p.detach().reshape(-1).float() for p in params])


def grad_of(rank, rnd):
    """Constant inner gradient of worker ``rank`` during sync round ``rnd`` (1-based)."""
    return float(rank + 1) * (1.0 + 0.5 * rnd)


def reference(W, H, rounds, lr, eta, mu, seed=0, n=2, gamma=None):
    """Equation (1) (or the paper's beta/gamma form) in plain Python floats, groups from noloco_groups."""
    beta = eta
    phi = [1.0] * W
    m = [0.0] * W
    out = []
    for rnd in range(1, rounds + 1):
        theta = [phi[r] - H * lr * grad_of(r, rnd) for r in range(W)]
        new_m = list(m)
        for grp in noloco_groups(range(W), n, seed, rnd):
            mt = sum(theta[j] for j in grp) / len(grp)
            mp = sum(phi[j] for j in grp) / len(grp)
            for r in grp:
                if gamma is None:
                    new_m[r] = mu * m[r] + eta * (mt - phi[r])
                else:  # Delta = alpha Delta - beta mean(phi_j - theta_j) - gamma (phi_i - mean phi_j)
                    new_m[r] = mu * m[r] - beta * (mp - mt) - gamma * (phi[r] - mp)
        m = new_m
        phi = [phi[r] + m[r] for r in range(W)]
        out.append(list(phi))
    return out


def scalar_worker(t, H, rounds, lr, **kw):
    p = torch.nn.Parameter(torch.ones(P_SHAPE))
    opt = lowcomm.NoLoCo(torch.optim.SGD([p], lr=lr), transport=t, sync_every=H, **kw)
    phis, groups = [], []
    for step in range(H * rounds):
        rnd = step // H + 1
        p.grad = torch.full_like(p, grad_of(t.rank, rnd))
        opt.step()
        if opt.local_step % H == 0:
            phis.append(opt.units[0].anchors[0].clone())
            groups.append(opt.last_group)
            assert torch.equal(p.detach(), opt.units[0].anchors[0])  # theta_i = phi_i after a sync
    return phis, groups, opt


def test_w2_eta1_mu0_moves_both_to_their_mean():
    def worker(t):
        m = make_model()
        opt = lowcomm.NoLoCo(torch.optim.SGD(m.parameters(), lr=0.05), transport=t, sync_every=3,
                             outer_lr=1.0, outer_momentum=0.0)
        for step in range(3):
            opt.zero_grad()
            loss_of(m, *batch(t.rank, step)).backward()
            if step == 2:  # theta just before the sync: apply the last inner step by hand on a copy
                pre = [p.detach() - 0.05 * p.grad for p in m.parameters()]
            opt.step()
        return flat(pre), flat(m.parameters()), flat(opt.units[0].anchors)

    out = run_local(2, worker)
    mean = (out[0][0] + out[1][0]) / 2
    assert (out[0][0] - out[1][0]).abs().max() > 1e-3  # they really had drifted apart
    for r in range(2):
        assert (out[r][1] - mean).abs().max() <= 1e-6
        assert (out[r][2] - mean).abs().max() <= 1e-6


def test_golden_two_syncs_with_momentum():
    # W=2 (one group), H=2, inner SGD lr 0.1, grads 1*(1.5) / 2*(1.5) then 1*2 / 2*2, eta 0.7, mu 0.5:
    # round 1: theta = 1-0.3=0.7, 1-0.6=0.4; mean .55; m = .7*(.55-1) = -.315; phi = .685
    # round 2: theta = .685-.4=.285, .685-.8=-.115; mean .085; m = .5*-.315 + .7*(.085-.685) = -.5775;
    #          phi = .1075
    out = run_local(2, scalar_worker, 2, 2, 0.1)
    for r in range(2):
        phis = out[r][0]
        assert torch.allclose(phis[0], torch.full(P_SHAPE, 0.685), atol=1e-6)
        assert torch.allclose(phis[1], torch.full(P_SHAPE, 0.1075), atol=1e-6)
    assert all(torch.equal(a, b) for a, b in zip(out[0][0], out[1][0]))  # one group: identical bits
    assert reference(2, 2, 2, 0.1, 0.7, 0.5)[-1] == pytest.approx([0.1075, 0.1075])


@pytest.mark.parametrize("W,n,gamma", [(4, 2, None), (5, 2, None), (6, 3, None), (4, 2, 0.3), (4, 2, 0.0),
                                       (1, 2, None)])
def test_matches_reference_recursion(W, n, gamma):
    """Stock SGD(lr=eta, momentum=mu) on g = phi - mean_G(theta) is equation (1), worker by worker."""
    H, rounds, lr, eta, mu = 2, 4, 0.1, 0.7, 0.5
    out = run_local(W, scalar_worker, H, rounds, lr, group_size=n, outer_lr=eta, outer_momentum=mu, consensus_lr=gamma)
    ref = reference(W, H, rounds, lr, eta, mu, n=n, gamma=gamma)
    for r in range(W):
        for k in range(rounds):
            assert torch.allclose(out[r][0][k], torch.full(P_SHAPE, ref[k][r]), atol=1e-5), (r, k)
    if W == 4 and gamma is None:
        # workers really diverge (different pairs), so the consensus term matters in this test
        assert len({round(ref[-1][r], 6) for r in range(W)}) > 1


def test_paper_form_with_equal_weights_is_the_default_form():
    a = run_local(4, scalar_worker, 2, 3, 0.1)
    b = run_local(4, scalar_worker, 2, 3, 0.1, consensus_lr=0.7)  # == outer_lr: theta-only path
    c = run_local(4, scalar_worker, 2, 3, 0.1, consensus_lr=0.7 + 1e-12)  # general path, sends phi too
    assert c[0][2].sends_phi and not b[0][2].sends_phi
    for r in range(4):
        assert all(torch.equal(x, y) for x, y in zip(a[r][0], b[r][0]))
        assert all(torch.allclose(x, y, atol=1e-6) for x, y in zip(a[r][0], c[r][0]))


def test_groups_agree_without_talking_and_change_between_syncs():
    W, H, rounds = 6, 1, 6
    out = run_local(W, scalar_worker, H, rounds, 0.1, broadcast_initial=False)
    seen = set()
    for k in range(rounds):
        by_worker = {r: tuple(out[r][1][k]) for r in range(W)}
        for r, grp in by_worker.items():
            assert r in grp and len(grp) == 2
            assert all(by_worker[j] == grp for j in grp)  # my partner thinks it is paired with me
        assert sorted(set(by_worker.values())) == [tuple(g) for g in sorted(noloco_groups(range(W), 2, 0, k + 1))]
        seen.add(tuple(sorted(set(by_worker.values()))))
    assert len(seen) > 1  # the pairing changes between syncs


def test_noloco_groups_pure_function():
    g = noloco_groups(range(8), 2, 0, 1)
    assert sorted(x for grp in g for x in grp) == list(range(8)) and all(len(grp) == 2 for grp in g)
    assert g == noloco_groups([7, 6, 5, 4, 3, 2, 1, 0], 2, 0, 1)  # depends on the set of ids only
    assert g != noloco_groups(range(8), 2, 1, 1) or g != noloco_groups(range(8), 2, 0, 2)
    assert [len(x) for x in noloco_groups(range(5), 2, 0, 3)] == [2, 3]  # remainder joins the last group
    assert [len(x) for x in noloco_groups(range(7), 3, 0, 3)] == [3, 4]
    assert noloco_groups(range(2), 4, 0, 0) == [[0, 1]]
    assert noloco_groups([0], 2, 0, 5) == [[0]]
    ids = [3, 17, 40, 41, 99]  # member ids, not ranks
    assert sorted(x for grp in noloco_groups(ids, 2, 9, 4) for x in grp) == ids
    with pytest.raises(ValueError):
        noloco_groups([], 2, 0, 0)
    with pytest.raises(ValueError):
        noloco_groups(range(4), 0, 0, 0)


@pytest.mark.parametrize("broadcast", [True, False])
def test_no_global_collective(broadcast):
    W, H, rounds = 4, 2, 3

    def worker(t):
        m = make_model()
        opt = lowcomm.NoLoCo(torch.optim.AdamW(m.parameters(), lr=1e-2), transport=t, sync_every=H,
                             broadcast_initial=broadcast)
        for step in range(H * rounds):
            opt.zero_grad()
            loss_of(m, *batch(t.rank, step)).backward()
            opt.step()
        return [(r.kind, r.participants, r.ok) for r in t.ledger.records], opt.sync_count

    for records, syncs in run_local(W, worker):
        kinds = [k for k, _, _ in records]
        assert kinds == (["broadcast"] if broadcast else []) + ["group_reduce"] * rounds
        assert all(p == 2 and ok for k, p, ok in records if k == "group_reduce")
        assert syncs == rounds


@pytest.mark.parametrize("W,kw", [(4, {}), (8, {}), (16, {}), (4, {"consensus_lr": 0.0}),
                                  (4, {"consensus_lr": 0.3})])
def test_bytes_per_worker_per_sync_are_p_values(W, kw):
    def worker(t, **kw):
        m = make_model()
        opt = lowcomm.NoLoCo(torch.optim.SGD(m.parameters(), lr=0.01), transport=t, sync_every=1, **kw)
        for step in range(2):
            opt.zero_grad()
            loss_of(m, *batch(t.rank, step)).backward()
            opt.step()
        P = sum(p.numel() for p in m.parameters())
        return P, [(r.bytes_sent, dict(r.bytes_by_peer)) for r in t.ledger.records if r.kind == "group_reduce"]

    for P, recs in run_local(W, worker, **kw):
        assert len(recs) == 2
        for nbytes, by_peer in recs:
            # one peer, P fp32 values whatever W is (2P in the general beta != gamma form: theta and phi)
            assert nbytes == (8 if kw.get("consensus_lr") == 0.3 else 4) * P and len(by_peer) == 1


def test_world_of_one_runs_the_update_alone():
    t = LocalTransport(LocalWorld(1), 0)
    phis, groups, opt = scalar_worker(t, 2, 3, 0.1)
    ref = reference(1, 2, 3, 0.1, 0.7, 0.5)
    for k in range(3):
        assert torch.allclose(phis[k], torch.full(P_SHAPE, ref[k][0]), atol=1e-6)
    assert groups == [[0]] * 3
    assert [r.kind for r in t.ledger.records] == ["broadcast"] + ["group_reduce"] * 3
    assert t.ledger.bytes_sent == 0 and opt.sync_count == 3


def test_failed_exchange_rolls_back_only_that_group():
    W, seed = 4, 0
    # op 0 = broadcast, op 1 = round 1, op 2 = round 2: worker 3 dies as round 2 starts
    pair2 = next(g for g in noloco_groups(range(W), 2, seed, 2) if 3 in g)
    partner = [r for r in pair2 if r != 3][0]
    barrier = threading.Barrier(3, timeout=30)
    transports = {}

    def worker(t):
        transports[t.rank] = t
        p = torch.nn.Parameter(torch.ones(4))
        opt = lowcomm.NoLoCo(torch.optim.SGD([p], lr=0.1), transport=t, sync_every=1, seed=seed)
        snaps = []
        for rnd in range(1, 4):
            # Test ordering only (the library does no such thing): worker 3 dies as its round-2
            # exchange starts, but only once every other worker has drawn its round-2 group
            # (its ledger holds the round-2 record), so all drew groups over the same four members;
            # and round 3 starts once every survivor is done with round 2.
            if rnd == 2 and t.rank == 3:
                deadline = time.monotonic() + 30
                while any(r not in transports or transports[r].ledger.ops < 3 for r in range(3)):
                    assert time.monotonic() < deadline
                    time.sleep(0.01)
            if rnd == 3:
                barrier.wait()
            p.grad = torch.full_like(p, float(t.rank + 1))
            before = (opt.units[0].anchors[0].clone(), copy.deepcopy(opt.units[0].outer.state_dict()))
            opt.step()
            ok = opt.sync_log[-1].committed
            snaps.append((before, opt.units[0].anchors[0].clone(), copy.deepcopy(opt.units[0].outer.state_dict()),
                          p.detach().clone(), ok, list(opt.last_group)))
        return snaps, opt.failed_syncs, opt.sync_log

    out = run_local(W, worker, faults={3: Fault(op=2, after_messages=0)}, timeout=30)
    assert out[3] is None
    for r in range(3):
        snaps, failed, log = out[r]
        (phi_before, outer_before), phi_after, outer_after, theta, ok, group = snaps[1]
        if r == partner:
            assert not ok and failed == 1 and not log[1].committed and "3" in log[1].error
            assert torch.equal(phi_before, phi_after) and torch.equal(theta, phi_after)  # theta_i = phi_i
            assert str(outer_before) == str(outer_after)  # momentum unchanged
        else:
            assert ok and failed == 0
        # round 3: everyone sees members [0, 1, 2]: one group of three (the remainder absorbed)
        assert snaps[2][4] and snaps[2][5] == [0, 1, 2]


def test_state_dict_resume_is_exact():
    W, steps, half = 4, 12, 5

    def run(t, checkpoint_at=None, resume_from=None):
        m = make_model()
        opt = lowcomm.NoLoCo(torch.optim.AdamW(m.parameters(), lr=1e-2), transport=t, sync_every=3)
        start = 0
        if resume_from is not None:
            sd = resume_from[t.rank]
            m.load_state_dict(sd["model"])
            opt.load_state_dict(sd["opt"])
            start = opt.local_step
        ckpt = None
        for step in range(start, steps):
            if step == checkpoint_at:
                ckpt = copy.deepcopy({"model": m.state_dict(), "opt": opt.state_dict()})
            opt.zero_grad()
            loss_of(m, *batch(t.rank, step)).backward()
            opt.step()
        mom = [opt.units[0].outer.state[a]["momentum_buffer"] for a in opt.units[0].anchors]
        return flat(m.parameters()), flat(opt.units[0].anchors), flat(mom), ckpt, opt.sync_count

    full = run_local(W, run, checkpoint_at=half)
    resumed = run_local(W, run, resume_from=[r[3] for r in full])
    for r in range(W):
        for i in range(3):
            assert torch.equal(full[r][i], resumed[r][i])
        assert full[r][4] == resumed[r][4] == 4
    # workers really differ (pairwise averaging is not a global average)
    assert not torch.equal(full[0][1], full[1][1]) or not torch.equal(full[0][1], full[2][1])


def test_registry_and_bad_arguments():
    s = lowcomm.get_strategy("noloco")
    d = s.defaults
    assert {k: d[k] for k in ("sync_every", "group_size", "outer_lr", "outer_momentum")} == \
        {"sync_every": 50, "group_size": 2, "outer_lr": 0.7, "outer_momentum": 0.5}
    m = make_model()
    t = LocalTransport(LocalWorld(1), 0)
    opt = s.build(torch.optim.AdamW(m.parameters()), t, m, **s.defaults)
    assert isinstance(opt, lowcomm.NoLoCo) and opt.sync_every == 50
    inner = lambda: torch.optim.SGD(m.parameters(), lr=0.1)  # noqa: E731
    for kw, match in [({"sync_every": 0}, "sync_every"), ({"group_size": 0}, "group_size"),
                      ({"outer_lr": 0}, "outer_lr"), ({"outer_momentum": 1.0}, "outer_momentum"),
                      ({"consensus_lr": -1}, "consensus_lr"), ({"seed": "x"}, "seed"),
                      ({"outer_momentum": 0.0, "nesterov": True}, "nesterov")]:
        with pytest.raises(ValueError, match=match):
            lowcomm.NoLoCo(inner(), transport=t, **kw)
    sd = lowcomm.NoLoCo(inner(), transport=t, seed=1).state_dict()
    with pytest.raises(ValueError, match="seed"):
        lowcomm.NoLoCo(inner(), transport=t, seed=2).load_state_dict(sd)
