"""The ZeroMQ wire format and snapshot serialisation: round trips, strict validation, fuzzing."""

import math

import msgpack
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lowcomm.comm.zmq.state import flatten_state, snapshot_hash, unflatten_state
from lowcomm.comm.zmq.wire import (
    DTYPES,
    MAX_HEADER_BYTES,
    VERSION,
    WireError,
    check_payload,
    decode_control,
    decode_header,
    encode_control,
    encode_header,
)


def test_header_round_trip():
    raw = encode_header("data", 3, 17, 42, "rs", 1, 2, 4, "bfloat16", [10, 3], 8, "int8")
    h = decode_header(raw)
    assert (h.sender, h.epoch, h.op, h.tag, h.group, h.part, h.nparts) == (3, 17, 42, "rs", 1, 2, 4)
    assert (h.dtype, h.shape, h.offset, h.codec, h.nbytes) == ("bfloat16", (10, 3), 8, "int8", 60)
    check_payload(h, 52)
    with pytest.raises(WireError, match="overruns"):
        check_payload(h, 54)
    with pytest.raises(WireError, match="whole number"):
        check_payload(h, 3)


def _hdr(**over):
    h = {"v": VERSION, "k": "data", "s": 0, "e": 0, "o": 0, "t": "rs", "g": 0, "pi": 0, "np": 1, "d": "float32",
         "sh": [4], "off": 0, "x": None}
    h.update(over)
    return msgpack.packb({k: v for k, v in h.items() if v is not ...})


@pytest.mark.parametrize("over, msg", [
    ({"v": 1}, "version"),
    ({"k": "pickle"}, "kind"),
    ({"d": "object"}, "not allowed"),
    ({"d": "float32", "sh": [1 << 40]}, "exceeds the limit"),
    ({"sh": [-1]}, "non-negative"),
    ({"sh": [1] * 9}, "at most 8"),
    ({"sh": "4"}, "shape"),
    ({"off": 2}, "aligned"),
    ({"off": 20}, "inside"),
    ({"t": "RS!"}, "must match"),
    ({"pi": 1, "np": 1}, "'pi'"),
    ({"s": -1}, "'s'"),
    ({"s": True}, "'s'"),
    ({"o": 1.5}, "'o'"),
    ({"x": 5}, "codec"),
    ({"x": "pickle"}, "known codec"),
    ({"x": "int4:block=64;rm -rf"}, "known codec"),
    ({"zz": 1}, "unknown field"),
    ({"e": ...}, "'e'"),
])
def test_header_rejects(over, msg):
    with pytest.raises(WireError, match=msg):
        decode_header(_hdr(**over), max_part_bytes=1 << 30)


def test_header_limits_and_garbage():
    with pytest.raises(WireError, match="limit"):
        decode_header(b"\x80" * (MAX_HEADER_BYTES + 1))
    with pytest.raises(WireError, match="map"):
        decode_header(msgpack.packb([1, 2, 3]))
    with pytest.raises(WireError, match="ext"):
        decode_header(msgpack.packb(msgpack.ExtType(1, b"x")))
    with pytest.raises(WireError):
        decode_header(b"")


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=300))
def test_fuzz_header_bytes_never_crash(data):
    try:
        decode_header(data)
    except WireError:
        pass


_values = st.recursive(st.none() | st.booleans() | st.integers(-2**63, 2**64 - 1) | st.floats() | st.text(max_size=8)
                       | st.binary(max_size=8), lambda c: st.lists(c, max_size=4)
                       | st.dictionaries(st.text(max_size=3), c, max_size=4), max_leaves=10)
_fields = st.dictionaries(st.sampled_from(["v", "k", "s", "e", "o", "t", "g", "pi", "np", "d", "sh", "off", "x",
                                           "id", "op", "ok", "group", "members", "zz"]), _values, max_size=14)


@settings(max_examples=200, deadline=None)
@given(_fields)
def test_fuzz_structured_headers_and_controls(fields):
    raw = msgpack.packb(fields)
    for dec in (decode_header, decode_control):
        try:
            dec(raw)
        except WireError:
            pass


def test_control_round_trip_and_rejects():
    raw = encode_control("done", id=1, op=7, group=[0, 1, 2], ok=True, why="")
    assert decode_control(raw)["group"] == [0, 1, 2]
    with pytest.raises(WireError, match="unexpected"):
        decode_control(raw, allowed=("hb",))
    with pytest.raises(WireError, match="fields"):
        decode_control(msgpack.packb({"v": VERSION, "k": "done", "id": 1}))
    with pytest.raises(WireError, match="invalid"):
        decode_control(msgpack.packb({"v": VERSION, "k": "done", "id": 1, "op": 7, "group": ["x"], "ok": True,
                                      "why": ""}))
    with pytest.raises(WireError, match=f"speaks wire version 1, this process speaks version {VERSION}"):
        decode_control(msgpack.packb({"v": 1, "k": "done", "id": 1, "op": 7, "group": [1], "ok": True}))
    with pytest.raises(ValueError, match="needs fields"):
        encode_control("done", id=1)


def test_wire_codec_names_are_the_codecs():
    from lowcomm.codecs import CODECS
    from lowcomm.comm.zmq.wire import CODEC_NAMES

    assert set(CODECS) == CODEC_NAMES  # add a codec there, add its name here
    decode_header(_hdr(x="int4:block=64:scale=bf16"))


def test_every_dtype_is_named_consistently():
    for name, dt in DTYPES.items():
        raw = encode_header("data", 0, 0, 0, "ag", 0, 0, 1, name, [3], 0)
        h = decode_header(raw)
        assert h.nbytes == 3 * torch.empty(0, dtype=dt).element_size()


def test_snapshot_round_trip_without_pickle():
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1, betas=(0.8, 0.9))
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    state = {"model": model.state_dict(), "opt": opt.state_dict(), "n": 3, "t": (1, "a")}
    meta, tensors = flatten_state(state)
    back = unflatten_state(meta, [t.clone() for t in tensors])
    assert back["t"] == (1, "a") and back["n"] == 3
    assert back["opt"]["param_groups"][0]["betas"] == (0.8, 0.9)
    assert torch.equal(back["opt"]["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"])
    h0 = snapshot_hash(meta, tensors)
    assert h0 == snapshot_hash(meta, [t.clone() for t in tensors])
    changed = [t.clone() for t in tensors]
    changed[0].view(-1)[0] += 1
    assert snapshot_hash(meta, changed) != h0
    with pytest.raises(ValueError, match="never pickles"):
        flatten_state({"f": math.sqrt})
    with pytest.raises(WireError, match="does not exist"):
        unflatten_state(meta, tensors[:-1])
