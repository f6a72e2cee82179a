"""The one reduction: member-order fp32 sums, chunked == whole, and the transports use it."""

import pytest
import torch

from lowcomm.comm.reduce import reduce_in_member_order
from lowcomm.shards import shard_bounds


def _parts(w=5, n=1000, dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    return [(torch.randn(n, generator=g) * 10 ** torch.randint(-3, 4, (n,), generator=g)).to(dtype)
            for _ in range(w)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_member_order_sum_bitwise(dtype):
    parts = _parts(dtype=dtype)
    want = parts[0].to(torch.float32, copy=True)
    for x in parts[1:]:
        want = want + x.to(torch.float32)
    got = reduce_in_member_order(parts, "sum")
    assert got.dtype == torch.float32 and torch.equal(got, want)
    assert torch.equal(reduce_in_member_order(iter(parts), "mean"), want / len(parts))


def test_chunked_into_out_equals_whole():
    parts = _parts()
    whole = reduce_in_member_order(parts, "mean")
    out = torch.empty(1000)
    for a, b in shard_bounds(1000, 7):  # a data plane's per-sender chunks
        r = reduce_in_member_order([x[a:b] for x in parts], "mean", out=out[a:b])
        assert r.data_ptr() == out[a:b].data_ptr()
    assert torch.equal(out, whole)


def test_bad_input():
    with pytest.raises(ValueError, match="op"):
        reduce_in_member_order([torch.ones(2)], "max")
    with pytest.raises(ValueError, match="at least one"):
        reduce_in_member_order([], "sum")
    with pytest.raises(ValueError, match="fp32"):
        reduce_in_member_order([torch.ones(2)], out=torch.empty(2, dtype=torch.float64))
    with pytest.raises(ValueError, match="shape"):
        reduce_in_member_order([torch.ones(2), torch.ones(3)])


def test_shard_bounds_old_location_still_works():
    from lowcomm.comm.p2p import shard_bounds as old

    assert old is shard_bounds and shard_bounds(7, 3) == [(0, 3), (3, 5), (5, 7)]


def test_all_gather_validate_fails_the_op_everywhere_naming_the_sender():
    """Transport.all_gather(validate=): a malformed payload fails the op on every member (voted), naming it."""
    from lowcomm.comm.base import CommError
    from lowcomm.comm.local import run_local

    def check(parts, member):
        if parts[0].numel() != 2:
            raise ValueError("expected 2 values")

    def worker(t):
        payload = [torch.zeros(3 if t.rank == 2 else 2)]
        try:
            t.all_gather(payload, validate=check).wait(30)
        except CommError as e:
            return str(e)
        return "ok"

    out = run_local(3, worker, timeout=10)
    assert all("the payload from member 2 is malformed: expected 2 values" in o for o in out[:2]), out
    assert out[2] != "ok"  # member 2 itself is failed by the others' votes
    good = run_local(3, lambda t: t.all_gather([torch.ones(2)], validate=check).wait(30), timeout=10)
    assert all(len(g) == 3 for g in good)
