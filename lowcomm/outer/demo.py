"""DeMo: Decoupled Momentum Optimization (Peng, Quesnelle, Kingma 2024, arXiv 2411.19870).

Every step, for every parameter tensor (the paper's Algorithm 1; the reference code is
bloc97/DeMo ``demo.py``):

1. momentum: ``delta = decay * delta + lr * g`` (``lr`` of the parameter's group, decay 0.999);
2. orthonormal DCT-II of ``delta`` over chunks (:mod:`lowcomm.dct`: chunk edge = the largest
   divisor of each dimension <= ``chunk``; a 2-D block is one chunk);
3. keep the ``topk`` coefficients of each chunk with the largest magnitude (k is clamped to
   the chunk size);
4. error feedback: subtract what was actually sent from ``delta``: the kept coefficients
   after their cast to the wire type (bf16, or scale*sign for 1-bit values), inverse-DCT'd;
5. one all-gather of every worker's indices and values (all tensors in one message);
6. decode: each coefficient is the mean over the workers that selected it (the reference's
   ``scatter_reduce(..., "mean", include_self=False)``, not a division by W) and 0 where
   nobody did; then the inverse DCT;
7. the result (its sign when ``sign=True``, as in the reference, which then runs plain SGD)
   becomes the gradient of the inner optimizer, after DeMo's own decoupled weight decay
   ``p *= 1 - lr * weight_decay``. With sign and inner SGD: ``p -= lr * sign(G)``.

The momentum is stored in DCT space (``opt.delta``: per tensor, ``(chunks, chunk_numel)``;
``opt.momentum()`` gives it in parameter space): ``DCT(delta) <- decay*DCT(delta) +
DCT(lr*g)``, and error feedback is a sparse subtraction of the sent coefficients. Since the
DCT is linear and orthonormal this is the paper's update up to rounding, with one forward
transform (of the gradient) and one inverse (of the decoded aggregate) per step instead of
the reference's three.

Determinism: in one worker's payload every (tensor, chunk, index) is distinct, so a decode
scatter adds at most one value to each coefficient; the scatters run in member order
(``((v_a + v_b) + v_c) / count``), so every worker computes the same bits on CPU and GPU.

Wire format, one all-gather per step: indices as the smallest integer type that holds a
chunk's positions (uint8 up to 256 coefficients per chunk, int16 up to 32768, else int32),
one tensor per index type; values as bf16 (default), fp32, the parameters' dtype
(``values="param"``) or 1 bit (``values="sign"``: the signs packed 8 per byte plus one bf16
scale per chunk, the mean magnitude of its kept values, as in scaled-sign compression with
error feedback, Karimireddy et al. 2019). Per worker and step the local/ZeroMQ all-gather
sends this payload to each of the W-1 peers.

Inner optimizer: the reference is DeMo + plain SGD. An inner SGD must have no momentum
(DeMo's ``delta`` is the momentum) and no weight decay (DeMo's is decoupled: pass
``weight_decay`` to DeMo); both raise ValueError. With AdamW (or any other optimizer) as
inner, DeMo replaces the gradient by the decoded aggregate and AdamW runs on it unchanged:
use ``sign=False`` so AdamW's second moment sees magnitudes (with sign=True every entry is
+-1 or 0 and AdamW degenerates to a smoothed sign descent), and give the weight decay to
AdamW, not to DeMo (both set raises ValueError: it would decay twice). Since ``delta`` is
scaled by ``lr``, AdamW's scale invariance makes the result independent of the lr's size but
not of its schedule.

Failure: a failed all-gather (``CommError``) leaves everything as before the step: the new
momentum is built in a second buffer and only swapped in on success, and the parameters and
the inner optimizer are not touched. The failure is counted, logged and recorded in
``sync_log`` like any sync (or raised with ``strict=True``).

Robust aggregation (``aggregate="clip"``): applied per sender at decode
(:func:`lowcomm.outer.robust.sender_factors`): a sender whose values are non-finite or whose norm
(of its sent values; the DCT is orthonormal, so this is the norm of what it sent in parameter
space) is above ``hard_bound`` x the median is left out of every coefficient's mean; the others'
values are scaled by ``min(1, clip_ratio * median / norm)`` before the mean. ``trimmed_mean`` and
``centered_clip`` would need every sender's dense vector: ValueError.

Compute accounting: DeMo's own work (momentum, DCT, top-k, error feedback before the
exchange; decode and inverse DCT after it) runs inside ``opt.compute_guard()`` (a context
manager factory, ``contextlib.nullcontext`` by default) and its seconds accumulate in
``opt.timings``; a simulator that serializes compute can set the guard to its lock so this
work is charged as compute. The inner step and the wait for the exchange are outside it.

Memory: fp32 momentum and its double buffer (2P), gradient, coefficient, accumulator and
count buffers (4P) and two scratch buffers of the largest 2-D tensor. The momentum is kept in fp32
whatever the parameter dtype (decay 0.999 would round away in bf16).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from ..comm.base import CommError, Handle, Transport
from ..dct import ChunkedDCT, chunk_size
from ..sparse import pack_bitvec, unpack_bitvec
from .base import OuterOptimizer, PendingSync, SyncRecord, check_float, check_int
from .registry import StrategyConfig, register_strategy
from .robust import resolve_aggregate, sender_factors

__all__ = ["DeMo", "DeMoConfig", "index_dtype"]

_VALUES = ("bf16", "fp32", "param", "sign")


def index_dtype(chunk_numel: int) -> torch.dtype:
    """The smallest integer dtype that holds positions ``0 .. chunk_numel - 1``."""
    if chunk_numel <= 256:
        return torch.uint8
    if chunk_numel <= 2 ** 15:
        return torch.int16
    if chunk_numel <= 2 ** 31:
        return torch.int32
    return torch.int64


_IDX_ORDER = {torch.uint8: 0, torch.int16: 1, torch.int32: 2, torch.int64: 3}


class DeMo(OuterOptimizer):
    """DeMo around an inner optimizer (plain SGD in the paper); see the module docstring.

    Args:
        inner: inner optimizer; ``torch.optim.SGD(params, lr=...)`` (no momentum, no weight decay)
            reproduces the paper. Its group lr is DeMo's lr.
        transport: where the compressed momenta are all-gathered.
        topk: coefficients kept per chunk (clamped to the chunk size; paper 32).
        chunk: target chunk edge (paper 64; a 2-D chunk has up to chunk*chunk coefficients).
        decay: momentum decay beta in [0, 1) (paper 0.999).
        sign: step with the sign of the decoded aggregate (paper: True).
        weight_decay: DeMo's decoupled weight decay, ``p *= 1 - lr*weight_decay`` before the update.
        values: wire type of the kept coefficients: "bf16", "fp32", "param" (the parameters'
            dtype) or "sign" (1 bit each plus a bf16 scale per chunk).
        strict: raise on a failed exchange instead of skipping the step.
        timeout: seconds an exchange may wait.
        aggregate: ``"mean"`` (default) or ``"clip"``, applied per sender at decode.
    """

    sharding_reason = ("its DCT chunks and top-k selection are laid over whole tensors; on FSDP shards they would "
                       "fall across shard boundaries and change the algorithm")

    def __init__(self, inner: torch.optim.Optimizer, *, transport: Transport, topk: int = 32, chunk: int = 64,
                 decay: float = 0.999, sign: bool = True, weight_decay: float = 0.0, values: str = "bf16",
                 strict: bool = False, timeout: float | None = None, aggregate: Any = "mean"):
        super().__init__(inner, transport=transport, strict=strict, timeout=timeout, aggregate=aggregate)
        self.topk = check_int("topk", topk, 1, "it is the number of DCT coefficients kept per chunk (paper: 32)")
        self.chunk = check_int("chunk", chunk, 1, "it is the target chunk edge (paper: 64)")
        self.decay = check_float("decay", decay, 0.0, 1.0)
        if self.decay >= 1.0:
            raise ValueError(f"decay must be < 1 (paper: 0.999), got {decay!r}")
        self.sign = bool(sign)
        self.weight_decay = check_float("weight_decay", weight_decay, 0.0)
        if values not in _VALUES:
            raise ValueError(f"values must be one of {_VALUES}, got {values!r}")
        self.values = values
        self._check_inner()
        params = self.params
        if values == "param":
            dtypes = {p.dtype for p in params}
            if len(dtypes) != 1:
                raise ValueError(f"values='param' needs one parameter dtype, found {sorted(map(str, dtypes))}; "
                                 f"use values='fp32' or 'bf16'")
            self._val_dtype = params[0].dtype
        else:
            self._val_dtype = {"bf16": torch.bfloat16, "fp32": torch.float32, "sign": torch.bfloat16}[values]
        self.timings = {"encode": 0.0, "decode": 0.0, "steps": 0}  # seconds of DeMo's own compute
        self.last_offences: dict[int, str] = {}  # senders screened out at the last decode (position -> why)
        self.screened: list[tuple[int, int, str]] = []  # every screening: (step, member id, why)
        self.broadcast_initial()
        self._build(params)

    def detections(self) -> list[dict[str, Any]]:
        return [{"member": m, "kind": why, "step": st} for st, m, why in self.screened]

    def resolve_aggregate(self, aggregate: Any) -> Any:
        return resolve_aggregate(self.transport, aggregate, allowed=("mean", "clip"), who="DeMo")

    # ---- setup ---------------------------------------------------------------------------------
    def _check_inner(self) -> None:
        for i, (inner, g) in enumerate((o, g) for o in self.inners for g in o.param_groups):
            if isinstance(inner, torch.optim.SGD):
                if g.get("momentum", 0) != 0:
                    raise ValueError(f"inner SGD group {i} has momentum={g['momentum']}; DeMo's delta is the "
                                     f"momentum: build torch.optim.SGD(params, lr=...) without momentum")
                if g.get("weight_decay", 0) != 0:
                    raise ValueError(f"inner SGD group {i} has weight_decay={g['weight_decay']}; DeMo applies its "
                                     f"own decoupled weight decay: pass weight_decay to DeMo and 0 to SGD")
            elif self.weight_decay != 0 and g.get("weight_decay", 0) != 0:
                raise ValueError(f"both DeMo (weight_decay={self.weight_decay}) and the inner "
                                 f"{type(inner).__name__} (group {i}: {g['weight_decay']}) decay the weights; "
                                 f"set one of them to 0")

    def _build(self, params: list[torch.Tensor]) -> None:
        dev = params[0].device
        if any(p.device != dev for p in params):
            raise ValueError("DeMo needs every parameter on one device")
        f32 = torch.float32
        # Group tensors that can be transformed together: 1-D tensors with the same chunk edge are
        # concatenated; 2-D views (R, S) with the same column count and chunk edges are stacked along
        # rows. Chunk edges divide each tensor's own dimensions, so no chunk straddles two tensors and
        # the result is the per-tensor transform (one matmul per group instead of one per tensor).
        keys: dict[tuple, list[int]] = {}
        for i, p in enumerate(params):
            n = p.numel()
            if p.dim() >= 2:
                rows, cols = p.shape[0], n // p.shape[0]
                key: tuple = (2, chunk_size(rows, self.chunk), chunk_size(cols, self.chunk), cols)
            else:
                key = (1, chunk_size(n, self.chunk))
            keys.setdefault(key, []).append(i)
        chunk_numel = {key: (key[1] * key[2] if key[0] == 2 else key[1]) for key in keys}
        # Wire order: groups sorted (stably) by index dtype, so each index dtype is one run.
        order = sorted(keys, key=lambda kk: _IDX_ORDER[index_dtype(chunk_numel[kk])])
        self._offsets: list[int] = [0] * len(params)
        self._groups: list[tuple[int, int, ChunkedDCT, int]] = []  # (start, end, transform, k), wire order
        off = 0
        big = max([sum(params[i].numel() for i in keys[kk]) for kk in order if kk[0] == 2], default=0)
        scratch = (torch.empty(big, dtype=f32, device=dev), torch.empty(big, dtype=f32, device=dev)) if big else None
        self._idx_groups: list[tuple[torch.dtype, int]] = []  # (dtype, number of indices), in wire order
        base, chunk_of, span, nchunks = [], [], [], 0
        for kk in order:
            start = off
            for i in keys[kk]:
                self._offsets[i] = off
                off += params[i].numel()
            if kk[0] == 2:
                shape: tuple[int, ...] = ((off - start) // kk[3], kk[3])
                plan = ChunkedDCT(shape, self.chunk, f32, dev, scratch=scratch, edges=(kk[1], kk[2]))
            else:
                plan = ChunkedDCT((off - start,), self.chunk, f32, dev, edges=(kk[1],))
            k = min(self.topk, plan.chunk_numel)
            self._groups.append((start, off, plan, k))
            dt, n = index_dtype(plan.chunk_numel), plan.num_chunks * k
            if self._idx_groups and self._idx_groups[-1][0] == dt:
                self._idx_groups[-1] = (dt, self._idx_groups[-1][1] + n)
            else:
                self._idx_groups.append((dt, n))
            rows_ = torch.arange(plan.num_chunks, device=dev, dtype=torch.int64)
            # Flat position of coefficient (chunk r, index j) of this group in the model-wide vector.
            base.append((start + rows_ * plan.chunk_numel).repeat_interleave(k))
            chunk_of.append((nchunks + rows_).repeat_interleave(k))
            span.append(torch.full((plan.num_chunks * k,), plan.chunk_numel, device=dev, dtype=torch.int64))
            nchunks += plan.num_chunks
        self._base = torch.cat(base)
        self._span = torch.cat(span)  # each index on the wire must lie in [0, its chunk's size)
        self._chunk_of = torch.cat(chunk_of)  # for 1-bit values: the chunk (scale) of each value
        self._nvalues, self._nchunks = self._base.numel(), nchunks
        self._ones = torch.ones(self._nvalues, dtype=f32, device=dev)
        total = off
        self._coef = torch.zeros(total, dtype=f32, device=dev)
        self._acc = torch.zeros(total, dtype=f32, device=dev)
        self._cnt = torch.zeros(total, dtype=f32, device=dev)
        self._spatial = torch.zeros(total, dtype=f32, device=dev)  # lr * g in the grouped layout
        # The momentum is kept in DCT space (see the class docstring), with its double buffer.
        self._delta_flat = torch.zeros(total, dtype=f32, device=dev)
        self._work_flat = torch.zeros(total, dtype=f32, device=dev)
        self._shapes = [p.shape for p in params]
        numel_of = {i: plan.chunk_numel for (start, end, plan, _) in self._groups for i in range(len(params))
                    if start <= self._offsets[i] < end}
        self._coef_shapes = [torch.Size((p.numel() // numel_of[i], numel_of[i])) for i, p in enumerate(params)]
        self.delta = self._views(self._delta_flat, self._coef_shapes)
        self._work = self._views(self._work_flat, self._coef_shapes)

    def _views(self, flat: torch.Tensor, shapes: list[torch.Size] | None = None) -> list[torch.Tensor]:
        shapes = self._shapes if shapes is None else shapes
        return [flat[o:o + s.numel()].view(s) for o, s in zip(self._offsets, shapes)]

    @torch.no_grad()
    def momentum(self) -> list[torch.Tensor]:
        """The momentum ``delta`` of every parameter in parameter space (new tensors, parameter shapes)."""
        out = torch.empty_like(self._delta_flat)
        for g in range(len(self._groups)):
            self._groups[g][2].decode(self._group(self._delta_flat, g), out=self._group(out, g, False))
        return self._views(out)

    def _group(self, buf: torch.Tensor, g: int, coefficients: bool = True) -> torch.Tensor:
        start, end, plan, _ = self._groups[g]
        return buf[start:end].view((plan.num_chunks, plan.chunk_numel) if coefficients else plan.shape)

    def payload_bytes(self) -> int:
        """Bytes of one worker's payload (what it sends to each peer every step)."""
        idx = sum(n * dt.itemsize for dt, n in self._idx_groups)
        if self.values == "sign":
            return idx + -(-self._nvalues // 8) + 2 * self._nchunks
        return idx + self._nvalues * self._val_dtype.itemsize

    # ---- the step ----------------------------------------------------------------------------------
    def step(self, closure: Any = None) -> Any:
        """Momentum, compress, all-gather, decode, then the inner step (skipped if the exchange fails)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self.local_step += 1
        self._exchange_and_step()
        return loss

    @torch.no_grad()
    def _exchange_and_step(self) -> bool:
        params = self.params
        lrs = [g["lr"] for g in self.inner.param_groups for _ in g["params"]]
        with self.compute_guard():
            t0 = time.perf_counter()
            handle, pending = self._encode_and_launch(params, lrs)
            self.timings["encode"] += time.perf_counter() - t0
        try:
            gathered = handle.wait(self.timeout)
        except CommError as e:
            self.handle_failure(pending, e, rollback=lambda _p: None)  # nothing was applied; delta is untouched
            return False
        with self.compute_guard():
            t0 = time.perf_counter()
            self._decode(gathered)
            for g in range(len(self._groups)):
                self._groups[g][2].decode(self._group(self._acc, g), out=self._group(self._coef, g, False))
            if self.sign:
                self._coef.sign_()
            update = self._views(self._coef)
            have = [i for i, p in enumerate(params) if p.grad is not None and p.grad.dtype == update[i].dtype]
            torch._foreach_copy_([params[i].grad for i in have], [update[i] for i in have])
            for i, p in enumerate(params):
                if p.grad is None:
                    p.grad = update[i].to(p.dtype, copy=True)
                elif p.grad.dtype != update[i].dtype:
                    p.grad.copy_(update[i])
            if self.weight_decay:
                torch._foreach_mul_(params, [1.0 - lr * self.weight_decay for lr in lrs])
            self.timings["decode"] += time.perf_counter() - t0
            self.timings["steps"] += 1
        self.inner.step()
        self._delta_flat, self._work_flat = self._work_flat, self._delta_flat
        self.delta, self._work = self._work, self.delta
        self.sync_count += 1
        self.sync_log.append(self._record(pending, True))
        return True

    def _encode_and_launch(self, params: list[torch.Tensor], lrs: list[float]) -> tuple[Handle, PendingSync]:
        """New momentum, its top-k DCT coefficients, launch the all-gather, error feedback."""
        # DCT(delta_new) = decay * DCT(delta) + DCT(lr * g), built beside delta so a failed step keeps it.
        spatial = self._views(self._spatial)
        for i, p in enumerate(params):
            if p.grad is None:
                spatial[i].zero_()
            else:
                torch.mul(p.grad, lrs[i], out=spatial[i])
        idx_parts, val_parts, scale_parts = [], [], []
        for g, (_, _, plan, k) in enumerate(self._groups):
            coef = plan.encode(self._group(self._spatial, g, False), out=self._group(self._work_flat, g))
            coef.add_(self._group(self._delta_flat, g), alpha=self.decay)
            mag = torch.abs(coef, out=self._group(self._acc, g))
            idx = torch.topk(mag, k, dim=1, largest=True, sorted=False).indices
            val = coef.gather(1, idx)
            idx_parts.append(idx.reshape(-1))
            val_parts.append(val.reshape(-1))
            if self.values == "sign":  # scaled sign: one scale per chunk, the mean |kept value|
                scale_parts.append(val.abs().mean(1))
        idx_own = torch.cat(idx_parts)
        vals = torch.cat(val_parts)
        payload = []
        start = 0
        for dt, n in self._idx_groups:
            payload.append(idx_own[start:start + n].to(dt))
            start += n
        if self.values == "sign":
            scales = torch.cat(scale_parts).to(torch.bfloat16)
            pos = vals >= 0
            payload += [pack_bitvec(pos), scales]
            sent = self._sign_values(pos, scales)
        else:
            wire = vals.to(self._val_dtype)
            payload.append(wire)
            sent = wire.to(torch.float32)
        gidx_own = idx_own + self._base

        try:
            # every member's payload is checked before the commit vote: a malformed one fails the
            # sync everywhere (rolled back, the sender named) instead of diverging the peers after it
            handle = self.transport.all_gather(payload, validate=self._parse)
        except CommError as e:  # cannot even start (e.g. no longer a member): fail like in flight
            handle = Handle.failed(e)
        pending = PendingSync(None, handle, [], self.local_step)  # DeMo keeps no global copy: no unit

        # Error feedback: delta_new -= what was sent. In DCT space that is a sparse subtraction at
        # distinct positions (the paper subtracts IDCT(sent) in parameter space; the DCT is linear
        # and orthonormal, so this is the same update and saves one inverse transform per step).
        self._work_flat.scatter_add_(0, gidx_own, sent.neg())
        return handle, pending

    def _record(self, pending: PendingSync, committed: bool) -> SyncRecord:
        return SyncRecord("all", pending.launch_step, self.local_step,
                          [] if pending.handle.op_id is None else [pending.handle.op_id], committed)

    def _sign_values(self, pos: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
        s = scales.to(torch.float32)[self._chunk_of]
        return torch.where(pos, s, -s)

    def _parse(self, parts: list[torch.Tensor], member: int) -> tuple[torch.Tensor, torch.Tensor]:
        """One member's payload -> (flat coefficient positions, fp32 values)."""
        nidx = len(self._idx_groups)
        expect = nidx + (2 if self.values == "sign" else 1)
        if len(parts) != expect:
            raise ValueError(f"member {member} sent {len(parts)} tensors, expected {expect}: every worker must run "
                             f"DeMo with the same model, topk, chunk and values")
        for (dt, n), t in zip(self._idx_groups, parts):
            if t.dtype != dt or t.numel() != n:
                raise ValueError(f"member {member} sent {t.numel()} indices of {t.dtype}, expected {n} of {dt}: "
                                 f"every worker must run DeMo with the same model, topk and chunk")
        dev = self._base.device
        raw = torch.cat([t.to(device=dev, dtype=torch.int64) for t in parts[:nidx]])
        if raw.numel() and (bool((raw < 0).any()) or bool((raw >= self._span).any())):
            raise ValueError(f"member {member} sent coefficient indices outside their chunks")
        idx = raw + self._base
        if self.values == "sign":
            packed, scales = parts[nidx].to(dev), parts[nidx + 1].to(dev)
            if packed.numel() != -(-self._nvalues // 8) or scales.numel() != self._nchunks:
                raise ValueError(f"member {member} sent a 1-bit payload of the wrong size")
            vals = self._sign_values(unpack_bitvec(packed, self._nvalues), scales)
        else:
            v = parts[nidx]
            if v.numel() != self._nvalues:
                raise ValueError(f"member {member} sent {v.numel()} values, expected {self._nvalues}")
            vals = v.to(device=dev, dtype=torch.float32)
        return idx, vals

    def _decode(self, gathered: list[list[torch.Tensor]]) -> None:
        """Mean over the members that selected each coefficient, into ``self._acc`` (0 where none did)."""
        members = self.transport.members()
        self._acc.zero_()
        self._cnt.zero_()
        parsed = [self._parse(list(parts), members[j] if j < len(members) else j) for j, parts in enumerate(gathered)]
        norms = [float(v.double().norm()) if self.aggregate.robust else 0.0 for _, v in parsed]
        weights, self.last_offences = sender_factors(self.aggregate, norms)
        self.screened += [(self.local_step, members[i] if i < len(members) else i, why)
                          for i, why in self.last_offences.items()]
        for (idx, vals), wt in zip(parsed, weights):
            if wt == 0.0:  # screened out (non-finite or beyond the hard bound): in no coefficient's mean
                continue
            # Positions are distinct within one payload, so each call adds at most once per coefficient:
            # the sums are formed in member order on any device.
            self._acc.scatter_add_(0, idx, vals if wt == 1.0 else vals * wt)
            self._cnt.scatter_add_(0, idx, self._ones)
        self._acc.div_(self._cnt.clamp_(min=1.0))

    # ---- state -------------------------------------------------------------------------------------
    def extra_state_dict(self) -> dict[str, Any]:
        # Copies: the momentum is double-buffered, so the live tensors are reused as scratch later.
        return {"delta_dct": [d.clone() for d in self.delta]}

    @torch.no_grad()
    def load_extra_state_dict(self, sd: dict[str, Any]) -> None:
        delta = sd.get("delta_dct")
        if delta is None or len(delta) != len(self.delta):
            raise ValueError(f"state has no DeMo momentum for {len(self.delta)} tensors; pass what "
                             f"DeMo.state_dict() returned for the same model")
        for d, s in zip(self.delta, delta):
            if d.shape != s.shape:
                raise ValueError(f"DeMo momentum shape {tuple(s.shape)} does not match parameter {tuple(d.shape)}")
            d.copy_(s)

    def __repr__(self) -> str:
        return (f"DeMo(inner={type(self.inner).__name__}, world_size={self.transport.world_size}, topk={self.topk}, "
                f"chunk={self.chunk}, values={self.values!r}, payload={self.payload_bytes()} B)")


@dataclass
class DeMoConfig(StrategyConfig):
    """DeMo's knobs (defaults: the paper's, arXiv 2411.19870); it wraps plain SGD, as the paper does."""

    inner: ClassVar[str | None] = "sgd"

    topk: int = 32  # DCT coefficients kept per chunk
    chunk: int = 64  # target chunk edge
    decay: float = 0.999  # momentum decay beta
    sign: bool = True  # step with the sign of the decoded aggregate
    weight_decay: float = 0.0  # DeMo's decoupled weight decay (0 with an inner AdamW that decays)
    values: str = "bf16"  # wire type of the kept coefficients: bf16 | fp32 | param | sign
    aggregate: str = "mean"  # "mean" or "clip" (with knobs, e.g. "clip:clip_ratio=2"), applied per sender at decode

    def build(self, inner, transport, model=None) -> DeMo:
        return DeMo(inner, transport=transport, topk=self.topk, chunk=self.chunk, decay=self.decay, sign=self.sign,
                    weight_decay=self.weight_decay, values=self.values, aggregate=self.aggregate)


register_strategy("demo", DeMoConfig,
                  "DeMo: every step, all-gather the top-k DCT coefficients of each chunk of the momentum; "
                  "sign-SGD on their mean")
