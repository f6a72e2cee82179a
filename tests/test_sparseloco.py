"""SparseLoCo and its wire format: closed forms, error feedback, quantiser bound, bytes, state, failures."""

import copy
import math

import pytest
import torch
from _common import RNG_LOCK

import lowcomm
from lowcomm.comm.base import Handle
from lowcomm.comm.local import Fault, LocalTransport, LocalWorld, run_local
from lowcomm.sparse import TopKCodec, chunk_edges, pack_bits, unpack_bits


def world_of_one():
    return LocalTransport(LocalWorld(1), 0)


def flat(params):
    return torch.cat([p.detach().reshape(-1).float() for p in params])


def make_model(seed=0):
    # chunk=4: the (8, 12) weight is 2x3 blocks of 4x4, the (3, 8) weight 1x2 blocks of 3x4, biases pieces of 4 and 3.
    with RNG_LOCK:
        torch.manual_seed(seed)
        return torch.nn.Sequential(torch.nn.Linear(12, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))


def batch(rank, step):
    g = torch.Generator().manual_seed(1000 * step + rank)
    return torch.randn(6, 12, generator=g), torch.randn(6, 3, generator=g)


def loss_of(model, x, y):
    return ((model(x) - y) ** 2).mean()


# ---- the wire format ----------------------------------------------------------------------------
def test_pack_bits_roundtrip_and_sizes():
    g = torch.Generator().manual_seed(0)
    for bits in (1, 2, 5, 12):
        v = torch.randint(0, 2 ** bits, (37,), generator=g)
        packed = pack_bits(v, bits)
        assert packed.dtype == torch.uint8 and packed.numel() == math.ceil(37 * bits / 8)
        assert torch.equal(unpack_bits(packed, 37, bits), v)
    assert chunk_edges((128, 192), 64) == (64, 64) and chunk_edges((6, 4, 3, 3), 4) == (3, 4)
    assert chunk_edges((100,), 64) == (50,) and chunk_edges((), 64) == (1,)


def test_chunk_layout_roundtrip():
    shapes = [(12, 8), (8,), (6, 4, 3, 3), (7,), ()]
    codec = TopKCodec(shapes, k=3, chunk=4)
    g = torch.Generator().manual_seed(1)
    ts = [torch.randn(s, generator=g) for s in shapes]
    buf = codec.to_chunks(ts, torch.empty(codec.numel))
    assert all(torch.equal(a, b) for a, b in zip(codec.from_chunks(buf), ts))
    # a 2-D block is one chunk: entries of the (12, 8) weight's block (1, 0) are rows 4..7, columns 0..3
    i = 0
    blk = buf[codec.offsets[i] + 2 * 16:codec.offsets[i] + 3 * 16].view(4, 4)
    assert torch.equal(blk, ts[0][4:8, 0:4])


def test_two_bit_quantiser_bound_and_levels():
    """Per tensor: 4 levels, each the mean of its bin; |v - decoded| < 1.5 std inside m +- 3 std; sums kept."""
    g = torch.Generator().manual_seed(2)
    shapes = [(64, 128), (256,), (48, 6)]
    codec = TopKCodec(shapes, k=16, chunk=64, bins=4, quant_range=6.0)
    x = torch.randn(codec.numel, generator=g) * 3 + 0.5
    x[::97] *= 40  # outliers beyond the range land in the outer bins
    parts = codec.encode(x)
    pos, dec = codec.decode(parts)
    kept = x[pos]
    for i in range(len(shapes)):
        a = codec._val_start[i]
        b = a + codec._count(i)
        v, d = kept[a:b], dec[a:b]
        assert d.unique().numel() <= 4
        m, s = v.mean(), v.std()
        code = torch.floor((v - m) / (1.5 * s)).clamp(-2, 1)
        inner = (code == -1) | (code == 0)  # the two inner bins of m +- 3 std
        assert inner.any() and ((v - d).abs()[inner] < 1.5 * s * (1 + 1e-5)).all()
        for c in (-2, 1):  # an outer bin: within its spread
            sel = code == c
            if sel.any():
                assert ((v - d).abs()[sel] <= (v[sel].max() - v[sel].min()) * (1 + 1e-5) + 1e-6).all()
        # every level is the mean of the values it replaces: the tensor's sum is kept, and the
        # squared error is at most that of sending the mean for everything
        for level in d.unique():
            sel = d == level
            assert torch.allclose(v[sel].mean(), level, rtol=1e-5, atol=1e-6)
        assert torch.allclose(d.sum(), v.sum(), rtol=1e-4, atol=1e-3)
        assert (v - d).pow(2).sum() <= (v - m).pow(2).sum() * (1 + 1e-5)
    # the kept entries are each chunk's top-k by magnitude
    blk = x[:codec.groups[0].rows * 4096].view(-1, 4096)
    want = blk.abs().topk(16, dim=1).values.min(1).values
    got = x[pos[:codec.groups[0].rows * 16]].abs().view(-1, 16).min(1).values
    assert torch.equal(got, want)


def _closed_form_bytes(chunks_numel_k, ntensors, bins):
    """ceil(index bits / 8) + values: (chunks, chunk_numel, k) per tensor."""
    idx_bits = sum(c * k * math.ceil(math.log2(n)) for c, n, k in chunks_numel_k if k < n)
    nval = sum(c * min(k, n) for c, n, k in chunks_numel_k)
    if bins is None:
        return math.ceil(idx_bits / 8) + 4 * nval
    return math.ceil(idx_bits / 8) + math.ceil(nval * int(math.log2(bins)) / 8) + 4 * bins * ntensors


def _bytes_worker(t, k, bins, steps=6):
    gen = torch.Generator().manual_seed(t.rank)
    ps = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in ((128, 64), (64,), (8, 6), (100,))]
    opt = lowcomm.SparseLoCo(torch.optim.SGD(ps, lr=1e-2), transport=t, sync_every=3, topk=k, bins=bins)
    for _ in range(steps):
        for p in ps:
            p.grad = torch.randn(p.shape, generator=gen)
        opt.step()
    recs = [r for r in t.ledger.records if r.kind == "all_gather"]
    return [r.bytes_sent for r in recs], [(r.op_id, s.op_ids) for r, s in zip(recs, opt.sync_log)], opt.payload_bytes()


@pytest.mark.parametrize("bins", [4, None])
def test_bytes_per_sync_equal_the_closed_form(bins):
    W = 3
    for k in (8, 64):
        # (128, 64): two 64x64 blocks (12-bit indices); (64,): one piece of 64; (8, 6): one 8x6 block
        # of 48 (6-bit indices); (100,): two pieces of 50.
        want = _closed_form_bytes([(2, 4096, k), (1, 64, k), (1, 48, k), (2, 50, k)], 4, bins)
        out = run_local(W, _bytes_worker, k, bins)
        for r in range(W):
            per_sync, links, payload = out[r]
            assert payload == want
            assert per_sync == [(W - 1) * want] * 2, (k, r)
            assert all(op_ids == [op_id] for op_id, op_ids in links)
    # the default 64 of 4096 with 2-bit values: 112 bytes per 64x64 block, 146x below fp32
    assert _closed_form_bytes([(1, 4096, 64)], 1, 4) - 16 == 112


def test_decode_rejects_malformed_payloads():
    codec = TopKCodec([(16, 16), (5,)], k=3, chunk=8, bins=4)
    x = torch.randn(codec.numel, generator=torch.Generator().manual_seed(4))
    good = codec.encode(x)
    codec.decode(good)
    idx, codes, table = good
    cases = {
        "tensors": [idx, codes],
        "index bytes": [idx[:-1], codes, table],
        "value codes": [idx, codes.to(torch.int16), table],
        "quantisation levels": [idx, codes, table[:-1]],
        "NaN": [idx, codes, torch.full_like(table, float("nan"))],
        "twice": [torch.zeros_like(idx), codes, table],
    }
    for what, parts in cases.items():
        with pytest.raises(ValueError, match=what):
            codec.decode(parts, who="member 7")
    # an index outside a 48-entry chunk (6 bits hold up to 63)
    c48 = TopKCodec([(8, 6)], k=2, chunk=64, bins=None)
    parts = c48.encode(torch.randn(48))
    with pytest.raises(ValueError, match="outside"):
        c48.decode([torch.full_like(parts[0], 255), parts[1]])
    with pytest.raises(ValueError, match="NaN"):
        codec.encode(torch.full((codec.numel,), float("inf")))


# ---- the optimizer: closed forms ----------------------------------------------------------------
@pytest.mark.parametrize("inner_cls", [torch.optim.SGD, torch.optim.AdamW])
def test_world_of_one_whole_chunks_fp32_no_decay_is_sgd_on_phi(inner_cls):
    """W=1, k >= chunk, no quantisation, beta=0: each sync is torch SGD(lr=alpha) on phi with phi - theta."""
    H, alpha, syncs = 3, 0.6, 3
    m, ref = make_model(), make_model()
    opt = lowcomm.SparseLoCo(inner_cls(m.parameters(), lr=1e-2), transport=world_of_one(), sync_every=H,
                             outer_lr=alpha, decay=0.0, topk=16, chunk=4, bins=None)
    ref_inner = inner_cls(ref.parameters(), lr=1e-2)
    phi = [p.detach().clone() for p in ref.parameters()]
    outer = torch.optim.SGD(phi, lr=alpha)
    for s in range(H * syncs):
        for model, o in ((m, opt), (ref, ref_inner)):
            o.zero_grad()
            loss_of(model, *batch(0, s)).backward()
            o.step()
        if (s + 1) % H == 0:
            with torch.no_grad():
                for a, p in zip(phi, ref.parameters()):
                    a.grad = a - p
                outer.step()
                for a, p in zip(phi, ref.parameters()):
                    p.copy_(a)
            assert torch.equal(flat(m.parameters()), flat(phi)), s
            assert torch.equal(flat(opt.units[0].anchors), flat(phi))
            assert opt._error.abs().max() == 0  # everything was sent
    assert opt.sync_count == syncs


def test_four_workers_whole_chunks_fp32_equal_fedavg_mean():
    """W=4 with everything sent is phi -= alpha * mean(phi - theta_r), like DiLoCo with outer SGD(lr=alpha)."""
    def worker(t, cls):
        m = make_model()
        inner = torch.optim.SGD(m.parameters(), lr=1e-2)
        if cls == "sparse":
            opt = lowcomm.SparseLoCo(inner, transport=t, sync_every=2, outer_lr=0.6, decay=0.0, topk=16, chunk=4,
                                     bins=None)
        else:
            opt = lowcomm.DiLoCo(inner, transport=t, sync_every=2,
                                 outer_optimizer=lambda ps: torch.optim.SGD(ps, lr=0.6))
        for s in range(6):
            opt.zero_grad()
            loss_of(m, *batch(t.rank, s)).backward()
            opt.step()
        return flat(m.parameters())

    a, b = run_local(4, worker, "sparse"), run_local(4, worker, "diloco")
    for r in range(4):
        assert torch.equal(a[r], a[0])
        assert (a[r] - b[r]).abs().max() <= 1e-6


def test_error_feedback_delivers_a_constant_pseudo_gradient():
    """beta=1: what is not sent now is sent later; n syncs of a constant D move phi by alpha*(n*D - e_n)."""
    alpha, n = 0.5, 48
    for bins in (None, 4):
        p = torch.nn.Parameter(torch.zeros(8, 8))
        opt = lowcomm.SparseLoCo(torch.optim.SGD([p], lr=0.1), transport=world_of_one(), sync_every=1,
                                 outer_lr=alpha, decay=1.0, topk=2, chunk=4, bins=bins)
        D = torch.randn(8, 8, generator=torch.Generator().manual_seed(5))
        phi0 = p.detach().clone()
        for _ in range(n):
            with torch.no_grad():
                p.copy_(opt.units[0].anchors[0] - D)  # the local work: theta = phi - D
            opt.sync()
        e = opt.error[0]
        moved = (phi0 - opt.units[0].anchors[0]) / alpha
        assert torch.allclose(moved + e, n * D, atol=1e-4)  # sent + still owed = everything
        # the debt stays bounded (top-2 of 16 entries clears every entry within a few syncs): the
        # average delivered per sync converges to D
        assert e.abs().max() <= 8 * D.abs().max()
        assert (moved / n - D).abs().max() <= 8 * D.abs().max() / n


# ---- replicas, state, failures --------------------------------------------------------------------
def _run(t, steps, knobs, resume=None, ckpt_at=None):
    m = make_model()
    opt = lowcomm.SparseLoCo(torch.optim.AdamW(m.parameters(), lr=1e-2), transport=t, chunk=4, **knobs)
    start, ckpt, trace = 0, None, []
    if resume is not None:
        m.load_state_dict(resume[t.rank]["model"])
        opt.load_state_dict(resume[t.rank]["opt"])
        start = ckpt_at
    for step in range(start, steps):
        if step == ckpt_at and resume is None:
            ckpt = copy.deepcopy({"model": m.state_dict(), "opt": opt.state_dict()})
        opt.zero_grad()
        loss_of(m, *batch(t.rank, step)).backward()
        opt.step()
        trace.append(flat(m.parameters()))
    return trace, ckpt, opt


def test_four_workers_bit_identical_and_state_dict_resume_is_exact():
    W, steps, knobs = 4, 10, dict(sync_every=3, topk=3, decay=0.9)
    full = run_local(W, _run, steps, knobs, ckpt_at=4)  # mid-interval, after one sync
    for s in (2, 5, 8):  # right after each sync every replica holds the same bits
        assert all(torch.equal(full[r][0][s], full[0][0][s]) for r in range(W))
    assert not torch.equal(full[0][0][2], full[1][0][1])
    assert full[0][2].sync_count == 3 and full[0][2]._error.abs().max() > 0
    resumed = run_local(W, _run, steps, knobs, [full[r][1] for r in range(W)], ckpt_at=4)
    for r in range(W):
        assert torch.equal(resumed[r][0][-1], full[r][0][-1])
        assert torch.equal(resumed[r][2]._error, full[r][2]._error)
        assert resumed[r][2].local_step == steps


def test_failed_sync_rolls_back_error_feedback_included():
    W, H = 3, 2

    def worker(t):
        m = make_model()
        opt = lowcomm.SparseLoCo(torch.optim.SGD(m.parameters(), lr=1e-2), transport=t, sync_every=H, topk=3,
                                 chunk=4, timeout=30)
        trace = []
        for step in range(1, 7):
            before = (opt._error.clone(), flat(opt.units[0].anchors))
            opt.zero_grad()
            loss_of(m, *batch(t.rank, step)).backward()
            opt.step()
            if step % H == 0:
                trace.append((torch.equal(opt._error, before[0]), torch.equal(flat(opt.units[0].anchors), before[1]),
                              torch.equal(flat(m.parameters()), before[1]), flat(m.parameters())))
        return trace, opt.failed_syncs, opt.sync_count, [r.committed for r in opt.sync_log], t.world_size

    # op 0 is the initial broadcast, op 2 the all-gather of the second sync
    out = run_local(W, worker, faults={2: Fault(op=2, after_messages=1)}, timeout=30)
    assert out[2] is None
    for r in (0, 1):
        trace, failed, synced, committed, world = out[r]
        assert failed == 1 and synced == 2 and committed == [True, False, True] and world == 2
        same_error, same_phi, locals_are_phi, _ = trace[1]
        assert same_error and same_phi and locals_are_phi  # rolled back: theta = phi, e as before
        assert not trace[0][0] and not trace[2][0]  # committed syncs change e
        assert torch.equal(trace[2][3], out[0][0][2][3])


class _Tampering(LocalTransport):
    """A world of one whose all-gather hands back a corrupted payload (a peer that lies)."""

    def all_gather(self, payload, validate=None):  # skips the check: the strategy's decode must catch it
        bad = [p.clone() for p in payload]
        bad[-1] = torch.full_like(bad[-1], float("nan"))
        return Handle.completed([bad])


def test_malformed_peer_payload_raises_and_rolls_back():
    m = make_model()
    opt = lowcomm.SparseLoCo(torch.optim.SGD(m.parameters(), lr=1e-2), transport=_Tampering(LocalWorld(1), 0),
                             sync_every=1, chunk=4)
    phi = flat(opt.units[0].anchors)
    opt.zero_grad()
    loss_of(m, *batch(0, 0)).backward()
    with pytest.raises(ValueError, match="member 0's payload: NaN"):
        opt.step()
    assert torch.equal(flat(m.parameters()), phi) and torch.equal(flat(opt.units[0].anchors), phi)
    assert opt._error.abs().max() == 0 and opt.sync_count == 0


def test_bad_arguments_raise_value_error():
    p = torch.nn.Parameter(torch.randn(4, 4))
    for kw in [{"sync_every": 0}, {"outer_lr": 0.0}, {"decay": 1.5}, {"topk": 0}, {"chunk": 0}, {"bins": 8},
               {"quant_range": -1.0}]:
        with pytest.raises(ValueError):
            lowcomm.SparseLoCo(torch.optim.SGD([p], lr=0.1), transport=world_of_one(), **kw)
    with pytest.raises(ValueError, match="no elements"):
        lowcomm.SparseLoCo(torch.optim.SGD([p, torch.nn.Parameter(torch.zeros(0))], lr=0.1),
                           transport=world_of_one())


def test_registered_for_the_simulator():
    s = lowcomm.get_strategy("sparseloco")
    assert s.default_run and s.config.inner is None  # the loop's default inner optimizer: AdamW
    assert s.defaults == {"sync_every": 30, "outer_lr": 0.6, "decay": 0.95, "topk": 64, "chunk": 64, "bins": 4,
                          "quant_range": 6.0, "anchor_device": None, "aggregate": "mean", "sync_tokens": None}
    m = make_model()
    opt = s.make_config({"bins": "none", "topk": "32"}).build(torch.optim.AdamW(m.parameters(), lr=1e-3),
                                                              world_of_one(), m)
    assert isinstance(opt, lowcomm.SparseLoCo) and opt.outer_lr == 0.6 and opt.decay == 0.95
    assert opt.codec.bins is None and opt.topk == 32


def test_clip_aggregate_screens_a_huge_sender_and_clips_a_large_one():
    def worker(t, scale, aggregate):
        p = torch.nn.Parameter(torch.zeros(8, 8))
        opt = lowcomm.SparseLoCo(torch.optim.SGD([p], lr=0.1), transport=t, sync_every=1, outer_lr=1.0, decay=0.0,
                                 topk=16, chunk=4, bins=None, aggregate=aggregate)
        D = torch.randn(8, 8, generator=torch.Generator().manual_seed(t.rank)) * (scale if t.rank == 2 else 1.0)
        with torch.no_grad():
            p.copy_(-D)  # theta = phi - D with phi = 0
        opt.sync()
        return opt.units[0].anchors[0].clone(), opt.detections(), D

    for scale, screened in ((1000.0, True), (5.0, False)):
        mean = run_local(3, worker, scale, "mean")
        clip = run_local(3, worker, scale, "clip")
        D = [mean[r][2] for r in range(3)]
        assert torch.allclose(mean[0][0], -(D[0] + D[1] + D[2]) / 3, atol=1e-5)
        for r in range(3):
            assert torch.equal(clip[r][0], clip[0][0]) and mean[r][1] == []
        if screened:  # beyond hard_bound x the median norm: left out, the mean is over the two others
            assert [d["member"] for d in clip[0][1]] == [2]
            assert torch.allclose(clip[0][0], -(D[0] + D[1]) / 2, atol=1e-5)
        else:  # clipped to clip_ratio (3) x the median norm, still counted
            assert clip[0][1] == []
            n = sorted(float(d.norm()) for d in D)
            want = -(D[0] + D[1] + D[2] * (3 * n[1] / float(D[2].norm()))) / 3
            assert torch.allclose(clip[0][0], want, atol=1e-5)
    with pytest.raises(ValueError, match="trimmed_mean"):
        lowcomm.SparseLoCo(torch.optim.SGD([torch.nn.Parameter(torch.zeros(4))], lr=0.1), transport=world_of_one(),
                           aggregate="trimmed_mean")
