"""The ZeroMQ trust model under attack (issue 12): an allowlisted key that is not a member (``evil``)
tries each attack of the issue's table over real CURVE sockets against a coordinator and honest
members; honest results stay exact and the attacker is named. Plus a hypothesis state machine that
drives the coordinator's message handler in process with hostile messages (injected clock)."""

from __future__ import annotations

import contextlib
import json
import logging
import threading
import time

import pytest
import torch
import zmq
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

import lowcomm
from lowcomm.comm.base import CommError
from lowcomm.comm.zmq import Coordinator, CurveConfig, ZmqTransport, generate_keypair
from lowcomm.comm.zmq.wire import decode_control, encode_control, encode_header

pytestmark = pytest.mark.timeout(120)
FAST = {"heartbeat": 0.2, "progress_timeout": 4.0, "join_timeout": 20.0}
EVIL = "key 'evil'"


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    d = tmp_path_factory.mktemp("keys")
    allow = d / "allow"
    allow.mkdir()
    for name in ("coord", "a", "b", "evil"):
        pub, _ = generate_keypair(str(d), name)
        if name != "coord":
            (allow / f"{name}.key").write_bytes(open(pub, "rb").read())
    return d


def cfg(keys, name):
    return CurveConfig(str(keys / f"{name}.key_secret"), str(keys / "allow"), str(keys / "coord.key"))


@contextlib.contextmanager
def run(keys, **kw):
    """A CURVE coordinator and two honest members a, b (threads of this process)."""
    c = Coordinator("tcp://127.0.0.1:*", min_peers=2, heartbeat=0.2, heartbeat_timeout=10.0, barrier_timeout=10.0,
                    curve=CurveConfig(str(keys / "coord.key_secret"), str(keys / "allow")), **kw)
    th = threading.Thread(target=c.serve, daemon=True)
    th.start()
    ts: list = [None, None]

    def mk(i, name):
        ts[i] = ZmqTransport(c.endpoint, **FAST, curve=cfg(keys, name))
    made = [threading.Thread(target=mk, args=(i, n)) for i, n in enumerate("ab")]
    for t in made:
        t.start()
    for t in made:
        t.join(30)
    try:
        assert all(ts), "the honest members did not start"
        yield c, ts
    finally:
        for t in ts:
            if t is not None:
                t.close()
        c.stop()
        th.join(5)


def evil_socket(keys, endpoint, server_key: bytes, rid: bytes | None = None):
    ctx = zmq.Context.instance()
    s = ctx.socket(zmq.DEALER)
    s.setsockopt(zmq.LINGER, 0)
    if rid is not None:
        s.setsockopt(zmq.ROUTING_ID, rid)
    cfg(keys, "evil").make_client(s, server_key)
    s.connect(endpoint)
    return s


def exact_all_reduce(ts, n=1000):
    hs = [t.all_reduce([torch.full((n,), float(t.rank) + 1.0)]) for t in ts]
    outs = [h.wait(30)[0] for h in hs]
    want = torch.full((n,), sum(float(t.rank) + 1.0 for t in ts) / len(ts))
    assert all(torch.equal(o, want) for o in outs)


def together(fns, timeout=60.0):
    """Run ``fns`` in threads at once (collectives need every member); their results, or raise the first error."""
    out, errs = [None] * len(fns), []

    def one(i):
        try:
            out[i] = fns[i]()
        except BaseException as e:  # noqa: BLE001 - raised below
            errs.append(e)
    th = [threading.Thread(target=one, args=(i,)) for i in range(len(fns))]
    for t in th:
        t.start()
    for t in th:
        t.join(timeout)
    if errs:
        raise errs[0]
    return out


def wait_for(pred, timeout=5.0):
    end = time.monotonic() + timeout
    while not pred() and time.monotonic() < end:
        time.sleep(0.02)
    return pred()


def test_forged_control_messages_and_verdicts_change_nothing(keys):
    with run(keys) as (c, ts):
        coord_pub = c.curve.public
        s = evil_socket(keys, c.endpoint, coord_pub)
        ids = sorted(t.rank for t in ts)
        epoch = c.epoch
        forged = [encode_control("leave", id=ids[0]), encode_control("hb", id=ids[1], hashes=[], stats={}),
                  encode_control("join", id=ids[0], addr="tcp://127.0.0.1:1", pub=None, rid=b"R" * 16, active=True,
                                 next_op=0, verdicts=[[5, "0,1", True, "0" * 64]]),
                  encode_control("activate", id=ids[1], next_op=0),
                  encode_control("done", id=ids[0], op=0, group=ids, ok=True, why=""),
                  encode_control("done", id=ids[0], op=1, group=list(range(4096)), ok=True, why="")]
        for f in forged:
            s.send(f)
        assert wait_for(lambda: c.rejects.counts.get(EVIL, 0) >= 4)
        assert sorted(c.active_ids()) == ids and c.epoch == epoch and not c.verdicts and not c.votes
        # the attacker joins as itself (a pending member) and still cannot vote on the members' ops
        s.send(encode_control("join", id=None, addr="tcp://127.0.0.1:2", pub=None, rid=b"E" * 16, active=False,
                              next_op=0, verdicts=[]))
        assert wait_for(lambda: len(c.members) == 3)
        evil_id = max(c.members)
        s.send(encode_control("done", id=evil_id, op=0, group=ids, ok=True, why=""))
        s.send(encode_control("ready", id=evil_id, op=0))
        exact_all_reduce(ts)
        assert all(ok for ok, _ in c.verdicts.values())
        assert not any(evil_id in map(int, k[1].split(",")) for k in c.verdicts)
        s.close(0)


def test_forged_abort_future_flood_and_fetch_from_a_non_member_are_dropped(keys):
    with run(keys) as (c, ts):
        a, b = sorted(ts, key=lambda t: t.rank)
        # the attacker knows b's routing id (squatting it): its key still is not b's
        s = evil_socket(keys, a.address, a.curve.public, rid=b._rid)
        for op in range(0, 50):
            s.send(encode_control("abort", id=b.rank, op=op))
            s.send_multipart([encode_header("data", b.rank, 0, op, "rs", 0, 0, 1, "float32", [1 << 18], 0),
                              torch.zeros(1 << 18).numpy()])
        s.send(encode_control("fetch", id=b.rank, snap=None, tensor=-1))
        assert wait_for(lambda: a.rejects.counts.get(EVIL, 0) >= 101)
        assert not a._aborts and not a._inbox and not a._held
        assert s.poll(300) == 0  # no snapshot for a stranger
        exact_all_reduce(ts)
        s.close(0)


def test_overflow_names_the_senders_not_the_owner(keys):
    with run(keys) as (c, ts):
        hs = [t.all_reduce([torch.full((10,), 3e38)]) for t in ts]
        errs = []
        for h in hs:
            with pytest.raises(CommError) as e:
                h.wait(30)
            errs.append(str(e.value))
        ids = sorted(t.rank for t in ts)
        assert any(f"member(s) {ids}" in e for e in errs), errs
        exact_all_reduce(ts)


def test_malformed_codec_parts_fail_the_op_naming_the_sender(keys):
    with run(keys) as (c, ts):
        a, b = sorted(ts, key=lambda t: t.rank)
        honest_send = b._send

        def corrupt(peer, tag, parts, rec):
            if tag[1] == "qrs":
                parts = [p[: max(0, p.numel() // 2)] for p in parts]  # well-formed frames, wrong sizes
            honest_send(peer, tag, parts, rec)
        b._send = corrupt
        hs = [t.all_reduce([torch.randn(4000)], codec="int8") for t in ts]
        msgs = []
        for h in hs:
            with pytest.raises(CommError) as e:
                h.wait(30)
            msgs.append(str(e.value))
        assert any(f"from member {b.rank} is malformed" in m for m in msgs), msgs
        b._send = honest_send
        exact_all_reduce(ts)


def test_demo_indices_out_of_range_fail_the_sync_everywhere_naming_the_sender(keys):
    """DeMo's sparse payloads are checked before the vote (index ranges, sizes): a bad one fails the sync
    on every peer (rolled back), instead of diverging the peers that would parse it after the commit."""
    from lowcomm.outer.demo import DeMo

    with run(keys) as (c, ts):
        ts = sorted(ts, key=lambda t: t.rank)
        torch.manual_seed(0)
        models = [torch.nn.Linear(16, 8) for _ in ts]
        for m in models[1:]:
            m.load_state_dict(models[0].state_dict())
        opts = together([lambda m=m, t=t: DeMo(torch.optim.SGD(m.parameters(), lr=0.1), transport=t, topk=4,
                                                chunk=8) for m, t in zip(models, ts)])  # construction syncs
        b = ts[1]
        honest_send = b._send

        def corrupt(peer, tag, parts, rec):
            if tag[1] == "gather":
                bad = parts[0].clone().fill_(min(torch.iinfo(parts[0].dtype).max, 1000))
                parts = [bad, *parts[1:]]
            honest_send(peer, tag, parts, rec)

        def steps(n):
            for _ in range(n):
                errs: list = []

                def one(i, errs=errs):
                    try:
                        x = torch.randn(4, 16, generator=torch.Generator().manual_seed(i))
                        models[i](x).square().mean().backward()
                        opts[i].step()
                        opts[i].zero_grad()
                    except BaseException as e:  # noqa: BLE001 - reported below
                        errs.append(e)
                th = [threading.Thread(target=one, args=(i,)) for i in range(len(ts))]
                for t in th:
                    t.start()
                for t in th:
                    t.join(30)
                assert not errs, errs

        b._send = corrupt
        steps(1)
        assert [o.failed_syncs for o in opts] == [1, 1]
        assert all(f"the payload from member {b.rank} is malformed" in o.sync_log[-1].error for o in opts), [
            o.sync_log[-1] for o in opts]
        b._send = honest_send
        steps(2)
        assert [o.failed_syncs for o in opts] == [1, 1]
        assert all(torch.equal(p, q) for p, q in zip(models[0].parameters(), models[1].parameters()))


def test_a_peer_whose_part_failed_in_a_committed_op_resyncs_to_the_same_bits(keys, caplog):
    """No silent None: when the run commits an op whose result this peer does not have, it raises, its
    strategy rolls back, and it re-syncs from a snapshot: afterwards it holds the others' bits."""
    from lowcomm.comm.zmq.state import global_state_hash

    with run(keys) as (c, ts):
        ts = sorted(ts, key=lambda t: t.rank)
        torch.manual_seed(0)
        models = [torch.nn.Linear(8, 4) for _ in ts]
        for m in models[1:]:
            m.load_state_dict(models[0].state_dict())
        opts = together([lambda m=m, t=t: lowcomm.DiLoCo(torch.optim.SGD(m.parameters(), lr=0.1), transport=t,
                                                          sync_every=2) for m, t in zip(models, ts)])
        for t, m, o in zip(ts, models, opts):
            t.attach(m, o)
        b = ts[1]
        start, commit = b._start, b._commit

        def failing_start(kind, participants, body, tag=""):
            def body2(*a):
                body(*a)
                raise CommError("injected: this member lost its result after sending its part")
            return start(kind, participants, body2, tag)
        b._start = failing_start
        b._commit = lambda tag, parts, ok, deadline: commit(tag, parts, True, deadline)  # it votes ok anyway
        caplog.set_level(logging.WARNING)
        errs: list = []

        def train(i, errs=errs):
            try:
                for step in range(2):
                    x = torch.randn(4, 8, generator=torch.Generator().manual_seed(10 * step + i))
                    models[i](x).square().mean().backward()
                    opts[i].step()
                    opts[i].zero_grad()
            except BaseException as e:  # noqa: BLE001 - reported below
                errs.append(e)
        th = [threading.Thread(target=train, args=(i,)) for i in range(2)]
        for t in th:
            t.start()
        for t in th:
            t.join(60)
        assert not errs, errs
        # member 1 raised, rolled back, and loaded member 0's snapshot (counters included)
        assert any("re-syncs from a snapshot" in r.message and r.levelname == "WARNING" for r in caplog.records)
        assert not b._resync and opts[0].sync_count == opts[1].sync_count == 1
        assert global_state_hash(opts[0]) == global_state_hash(opts[1])
        assert all(torch.equal(p, q) for p, q in zip(models[0].parameters(), models[1].parameters()))


def test_removed_key_is_ejected_and_old_state_file_refused(keys, tmp_path):
    old = tmp_path / "old.json"
    old.write_text(json.dumps({"epoch": 1, "next_id": 3, "dropped": []}))
    with pytest.raises(ValueError, match="start afresh"):
        Coordinator("tcp://127.0.0.1:*", state_file=str(old))
    with run(keys) as (c, ts):
        b = ts[1]  # the member whose key is b.key (its id depends on the order of the joins)
        gone = keys / "allow" / "b.key"
        saved = gone.read_bytes()
        gone.unlink()
        try:
            c.request_reload()
            assert wait_for(lambda: b.rank not in c.members)
            assert c.events[-1]["member"] == b.rank and "removed from the allowlist" in c.events[-1]["reason"]
        finally:
            gone.write_bytes(saved)


def test_non_loopback_without_curve_needs_insecure():
    with pytest.raises(ValueError, match="insecure"):
        Coordinator("tcp://0.0.0.0:*")
    c = Coordinator("tcp://0.0.0.0:*", insecure=True)
    c.close()
    with pytest.raises(ValueError, match="insecure"):
        ZmqTransport("tcp://127.0.0.1:1", announce="tcp://10.1.2.3:7000")


# ---- the coordinator's handler as a state machine --------------------------------------------------------
class CoordinatorUnderAttack(RuleBasedStateMachine):
    """Honest members (identities h0..h2) run ops; an attacker (identity "x") sends any message claiming any
    id. Invariants: state stays bounded and no op counts a vote the attacker forged."""

    def __init__(self):
        super().__init__()
        self.now = 0.0
        self.c = Coordinator("tcp://127.0.0.1:*", min_peers=3, recovery=0.0, barrier_timeout=5.0,
                             heartbeat_timeout=1e9, max_members=8, clock=lambda: self.now)
        self.c._send = lambda rid, frame: self.out.append(decode_control(frame))
        self.out: list[dict] = []
        self.honest: dict[int, str] = {}
        self.honest_ok: dict[tuple, set[int]] = {}  # verdict key -> honest members that voted ok
        for i in range(3):
            who = f"h{i}"
            self.c.handle(b"", encode_control("join", id=None, addr=f"tcp://127.0.0.1:{9000 + i}", pub=None,
                                              rid=bytes([i]) * 16, active=False, next_op=0, verdicts=[]), who)
            self.honest[self.out[-1]["id"]] = who
        self.op = 0

    def teardown(self):
        self.c.close()

    @rule()
    def honest_op(self):
        ids = sorted(self.honest)
        for mid in ids:
            self.c.handle(b"", encode_control("ready", id=mid, op=self.op), self.honest[mid])
        if self.op in self.c.released:
            group = sorted(self.c.released[self.op][0])
            key = (self.op, ",".join(map(str, group)))
            for mid in group:
                if mid in self.honest:
                    self.honest_ok.setdefault(key, set()).add(mid)
                    self.c.handle(b"", encode_control("done", id=mid, op=self.op, group=group, ok=True, why=""),
                                  self.honest[mid])
        self.op += 1

    @rule(kind=st.sampled_from(["join", "hb", "leave", "ready", "done", "activate", "query"]),
          mid=st.integers(0, 5), op=st.integers(0, 40), group=st.lists(st.integers(0, 5000), min_size=1, max_size=6),
          ok=st.booleans())
    def attack(self, kind, mid, op, group, ok):
        fields = {"join": dict(id=mid, addr="tcp://127.0.0.1:1", pub=None, rid=b"X" * 16, active=True, next_op=op,
                               verdicts=[[op, ",".join(map(str, sorted(set(group)))), ok, "a" * 64]]),
                  "hb": dict(id=mid, hashes=[[op, "f" * 64]], stats={"tokens": op}), "leave": dict(id=mid),
                  "ready": dict(id=mid, op=op),
                  "done": dict(id=mid, op=op, group=group, ok=ok, why="x"), "activate": dict(id=mid, next_op=op),
                  "query": dict(id=mid, sync=op)}[kind]
        self.c.handle(b"", encode_control(kind, **fields), "x")

    @rule(dt=st.floats(0.0, 6.0))
    def tick(self, dt):
        self.now += dt
        self.c._check_barriers()
        self.c._check_votes()

    @invariant()
    def bounded_and_honest(self):
        c = self.c
        assert len(c.members) <= c.max_members
        assert len(c.barriers) <= 2 * max(1, len(c.members))
        assert len(c.votes) <= 4 * max(1, len(c.members))
        assert all(len(v.group) <= len(c.members) + len(c.bindings) for v in c.votes.values())
        for mid in self.honest:  # no honest member was evicted or taken over
            assert mid in c.members and c.members[mid].who == self.honest[mid]
        for key, (ok, _) in c.verdicts.items():
            if ok:  # a committed op: every member of its group voted ok itself
                group = set(map(int, key[1].split(",")))
                assert group <= self.honest_ok.get(key, set()), key


TestCoordinatorUnderAttack = CoordinatorUnderAttack.TestCase
TestCoordinatorUnderAttack.settings = settings(max_examples=60, stateful_step_count=25, derandomize=True,
                                               deadline=None, suppress_health_check=list(HealthCheck))


def bare_peer():
    """A ZmqTransport's message handler without sockets (no CURVE: identities are routing ids): member 0 of
    a run with members 0, 1, 2; what it serves is recorded instead of sent."""
    from lowcomm.comm.zmq.security import Rejects

    p = object.__new__(ZmqTransport)
    p.curve, p._id, p.max_tensor_bytes, p.chunk_bytes = None, 0, 1 << 20, 1024
    p._cv = threading.Condition()
    p._inbox, p._aborts, p._groups, p._held, p._rx, p._progress = {}, {}, {}, {}, {}, {}
    p._expect, p._own_bytes, p._floor, p._seq, p._live = 0, 0, 0, 0, None
    p._members, p._joiners, p._deferred, p._next_hb = [0, 1, 2], {}, [], 0.0
    p._peers = {i: (f"tcp://127.0.0.1:{7000 + i}", None, bytes([i + 1]) * 16) for i in range(3)}
    p.dropped_invalid, p.rejects = 0, Rejects(logging.getLogger("test"))
    p.served = []
    p._serve = lambda rid, m: p.served.append(m["id"])
    return p


class PeerUnderAttack(RuleBasedStateMachine):
    """Honest members 1 and 2 send chunks, aborts and fetches; a stranger ("X" routing id) sends the same
    kinds claiming any member id. Invariants: only honest messages are filed, within the op window and the
    per-sender quotas; the stranger is never served a snapshot."""

    def __init__(self):
        super().__init__()
        self.p = bare_peer()
        self.honest: set[tuple[int, int]] = set()
        self.honest_aborts: set[int] = set()

    def _data(self, rid, sender, op, n, off=0, tag="rs"):
        hdr = encode_header("data", sender, 0, op, tag, 0, 0, 1, "float32", [n], off)
        self.p._on_peer_message([zmq.Frame(rid), zmq.Frame(hdr), zmq.Frame(torch.ones(n).numpy().tobytes())])

    @rule(sender=st.sampled_from([1, 2]), dop=st.integers(0, 3), tag=st.sampled_from(["rs", "ag"]))
    def honest_chunk(self, sender, dop, tag):
        op = self.p._floor + dop
        before = len(self.p._inbox)
        self._data(bytes([sender + 1]) * 16, sender, op, 64, 0, tag)
        if len(self.p._inbox) > before:
            self.honest.add((sender, op))

    @rule(sender=st.sampled_from([1, 2]))
    def honest_abort(self, sender):
        op = self.p._floor
        self.p._on_peer_message([zmq.Frame(bytes([sender + 1]) * 16), zmq.Frame(encode_control("abort", id=sender,
                                                                                                op=op))])
        self.honest_aborts.add(op)

    @rule(kind=st.sampled_from(["data", "abort", "fetch", "garbage"]), claim=st.integers(0, 5),
          op=st.integers(0, 60), n=st.integers(1, 4096), rid=st.sampled_from([b"X" * 16, b"X" * 17, b"Y"]))
    def attack(self, kind, claim, op, n, rid):
        if kind == "data":
            self._data(rid, claim, op, n)
        elif kind == "abort":
            self.p._on_peer_message([zmq.Frame(rid), zmq.Frame(encode_control("abort", id=claim, op=op))])
        elif kind == "fetch":
            self.p._on_peer_message([zmq.Frame(rid), zmq.Frame(encode_control("fetch", id=claim, snap=None,
                                                                                tensor=-1))])
            for frames in self.p._deferred:  # the next state from the coordinator admits nobody new
                self.p._on_peer_message(frames, deferred=True)
            self.p._deferred.clear()
        else:
            self.p._on_peer_message([zmq.Frame(rid), zmq.Frame(b"\xc1" * n)])

    @rule()
    def next_op(self):
        seq = self.p._floor + 1
        self.p._seq = seq + 1
        self.p._advance_floor(seq)
        self.p._groups[seq] = {0, 1, 2}

    @invariant()
    def only_honest_and_bounded(self):
        p = self.p
        assert {(k[0], k[1]) for k in p._inbox} <= self.honest
        assert all(p._floor <= k[1] <= p._floor + 3 for k in p._inbox)
        assert set(p._aborts) <= self.honest_aborts and set(p._aborts.values()) <= {1, 2}
        assert not p.served and len(p._deferred) <= 8
        for sender, (nbytes, chunks) in p._held.items():
            assert sender in (1, 2) and chunks <= 4096 and nbytes <= 2 * 4 * p.chunk_bytes + 4096 * 64 * 4


TestPeerUnderAttack = PeerUnderAttack.TestCase
TestPeerUnderAttack.settings = settings(max_examples=60, stateful_step_count=30, derandomize=True, deadline=None,
                                        suppress_health_check=list(HealthCheck))
