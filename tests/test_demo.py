"""DeMo and the chunked DCT: golden values, closed forms, determinism, bytes, failures, state."""

import copy
import threading

import pytest
import torch

import lowcomm
from lowcomm.comm.local import Fault, LocalTransport, LocalWorld, run_local
from lowcomm.dct import ChunkedDCT, chunk_size, dct_matrix
from lowcomm.outer.demo import index_dtype


def world_of_one():
    return LocalTransport(LocalWorld(1), 0)


def flat(params):
    return torch.cat([p.detach().reshape(-1).float() for p in params])


_RNG_LOCK = threading.Lock()


def make_model(seed=0):
    # 2-D weights cut into several blocks with chunk=4, 1-D biases into several chunks.
    # torch's global RNG is shared by run_local's worker threads: seed and draw atomically.
    with _RNG_LOCK:
        torch.manual_seed(seed)
        return torch.nn.Sequential(torch.nn.Linear(12, 8), torch.nn.Tanh(), torch.nn.Linear(8, 4))


def batch(rank, step):
    g = torch.Generator().manual_seed(1000 * step + rank)
    return torch.randn(6, 12, generator=g), torch.randn(6, 4, generator=g)


def loss_of(model, x, y):
    return ((model(x) - y) ** 2).mean()


# ---- the transform ------------------------------------------------------------------------------
def test_dct_matrix_golden_rows():
    golden = torch.tensor([[.5, .6533, .5, .2706], [.5, .2706, -.5, -.6533],
                           [.5, -.2706, -.5, .6533], [.5, -.6533, .5, -.2706]])
    f = dct_matrix(4)
    assert torch.allclose(f, golden, atol=1e-4)
    assert torch.allclose(f @ f.T, torch.eye(4), atol=1e-6)
    assert torch.equal(dct_matrix(4, inverse=True), f.T.contiguous())


@pytest.mark.parametrize("shape,target", [((12,), 4), ((100,), 64), ((30, 20), 4), ((128, 192), 64),
                                          ((6, 4, 3, 3), 4), ((), 64), ((7, 13), 5)])
def test_dct_roundtrip(shape, target):
    torch.manual_seed(0)
    x = torch.rand(shape) * 2 - 1  # unit scale, so 1e-6 is an fp32 rounding bound
    d = ChunkedDCT(shape, target)
    c = d.encode(x)
    assert c.shape == (d.num_chunks, d.chunk_numel) and d.num_chunks * d.chunk_numel == x.numel()
    assert (d.decode(c) - x).abs().max() <= 1e-6
    # orthonormal: energy is preserved
    assert torch.allclose(c.pow(2).sum(), x.pow(2).sum(), rtol=1e-5)


def test_dct_2d_block_is_one_chunk():
    torch.manual_seed(1)
    x = torch.randn(12, 10)
    d = ChunkedDCT(x.shape, 4)
    assert d.edges == (4, 2) and d.grid == (3, 5)
    c = d.encode(x)
    for by in range(3):
        for bx in range(5):
            blk = x[4 * by:4 * by + 4, 2 * bx:2 * bx + 2]
            want = dct_matrix(4).T @ blk @ dct_matrix(2)  # DCT along both axes of the block
            assert torch.allclose(c[by * 5 + bx].view(4, 2), want, atol=1e-6)


def test_chunk_size_table():
    for (n, t), want in {(12, 3): 3, (12, 5): 4, (100, 7): 5, (100, 26): 25, (64, 64): 64, (13, 64): 13,
                         (67, 64): 1}.items():
        assert chunk_size(n, t) == want, (n, t)
    assert [index_dtype(n) for n in (64, 256, 257, 4096)] == [torch.uint8, torch.uint8, torch.int16, torch.int16]


# ---- the optimizer --------------------------------------------------------------------------------
def test_error_feedback_identity():
    """delta_new + IDCT(sent) = decay*delta_old + lr*g, with sent = bf16(top-k of each chunk)."""
    lr, decay, k = 0.1, 0.9, 3
    # (12, 10) and (8, 10) share chunk edges (4, 2) and are transformed stacked; so are the two
    # biases (chunk 4); the 4-D tensor is viewed as (6, 36). Each is checked against its own transform.
    gen = torch.Generator().manual_seed(3)
    ps = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in ((12, 10), (12,), (8, 10), (8,), (6, 4, 3, 3))]
    opt = lowcomm.DeMo(torch.optim.SGD(ps, lr=lr), transport=world_of_one(), topk=k, chunk=4, decay=decay)
    assert len(opt._groups) == 3
    for step in range(4):
        old = opt.momentum()
        grads = [torch.randn(p.shape, generator=gen) for p in ps]
        for p, g in zip(ps, grads):
            p.grad = g.clone()
        opt.step()
        for i, (p, g) in enumerate(zip(ps, grads)):
            m = decay * old[i] + lr * g
            d = ChunkedDCT(p.shape, 4)
            c = d.encode(m)
            sent = d.encode(m - opt.momentum()[i])  # DCT(IDCT(sent)): the sent coefficients, dense
            top = c.abs().topk(k, dim=1).indices
            want = torch.zeros_like(c).scatter_(1, top, c.gather(1, top).to(torch.bfloat16).float())
            assert (sent - want).abs().max() <= 1e-6, step
    assert opt.sync_count == 4 and opt.failed_syncs == 0


@pytest.mark.parametrize("wd", [0.0, 0.5])
def test_whole_chunk_fp32_is_sign_descent(wd):
    """W=1, k = the whole chunk, fp32 values: p <- p*(1 - lr*wd) - lr*sign(delta)."""
    lr, decay = 0.01, 0.9
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(8, 6))
    b = torch.nn.Parameter(torch.randn(10))
    opt = lowcomm.DeMo(torch.optim.SGD([w, b], lr=lr), transport=world_of_one(), topk=64, chunk=64,
                       decay=decay, values="fp32", weight_decay=wd)
    for _ in range(5):
        grads = [torch.randn(p.shape) for p in (w, b)]
        before = [p.detach().clone() for p in (w, b)]
        deltas = [decay * d + lr * g for d, g in zip(opt.momentum(), grads)]
        for p, g in zip((w, b), grads):
            p.grad = g
        opt.step()
        for p, p0, d in zip((w, b), before, deltas):
            mask = d.abs() > 1e-5
            want = p0 * (1 - lr * wd) - lr * torch.sign(d)
            assert (p.detach() - want)[mask].abs().max() <= 1e-6
        # everything was sent: the residual momentum is rounding noise only
        assert max(d.abs().max().item() for d in opt.delta) <= 1e-6


def _lockstep_worker(t, steps, **knobs):
    m = make_model()
    inner = (torch.optim.AdamW(m.parameters(), lr=1e-2) if knobs.pop("adamw", False)
             else torch.optim.SGD(m.parameters(), lr=1e-2))
    opt = lowcomm.DeMo(inner, transport=t, chunk=4, **knobs)
    out = []
    for step in range(steps):
        opt.zero_grad()
        loss_of(m, *batch(t.rank, step)).backward()
        opt.step()
        out.append(flat(m.parameters()))
    return out, opt.sync_count


@pytest.mark.parametrize("knobs", [dict(topk=2), dict(topk=3, values="sign"),
                                   dict(topk=5, values="fp32", sign=False, adamw=True)])
def test_four_workers_bit_identical_every_step(knobs):
    steps = 6
    out = run_local(4, _lockstep_worker, steps, **knobs)
    start = flat(make_model().parameters())
    for r in range(4):
        params, syncs = out[r]
        assert syncs == steps
        for s in range(steps):
            assert torch.equal(params[s], out[0][0][s]), (r, s)
    assert not torch.equal(out[0][0][-1], start)


def test_decode_is_mean_over_selecting_workers():
    """W=2 on a 1-D chunk of 4 with k=1: a coefficient chosen by one worker is not halved."""
    lr = 1.0

    def worker(t):
        p = torch.nn.Parameter(torch.zeros(4))
        opt = lowcomm.DeMo(torch.optim.SGD([p], lr=lr), transport=t, topk=1, chunk=4, decay=0.5,
                           sign=False, values="fp32")
        # gradients whose DCTs are single coefficients: worker 0 -> coefficient 0 (value 2),
        # worker 1 -> coefficient 1 (value 3); each keeps exactly its own.
        f = dct_matrix(4)
        coef = torch.zeros(4)
        coef[t.rank] = 2.0 + t.rank
        p.grad = coef @ f.T  # IDCT
        opt.step()
        return p.detach().clone()

    out = run_local(2, worker)
    f = dct_matrix(4)
    want = -(torch.tensor([2.0, 3.0, 0.0, 0.0]) @ f.T)  # each coefficient at its own value, not / 2
    for r in range(2):
        assert torch.allclose(out[r], want, atol=1e-6)


def _bytes_worker(t, topk, values, steps=2):
    gen = torch.Generator().manual_seed(t.rank)
    ps = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in ((128, 64), (64,), (8, 6))]
    opt = lowcomm.DeMo(torch.optim.SGD(ps, lr=1e-3), transport=t, topk=topk, chunk=64, values=values)
    for _ in range(steps):
        for p in ps:
            p.grad = torch.randn(p.shape, generator=gen)
        opt.step()
    recs = [r for r in t.ledger.records if r.kind == "all_gather"]
    return [r.bytes_sent for r in recs], [(r.op_id, s.op_ids) for r, s in zip(recs, opt.sync_log)]


@pytest.mark.parametrize("values", ["bf16", "fp32", "sign"])
def test_bytes_per_step_closed_form_and_linear_in_k(values):
    W = 3
    # (num_chunks, chunk_numel, index bytes): (128, 64) -> two 64x64 blocks of 4096 (int16);
    # (64,) -> one chunk of 64 (uint8); (8, 6) -> one 8x6 block of 48 (uint8).
    tensors = [(2, 4096, 2), (1, 64, 1), (1, 48, 1)]
    per_k = {}
    for k in (4, 8, 16):
        out = run_local(W, _bytes_worker, k, values)
        kept = [(c, min(k, n), ib) for c, n, ib in tensors]
        idx = sum(c * kk * ib for c, kk, ib in kept)
        nval = sum(c * kk for c, kk, _ in kept)
        if values == "sign":
            payload = idx + -(-nval // 8) + 2 * sum(c for c, _, _ in kept)  # bits + one bf16 scale per chunk
        else:
            payload = idx + nval * (2 if values == "bf16" else 4)
        for r in range(W):
            per_step, links = out[r]
            assert per_step == [(W - 1) * payload] * 2, (k, r)
            assert all(op_ids == [op_id] for op_id, op_ids in links)  # the simulator can charge every step
        per_k[k] = payload
    if values != "sign":  # exactly linear in k (1-bit values round up to whole bytes)
        assert per_k[8] == 2 * per_k[4] and per_k[16] == 4 * per_k[4]


def test_failed_step_rolls_back_and_training_goes_on():
    W, steps, fail_step = 3, 6, 3

    def worker(t):
        m = make_model()
        opt = lowcomm.DeMo(torch.optim.SGD(m.parameters(), lr=1e-2), transport=t, topk=2, chunk=4, timeout=30)
        trace = []
        for step in range(1, steps + 1):
            before = (flat(m.parameters()), [d.clone() for d in opt.delta])
            opt.zero_grad()
            loss_of(m, *batch(t.rank, step)).backward()
            opt.step()
            changed = not torch.equal(flat(m.parameters()), before[0])
            same_delta = all(torch.equal(a, b) for a, b in zip(opt.delta, before[1]))
            trace.append((changed, same_delta, flat(m.parameters())))
        return trace, opt.failed_syncs, opt.sync_count, [r.committed for r in opt.sync_log], t.world_size

    # op 0 is the initial broadcast, op s the all-gather of step s
    out = run_local(W, worker, faults={2: Fault(op=fail_step, after_messages=1)}, timeout=30)
    assert out[2] is None
    for r in (0, 1):
        trace, failed, synced, committed, world = out[r]
        assert failed == 1 and synced == steps - 1 and world == 2
        assert committed == [s != fail_step for s in range(1, steps + 1)]
        changed, same_delta, _ = trace[fail_step - 1]
        assert not changed and same_delta  # no parameter change, momentum rolled back
        assert all(trace[s][0] for s in range(steps) if s != fail_step - 1)
        for s in range(steps):
            assert torch.equal(trace[s][2], out[0][0][s][2])


def test_state_dict_resume_is_exact():
    W, steps, half = 2, 6, 3

    def run(t, resume=None):
        m = make_model()
        opt = lowcomm.DeMo(torch.optim.SGD(m.parameters(), lr=1e-2), transport=t, topk=2, chunk=4)
        start, ckpt = 0, None
        if resume is not None:
            m.load_state_dict(resume[t.rank]["model"])
            opt.load_state_dict(resume[t.rank]["opt"])
            start = half
        for step in range(start, steps):
            if step == half and resume is None:
                ckpt = copy.deepcopy({"model": m.state_dict(), "opt": opt.state_dict()})
            opt.zero_grad()
            loss_of(m, *batch(t.rank, step)).backward()
            opt.step()
        return flat(m.parameters()), ckpt, opt.local_step

    full = run_local(W, run)
    resumed = run_local(W, run, [full[r][1] for r in range(W)])
    for r in range(W):
        assert torch.equal(full[r][0], resumed[r][0]) and resumed[r][2] == steps


def test_bad_arguments_raise_value_error():
    p = torch.nn.Parameter(torch.randn(4, 4))
    t = world_of_one()
    for inner, kw in [(torch.optim.SGD([p], lr=0.1, momentum=0.9), {}),
                      (torch.optim.SGD([p], lr=0.1, weight_decay=0.1), {}),
                      (torch.optim.AdamW([p], lr=0.1, weight_decay=0.1), {"weight_decay": 0.1}),
                      (torch.optim.SGD([p], lr=0.1), {"topk": 0}),
                      (torch.optim.SGD([p], lr=0.1), {"chunk": 0}),
                      (torch.optim.SGD([p], lr=0.1), {"decay": 1.0}),
                      (torch.optim.SGD([p], lr=0.1), {"values": "int8"})]:
        with pytest.raises(ValueError):
            lowcomm.DeMo(inner, transport=t, **kw)


def test_registered_for_the_simulator():
    from lowcomm.sim.presets import preset

    s = lowcomm.get_strategy("demo")
    assert s.config.inner == "sgd" and preset("demo")["lr"] > 0 and s.defaults["topk"] == 32
    m = make_model()
    knobs = s.defaults
    opt = s.build(torch.optim.SGD(m.parameters(), lr=preset("demo")["lr"]), world_of_one(), m, **knobs)
    assert isinstance(opt, lowcomm.DeMo)
