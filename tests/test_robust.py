"""Robust aggregation: closed forms of each rule, the transport's bits, offences and ejection."""

import math

import pytest
import torch

from lowcomm.comm.adversary import Adversary, alie_z
from lowcomm.comm.aggregate import RULES, Aggregate, aggregate, get_aggregate
from lowcomm.comm.local import LocalTransport, LocalWorld, run_local


def vecs(*rows):
    return [torch.tensor(r, dtype=torch.float32) for r in rows]


@pytest.mark.parametrize("rule", RULES)
def test_equal_contributions_return_that_value(rule):
    x = torch.tensor([0.5, -1.25, 2.0, 0.0, 3.75])
    for shards in (1, 3):
        out, _ = aggregate([x.clone() for _ in range(4)], rule, shards=shards)
        assert torch.equal(out, x), (rule, shards)


def test_mean_is_member_order_sum_over_w():
    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(11, generator=g) for _ in range(5)]
    ref = xs[0].clone()
    for x in xs[1:]:
        ref.add_(x)
    out, screen = aggregate(xs, "mean", shards=5)
    assert torch.equal(out, ref / 5) and screen is None


def test_clip_scales_outlier_to_ratio_times_median():
    # four unit vectors along e0, one of norm 50 along e1 (below the hard bound 100): it is scaled to 3
    xs = vecs(*([[1.0, 0.0]] * 4), [0.0, 50.0])
    out, screen = aggregate(xs, "clip")
    assert screen.keep == [0, 1, 2, 3, 4] and not screen.offences
    assert screen.median == 1.0
    assert torch.allclose(out, torch.tensor([4 / 5, 3 / 5]), atol=1e-6)
    out2, _ = aggregate(xs, Aggregate("clip", clip_ratio=2.0))
    assert torch.allclose(out2, torch.tensor([4 / 5, 2 / 5]), atol=1e-6)
    # the factor applies to the whole vector: sharding gives the same result up to rounding
    out3, _ = aggregate(xs, "clip", shards=2)
    assert torch.allclose(out, out3, atol=1e-6)


def test_trimmed_mean_drops_extremes_per_coordinate():
    xs = vecs([1, -7], [2, 5], [3, 6], [4, 8], [100, 7])
    out, _ = aggregate(xs, "trimmed_mean")
    assert torch.allclose(out, torch.tensor([3.0, 6.0]))  # (2+3+4)/3 and (5+6+7)/3
    out, _ = aggregate(xs, Aggregate("trimmed_mean", trim=2))
    assert torch.allclose(out, torch.tensor([3.0, 6.0]))  # the median
    with pytest.raises(ValueError, match="trim"):
        aggregate(xs[:4], Aggregate("trimmed_mean", trim=2))
    with pytest.raises(ValueError, match="trim"):
        Aggregate("trimmed_mean", trim=1).check_world(2)


def test_centered_clip_closed_forms():
    honest = [1.0, 2.0]
    xs = vecs(*([honest] * 4), [-30.0, 40.0])
    # centered at the honest value: honest distances 0, so tau = 0 and the outlier moves nothing
    out, _ = aggregate(xs, "centered_clip", center=torch.tensor(honest))
    assert torch.equal(out, torch.tensor(honest))
    # from zero, one round: tau = median |x_i| = sqrt(5); the outlier (norm 50) is clipped to sqrt(5)
    out1, _ = aggregate(xs, Aggregate("centered_clip", iters=1))
    o = torch.tensor([-30.0, 40.0])
    expect = (4 * torch.tensor(honest) + o * (math.sqrt(5) / 50)) / 5
    assert torch.allclose(out1, expect, atol=1e-6)
    # more rounds move towards the honest value
    out3, _ = aggregate(xs, "centered_clip")
    assert (out3 - torch.tensor(honest)).norm() < (out1 - torch.tensor(honest)).norm()


def test_screening_excludes_non_finite_and_beyond_hard_bound():
    xs = vecs([1, 0], [0, 1], [1, 1], [float("nan"), 0], [1e4, 0])
    for rule in ("clip", "trimmed_mean", "centered_clip"):
        out, screen = aggregate(xs, rule)
        assert screen.offences == {3: "non_finite", 4: "bound"}, rule
        assert screen.keep == [0, 1, 2]
        assert torch.isfinite(out).all() and out.abs().max() <= 1.0, rule


def test_get_aggregate_and_bad_input():
    assert get_aggregate(None).rule == "mean"
    assert get_aggregate("clip", clip_ratio=2.0).clip_ratio == 2.0
    assert get_aggregate({"rule": "trimmed_mean", "trim": 2}).trim == 2
    assert get_aggregate("clip:clip_ratio=2:hard_bound=50") == Aggregate("clip", clip_ratio=2.0, hard_bound=50.0)
    assert get_aggregate("centered_clip:iters=5").iters == 5
    for bad in ("clip:ratio=2", "clip:clip_ratio", "trimmed_mean:trim=x"):
        with pytest.raises(ValueError, match="aggregate spec"):
            get_aggregate(bad)
    for bad in ({"rule": "median"}, {"rule": "clip", "clip_ratio": 0}, {"rule": "centered_clip", "iters": 0},
                {"rule": "clip", "hard_bound": 0.5}):
        with pytest.raises(ValueError):
            get_aggregate(bad)


def _reduce_worker(t, xs, rule, codec=None, center=None):
    buf = xs[t.rank].clone()
    t.all_reduce([buf], codec=codec, aggregate=rule, center=center).wait(30)
    return buf


@pytest.mark.parametrize("rule", RULES)
def test_transport_matches_reference_bit_for_bit(rule):
    W = 4
    g = torch.Generator().manual_seed(1)
    xs = [torch.randn(37, generator=g) for _ in range(W)]
    xs[3] = xs[3] * 20  # an outlier that clip and centered_clip act on
    center = torch.randn(37, generator=g) * 0.1
    out = run_local(W, _reduce_worker, xs, rule, center=[center] if rule == "centered_clip" else None)
    ref, _ = aggregate(xs, rule, center=center if rule == "centered_clip" else None, shards=W)
    for o in out:
        assert torch.equal(o, ref)


def test_mean_aggregate_is_todays_all_reduce_bitwise():
    W = 3
    g = torch.Generator().manual_seed(2)
    xs = [torch.randn(29, generator=g) for _ in range(W)]
    today = run_local(W, _reduce_worker, xs, None)
    mean = run_local(W, _reduce_worker, xs, "mean")
    for a, b in zip(today, mean):
        assert torch.equal(a, b)
    for codec in ("int8", "e3m0"):
        a = run_local(W, _reduce_worker, xs, None, codec)
        b = run_local(W, _reduce_worker, xs, "mean", codec)
        assert all(torch.equal(x, y) for x, y in zip(a, b))


def test_quantized_robust_all_reduce_identical_on_every_member():
    W = 4
    g = torch.Generator().manual_seed(3)
    xs = [torch.randn(64, generator=g) for _ in range(W)]
    xs[0] = xs[0] * -10
    for rule in ("clip", "trimmed_mean", "centered_clip"):
        out = run_local(W, _reduce_worker, xs, rule, "int8")
        assert all(torch.equal(o, out[0]) for o in out)
        plain = run_local(W, _reduce_worker, xs, rule)
        assert torch.allclose(out[0], plain[0], atol=0.05)


def test_scale_attacker_is_screened_and_ejected_after_max_offences():
    W, ops = 5, 4
    world = LocalWorld(W, 30.0, adversary=Adversary("scale", 1, W), max_offences=3)

    def worker(t):
        g = torch.Generator().manual_seed(10 + t.rank)
        outs = []
        for _ in range(ops):
            buf = torch.randn(20, generator=g)
            try:
                t.all_reduce([buf], aggregate="clip").wait(30)
                outs.append(buf)
            except Exception as e:  # noqa: BLE001 - the ejected attacker's ops fail
                outs.append(e)
        return outs, t.members()

    res = run_local(W, worker, world=world)
    book = world.book
    assert [o.member for o in book.offences] == [4, 4, 4] and {o.kind for o in book.offences} == {"bound"}
    assert list(book.ejected) == [4]
    for r in range(4):
        outs, members = res[r]
        assert members == [0, 1, 2, 3]
        assert all(isinstance(o, torch.Tensor) and o.abs().max() < 10 for o in outs)
        assert all(torch.equal(o, p) for o, p in zip(outs, res[0][0]))  # honest members agree bitwise
    assert isinstance(res[4][0][-1], Exception)  # ejected: its own operations fail


def test_honest_members_never_offend_with_defaults():
    W = 6
    world = LocalWorld(W, 30.0)

    def worker(t):
        g = torch.Generator().manual_seed(t.rank)
        for _ in range(5):
            buf = torch.randn(50, generator=g) * (1 + t.rank)  # norms 1x..6x apart
            t.all_reduce([buf], aggregate="trimmed_mean").wait(30)

    run_local(W, worker, world=world)
    assert not world.book.offences and not world.book.ejected


def test_alie_sends_mean_minus_z_std_of_honest():
    W = 5
    adv = Adversary("alie", 2, W)
    assert math.isclose(adv.z, alie_z(5, 2))
    world = LocalWorld(W, 30.0, adversary=adv)
    xs = [torch.full((4,), float(r)) for r in range(W)]
    out = run_local(W, _reduce_worker, xs, None, world=world)
    honest = torch.stack(xs[:3])
    bad = honest.mean(0) - adv.z * honest.std(0)
    assert torch.allclose(out[0], (honest.sum(0) + 2 * bad) / 5)


def test_strategy_rejects_rule_its_transport_cannot_serve():
    import lowcomm
    from lowcomm.comm.local import LocalTransport

    class MeanOnly(LocalTransport):
        aggregate_rules = ("mean",)

    m = torch.nn.Linear(2, 2)
    with pytest.raises(ValueError, match="cannot aggregate"):
        lowcomm.DiLoCo(torch.optim.SGD(m.parameters(), lr=0.1), transport=MeanOnly(LocalWorld(1), 0),
                       aggregate="clip")


# ---- strategies ------------------------------------------------------------------------------------------
def _train(t, make, steps=12, attack_scale=None):
    from _common import batch, loss_of, make_model

    m = make_model()
    opt = make(m, t)
    for step in range(steps):
        opt.zero_grad()
        loss_of(m, *batch(t.rank, step)).backward()
        opt.step()
    return torch.cat([p.detach().reshape(-1) for p in m.parameters()]), opt


def test_diloco_mean_aggregate_is_bitwise_default():
    import lowcomm

    def run(agg):
        kw = {} if agg is None else {"aggregate": agg}
        return run_local(3, _train, lambda m, t: lowcomm.DiLoCo(torch.optim.AdamW(m.parameters(), lr=1e-2),
                                                                transport=t, sync_every=4, **kw))

    a, b = run(None), run("mean")
    assert all(torch.equal(x[0], y[0]) for x, y in zip(a, b))


@pytest.mark.parametrize("rule", ["clip", "trimmed_mean", "centered_clip"])
def test_diloco_robust_rules_survive_a_sign_flip_attacker(rule):
    import lowcomm

    W = 5

    def make(m, t):
        return lowcomm.DiLoCo(torch.optim.AdamW(m.parameters(), lr=1e-2), transport=t, sync_every=4, aggregate=rule)

    clean = run_local(W, _train, make)
    world = LocalWorld(W, 30.0, adversary=Adversary("sign_flip", 1, W))
    attacked = run_local(W, _train, make, world=world)
    meanw = LocalWorld(W, 30.0, adversary=Adversary("sign_flip", 1, W))
    ruined = run_local(W, _train, lambda m, t: lowcomm.DiLoCo(torch.optim.AdamW(m.parameters(), lr=1e-2),
                                                              transport=t, sync_every=4), world=meanw)
    honest = [attacked[r][0] for r in range(W - 1)]
    assert all(torch.equal(h, honest[0]) for h in honest)  # honest members agree bit for bit
    err = (honest[0] - clean[0][0]).norm()
    assert err < 0.5 * (ruined[0][0] - clean[0][0]).norm()
    assert attacked[0][1].sync_count == 3 and not world.book.offences  # x-10 is within the hard bound


def test_streaming_quantized_clip_ejects_scale_attacker():
    import lowcomm

    W = 4

    def make(m, t):
        return lowcomm.StreamingDiLoCo(torch.optim.AdamW(m.parameters(), lr=1e-2), transport=t, model=m,
                                       sync_every=2, fragments=1, overlap=0, alpha=0.0, codec="int8",
                                       aggregate="clip")

    world = LocalWorld(W, 30.0, adversary=Adversary("scale", 1, W))
    out = run_local(W, _train, make, world=world)
    assert list(world.book.ejected) == [3] and len(world.book.offences) == 3
    assert all(torch.equal(out[r][0], out[0][0]) for r in range(3))
    assert out[0][1].failed_syncs == 0 and out[3][1].failed_syncs == 6 - 3


def test_noloco_rejects_far_partner_and_names_it():
    import lowcomm

    W = 2

    def make(m, t):
        return lowcomm.NoLoCo(torch.optim.AdamW(m.parameters(), lr=1e-2), transport=t, sync_every=3,
                              aggregate="clip")

    world = LocalWorld(W, 30.0, adversary=Adversary("scale", 1, W))
    out = run_local(W, _train, make, world=world)
    opt = out[0][1]
    assert opt.sync_count == 0 and opt.failed_syncs == 4
    assert [r["member"] for r in opt.detections()] == [1] * 4
    assert "partner 1 rejected" in opt.sync_log[0].error
    clean = run_local(W, _train, make)
    assert clean[0][1].sync_count == 4 and not clean[0][1].partner_screen.rejected


def test_demo_clip_per_sender_at_decode():
    import lowcomm

    W = 4

    def make(m, t):
        return lowcomm.DeMo(torch.optim.SGD(m.parameters(), lr=1e-2), transport=t, topk=2, chunk=4, sign=False,
                            aggregate="clip")

    world = LocalWorld(W, 30.0, adversary=Adversary("scale", 1, W))
    out = run_local(W, _train, make, world=world)
    assert out[0][1].last_offences == {3: "bound"}
    clean = run_local(W, _train, make)
    assert (out[0][0] - clean[0][0]).norm() < 0.2 * clean[0][0].norm()
    with pytest.raises(ValueError, match="DeMo"):
        lowcomm.DeMo(torch.optim.SGD(torch.nn.Linear(2, 2).parameters(), lr=0.1),
                     transport=LocalTransport(LocalWorld(1), 0), aggregate="trimmed_mean")


# ---- lying owners and the simulator ----------------------------------------------------------------------
def test_lying_owner_caught_by_forced_audit_named_and_ejected():
    W = 4
    world = LocalWorld(W, 30.0, adversary=Adversary("lying_owner", 1, W), audit=1.0, seed=3)

    def worker(t):
        g = torch.Generator().manual_seed(t.rank)
        res = []
        for _ in range(12):
            buf = torch.randn(10, generator=g)
            try:
                t.all_reduce([buf], aggregate="clip", codec="int8").wait(30)
                res.append(True)
            except Exception:  # noqa: BLE001
                res.append(False)
        return res

    out = run_local(W, worker, world=world)
    audits = world.audits.summary()
    liar_audits = [a["op"] for a in world.audits.audits if a["owner"] == 3 and a["op"] <= audits["named"][-1]["op"]]
    # every audit of the liar's shard named it (and only it), and failed that op on every member
    assert [n["op"] for n in audits["named"]] == liar_audits and {n["member"] for n in audits["named"]} == {3}
    assert {n["kind"] for n in audits["named"]} == {"owner"} and len(liar_audits) == 3
    for r in range(3):
        assert [i + 1 for i, ok in enumerate(out[r]) if not ok] == liar_audits
    assert list(world.book.ejected) == [3] and audits["extra_bytes"] > 0


def test_honest_owners_pass_every_audit():
    W = 3
    world = LocalWorld(W, 30.0, audit=1.0)
    out = run_local(W, _reduce_worker, [torch.full((9,), float(r)) for r in range(W)], "centered_clip", world=world)
    assert all(torch.equal(o, out[0]) for o in out)
    assert world.audits.summary()["audits"] == 1 and not world.audits.found and not world.book.offences


def test_sim_attack_records_rule_detections_ejections(tmp_path):
    from lowcomm.models import GPTConfig
    from lowcomm.sim.report import table
    from lowcomm.sim.runner import SimConfig, run_strategy

    tiny = GPTConfig(n_layer=1, n_embd=16, n_head=2, seq_len=16)
    cfg = SimConfig(workers=3, steps=6, batch_size=2, model=tiny, eval_every=3, eval_sequences=4, threads=1,
                    warmup_steps=1, attackers=1, attack="scale")
    r = run_strategy("diloco", cfg, {"sync_every": 2, "aggregate": "clip"})
    assert r.attack == "scale" and r.aggregate == "clip" and r.attackers == 1
    assert [d["member"] for d in r.detections] == [2, 2, 2] and r.ejections[0]["member"] == 2
    assert math.isfinite(r.final_eval_loss) and r.final_eval_loss < 6
    assert "detections" in table([r], cfg)
    with pytest.raises(ValueError, match="attackers"):
        SimConfig(workers=3, attackers=3, attack="scale")
    with pytest.raises(ValueError, match="both"):
        SimConfig(workers=3, attack="scale")


def test_trimmed_mean_goes_on_when_the_world_shrinks_below_2_trim_plus_1():
    W = 3
    world = LocalWorld(W, 30.0, adversary=Adversary("scale", 1, W))

    def worker(t):
        outs = []
        for i in range(5):
            buf = torch.full((6,), float(t.rank + i))
            try:
                t.all_reduce([buf], aggregate="trimmed_mean").wait(30)
                outs.append(buf[0].item())
            except Exception:  # noqa: BLE001 - the ejected attacker
                outs.append(None)
        return outs

    out = run_local(W, worker, world=world)
    assert list(world.book.ejected) == [2]
    # screened out, the attacker leaves two values: their mean; then the two members alone
    assert out[0] == out[1] == [0.5 + i for i in range(5)]


def test_sparseloco_clip_per_sender_at_decode():
    import lowcomm
    from lowcomm.outer.sparseloco import SparseLoCo

    W = 4

    def make(agg):
        return lambda m, t: SparseLoCo(torch.optim.AdamW(m.parameters(), lr=1e-2), transport=t, sync_every=3,
                                       topk=2, chunk=4, aggregate=agg)

    world = LocalWorld(W, 30.0, adversary=Adversary("scale", 1, W))
    out = run_local(W, _train, make("clip"), world=world)
    assert {d["member"] for d in out[0][1].detections()} == {3} and out[0][1].sync_count == 4
    clean = run_local(W, _train, make("clip"))
    ruined = run_local(W, _train, make("mean"), world=LocalWorld(W, 30.0, adversary=Adversary("scale", 1, W)))
    assert (out[0][0] - clean[0][0]).norm() < 0.1 * (ruined[0][0] - clean[0][0]).norm()
    assert not clean[0][1].detections()
    with pytest.raises(ValueError, match="SparseLoCo"):
        SparseLoCo(torch.optim.SGD(torch.nn.Linear(2, 2).parameters(), lr=0.1),
                   transport=LocalTransport(LocalWorld(1), 0), aggregate="centered_clip")
    del lowcomm
