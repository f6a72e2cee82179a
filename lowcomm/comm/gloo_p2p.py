"""The point-to-point layer of the torch.distributed transport: messages over one gloo process group.

:class:`GlooP2P` gives :mod:`lowcomm.comm.p2p`'s collectives a ``_send``/``_recv``/``_commit`` over
gloo ``isend``/``irecv`` (each message preceded by a fixed-size int64 header naming its parts'
dtypes and shapes, receives posted ahead); :mod:`lowcomm.comm.torchdist` builds the transport's
replicas and cross-replica groups from it (see that module's docstring for the whole design).
"""

from __future__ import annotations

import collections
import datetime
import time
import zlib
from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist

from .base import CommError, CommTimeout, Handle, OpRecord, PeerLost
from .p2p import P2PTransport

__all__ = ["GlooP2P"]

# Wire codes for the dtypes a part may have (the header says which).
_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int8, torch.uint8,
           torch.int16, torch.int32, torch.int64, torch.bool)
_DTYPE_CODE = {d: i for i, d in enumerate(_DTYPES)}
_MAX_HEADER = 1 << 16  # int64 words; a header longer than this is corrupt
_HEADER = 32  # int64 words in a message's first (fixed-size) header; longer ones continue in a second
_ONE_SENDER = ("bc",)  # phases where one member sends to the others (no receives posted ahead)


class _Incoming:
    """A message being received: its fixed-size header, then its parts."""

    __slots__ = ("hdr", "work", "parts", "works")

    def __init__(self, hdr: torch.Tensor, work: Any):
        self.hdr, self.work = hdr, work
        self.parts: list[torch.Tensor] | None = None
        self.works: list[Any] = []


def _wire_tag(tag: tuple) -> int:
    """A gloo tag (a non-negative int32) for a message tag tuple such as ``(seq, "rs", 0)``.

    Messages between two ranks on one tag arrive in order and the algorithms send and
    receive in the same order on every rank, so a rare collision is harmless; distinct tags
    just keep the phases of an operation apart.
    """
    return zlib.crc32(repr(tag[1:]).encode()) & 0x7FFFFFFF


class GlooP2P(P2PTransport):
    """The point-to-point layer of :mod:`lowcomm.comm.p2p` over one gloo process group.

    Member ``i`` is global rank ``ranks[i]``; ``me`` is this rank's member id.
    """

    def __init__(self, group: Any, ranks: Sequence[int], me: int, timeout: float):
        super().__init__(timeout)
        self._group = group
        self._ranks = list(ranks)
        self._me = me
        self._pending: list[tuple[int, Any, list[torch.Tensor]]] = []  # (peer, work, buffers kept alive)
        self._op_lost: set[int] = set()
        self._op_error: CommError | None = None
        self._failure: BaseException | None = None
        self._op_members: list[int] = []
        self._inbox: dict[tuple[int, int], collections.deque] = {}

    @property
    def rank(self) -> int:
        return self._me

    @property
    def epoch(self) -> int:
        return 0

    def members(self) -> list[int]:
        return list(range(len(self._ranks)))

    def _describe(self, peer: int) -> str:
        return f"member {peer} (global rank {self._ranks[peer]})"

    def _on_op_start(self, seq: int) -> None:
        self._op_lost = set()
        self._op_error = None
        self._pending = []

    def _start(self, kind: str, participants: Sequence[int], body, tag: str = "") -> Handle:
        def noted(*args):
            self._op_members = list(args[2])
            try:
                return body(*args)
            except CommError as e:  # kept so that the fail-stop error can say what happened
                self._op_error = e
                raise
        return super()._start(kind, participants, noted, tag)

    def _wait(self, work: Any, peer: int, deadline: float, what: str) -> None:
        left = deadline - time.monotonic()
        try:
            if left <= 0:
                raise RuntimeError("deadline passed")
            if work.wait(timeout=datetime.timedelta(seconds=left)) is False:
                raise RuntimeError("timed out")
        except RuntimeError as e:
            self._op_lost.add(peer)
            msg = str(e).splitlines()[0] if str(e) else type(e).__name__
            if "Timed out" in msg or "timed out" in msg or "deadline" in msg:
                raise CommTimeout([peer], f"no {what} from {self._describe(peer)} before the deadline "
                                          f"({self.timeout:.0f}s): {msg}") from None
            raise PeerLost([peer], f"{self._describe(peer)} was lost during {what}: {msg}") from None

    def _post(self, fn: Any, tensor: torch.Tensor, peer: int, tag: int, what: str) -> Any:
        try:
            return fn(tensor, self._ranks[peer], group=self._group, tag=tag)
        except RuntimeError as e:
            self._op_lost.add(peer)
            raise PeerLost([peer], f"{self._describe(peer)} was lost during {what}: "
                                   f"{str(e).splitlines()[0] if str(e) else e!r}") from None

    # ---- the three primitives of P2PTransport ---------------------------------------------------
    def _send(self, peer: int, tag: tuple, parts: list[torch.Tensor], rec: OpRecord) -> None:
        """Post the sends of ``parts`` to ``peer`` (gloo sends asynchronously).

        Uncompressed buffers are not copied: the algorithms of p2p only overwrite a sent
        shard after the peer it went to has answered, and every send is waited for before
        the operation ends (:meth:`_flush_sends`).
        """
        wt = _wire_tag(tag)
        parts = [p.detach().contiguous() for p in parts]
        if tag[1] in ("qrs", "qag"):
            # Codec output is small; copy it in case a codec hands out reused buffers.
            parts = [p.clone() for p in parts]
        words = [0, len(parts)]
        for p in parts:
            if p.dtype not in _DTYPE_CODE:
                raise CommError(f"cannot send dtype {p.dtype}; supported: {[str(d) for d in _DTYPES]}")
            if p.device.type != "cpu":
                raise CommError("internal: lowcomm's gloo messages carry host tensors only")
            words += [_DTYPE_CODE[p.dtype], p.dim(), *p.shape]
        words[0] = len(words)
        if len(words) > _MAX_HEADER:
            raise CommError(f"a message of {len(parts)} tensors is too large a header; send fewer, larger tensors")
        header = torch.zeros(max(_HEADER, len(words)), dtype=torch.int64)
        header[:len(words)] = torch.tensor(words, dtype=torch.int64)
        # The first _HEADER words go as one fixed-size message (its receive is posted ahead of
        # time, see _recv); a longer header continues in a second message.
        msgs = [header[:_HEADER]] + ([header[_HEADER:]] if len(words) > _HEADER else [])
        keep = [header, *parts]
        for t in (*msgs, *[p for p in parts if p.numel() > 0]):
            work = self._post(dist.isend, t, peer, wt, f"sending {tag[1:]}")
            self._pending.append((peer, work, keep))
        # Payload only, as the local transport counts it; the header is framing.
        self.ledger.add(rec, peer, sum(p.numel() * p.element_size() for p in parts))

    def _post_header(self, peer: int, wt: int) -> None:
        hdr = torch.empty(_HEADER, dtype=torch.int64)
        work = self._post(dist.irecv, hdr, peer, wt, "a message header")
        self._inbox.setdefault((peer, wt), collections.deque()).append(_Incoming(hdr, work))

    def _advance(self, inc: _Incoming, peer: int, wt: int, deadline: float, block: bool, what: str) -> None:
        """Once ``inc``'s header is in, post the receives of its parts (so their data flows)."""
        if inc.parts is not None or (not block and not inc.work.is_completed()):
            return
        self._wait(inc.work, peer, deadline, what)
        words = inc.hdr.tolist()
        n = words[0]
        if not 2 <= n <= _MAX_HEADER:
            raise CommError(f"corrupt header (length {n}) from {self._describe(peer)}")
        if n > _HEADER:
            ext = torch.empty(n - _HEADER, dtype=torch.int64)
            self._wait(self._post(dist.irecv, ext, peer, wt, what), peer, deadline, what)
            words = words + ext.tolist()
        parts, works, i = [], [], 2
        try:
            for _ in range(words[1]):
                code, ndim = words[i], words[i + 1]
                shape = words[i + 2:i + 2 + ndim]
                i += 2 + ndim
                t = torch.empty(shape, dtype=_DTYPES[code])
                parts.append(t)
                if t.numel() > 0:
                    works.append(self._post(dist.irecv, t, peer, wt, what))
        except (IndexError, RuntimeError) as e:
            raise CommError(f"corrupt header from {self._describe(peer)}: {e}") from None
        inc.parts, inc.works = parts, works

    def _recv(self, peer: int, tag: tuple, deadline: float) -> list[torch.Tensor]:
        """Receive ``peer``'s next message on ``tag``.

        gloo moves a message only once its receive is posted, so waiting for one peer at a
        time would serialise the peers (and all ranks would queue on member 0 first). So the
        first receive of a phase posts header receives for every other member of the
        operation, and while waiting for one peer the parts of every peer whose header has
        arrived are posted too; the data of all peers flows at once, and the results are
        still consumed in member order. Receives are per (peer, tag) queues in message
        order, so one posted for a message that comes in a later operation is used then.
        """
        wt = _wire_tag(tag)
        what = f"message {tag[1:]} of operation {tag[0]}"
        if tag[1] not in _ONE_SENDER:
            for p in self._op_members:
                if p != self._me and not self._inbox.get((p, wt)):
                    self._post_header(p, wt)
        if not self._inbox.get((peer, wt)):
            self._post_header(peer, wt)
        inc = self._inbox[(peer, wt)].popleft()
        self._advance(inc, peer, wt, deadline, True, what)
        for (p, w2), q in self._inbox.items():
            if w2 == wt and q and p != peer:
                self._advance(q[0], p, wt, deadline, False, what)
        for w in inc.works:
            self._wait(w, peer, deadline, what)
        return inc.parts

    def _flush_sends(self, deadline: float) -> None:
        pending, self._pending = self._pending, []
        for peer, work, _keep in pending:
            self._wait(work, peer, deadline, "a send to it")

    def _commit(self, tag: tuple, participants: Sequence[int], ok: bool, deadline: float) -> tuple[bool, list[int]]:
        """Vote: every participant tells every other whether it succeeded and whom it lost.

        A participant that failed sends its vote without waiting for the others' (it is
        leaving: fail-stop) and drops its unfinished sends. One that succeeded waits for
        its sends and for every vote, so it never applies a result that another rank
        rejected.
        """
        parts = list(participants)
        if ok:
            try:
                self._flush_sends(deadline)
            except CommError:
                ok = False
        else:
            self._pending = []
        vote = torch.tensor([1 if ok else 0] + [1 if p in self._op_lost else 0 for p in parts], dtype=torch.int64)
        wt = _wire_tag(tag)
        sends = []
        for p in parts:
            if p != self._me:
                try:
                    sends.append((p, dist.isend(vote, self._ranks[p], group=self._group, tag=wt)))
                except RuntimeError:
                    self._op_lost.add(p)
        if not ok:
            self._note_failure(tag, self._op_lost)
            return False, sorted(self._op_lost)
        committed = True
        lost = set(self._op_lost)
        for p in parts:
            if p == self._me:
                continue
            theirs = torch.empty_like(vote)
            try:
                self._wait(self._post(dist.irecv, theirs, p, wt, "vote"), p, deadline, "the commit vote")
            except CommError:
                committed = False
                lost.add(p)
                continue
            if theirs[0].item() != 1:
                committed = False
            lost |= {q for q, flag in zip(parts, theirs[1:].tolist()) if flag}
        for p, w in sends:
            try:
                self._wait(w, p, deadline, "the commit vote")
            except CommError:
                committed = False
                lost.add(p)
        if not committed:
            self._note_failure(tag, lost)
            return False, sorted(lost)
        return True, []

    def _note_failure(self, tag: tuple, lost: set[int]) -> None:
        if self._failure is None:
            who = ", ".join(self._describe(p) for p in sorted(lost)) or "another member (it voted to abort)"
            cause = f": {self._op_error}" if self._op_error is not None else ""
            self._failure = PeerLost(sorted(lost), f"operation #{tag[0]} failed; lost {who}{cause}")
