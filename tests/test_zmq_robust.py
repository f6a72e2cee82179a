"""Issue 13 over ZeroMQ: robust rules on the data plane, offences counted per key by the coordinator
and ejection, audits of shard owners (real sockets, peers as threads of this process)."""

from __future__ import annotations

import contextlib
import threading

import pytest
import torch

from lowcomm.comm.aggregate import RULES
from lowcomm.comm.local import run_local
from lowcomm.comm.zmq import Coordinator, ZmqTransport

pytestmark = pytest.mark.timeout(120)
FAST = {"heartbeat": 0.2, "progress_timeout": 4.0, "join_timeout": 20.0, "timeout": 30.0}


@contextlib.contextmanager
def group(n=3, cls=(), **coord_kw):
    """A coordinator and ``n`` peers (``cls[i]`` the class of peer i, default ZmqTransport)."""
    c = Coordinator("tcp://127.0.0.1:*", min_peers=n, heartbeat=0.2, heartbeat_timeout=10.0,
                    barrier_timeout=10.0, **coord_kw)
    th = threading.Thread(target=c.serve, daemon=True)
    th.start()
    ts: list = [None] * n

    def mk(i):
        ts[i] = (cls[i] if i < len(cls) else ZmqTransport)(c.endpoint, **FAST)
    made = [threading.Thread(target=mk, args=(i,)) for i in range(n)]
    for t in made:
        t.start()
    for t in made:
        t.join(30)
    try:
        assert all(ts), "the peers did not start"
        yield c, ts
    finally:
        for t in ts:
            if t is not None:
                t.close()
        c.stop()
        th.join(5)


def together(fns, timeout=60.0):
    out, errs = [None] * len(fns), []

    def one(i):
        try:
            out[i] = fns[i]()
        except BaseException as e:  # noqa: BLE001 - collected, asserted by the caller
            errs.append(e)
            out[i] = e
    th = [threading.Thread(target=one, args=(i,)) for i in range(len(fns))]
    for t in th:
        t.start()
    for t in th:
        t.join(timeout)
    return out


def _local(t, xs, rule, codec, center):
    buf = xs[t.rank].clone()
    t.all_reduce([buf], codec=codec, aggregate=rule, center=center).wait(30)
    return buf


def test_every_rule_fp32_and_quantized_equals_the_local_transport_bit_for_bit():
    W = 3
    g = torch.Generator().manual_seed(3)
    xs = [torch.randn(1001, generator=g) for _ in range(W)]
    xs[2] = xs[2] * 30  # an outlier clip and centered_clip act on (below the 100x hard bound)
    center = torch.randn(1001, generator=g) * 0.1
    with group(W) as (_, ts):
        assert set(RULES) <= set(ts[0].aggregate_rules)
        for rule in RULES:
            for codec in (None, "int8"):
                cen = [center] if rule == "centered_clip" else None

                def go(t, rule=rule, codec=codec, cen=cen):
                    buf = xs[t.rank].clone()
                    t.all_reduce([buf], codec=codec, aggregate=rule, center=cen).wait(30)
                    return buf
                outs = together([lambda t=t: go(t) for t in ts])
                assert not any(isinstance(o, BaseException) for o in outs), (rule, codec, outs)
                ref = run_local(W, _local, xs, rule, codec, cen)[0]
                for o in outs:
                    assert torch.equal(o, ref), (rule, codec)
