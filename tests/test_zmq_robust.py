"""Issue 13 over ZeroMQ: robust rules on the data plane, offences counted per key by the coordinator
and ejection, audits of shard owners (real sockets, peers as threads of this process)."""

from __future__ import annotations

import contextlib
import threading
import time

import pytest
import torch

from lowcomm.comm.aggregate import RULES, aggregate
from lowcomm.comm.base import CommError
from lowcomm.comm.local import run_local
from lowcomm.comm.zmq import Coordinator, CurveConfig, ZmqTransport, generate_keypair

pytestmark = pytest.mark.timeout(120)
FAST = {"heartbeat": 0.2, "progress_timeout": 4.0, "join_timeout": 20.0, "timeout": 30.0}


@contextlib.contextmanager
def group(n=3, cls=(), curve=None, **coord_kw):
    """A coordinator and ``n`` peers (``cls[i]`` the class of peer i, default ZmqTransport; ``curve(i)``
    the CurveConfig of peer i, ``curve(None)`` the coordinator's)."""
    c = Coordinator("tcp://127.0.0.1:*", min_peers=n, heartbeat=0.2, heartbeat_timeout=10.0,
                    barrier_timeout=10.0, curve=curve and curve(None), **coord_kw)
    th = threading.Thread(target=c.serve, daemon=True)
    th.start()
    ts: list = [None] * n

    def mk(i):
        ts[i] = (cls[i] if i < len(cls) else ZmqTransport)(c.endpoint, **FAST, curve=curve and curve(i))
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
    with group(W, audit=1.0) as (c, ts):  # every op audited: honest members are never named
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
        assert c.audits_drawn == 2 * len(RULES) and c.ops_failed == 0
        assert c.offences == [] and c.ejected == {}


def _op(t, x, rule=None, codec=None):
    buf = x.clone()
    t.all_reduce([buf], codec=codec, aggregate=rule).wait(30)
    return buf


class Scaler(ZmqTransport):
    """The issue's ``scale`` attacker: its contributions x 1e4."""

    def _contribution(self, seq, members, flat):
        return flat * 1e4


class Liar(ZmqTransport):
    """A lying shard owner: returns -10 x the result of its shard."""

    def _owner_result(self, seq, result):
        return result * -10.0


def wait_for(pred, timeout=10.0):
    end = time.monotonic() + timeout
    while not pred() and time.monotonic() < end:
        time.sleep(0.02)
    return pred()


def test_scale_attacker_is_screened_named_and_its_key_ejected(tmp_path):
    allow = tmp_path / "allow"
    allow.mkdir()
    for name in ("coord", "p0", "p1", "p2"):
        pub, _ = generate_keypair(str(tmp_path), name)
        if name != "coord":
            (allow / f"{name}.key").write_bytes(open(pub, "rb").read())

    def curve(i):
        if i is None:
            return CurveConfig(str(tmp_path / "coord.key_secret"), str(allow))
        return CurveConfig(str(tmp_path / f"p{i}.key_secret"), str(allow), str(tmp_path / "coord.key"))
    g = torch.Generator().manual_seed(5)
    with group(3, cls=(ZmqTransport, ZmqTransport, Scaler), curve=curve, audit=0.0) as (c, ts):
        bad = ts[2]
        honest = ts[:2]
        for k in range(3):
            xs = {t.rank: torch.randn(600, generator=g) for t in ts}
            outs = together([lambda t=t, x=xs[t.rank]: _op(t, x, "clip") for t in ts])
            # the attacker is screened out (beyond 100x the median norm): the others' mean, on every peer
            ref, scr = aggregate([xs[m] * (1e4 if m == bad.rank else 1.0) for m in sorted(xs)], "clip", shards=3)
            assert scr.keep == [m for m in sorted(xs) if m != bad.rank]
            assert all(torch.equal(o, ref) for o in outs), k
        assert wait_for(lambda: bad.rank not in c.members)
        assert [(o["member"], o["kind"], o["key"]) for o in c.offences] == [(bad.rank, "bound", "key 'p2'")] * 3
        assert "2 of the 2 other members" in c.offences[0]["evidence"]
        assert c.status()["ejected"] == ["key 'p2'"] and c.status()["offences"] == {"key 'p2'": 3}
        assert any(e["event"] == "ejected" and e["member"] == bad.rank for e in c.events)
        # the honest peers go on without it, bit-identical; the attacker is out of the run
        xs = {t.rank: torch.randn(600, generator=g) for t in ts}
        outs = together([lambda t=t: _op(t, xs[t.rank], "clip") for t in ts])
        assert isinstance(outs[2], CommError)
        ref, _ = aggregate([xs[t.rank] for t in sorted(honest, key=lambda t: t.rank)], "clip", shards=2)
        assert torch.equal(outs[0], ref) and torch.equal(outs[1], ref)
        # its key is refused at join for the rest of the run
        with pytest.raises(CommError, match="ejected"):
            ZmqTransport(c.endpoint, **{**FAST, "join_timeout": 5.0}, curve=curve(2))


def test_lying_owner_is_caught_by_a_forced_audit_and_named():
    g = torch.Generator().manual_seed(7)
    with group(3, cls=(ZmqTransport, ZmqTransport, Liar), audit=1.0) as (c, ts):
        liar = ts[2].rank
        for k in range(40):  # the audited shard is drawn at random: the liar's comes up with p = 1/3 per op
            rule, codec = [("clip", None), (None, "int8")][k % 2]
            xs = {t.rank: torch.randn(300, generator=g) for t in ts}
            outs = together([lambda t=t, x=xs[t.rank], r=rule, q=codec: _op(t, x, r, q) for t in ts])
            if any(isinstance(o, BaseException) for o in outs):
                break
        assert all(isinstance(o, CommError) for o in outs), outs
        for o in outs:
            assert f"member {liar} returned a result that differs from the recomputation" in str(o)
        assert [(o["member"], o["kind"]) for o in c.offences] == [(liar, "lying_owner")]
        assert "2 of 2 auditors" in c.offences[0]["evidence"]
        assert c.ops_failed == 1


class BadHash(ZmqTransport):
    """Reports hashes that are not those of the bytes it sent."""

    def _vote_fields(self, group):
        return {**super()._vote_fields(group), "sent": ["f" * 32] * len(group)}


def test_sender_and_owner_disagreeing_on_hashes_fail_the_audited_op_naming_nobody():
    with group(3, cls=(ZmqTransport, ZmqTransport, BadHash), audit=1.0) as (c, ts):
        outs = together([lambda t=t: _op(t, torch.full((90,), float(t.rank))) for t in ts])
        assert all(isinstance(o, CommError) for o in outs), outs
        assert all("report different hashes of the same bytes" in str(o) for o in outs)
        assert c.offences == [] and c.ops_failed == 1


class AuditCheat(ZmqTransport):
    """Sends auditors other bytes than those it sent the owner (and reported the hash of)."""

    def _audit_part(self, seq, group, m, rec, deadline):
        self._aud = [([[p + 1 for p in parts] for parts in a[0]], *a[1:]) for a in self._aud]
        return super()._audit_part(seq, group, m, rec, deadline)


def test_contribution_that_does_not_match_its_hash_names_its_sender():
    with group(3, cls=(ZmqTransport, ZmqTransport, AuditCheat), audit=1.0) as (c, ts):
        cheat = ts[2].rank
        outs = together([lambda t=t: _op(t, torch.full((90,), float(t.rank)), "trimmed_mean") for t in ts])
        assert all(isinstance(o, CommError) for o in outs), outs
        assert all(f"member {cheat} sent bytes that do not match its hash" in str(o) for o in outs)
        assert [(o["member"], o["kind"]) for o in c.offences] == [(cheat, "hash_mismatch")]
