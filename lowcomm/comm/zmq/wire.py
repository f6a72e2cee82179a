"""The ZeroMQ wire format, frame by frame. Everything a peer or the coordinator puts on a
socket is built and checked here; nothing is ever pickled.

Data messages (peer -> peer, a DEALER connected to the receiver's ROUTER; the ROUTER adds
the sender's routing id as frame 0 on receipt, which is not part of the format):

* frame 1, **header**: a msgpack map with short string keys, at most ``MAX_HEADER_BYTES``:

  ======  ==========================================================================
  ``v``   format version, int, must equal :data:`VERSION`
  ``k``   kind, always ``"data"`` (a chunk of a tensor) in this version
  ``s``   sender member id, int in [0, 2**31)
  ``e``   sender's epoch, int in [0, 2**62)
  ``o``   operation id (the transport's op sequence number), int in [0, 2**62)
  ``t``   tag naming the message's role in the operation ("rs", "ag", "qrs", ...), a
          string of at most 16 characters from ``[a-z0-9_]``
  ``g``   sub-operation index (dtype group), int in [0, 4096)
  ``pi``  index of the tensor (part) this chunk belongs to, int in [0, np)
  ``np``  number of parts in the logical message, int in [1, MAX_PARTS]
  ``d``   dtype of the part, one of :data:`DTYPES` (names, never objects)
  ``sh``  shape of the part, a list of at most 8 non-negative ints
  ``off`` byte offset of this chunk inside the part, a multiple of the element size
  ``x``   codec spec or nil: what the sender encoded with; the name must be one of
          :data:`CODEC_NAMES` (``name[:key=value...]``, checked by pattern)
  ======  ==========================================================================

* frame 2, **payload** (``"data"`` only): the raw little-endian bytes of the part from
  ``off`` to ``off + len(frame)``, sent with ``copy=False`` straight from the tensor's
  memory. ``off + len <= numel(sh) * itemsize(d)`` and ``len`` is a multiple of the
  element size; a part bigger than the chunk size (~4 MiB) travels as several messages.

``decode_header`` checks every field's type and range, the dtype against the allow-list and
the declared size against ``max_part_bytes`` *before* the receiver allocates anything;
any violation raises :class:`WireError` (never another exception), and the receiver drops
the message and logs the sender. ``zmq.MAXMSGSIZE`` on every receiving socket stops an
oversized frame inside libzmq before Python sees it.

Control messages (peer <-> coordinator, and the small peer-to-peer ``abort`` / ``fetch`` /
``snap`` messages) are one msgpack map frame (key ``v`` the format version, ``k`` the kind) whose fields are
checked against :data:`CONTROL_SCHEMA` by :func:`decode_control`. A peer's ROUTER tells them
apart by frame count: one frame after the routing id is a control message, two a data message,
anything else is dropped. Snapshot chunks (donor -> joiner) are data messages with tag
``"snap"``, ``o`` = the snapshot id and ``pi`` = the tensor's index in the snapshot.
"""

from __future__ import annotations

import math
import re
from typing import Any

import msgpack
import torch

from ..base import STAT_KEYS

__all__ = [
    "CONTROL_SCHEMA",
    "DTYPES",
    "MAX_HEADER_BYTES",
    "VERSION",
    "DataHeader",
    "WireError",
    "decode_control",
    "decode_header",
    "dtype_from_name",
    "dtype_name",
    "encode_control",
    "encode_header",
    "unpack",
]

VERSION = 2  # 2: identities (routing ids, keys) in member lists, signed verdicts, versioned controls
MAX_HEADER_BYTES = 4096
MAX_CONTROL_BYTES = 1 << 20
MAX_PARTS = 4096
MAX_NDIM = 8
MAX_INT = 1 << 62
DEFAULT_MAX_PART_BYTES = 1 << 34  # 16 GiB: a sanity bound; transports pass their own

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float64": torch.float64,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "int8": torch.int8,
    "uint8": torch.uint8,
    "int16": torch.int16,
    "int32": torch.int32,
    "int64": torch.int64,
    "bool": torch.bool,
}
_NAMES = {v: k for k, v in DTYPES.items()}
_ITEMSIZE = {k: torch.empty(0, dtype=v).element_size() for k, v in DTYPES.items()}
_TAG_RE = re.compile(r"^[a-z0-9_]{1,16}$")
_CODEC_RE = re.compile(r"^[a-z0-9_]{1,16}(:[a-z_]{1,16}=[a-z0-9_.]{1,16}){0,4}$")
CODEC_NAMES = frozenset({"identity", "none", "fp32", "bf16", "fp16", "int8", "int4", "e3m0"})  # lowcomm.codecs
DATA_KINDS = ("data",)


class WireError(ValueError):
    """A message that does not follow the wire format; the receiver drops it."""


def dtype_name(dtype: torch.dtype) -> str:
    try:
        return _NAMES[dtype]
    except KeyError:
        raise ValueError(f"dtype {dtype} cannot travel on the wire; use one of {sorted(DTYPES)}") from None


def dtype_from_name(name: str) -> torch.dtype:
    return DTYPES[name]


def itemsize(name: str) -> int:
    return _ITEMSIZE[name]


def unpack(buf: bytes | memoryview, max_bytes: int) -> Any:
    """msgpack-decode ``buf`` with every container/string limit set, no ext types."""
    if len(buf) > max_bytes:
        raise WireError(f"msgpack frame of {len(buf)} bytes exceeds the {max_bytes}-byte limit")
    try:
        return msgpack.unpackb(
            buf, raw=False, strict_map_key=True, use_list=True,
            max_str_len=max_bytes, max_bin_len=max_bytes, max_array_len=max(16, max_bytes // 2),
            max_map_len=max(16, max_bytes // 4), max_ext_len=0,
            ext_hook=_no_ext,
        )
    except WireError:
        raise
    except Exception as e:  # noqa: BLE001 - msgpack raises many types on garbage; all mean the same
        raise WireError(f"not a valid msgpack frame: {type(e).__name__}: {e}") from None


def _no_ext(code: int, data: bytes) -> Any:
    raise WireError(f"msgpack extension type {code} is not allowed")


def _int(h: dict, key: str, lo: int = 0, hi: int = MAX_INT) -> int:
    v = h.get(key)
    if type(v) is not int or not lo <= v < hi:
        raise WireError(f"header field {key!r} must be an int in [{lo}, {hi}), got {_short(v)}")
    return v


def _short(v: Any) -> str:
    r = repr(v)
    return r if len(r) <= 60 else r[:57] + "..."


class DataHeader:
    """A validated data-message header (see the module docstring for the fields)."""

    __slots__ = ("kind", "sender", "epoch", "op", "tag", "group", "part", "nparts", "dtype", "shape", "offset",
                 "codec", "nbytes")

    def __init__(self, kind, sender, epoch, op, tag, group, part, nparts, dtype, shape, offset, codec, nbytes):
        self.kind, self.sender, self.epoch, self.op, self.tag = kind, sender, epoch, op, tag
        self.group, self.part, self.nparts, self.dtype, self.shape = group, part, nparts, dtype, shape
        self.offset, self.codec, self.nbytes = offset, codec, nbytes

    def __repr__(self) -> str:
        return (f"DataHeader({self.kind} from {self.sender} op {self.op} {self.tag}/{self.group} "
                f"part {self.part}/{self.nparts} {self.dtype}{self.shape} @{self.offset})")


_KEYS = {"v", "k", "s", "e", "o", "t", "g", "pi", "np", "d", "sh", "off", "x"}


def encode_header(kind: str, sender: int, epoch: int, op: int, tag: str, group: int = 0, part: int = 0,
                  nparts: int = 1, dtype: str = "uint8", shape: tuple | list = (0,), offset: int = 0,
                  codec: str | None = None) -> bytes:
    """The header frame of a data message (no validation: the sender is trusted code)."""
    return msgpack.packb({"v": VERSION, "k": kind, "s": sender, "e": epoch, "o": op, "t": tag, "g": group,
                          "pi": part, "np": nparts, "d": dtype, "sh": list(shape), "off": offset, "x": codec})


def decode_header(buf: bytes | memoryview, max_part_bytes: int = DEFAULT_MAX_PART_BYTES) -> DataHeader:
    """Validate and decode a data header frame; raises :class:`WireError` on anything wrong."""
    h = unpack(buf, MAX_HEADER_BYTES)
    if type(h) is not dict:
        raise WireError(f"header must be a msgpack map, got {type(h).__name__}")
    extra = set(h) - _KEYS
    if extra:
        raise WireError(f"header has unknown field(s) {sorted(map(str, extra))[:5]}")
    _check_version(h.get("v"))
    kind = h.get("k")
    if kind not in DATA_KINDS:
        raise WireError(f"unknown message kind {_short(kind)}")
    sender = _int(h, "s", 0, 1 << 31)
    epoch = _int(h, "e")
    op = _int(h, "o")
    tag = h.get("t")
    if type(tag) is not str or not _TAG_RE.match(tag):
        raise WireError(f"header field 't' must match [a-z0-9_]{{1,16}}, got {_short(tag)}")
    group = _int(h, "g", 0, 4096)
    nparts = _int(h, "np", 1, MAX_PARTS + 1)
    part = _int(h, "pi", 0, nparts)
    dtype = h.get("d")
    if type(dtype) is not str or dtype not in DTYPES:
        raise WireError(f"dtype {_short(dtype)} is not allowed on the wire (allowed: {sorted(DTYPES)})")
    shape = h.get("sh")
    if type(shape) is not list or len(shape) > MAX_NDIM or any(type(s) is not int or s < 0 for s in shape):
        raise WireError(f"shape must be a list of at most {MAX_NDIM} non-negative ints, got {_short(shape)}")
    # Python ints do not overflow; the product is checked against the limit before anyone allocates.
    numel = math.prod(shape) if shape else 1
    nbytes = numel * _ITEMSIZE[dtype]
    if nbytes > max_part_bytes:
        raise WireError(f"declared part of {nbytes} bytes exceeds the limit of {max_part_bytes} bytes")
    offset = _int(h, "off")
    if offset % _ITEMSIZE[dtype] or offset > nbytes:
        raise WireError(f"chunk offset {offset} is not inside the {nbytes}-byte part or not element-aligned")
    codec = h.get("x")
    if codec is not None and (type(codec) is not str or not _CODEC_RE.match(codec)
                              or codec.split(":")[0] not in CODEC_NAMES):
        raise WireError(f"codec must be nil or a spec of a known codec ({sorted(CODEC_NAMES)}), got {_short(codec)}")
    return DataHeader(kind, sender, epoch, op, tag, group, part, nparts, dtype, tuple(shape), offset, codec, nbytes)


def _check_version(v: Any) -> None:
    if type(v) is not int or v != VERSION:
        raise WireError(f"the sender speaks wire version {_short(v)}, this process speaks version {VERSION}: "
                        f"run the same lowcomm release everywhere")


def check_payload(h: DataHeader, length: int) -> None:
    """The payload frame of a data message must fit its part and hold whole elements."""
    if length % _ITEMSIZE[h.dtype]:
        raise WireError(f"payload of {length} bytes is not a whole number of {h.dtype} elements")
    if h.offset + length > h.nbytes:
        raise WireError(f"payload [{h.offset}, {h.offset + length}) overruns the {h.nbytes}-byte part")
    if length == 0 and h.nbytes != 0:
        raise WireError("empty payload for a non-empty part")


# ---- control messages --------------------------------------------------------------------------------
def _is_int(v: Any) -> bool:
    return type(v) is int and -MAX_INT <= v < MAX_INT


def _is_str(n: int):
    return lambda v: type(v) is str and len(v) <= n


def _opt(check):
    return lambda v: v is None or check(v)


def _int_list(n: int):
    return lambda v: type(v) is list and len(v) <= n and all(_is_int(x) for x in v)


MAX_MEMBERS = 4096
RID_BYTES = 16  # a peer's random routing id, registered with the coordinator at join


def _rid(v: Any) -> bool:
    return type(v) is bytes and len(v) == RID_BYTES


def _member_id(v: Any) -> bool:
    return type(v) is int and 0 <= v < (1 << 31)


def _member_list(v: Any) -> bool:
    # [[id, announced address, public key or nil, routing id], ...]
    return (type(v) is list and len(v) <= MAX_MEMBERS and all(
        type(m) is list and len(m) == 4 and _member_id(m[0]) and _is_str(512)(m[1]) and _opt(_is_str(64))(m[2])
        and _rid(m[3]) for m in v))


def _group(v: Any) -> bool:
    return type(v) is list and 0 < len(v) <= MAX_MEMBERS and all(_member_id(x) for x in v)


def _mac(v: Any) -> bool:
    return type(v) is str and len(v) == 64


def _verdicts(v: Any) -> bool:
    # [[op, group key "1,2,3", ok, mac], ...]: verdicts the coordinator gave, re-reported after its restart
    return type(v) is list and len(v) <= 64 and all(
        type(x) is list and len(x) == 4 and _is_int(x[0]) and _is_str(8 * MAX_MEMBERS)(x[1]) and type(x[2]) is bool
        and _mac(x[3]) for x in v)


def _hashes(v: Any) -> bool:
    return type(v) is list and len(v) <= 64 and all(
        type(x) is list and len(x) == 2 and _is_int(x[0]) and _is_str(128)(x[1]) for x in v)


def _stats(v: Any) -> bool:
    # a training loop's figures (comm.base.STAT_KEYS): known keys only, finite numbers
    return type(v) is dict and len(v) <= len(STAT_KEYS) and all(
        k in STAT_KEYS and type(x) in (int, float) and x == x and abs(x) <= 1e18 for k, x in v.items())


_B = lambda v: type(v) is bool  # noqa: E731
_I = _is_int
_S = _is_str(512)

CONTROL_SCHEMA: dict[str, dict[str, Any]] = {
    # peer -> coordinator
    "join": {"id": _opt(_member_id), "addr": _S, "pub": _opt(_is_str(64)), "rid": _rid, "active": _B,
             "next_op": _I, "verdicts": _verdicts},
    "hb": {"id": _I, "hashes": _hashes, "stats": _stats},
    "leave": {"id": _I},
    "ready": {"id": _I, "op": _I},
    "done": {"id": _I, "op": _I, "group": _group, "ok": _B, "why": _is_str(256)},
    "activate": {"id": _I, "next_op": _I},
    "query": {"id": _I, "sync": _I},
    # coordinator -> peer
    "welcome": {"id": _I, "epoch": _I, "members": _member_list, "started": _B, "min_peers": _I},
    "retry": {"reason": _S},
    "state": {"epoch": _I, "members": _member_list, "started": _B, "known": _B, "recovering": _B,
              "joiners": _member_list},
    "go": {"op": _I, "epoch": _I, "members": _member_list},
    "drop": {"op": _I, "reason": _S},
    "verdict": {"op": _I, "ok": _B, "lost": _int_list(MAX_MEMBERS), "mac": _mac, "why": _is_str(1024)},
    "answer": {"sync": _I, "hash": _opt(_is_str(128)), "agreed": _B},
    "error": {"reason": _S},
    # peer <-> peer (sent as a single control frame on the data sockets)
    "abort": {"id": _I, "op": _I},
    "fetch": {"id": _I, "snap": _opt(_I), "tensor": _I},
    "snap": {"snap": _I, "meta": lambda v: type(v) is bytes and len(v) <= MAX_CONTROL_BYTES // 2,
             "tensors": lambda v: type(v) is list and len(v) <= MAX_PARTS and all(
                 type(t) is list and len(t) == 2 and t[0] in DTYPES and type(t[1]) is list
                 and len(t[1]) <= MAX_NDIM and all(type(s) is int and s >= 0 for s in t[1]) for t in v),
             "hash": _is_str(128), "next_op": _I, "sync": _I},
    "nosnap": {"reason": _S},
}


def encode_control(kind: str, **fields: Any) -> bytes:
    """A control frame; the fields must be those of ``CONTROL_SCHEMA[kind]`` (checked, so bugs surface here)."""
    schema = CONTROL_SCHEMA[kind]
    if set(fields) != set(schema):
        raise ValueError(f"control message {kind!r} needs fields {sorted(schema)}, got {sorted(fields)}")
    return msgpack.packb({"v": VERSION, "k": kind, **fields}, use_bin_type=True)


def decode_control(buf: bytes | memoryview, allowed: tuple[str, ...] | None = None,
                   max_bytes: int = MAX_CONTROL_BYTES) -> dict[str, Any]:
    """Validate a control frame against :data:`CONTROL_SCHEMA`; raises :class:`WireError`."""
    m = unpack(buf, max_bytes)
    if type(m) is not dict:
        raise WireError(f"control message must be a msgpack map, got {type(m).__name__}")
    _check_version(m.get("v"))
    kind = m.get("k")
    if type(kind) is not str or kind not in CONTROL_SCHEMA or (allowed is not None and kind not in allowed):
        raise WireError(f"unexpected control message kind {_short(kind)}")
    schema = CONTROL_SCHEMA[kind]
    fields = set(m) - {"k", "v"}
    if fields != set(schema):
        raise WireError(f"control message {kind!r} has fields {sorted(map(str, fields))[:8]}, "
                        f"expected {sorted(schema)}")
    for key, check in schema.items():
        if not check(m[key]):
            raise WireError(f"control message {kind!r}: field {key!r} is invalid ({_short(m[key])})")
    return m
