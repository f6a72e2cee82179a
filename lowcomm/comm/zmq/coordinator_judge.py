"""The coordinator's judge (issue 13): audits of shard owners, offences counted per member key, and
ejection. A mixin of :class:`~lowcomm.comm.zmq.coordinator.Coordinator`.

**Evidence, not words.** The coordinator never sees a tensor, so it cannot look at the values
itself; what it can do is refuse to act on any single member's word. It counts an offence of a
member only in these two cases, and says which in the offence's ``evidence``:

1. *Witnessed by most owners* (non-finite values, a contribution beyond the hard bound). Under a
   robust rule each owner checks the pieces of its own shard as it received them
   (:mod:`.audits`): a piece with NaN/Inf, or with a norm above ``hard_bound`` (default 100) times
   the median norm of that shard's pieces, and reports the sender with its vote. The offence
   counts when a strict majority of the *other* members of the op's group report that sender
   (each on bytes it received itself; a ``scale`` attacker's x1e4 shows in every shard, so every
   honest owner reports it). One owner, or a minority of colluding owners, can therefore never
   make an honest member offend (at least two witnesses are needed, so groups of two never count,
   and only in ops the coordinator itself opened to that group). A sender that poisons only a few
   shards is still screened out of the aggregate by the rule, but is not counted.
2. *Found by an audit and confirmed by a majority of its auditors* (a hash mismatch, a lying
   owner). With probability ``audit`` per op (drawn here, from an unpredictable source, only after
   every member of the op voted with its hashes: no owner can know in advance), one shard ``j``
   and two auditors other than its owner are drawn. First the coordinator compares each sender's
   hash of its piece of shard ``j`` with the hash the owner reports for what it received: if they
   differ, one of the two lies about the bytes, nobody can tell which from here, so the op fails and
   nobody is named. Otherwise the auditors fetch the contributions, check them against the hashes
   and recompute the shard; a finding counts as an offence only when more than half of the auditors
   (both of two) report the same member. Any finding at all fails the op (so it is rolled back
   everywhere), but an unconfirmed one names nobody.

After ``max_offences`` (default 3) offences the member's *key* (its CURVE key; without CURVE, its
registered token, which a fresh process does not share, so ejection without CURVE only ends that
process's membership) is ejected: dropped from the run, logged, refused at join for the rest of the
run (also across coordinator restarts: the state file keeps ejected keys).

Audits need an op the coordinator opened (released by a sync-start barrier) to a group of at least
3 (two auditors besides the owner) and at most :data:`~.wire.MAX_AUDITED` members, whose votes carry
shard hashes (all-reduces).
"""

from __future__ import annotations

import logging
import secrets
from typing import Any

from .wire import encode_control

__all__ = ["Judge"]

log = logging.getLogger("lowcomm.comm.zmq.coordinator")

_KINDS = {"sender": "hash_mismatch", "owner": "lying_owner"}


class Judge:
    """Audits, offences and ejections (a mixin of Coordinator; see the module docstring)."""

    def _judge_init(self, st: dict, audit: float, max_offences: int, rng: Any) -> None:
        if isinstance(audit, bool) or not isinstance(audit, (int, float)) or not 0.0 <= audit <= 1.0:
            raise ValueError(f"audit must be a probability in [0, 1] (default 0.1), got {audit!r}")
        if isinstance(max_offences, bool) or not isinstance(max_offences, int) or max_offences < 1:
            raise ValueError(f"max_offences must be an integer >= 1 (default 3), got {max_offences!r}")
        self.audit = float(audit)
        self.max_offences = max_offences
        self._rng = rng if rng is not None else secrets.SystemRandom()
        self.ejected: dict[str, str] = dict(st.get("ejected", {}))  # identity -> why (kept in the state file)
        self.offence_counts: dict[str, int] = {}  # identity -> offences so far
        self.offences: list[dict] = []  # the last 1024: member, key, op, kind, evidence, count
        self.audits_drawn = 0
        self.verdict_whys: dict[tuple, str] = {}  # verdict key -> why it failed (as many entries as verdicts)

    def _verdict_frame(self, key: tuple) -> bytes:
        ok, lost = self.verdicts[key]
        return encode_control("verdict", op=key[0], ok=ok, lost=lost, mac=self._mac(*key, ok),
                              why=self.verdict_whys.get(key, ""))

    def _refuse_ejected(self, rid: bytes, who: str) -> bool:
        if who not in self.ejected:
            return False
        self._reject(who, "join from an ejected key")
        self._send(rid, encode_control("error", reason=f"this key was ejected from the run: {self.ejected[who]}"))
        return True

    # ---- votes and audits -----------------------------------------------------------------------
    def _record_vote(self, rid: bytes, v: Any, mid: int, m: dict) -> None:
        v.reports.setdefault(mid, (m["offences"], m["sent"], m["received"]))  # the first vote's reports count
        if v.audit is not None and v.audit[2]:
            self._send(rid, v.audit[2])  # a re-sent vote while the op is being audited

    def _on_found(self, rid: bytes, mem: Any, m: dict) -> None:
        mid, op, group = m["id"], m["op"], sorted(set(m["group"]))
        key = (op, ",".join(map(str, group)))
        if key in self.verdicts:
            self._send(rid, self._verdict_frame(key))
            return
        v = self.votes.get(key)
        if v is None or mid not in v.group or v.audit is None:
            why = f"member {mid} reports an audit finding for op {op}, which has no open audit"
            self._reject(mem.who, why)
            self._send(rid, encode_control("error", reason=why))  # e.g. we restarted mid-audit: the op fails
            return
        v.reply_to[mid] = rid
        if mid in v.audit[1]:
            v.findings.setdefault(mid, list(m["found"]))  # an auditor's first word counts
        self._check_votes()

    def _auditing(self, key: tuple, v: Any) -> bool:
        """Whether op ``key``'s verdict waits for an audit (drawn here, once, when every vote is in)."""
        if v.audit is not None:
            return not all(a in v.findings for a in v.audit[1])
        if v.drawn or not self._opened(key, v):
            return False
        v.drawn = True
        w = len(v.group)
        rep = v.reports
        if any(len(rep.get(g, ((), (), ()))[1]) != w or len(rep[g][2]) != w for g in v.group):
            return False  # not an op with shard hashes (or too large a group)
        if not (self.audit > 0 and w >= 3 and self._rng.random() < self.audit):
            return False
        self.audits_drawn += 1
        j = self._rng.randrange(w)
        owner = v.group[j]
        v.disagree = [g for i, g in enumerate(v.group) if rep[g][1][j] != rep[owner][2][i]]
        if v.disagree:
            v.audit = (j, [], b"")
            return False
        auditors = sorted(self._rng.sample([g for g in v.group if g != owner], 2))
        frame = encode_control("audit", op=key[0], shard=j, auditors=auditors,
                               hashes=[rep[g][1][j] for g in v.group])
        v.audit = (j, auditors, frame)
        log.info("op %d: auditing shard %d (owner %d) by members %s", key[0], j, owner, auditors)
        for rid in v.reply_to.values():
            self._send(rid, frame)
        return True

    def _opened(self, key: tuple, v: Any) -> bool:
        """Whether ``key`` is an op this coordinator released to exactly this group (a vote on any other
        group, which a member can open by voting, is never evidence)."""
        return key[0] in self.released and self.released[key[0]][0] == set(v.group)

    def _judge(self, key: tuple, v: Any, ok: bool) -> tuple[bool, str]:
        """Count the offences op ``key``'s votes and audit prove; the verdict (failed by any audit finding)."""
        op, why = key[0], []
        others = len(v.group) - 1
        witnessed: dict[int, list[str]] = {}  # sender -> kinds its owners saw (one report per owner and sender)
        for g, (offs, _, _) in sorted(v.reports.items()) if self._opened(key, v) else ():
            for x, k in dict((x, k) for x, k in offs if x != g and x in v.group).items():
                witnessed.setdefault(x, []).append(k)
        for s, seen in sorted(witnessed.items()):
            if len(seen) >= 2 and 2 * len(seen) > others:
                kind = max(sorted(set(seen)), key=seen.count)
                self._offend(s, op, kind, f"{len(seen)} of the {others} other members' shards received its "
                                          f"pieces {'non-finite' if kind == 'non_finite' else 'beyond the hard bound'}")
        if v.audit is None:
            return ok, ""
        j, auditors, _ = v.audit
        owner = v.group[j]
        if v.disagree:
            why.append(f"audit of shard {j}: member(s) {v.disagree} and the owner {owner} report different hashes "
                       f"of the same bytes (one side lies; nobody is named)")
        finds = [tuple(v.findings.get(a, ("failed", a))) for a in auditors]
        for f in sorted(set(finds)):
            if not f:
                continue
            n = finds.count(f)
            if f[0] in _KINDS and 2 * n > len(auditors):
                what = ("sent bytes that do not match its hash" if f[0] == "sender"
                        else "returned a result that differs from the recomputation")
                self._offend(f[1], op, _KINDS[f[0]], f"{n} of {len(auditors)} auditors found that it {what}")
                why.append(f"audit of shard {j}: member {f[1]} {what} ({n} of {len(auditors)} auditors)")
            else:
                why.append(f"audit of shard {j}: {n} of {len(auditors)} auditors report {list(f)} "
                           f"(not confirmed by a majority: nobody is named)")
        return ok and not why, "; ".join(why)

    # ---- offences -------------------------------------------------------------------------------
    def _offend(self, mid: int, op: int, kind: str, evidence: str) -> None:
        mem = self.members.get(mid)
        who = mem.who if mem is not None else self.bindings.get(mid)
        if who is None:
            return
        n = self.offence_counts[who] = self.offence_counts.get(who, 0) + 1
        if len(self.offence_counts) > 4 * self.max_members:
            for k in sorted(self.offence_counts, key=self.offence_counts.get)[:self.max_members]:
                del self.offence_counts[k]
        self.offences.append({"member": mid, "key": self.name(who), "op": op, "kind": kind,
                              "evidence": evidence, "count": n})
        del self.offences[:-1024]
        log.warning("offence %d of %d by member %d (%s) in op %d: %s: %s", n, self.max_offences, mid,
                    self.name(who), op, kind, evidence)
        self._event("offence", mid, op, 0, f"{kind}: {evidence}")
        if n >= self.max_offences and who not in self.ejected:
            self.ejected[who] = f"{n} offences, the last {kind} in op {op} ({evidence})"
            while len(self.ejected) > 4096:
                self.ejected.pop(next(iter(self.ejected)))
            log.warning("ejected %s (member %d) for the rest of the run: %s", self.name(who), mid, self.ejected[who])
            self._drop(mid, f"ejected: {self.ejected[who]}", event="ejected")
            self._persist()
