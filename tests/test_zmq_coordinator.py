"""The coordinator's membership rules, driven message by message (no peers, no threads).

A member that misses a sync-start barrier is reported and must catch up from a snapshot; at
``max_misses`` consecutive misses it is dropped as too slow, and it can join again.
"""

from __future__ import annotations

import time

import pytest

from lowcomm.comm.zmq import Coordinator
from lowcomm.comm.zmq.wire import decode_control, encode_control


class Driven:
    """A coordinator whose answers are collected instead of sent."""

    def __init__(self, **kw):
        kw.setdefault("barrier_timeout", 0.05)
        kw.setdefault("recovery", 0.0)
        self.c = Coordinator("tcp://127.0.0.1:*", **kw)
        self.out: list[tuple[bytes, dict]] = []
        self.rids: dict[int, bytes] = {}  # member id -> the routing id of its coordinator connection
        self.c._send = lambda rid, frame: self.out.append((rid, decode_control(frame)))

    def send(self, conn: bytes, kind: str, **fields) -> list[dict]:
        n = len(self.out)
        self.c.handle(conn, encode_control(kind, **fields))
        return [m for _, m in self.out[n:]]

    def join(self, mid=None) -> int:
        rid = self.rids.get(mid, b"%016d" % len(self.out) + b"r")
        ans = self.send(rid, "join", id=mid, addr=f"tcp://127.0.0.1:{7000 + (mid or 0)}", pub=None,
                        rid=b"D" + rid[1:16], active=False, next_op=0, verdicts=[])
        assert ans[-1]["k"] == "welcome", ans
        self.rids[ans[-1]["id"]] = rid
        return ans[-1]["id"]

    def ready(self, mid: int, op: int) -> list[dict]:
        return self.send(self.rids[mid], "ready", id=mid, op=op)

    def deadline(self) -> list[dict]:
        """Let the barrier deadline pass and release what is due."""
        n = len(self.out)
        time.sleep(self.c.barrier_timeout * 1.5)
        self.c._check_barriers()
        return [m for _, m in self.out[n:]]

    def close(self):
        self.c.close()


@pytest.fixture
def coord():
    made = []

    def make(**kw):
        d = Driven(**kw)
        made.append(d)
        return d
    yield make
    for d in made:
        d.close()


def test_miss_catch_up_reset_then_drop_and_rejoin(coord):
    d = coord(min_peers=3, max_misses=2)
    ids = [d.join() for _ in range(3)]
    assert ids == [0, 1, 2] and d.c.active_ids() == [0, 1, 2]

    # op 0: everyone in time
    for m in ids:
        d.ready(m, 0)
    assert d.c.released[0][0] == {0, 1, 2}

    # op 1: member 2 is late -> the others go without it; it is reported, pending, keeps its id
    d.ready(0, 1)
    d.ready(1, 1)
    go = [m for m in d.deadline() if m["k"] == "go"]
    assert len(go) == 2 and [x[0] for x in go[0]["members"]] == [0, 1]
    assert d.c.events[-1]["event"] == "missed" and d.c.events[-1]["member"] == 2
    # stale until it activates: kept in the persisted `dropped` set, so a coordinator restart
    # cannot take it back as active
    assert d.c.members[2].misses == 1 and not d.c.members[2].active and 2 in d.c.dropped
    late = d.ready(2, 1)
    assert late[-1]["k"] == "drop" and "miss 1 of 2" in late[-1]["reason"]

    # it catches up (snapshot fetched elsewhere) and activates from op 2, then takes part: count reset
    assert d.send(d.rids[2], "activate", id=2, next_op=2)[-1]["k"] == "state"
    assert d.c.members[2].active and 2 not in d.c.dropped
    for m in ids:
        d.ready(m, 2)
    assert d.c.released[2][0] == {0, 1, 2} and d.c.members[2].misses == 0

    # op 3 missed, caught up, op 4 missed again: 2 in a row -> dropped as too slow
    d.ready(0, 3)
    d.ready(1, 3)
    d.deadline()
    assert d.c.members[2].misses == 1
    d.send(d.rids[2], "activate", id=2, next_op=4)
    d.ready(0, 4)
    d.ready(1, 4)
    d.deadline()
    assert 2 not in d.c.members and 2 in d.c.dropped
    ev = d.c.events[-1]
    assert ev["event"] == "dropped" and ev["member"] == 2 and "too slow: missed 2" in ev["reason"]
    assert "dropped: too slow" in d.ready(2, 4)[-1]["reason"]
    assert d.c.status()["active"] == [0, 1]

    # it joins again with its id: pending until it activates, then expected at the barriers again
    assert d.join(2) == 2
    assert not d.c.members[2].active and d.c.members[2].misses == 0
    d.send(d.rids[2], "activate", id=2, next_op=5)
    for m in ids:
        d.ready(m, 5)
    assert d.c.released[5][0] == {0, 1, 2}
    assert "3 active [0, 1, 2]" in d.c.status_line()


def test_max_misses_one_drops_at_the_first_miss(coord):
    d = coord(min_peers=2, max_misses=1)
    a, b = d.join(), d.join()
    d.ready(a, 0)
    d.deadline()
    assert b not in d.c.members and [e["event"] for e in d.c.events] == ["dropped"]


def test_bad_max_misses(coord):
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="max_misses"):
            coord(max_misses=bad)


def test_serve_prints_members_and_progress(capsys):
    c = Coordinator("tcp://127.0.0.1:*", min_peers=2, heartbeat=0.2)
    c.serve(duration=1.5, status_every=0.1)  # closes the sockets when done
    out = capsys.readouterr().out
    assert "waiting for 2 peer(s) to start the run" in out
    # an unchanged line is printed again only after 6 intervals (0.6 s): at 0 s, >= 0.6 s, maybe >= 1.2 s
    assert 2 <= out.count("waiting for") <= 3
