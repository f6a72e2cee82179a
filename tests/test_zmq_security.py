"""ZeroMQ transport security and robustness, peers as threads of this process over real loopback
sockets: CURVE allowlists, invalid and oversized messages, NaN/Inf payloads, ``lowcomm keygen``."""

from __future__ import annotations

import contextlib
import logging
import socket
import struct
import threading
import time

import pytest
import torch
import zmq

from lowcomm.comm.base import CommError, CommTimeout
from lowcomm.comm.zmq import Coordinator, CurveConfig, ZmqTransport, generate_keypair
from lowcomm.comm.zmq.wire import encode_header

pytestmark = pytest.mark.timeout(120)
FAST = {"heartbeat": 0.2, "progress_timeout": 5.0, "join_timeout": 20.0}


@contextlib.contextmanager
def coordinator(**kw):
    kw.setdefault("heartbeat", 0.2)
    kw.setdefault("heartbeat_timeout", 3.0)
    kw.setdefault("barrier_timeout", 20.0)
    c = Coordinator("tcp://127.0.0.1:*", **kw)
    th = threading.Thread(target=c.serve, daemon=True)
    th.start()
    try:
        yield c
    finally:
        c.stop()
        th.join(5)


@contextlib.contextmanager
def transports(endpoint, configs):
    """Build one transport per config concurrently (construction waits for the run to start)."""
    out: list = [None] * len(configs)
    errs: list = [None] * len(configs)

    def mk(i):
        try:
            out[i] = ZmqTransport(endpoint, **{**FAST, **configs[i]})
        except BaseException as e:  # noqa: BLE001 - reported below
            errs[i] = e

    ths = [threading.Thread(target=mk, args=(i,)) for i in range(len(configs))]
    for t in ths:
        t.start()
    for t in ths:
        t.join(60)
    try:
        for e in errs:
            if e is not None:
                raise e
        yield out
    finally:
        for t in out:
            if t is not None:
                t.close()


def all_reduce_all(ts, make):
    hs = [t.all_reduce([make(t)]) for t in ts]
    out = []
    for h in hs:
        try:
            out.append(h.wait(30)[0])
        except CommError as e:
            out.append(e)
    return out


def test_curve_right_keys_accepted_wrong_or_missing_refused(tmp_path, caplog):
    keys, allow = tmp_path / "keys", tmp_path / "allow"
    for name in ("coord", "a", "b", "mallory"):
        pub, _ = generate_keypair(str(keys), name)
        if name != "mallory":
            (allow / f"{name}.key").parent.mkdir(exist_ok=True)
            (allow / f"{name}.key").write_bytes(open(pub, "rb").read())
    coord_pub = str(keys / "coord.key")
    cfg = lambda n: CurveConfig(str(keys / f"{n}.key_secret"), str(allow), coord_pub)  # noqa: E731
    with coordinator(min_peers=2, curve=CurveConfig(str(keys / "coord.key_secret"), str(allow))) as c:
        with caplog.at_level(logging.WARNING):
            # an unlisted key and no key at all never get an answer from the coordinator
            with pytest.raises(CommTimeout):
                ZmqTransport(c.endpoint, **{**FAST, "join_timeout": 1.5, "curve": cfg("mallory")})
            with pytest.raises(CommTimeout):
                ZmqTransport(c.endpoint, **{**FAST, "join_timeout": 1.5})
        assert any("unlisted public key" in r.message for r in caplog.records)
        with transports(c.endpoint, [{"curve": cfg("a")}, {"curve": cfg("b")}]) as ts:
            out = all_reduce_all(ts, lambda t: torch.full((1000,), float(t.rank)))
            assert all(torch.equal(o, torch.full((1000,), 0.5)) for o in out)
            a = ts[0]
            # mallory dials a peer directly: the handshake is refused, nothing reaches the inbox
            ctx = zmq.Context()
            try:
                m = ctx.socket(zmq.DEALER)
                m.setsockopt(zmq.LINGER, 0)
                m.setsockopt(zmq.ROUTING_ID, b"m%d" % ts[1].rank)
                cfg("mallory").make_client(m, a.curve.public)
                m.connect(a.address)
                hdr = encode_header("data", ts[1].rank, 0, 99, "rs", 0, 0, 1, "float32", [4], 0)
                m.send_multipart([hdr, torch.zeros(4).numpy()])
                # a listed key that lies about who it is: delivered, then dropped and logged with its sender
                b = ctx.socket(zmq.DEALER)
                b.setsockopt(zmq.LINGER, 0)
                b.setsockopt(zmq.ROUTING_ID, b"x1")  # not the routing id of the member its header names
                cfg("b").make_client(b, a.curve.public)
                b.connect(a.address)
                lie = encode_header("data", 7, 0, 99, "rs", 0, 0, 1, "float32", [4], 0)
                with caplog.at_level(logging.WARNING):
                    b.send_multipart([lie, torch.zeros(4).numpy()])
                    b.send_multipart([b"\xc1garbage", b"x"])
                    end = time.monotonic() + 10
                    while a.dropped_invalid < 2 and time.monotonic() < end:
                        time.sleep(0.05)
                assert a.dropped_invalid == 2
                assert not [k for k in a._inbox if k[1] == 99]
                assert any("dropped a message from key 'b'" in r.message for r in caplog.records)
                assert a.rejects.counts["key 'b'"] == 2
            finally:
                ctx.destroy(linger=0)


def _rss_kb() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def test_oversized_frame_from_raw_socket_refused_without_memory_growth():
    with coordinator(min_peers=1) as c, transports(c.endpoint, [{"chunk_bytes": 1 << 20}]) as (t,):
        host, port = t.address.replace("tcp://", "").rsplit(":", 1)
        before = _rss_kb()
        for _ in range(3):
            s = socket.create_connection((host, int(port)), timeout=5)
            # ZMTP 3.0 greeting (RFC 23): signature, version 3.0, NULL mechanism, as-server 0, filler
            s.sendall(b"\xff" + b"\x00" * 8 + b"\x7f" + b"\x03\x00" + b"NULL".ljust(20, b"\x00") + b"\x00" * 32)
            body = b"\x05READY" + b"\x0bSocket-Type" + struct.pack(">I", 6) + b"DEALER"
            s.sendall(b"\x04" + bytes([len(body)]) + body)
            # a frame announcing 1 GiB (long-size flag), then as much of it as the peer will read
            s.sendall(b"\x02" + struct.pack(">Q", 1 << 30))
            chunk = b"\x00" * (1 << 20)
            sent = 0
            with contextlib.suppress(OSError):
                for _ in range(64):
                    s.sendall(chunk)
                    sent += len(chunk)
            s.close()
        time.sleep(0.5)
        grown_mb = (_rss_kb() - before) / 1024
        assert grown_mb < 48, f"peer memory grew by {grown_mb:.0f} MB"
        # the peer still works (an operation goes through the coordinator barrier)
        assert t.all_reduce([torch.ones(3)]).wait(20)[0].tolist() == [1.0, 1.0, 1.0]
        assert t._io.is_alive()


def test_nan_payload_fails_the_sync_and_names_the_sender():
    with coordinator(min_peers=2) as c, transports(c.endpoint, [{}, {}]) as ts:
        bad = max(t.rank for t in ts)

        def make(t):
            x = torch.ones(100)
            if t.rank == bad:
                x[0] = float("nan")  # element 0 lies in the shard of the lowest member
            return x
        out = all_reduce_all(ts, make)
        assert all(isinstance(o, CommError) for o in out)
        owner = [o for t, o in zip(ts, out) if t.rank != bad][0]
        assert f"member(s) [{bad}]" in str(owner) and "NaN" in str(owner)
        # the run goes on: the next all-reduce commits
        out = all_reduce_all(ts, lambda t: torch.full((100,), float(t.rank)))
        assert all(torch.equal(o, torch.full((100,), 0.5)) for o in out)


def test_keygen_cli(tmp_path, capsys):
    from lowcomm.cli import main

    assert main(["keygen", "--out", str(tmp_path), "--name", "peer1"]) == 0
    assert (tmp_path / "peer1.key").exists() and (tmp_path / "peer1.key_secret").exists()
    cfg = CurveConfig(str(tmp_path / "peer1.key_secret"), str(tmp_path))
    assert len(cfg.public) == 40
    with pytest.raises(ValueError, match="keygen"):
        CurveConfig(str(tmp_path / "missing.key_secret"), str(tmp_path))


def test_bad_arguments():
    with pytest.raises(ValueError, match="endpoint"):
        ZmqTransport("localhost:5555")
    with pytest.raises(ValueError, match="chunk_bytes"):
        ZmqTransport("tcp://127.0.0.1:1", chunk_bytes=10)
    with pytest.raises(ValueError, match="min_peers"):
        Coordinator("tcp://127.0.0.1:*", min_peers=0)


def test_connect_picks_zmq_from_the_environment(monkeypatch):
    import lowcomm

    with coordinator(min_peers=1) as c:
        monkeypatch.setenv("LOWCOMM_COORDINATOR", c.endpoint)
        monkeypatch.setenv("LOWCOMM_BIND", "tcp://127.0.0.1:*")
        t = lowcomm.connect(heartbeat=0.2)
        try:
            assert isinstance(t, ZmqTransport) and t.members() == [t.rank]
            x = torch.arange(4.0)
            assert torch.equal(t.all_reduce([x]).wait(20)[0], torch.arange(4.0))
        finally:
            t.close()
