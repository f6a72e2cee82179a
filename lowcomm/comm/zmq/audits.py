"""A ZeroMQ peer's side of issue 13's defences: what it reports with its commit vote, and its part
in an audit of a shard owner. A mixin of :class:`~lowcomm.comm.zmq.peer.ZmqTransport`.

With every all-reduce vote (``done``, :mod:`.wire`) a member reports, for groups of at most
:data:`~.wire.MAX_AUDITED` members:

- ``sent``: per shard ``j`` (member order), the hash of the bytes it sent to owner ``j`` (its
  own shard included), over all dtype groups of the op;
- ``received``: as the owner of its own shard, the hash of the bytes each member sent it, computed
  as they arrive (so the coordinator can check that the sender and the owner speak of the same
  bytes before anybody recomputes anything);
- ``offences``: as the owner, under a robust rule, each sender whose piece of this shard it
  *itself received* non-finite, or with a norm above ``hard_bound`` x the median norm of the
  shard's pieces (its own witness; the coordinator counts an offence only when most owners agree,
  see :mod:`.coordinator_judge`).

When the coordinator draws the op for an audit it answers the vote with ``audit`` (shard ``j``,
two auditors, the senders' hashes of shard ``j``): every member sends its contribution to shard
``j`` to each auditor (tag ``"aud"``); an auditor checks each contribution against its sender's
hash and recomputes the shard with the op's rule (:func:`lowcomm.comm.audit.plain_audit` /
:func:`~lowcomm.comm.audit.robust_audit`, the code the local transport's audits use), then sends
its finding (``found``): ``["sender", id]`` for bytes that do not match their hash, ``["owner",
id]`` for a result that differs from its recomputation, ``["failed", id]`` when it could not
finish, ``[]`` when all is well. Members that are not auditors send ``found`` with ``[]`` and wait
for the verdict like everyone else.
"""

from __future__ import annotations

import hashlib
import logging
import math
from collections.abc import Sequence
from typing import Any

import torch

from ..aggregate import lower_median
from ..audit import digest
from ..base import CommError
from .wire import HASH_CHARS, MAX_AUDITED, encode_control

__all__ = ["Audits"]

log = logging.getLogger("lowcomm.comm.zmq.peer")



def _short(parts: Sequence[torch.Tensor]) -> str:
    return digest(parts)[:HASH_CHARS]


def _raw(t: torch.Tensor):
    return t.detach().contiguous().reshape(-1).view(torch.uint8).numpy()


class Audits:
    """Hashes, witnessed offences and audits (a mixin of ZmqTransport; see the module docstring)."""

    def _audit_reset(self) -> None:
        """A new op starts: forget the last one's audit material."""
        self._aud: list[tuple] = []  # per dtype group: (sent, results, decode, expected) of lowcomm.comm.audit
        self._rx_hash: dict[int, Any] = {}  # sender -> running sha256 of what it sent for our shard
        self._witness: dict[int, str] = {}  # sender -> offence kind this owner saw in its shard

    # ---- hooks of P2PTransport's all-reduce --------------------------------------------------------
    def _auditing(self) -> bool:
        return True  # every vote carries hashes; the coordinator decides which ops are audited

    def _audit(self, seq: Any, rec: Any, members: Sequence[int], deadline: float, args: tuple) -> None:
        self._aud.append(args)  # audited (maybe) after the vote, see _commit

    def _on_screen(self, seq: Any, members: Sequence[int], screen: Any, parts: list[torch.Tensor]) -> None:
        """As an owner: witness the senders whose pieces of this shard, as received, are non-finite or
        beyond the hard bound (hard_bound x the median of this shard's piece norms)."""
        ratio = (screen.bound / screen.median if 0 < screen.median < math.inf and math.isfinite(screen.bound)
                 else 100.0)
        norms = [float(p.double().norm()) for p in parts]
        finite = [n for n in norms if math.isfinite(n)]
        med = lower_median(finite) if finite else math.inf
        for i, n in enumerate(norms):
            if members[i] == self._id:
                continue
            if not math.isfinite(n):
                self._witness[members[i]] = "non_finite"
            elif n > ratio * med:
                self._witness[members[i]] = "bound"

    def _hash_in(self, peer: int, t: torch.Tensor, head: bool) -> None:
        """Bytes of ``peer``'s piece of our shard as they arrive (``head``: the first chunk of a part)."""
        h = self._rx_hash.get(peer)
        if h is None:
            h = self._rx_hash[peer] = hashlib.sha256()
        if head:
            h.update(str(t.dtype).encode())
        h.update(_raw(t))

    # ---- the vote ----------------------------------------------------------------------------------
    def _vote_fields(self, group: Sequence[int]) -> dict[str, Any]:
        offences = [[s, k] for s, k in sorted(self._witness.items()) if s in group][:MAX_AUDITED]
        if not self._aud or len(group) > MAX_AUDITED:
            return {"offences": offences, "sent": [], "received": []}
        w = len(group)
        me = list(group).index(self._id)
        sent = [_short([p for a in self._aud for p in a[0][j]]) for j in range(w)]
        received = [sent[me] if g == self._id else
                    (self._rx_hash[g].hexdigest()[:HASH_CHARS] if g in self._rx_hash else "0" * HASH_CHARS)
                    for g in group]
        return {"offences": offences, "sent": sent, "received": received}

    def _audit_part(self, seq: int, group: list[int], m: dict, rec: Any, deadline: float) -> bytes:
        """Our part in the audit the coordinator drew (message ``m``); returns our ``found`` frame."""
        j, auditors, hashes = m["shard"], m["auditors"], m["hashes"]
        found: list = []
        if len(hashes) != len(group) or not 0 <= j < len(group):
            found = ["failed", group[0]]
        else:
            for a in auditors:
                if a != self._id:
                    for gi, args in enumerate(self._aud):
                        self._send(a, (seq, "aud", gi), args[0][j], rec)
            if self._id in auditors:
                found = self._recompute(seq, group, j, hashes, deadline)
        if found:
            log.warning("member %d audited shard %d of op %d: %s", self._id, j, seq, found)
        return encode_control("found", id=self._id, op=seq, group=group, found=found)

    def _recompute(self, seq: int, group: list[int], j: int, hashes: list[str], deadline: float) -> list:
        contribs: list[list[torch.Tensor]] = [[] for _ in self._aud]
        for i, peer in enumerate(group):
            try:
                parts = [a[0][j] if peer == self._id else self._recv(peer, (seq, "aud", gi), deadline)
                         for gi, a in enumerate(self._aud)]
            except CommError:
                return ["failed", peer]
            if _short([p for ps in parts for p in ps]) != hashes[i]:
                return ["sender", peer]
            try:
                for gi, a in enumerate(self._aud):
                    contribs[gi].append(a[2](list(parts[gi]), j))
            except (ValueError, RuntimeError, IndexError, TypeError) as e:
                log.warning("audit of op %d: the contribution of member %d does not decode: %s", seq, peer, e)
                return ["failed", peer]
        for gi, a in enumerate(self._aud):
            if digest(a[3](j, contribs[gi])) != digest(a[1][j]):
                return ["owner", group[j]]
        return []
