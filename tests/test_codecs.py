"""Codecs: round trips within each codec's bound, golden bit layouts, NaN/Inf, determinism, error feedback."""

import threading

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lowcomm.codecs import CODECS, E3M0Codec, ErrorFeedback, Int4Codec, Int8Codec, get_codec
from lowcomm.comm.local import run_local

BLOCK_CODECS = {"int8": 254.0, "int4": 14.0}  # error <= s / this
SCALE_SLACK = {"fp32": 0.0, "bf16": 2.0 ** -7, "fp16": 2.0 ** -10}
SCALE_FLOOR = {"fp32": 0.0, "bf16": 2.0 ** -133, "fp16": 2.0 ** -24}  # smallest subnormal scale
ABS_SLACK = 1e-42  # products with subnormal scales lose bits below 2**-140
REL_SLACK = 1e-5


def blocky_input(seed, n, block, lo_exp, hi_exp, dtype=torch.float32):
    """Per block: all zeros, or uniform(-1, 1) * 2**e with e drawn in [lo_exp, hi_exp]."""
    g = torch.Generator().manual_seed(seed)
    nb = -(-n // block) if n else 0
    exps = torch.randint(lo_exp, hi_exp + 1, (max(nb, 1),), generator=g).to(torch.float64)
    zero = torch.rand(max(nb, 1), generator=g) < 0.15
    x = (torch.rand(nb * block, generator=g, dtype=torch.float64) * 2 - 1).view(nb, block)
    x = x * torch.pow(2.0, exps[:nb, None]) * (~zero[:nb, None])
    x = x.reshape(-1)[:n].to(torch.float32)
    return x.to(dtype).to(torch.float32) if dtype != torch.float32 else x


def block_absmax(x, block):
    n = x.numel()
    nb = -(-n // block)
    pad = torch.zeros(nb * block, dtype=torch.float64)
    pad[:n] = x.double().abs()
    return pad.view(nb, block).amax(1).repeat_interleave(block)[:n]


def check_bound(codec, x):
    """Decode(encode(x)) within the codec's documented bound; returns the error."""
    parts = codec.encode(x)
    y = codec.decode(parts, x.numel())
    assert y.dtype == torch.float32 and y.shape == (x.numel(),)
    xd = x.double()
    err = (y.double() - xd).abs()
    ax = xd.abs()
    if codec.name == "bf16":
        bound = ax * 2.0 ** -8 * (1 + REL_SLACK) + 2.0 ** -133
    elif codec.name == "fp16":
        bound = torch.maximum(ax * 2.0 ** -11, torch.full_like(ax, 2.0 ** -25)) * (1 + REL_SLACK)
    else:
        a = block_absmax(x, codec.block)
        s = parts[1].double().repeat_interleave(codec.block)[:x.numel()]
        # the stored scale is the absmax rounded up in the scale dtype
        assert bool((s >= a).all())
        assert bool((s <= a * (1 + SCALE_SLACK[codec.scale]) + SCALE_FLOOR[codec.scale]).all())
        if codec.name in BLOCK_CODECS:
            bound = s / BLOCK_CODECS[codec.name] * (1 + REL_SLACK) + ABS_SLACK
        else:  # e3m0: relative 1/3 inside [s/64, s], absolute s/128 below
            inside = ax >= s / 64
            bound = torch.where(inside, ax / 3, s / 128) * (1 + REL_SLACK) + ABS_SLACK
    bad = err > bound
    assert not bool(bad.any()), (codec.spec, x[bad][:5], y[bad][:5], bound[bad][:5])
    return err


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(name=st.sampled_from(["int8", "int4", "e3m0"]), scale=st.sampled_from(["fp32", "bf16", "fp16"]),
       block=st.sampled_from([2, 8, 64, 128]), n=st.integers(0, 700), seed=st.integers(0, 2 ** 31),
       lo=st.integers(-149, 120), span=st.integers(0, 30),
       dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]))
def test_block_codecs_round_trip_within_bound(name, scale, block, n, seed, lo, span, dtype):
    hi = min(lo + span, 126)
    if scale == "fp16":
        hi = min(hi, 15)  # fp16 scales hold absmax <= 65504 (beyond: a clear error, tested below)
        lo = min(lo, hi)
    if dtype == torch.float16:
        lo, hi = max(min(lo, 15), -24), min(max(hi, -24), 15)
    elif dtype == torch.bfloat16:
        lo = max(lo, -133)
    hi = max(hi, lo)
    codec = get_codec(f"{name}:block={block}:scale={scale}")
    check_bound(codec, blocky_input(seed, n, block, lo, hi, dtype))


@settings(max_examples=40, deadline=None)
@given(name=st.sampled_from(["bf16", "fp16", "identity"]), n=st.integers(0, 500), seed=st.integers(0, 2 ** 31),
       lo=st.integers(-149, 120), span=st.integers(0, 30))
def test_cast_codecs_round_trip_within_bound(name, n, seed, lo, span):
    hi = min(lo + span, 126)
    if name == "fp16":
        lo, hi = min(lo, 15), min(hi, 15)
    x = blocky_input(seed, n, 16, lo, hi)
    codec = get_codec(name)
    if name == "identity":
        assert torch.equal(codec.decode(codec.encode(x), n), x)
    else:
        check_bound(codec, x)


def test_extreme_blocks_no_overflow_or_underflow():
    tiny = torch.tensor([2.0 ** -149, -2.0 ** -149, 0.0, 3 * 2.0 ** -149] * 32)
    huge = torch.tensor([3.4e38, -3.3e38, 1e38, -2.0 ** 127] * 32)
    for name in ["int8", "int4", "e3m0", "int8:scale=bf16", "e3m0:scale=bf16", "int4:scale=fp16:block=128"]:
        codec = get_codec(name)
        # bf16 holds scales up to 3.39e38 (beyond: a clear error), fp16 up to 65504
        h = huge * 0.9 if "bf16" in name else huge
        for x in (tiny, torch.cat([tiny, torch.zeros(128)])) if "fp16" in name else (tiny, h, torch.cat([tiny, h])):
            err = check_bound(codec, x)
            assert torch.isfinite(err).all()
    # an all-zero input decodes to exact zeros
    for name in ["int8", "int4", "e3m0", "bf16", "fp16"]:
        c = get_codec(name)
        assert torch.equal(c.decode(c.encode(torch.zeros(300)), 300), torch.zeros(300))


def test_wire_sizes():
    n = 1024
    x = torch.randn(n)
    size = {name: sum(p.numel() * p.element_size() for p in get_codec(name).encode(x))
            for name in ["identity", "bf16", "int8", "int4", "e3m0", "e3m0:scale=bf16"]}
    assert size == {"identity": 4096, "bf16": 2048, "int8": 1024 + 4 * 4, "int4": 512 + 8 * 4,
                    "e3m0": 512 + 8 * 4, "e3m0:scale=bf16": 512 + 8 * 2}
    # odd counts pad one nibble
    assert get_codec("e3m0").encode(torch.ones(5))[0].numel() == 3


def test_golden_bit_layouts():
    # int4: q = round(7 x / s) + 8, element 2i in the low nibble
    parts = Int4Codec(block=4).encode(torch.tensor([1.0, -1.0, 0.0, 0.5]))
    assert parts[0].tolist() == [15 | (1 << 4), 8 | (12 << 4)] and parts[1].tolist() == [1.0]  # 3.5 -> 4 (even)
    # e3m0: nibble = 7 + sign * k, value sign * s * 2**(k - 7), k = 0 is zero
    c = E3M0Codec(block=8)
    x = torch.tensor([1.0, -0.5, 0.25, 0.0, 0.74, 0.76, 2.0 ** -7, -0.99 * 2.0 ** -7]) * 4
    parts = c.encode(x)
    assert parts[0].tolist() == [14 | (1 << 4), 12 | (7 << 4), 13 | (14 << 4), 8 | (7 << 4)]
    assert c.decode(parts, 8).tolist() == [4.0, -2.0, 1.0, 0.0, 2.0, 4.0, 4 * 2.0 ** -6, 0.0]
    assert c.decode([torch.tensor([15 | (15 << 4)], dtype=torch.uint8), torch.ones(1)], 2).tolist() == [0.0, 0.0]
    # int8: scale is the absmax itself
    parts = Int8Codec(block=4).encode(torch.tensor([2.0, -1.0, 0.5, 0.0]))
    assert parts[0].tolist() == [127, -64, 32, 0] and parts[1].tolist() == [2.0]


def test_e3m0_relative_error_is_one_third_at_the_split():
    c = E3M0Codec(block=2)
    x = torch.tensor([1.0, 0.75 - 1e-6])  # just below 1.5 * 2**-1: rounds down to 0.5
    y = c.decode(c.encode(x), 2)
    assert y[1] == 0.5 and float((x[1] - y[1]) / x[1]) == pytest.approx(1 / 3, rel=1e-5)


@pytest.mark.parametrize("name", ["bf16", "fp16", "int8", "int4", "e3m0", "int8:scale=fp16"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_nonfinite_input_raises(name, bad):
    x = torch.randn(300)
    x[157] = bad
    with pytest.raises(ValueError, match="non-finite.*index 157"):
        get_codec(name).encode(x)


def test_out_of_range_raises():
    with pytest.raises(ValueError, match="range"):
        get_codec("fp16").encode(torch.tensor([1.0, 7e4]))
    with pytest.raises(ValueError, match="scale range"):
        get_codec("int8:scale=fp16").encode(torch.tensor([1.0, 7e4]))
    with pytest.raises(ValueError, match="scale range.*fp32"):
        get_codec("e3m0:scale=bf16").encode(torch.tensor([1.0, 3.4e38]))


def test_bad_arguments_and_parts():
    with pytest.raises(ValueError, match="unknown codec"):
        get_codec("int3")
    with pytest.raises(ValueError, match="block"):
        get_codec("int8:block=7")
    with pytest.raises(ValueError, match="scale"):
        get_codec("int8:scale=fp64")
    with pytest.raises(ValueError, match="key=value"):
        get_codec("int8:64")
    with pytest.raises(ValueError, match="floating-point"):
        get_codec("int8").encode(torch.arange(4))
    c = get_codec("e3m0")
    parts = c.encode(torch.randn(100))
    with pytest.raises(ValueError, match="expected"):
        c.decode(parts, 101)
    with pytest.raises(ValueError, match="expected"):
        c.decode(parts[:1], 100)
    with pytest.raises(ValueError, match="out"):
        c.decode(parts, 100, out=torch.empty(100, dtype=torch.float64))


def test_spec_round_trip_and_registry():
    for name in CODECS:
        c = get_codec(name)
        assert get_codec(c.spec) == c
    assert get_codec("int4:block=64:scale=bf16").block == 64
    assert get_codec(None).name == "identity"


def test_decode_is_a_pure_function_of_the_parts():
    c = get_codec("e3m0")
    x1, x2 = torch.randn(1000), torch.randn(5000) * 100
    p1 = c.encode(x1)
    ref = c.decode(p1, 1000).clone()
    c.encode(x2)  # reuses the scratch buffers
    p1b = c.encode(x1)
    assert all(torch.equal(a, b) for a, b in zip(p1, p1b))
    out = torch.full((1000,), 7.0)
    assert torch.equal(c.decode(p1, 1000, out=out), ref)
    other = {}
    t = threading.Thread(target=lambda: other.setdefault("y", get_codec(c.spec).decode(p1, 1000)))
    t.start()
    t.join(10)
    assert torch.equal(other["y"], ref)


@pytest.mark.parametrize("name", ["int8", "int4", "e3m0", "bf16"])
def test_quantized_all_reduce_bit_identical(name):
    def worker(t):
        g = torch.Generator().manual_seed(t.rank)
        a, b = torch.randn(333, generator=g), torch.randn(7, 5, generator=g)
        t.all_reduce([a, b], op="mean", codec=name).wait(30)
        return torch.cat([a, b.reshape(-1)])

    out = run_local(3, worker)
    for r in range(1, 3):
        assert torch.equal(out[r], out[0])
    exact = torch.stack([torch.cat([torch.randn(333, generator=g), torch.randn(35, generator=g)])
                         for g in (torch.Generator().manual_seed(r) for r in range(3))]).mean(0)
    assert (out[0] - exact).abs().max() < 2.0  # quantized twice, but close to the true mean


def test_error_feedback_does_not_drift():
    """1000 syncs of random data: the carried error stays within one step's codec bound."""
    n, W = 1000, 3
    for name in ["e3m0", "int4"]:
        codec = get_codec(name)
        ef = ErrorFeedback(codec, n)
        g = torch.Generator().manual_seed(0)
        worst = 0.0
        for _ in range(1000):
            x = torch.randn(n, generator=g) * 0.01
            y = ef.compensate_(x)
            ef.residual(y, shards=W)
            ef.commit()
            e = ef.error.double()
            # elementwise: what is carried is one quantization step's error of y
            if name == "int4":
                from lowcomm.comm.p2p import shard_bounds
                a = torch.cat([block_absmax(y[s:t], codec.block) for s, t in shard_bounds(n, W)])
                assert bool((e.abs() <= a / 14 * (1 + REL_SLACK) + ABS_SLACK).all())
            worst = max(worst, float(e.abs().max()))
        # and bounded by one step's bound on data of this scale (absmax of 0.01 * randn over a block < 0.05)
        bound = 0.05 / 14 if name == "int4" else 0.05 / 2  # e3m0: |e| <= |y|/3 with |y| <= |x| + |e|
        assert worst <= bound, (name, worst)


def test_error_feedback_state_and_failure():
    ef = ErrorFeedback("int4", 10)
    y = ef.compensate_(torch.linspace(-1, 1, 10))
    pending = ef.residual(y).clone()
    ef.discard()
    ef.commit()
    assert torch.equal(ef.error, torch.zeros(10))  # a failed sync keeps the old error
    ef.residual(y)
    ef.commit()
    assert torch.equal(ef.error, pending)
    ef2 = ErrorFeedback("int4", 10)
    ef2.load_state_dict(ef.state_dict())
    assert torch.equal(ef2.error, ef.error)
    with pytest.raises(ValueError, match="holds 10"):
        ef.compensate_(torch.zeros(11))
