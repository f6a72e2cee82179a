"""SparseLoCo (Sarfi et al. 2025, arXiv 2508.15706): sparse, 2-bit, error-fed pseudo-gradients.

Every ``sync_every`` (H) inner steps, on each worker r, with ``phi`` the global weights and
``Delta_r = phi - theta_r`` its pseudo-gradient:

1. error feedback: ``e_r <- beta * e_r + Delta_r`` (fp32, one buffer per parameter);
2. ``S_r = Q(TopK_chunk(e_r))``: the ``k`` largest-magnitude entries of every chunk (chunks as
   DeMo cuts them, without the DCT: 64x64 blocks of a 2-D weight, pieces of <= 64 of a vector),
   values quantised to 2 bits: per tensor, 4 equal bins over the kept values' mean +- 3 standard
   deviations (bin width 1.5 std; templar's ``quantization_range`` 6 spread over its 4 bins, values
   outside fall into the outer bins), and the scale sent is a table of 4 fp32 levels per tensor,
   each the mean of the values in its bin (:mod:`lowcomm.sparse` has the wire format and bounds);
3. ``e_r <- e_r - decode(S_r)``: what was sent, as the receivers decode it;
4. one all-gather of the ``S_r``; every worker decodes every payload in member order and sums
   them in that order into one fp32 accumulator, so all replicas get the same bits;
5. ``phi <- phi - alpha * (sum_r decode(S_r)) / W`` (no outer momentum), ``theta_r <- phi``.

Defaults are templar's hparams (``inner_steps`` 30, ``outer_learning_rate`` 0.6,
``momentum_decay`` 0.95, ``topk_compression`` 64, ``target_chunk`` 64, ``quantization_bins`` 4,
``quantization_range`` 6): H = 30, alpha = 0.6, beta = 0.95, k = 64 of each 4096-entry block
(1.56%). Per worker and sync the payload is ``TopKCodec.payload_bytes()``: for a 64x64 block,
64 x (12 index bits + 2 value bits) = 112 bytes against 16 KiB dense (146x); the local and ZeroMQ
all-gathers send it to each of the W-1 peers.

Where this differs from templar (``src/tplr/neurons.py``, ``prepare_gradient_dict`` and
``outer_step``), and why:

* templar scales the pseudo-gradient by ``alpha`` as it enters the buffer
  (``error_feedback.add_(grad, alpha=lr)``) and hands the aggregate to its outer optimizer;
  lowcomm keeps ``Delta`` in the buffer and applies ``alpha`` to the aggregate, as the paper
  writes it. Top-k selection and the quantiser are scale-equivariant, so with an outer step of
  lr 1 this is the same update up to rounding, and ``alpha`` can change without rescaling the
  saved buffer.
* templar aggregates with a scatter-mean over the peers that selected each entry (each entry
  divided by its own count) after clipping every peer's contribution to the median norm; lowcomm
  divides the sum by W, which is the mean of the sparse pseudo-gradients the paper's update uses,
  keeps ``alpha * mean`` a plain average of what every worker sent, and leaves robustness to
  peers that lie to the transport layer's checks (every payload is validated field by field,
  :meth:`lowcomm.sparse.TopKCodec.decode`).
* the quantiser's bins are symmetric about the mean and the index packing is fixed-width; see
  :mod:`lowcomm.sparse`.

Failure: a failed all-gather rolls back like DiLoCo: ``phi`` is untouched, ``theta <- phi``
(the local work since the last sync is dropped), and the error buffer is exactly as before the
sync (the new one is built in a second buffer and only swapped in on success). A malformed
payload from a peer raises ``ValueError`` naming it, after the same rollback; on a transport that
validates all-gather payloads before its commit vote (ZeroMQ's ``validate=``), it fails the sync
on every member instead, which rolls back as above.

Robust aggregation (``aggregate="clip"``, as DeMo's): applied per sender at decode
(:func:`lowcomm.outer.robust.sender_factors`): a sender whose decoded values' norm is above
``hard_bound`` x the median is left out, the others' values are scaled by
``min(1, clip_ratio * median / norm)``, and the sum is divided by the number of senders kept
(W when none is left out). A payload that is malformed (non-finite values included) is a
ValueError, as above. ``trimmed_mean`` and ``centered_clip`` would need dense vectors: ValueError.

Compute accounting: the compression before the exchange and the decoding after it run inside
``opt.compute_guard()`` (see :class:`~.base.OuterOptimizer`), so the simulator charges them as
compute; the all-gather itself is outside it.

Memory: the global copy ``phi`` (P in the parameters' dtype), the error buffer and its double
buffer (2P fp32), and per sync the kept entries (about 1.5% of P) of every member.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ..comm.base import CommError, Handle, Transport
from ..sparse import BINS, TopKCodec
from .base import OuterOptimizer, PendingSync, SyncUnit, check_float, check_int
from .diloco import schedule_kwargs
from .placement import resolve_anchor_device
from .registry import StrategyConfig, register_strategy
from .robust import resolve_aggregate, sender_factors
from .work import WorkTrigger, sync_schedule

__all__ = ["SparseLoCo", "SparseLoCoConfig"]


class SparseLoCo(OuterOptimizer):
    """SparseLoCo around any inner optimizer (AdamW in the paper); see the module docstring.

    Args:
        inner: the inner optimizer.
        transport: where the sparse pseudo-gradients are all-gathered.
        sync_every: H, inner steps between syncs (templar: 30).
        sync_tokens: N: instead of ``sync_every``, sync when the group's tokens since the last sync reach N,
            each worker's Delta weighted by its tokens before error feedback (:mod:`lowcomm.outer.work`).
        tokens_per_step: tokens of a step when ``opt.count_tokens(n)`` is not called (``sync_tokens``).
        outer_lr: alpha, the step on ``phi`` with the mean decoded pseudo-gradient (0.6).
        decay: beta, the error buffer's decay in [0, 1] (0.95; 1 keeps every unsent entry).
        topk: k, entries kept per chunk (64; a chunk of <= k entries is sent whole).
        chunk: target chunk edge (64: 64x64 blocks of 2-D weights).
        bins: quantisation levels of the kept values (4: 2 bits; 2, 16, or None for fp32).
        quant_range: width of the quantised range in standard deviations of the kept values (6).
        anchor_device: where the global weights and error buffers live (None: the parameters' device;
            "cpu": CPU memory, pinned when CUDA is present; see :mod:`.placement`).
        strict: raise on a failed sync instead of rolling back.
        timeout: seconds a sync may wait.
        aggregate: ``"mean"`` (default) or ``"clip"``, applied per sender at decode.
    """

    shares_global_state = True  # phi, the (unstepped) outer state and the sync count; the error buffers differ
    sharding_reason = ("its top-k chunks are laid over whole tensors; on FSDP shards they would fall across shard "
                       "boundaries and change the algorithm")

    def __init__(self, inner: torch.optim.Optimizer, *, transport: Transport, sync_every: int = 30,
                 outer_lr: float = 0.6, decay: float = 0.95, topk: int = 64, chunk: int = 64,
                 bins: int | None = 4, quant_range: float = 6.0, anchor_device: Any = None, strict: bool = False,
                 timeout: float | None = None, aggregate: Any = "mean", sync_tokens: int | None = None,
                 tokens_per_step: int | None = None):
        super().__init__(inner, transport=transport, strict=strict, timeout=timeout, aggregate=aggregate)
        self.sync_every = sync_schedule(sync_every, sync_tokens, 30)
        if sync_tokens is not None:
            self.work = WorkTrigger(transport, sync_tokens, tokens_per_step)
        self.outer_lr = check_float("outer_lr", outer_lr, 0.0)
        if self.outer_lr <= 0:
            raise ValueError(f"outer_lr must be > 0 (templar: 0.6), got {outer_lr!r}")
        self.decay = check_float("decay", decay, 0.0, 1.0)
        self.topk = check_int("topk", topk, 1, "it is k, the entries kept per chunk (templar: 64 of 4096)")
        self.chunk = check_int("chunk", chunk, 1, "it is the target chunk edge (templar: 64)")
        if bins is not None and bins not in BINS:
            raise ValueError(f"bins must be one of {BINS} or None (fp32 values), got {bins!r}")
        params = self.params
        for i, p in enumerate(params):
            if p.numel() == 0:
                raise ValueError(f"parameter {i} has no elements; leave it out of the inner optimizer")
        dev = params[0].device
        if any(p.device != dev for p in params):
            raise ValueError("SparseLoCo needs every parameter on one device")
        device = resolve_anchor_device(anchor_device)
        dev = device or dev  # lowcomm's state (global weights, error buffers, codec) lives there
        self.codec = TopKCodec([p.shape for p in params], k=self.topk, chunk=self.chunk, bins=bins,
                               quant_range=quant_range, device=dev)
        self.broadcast_initial()
        # The outer optimizer of the unit is never stepped (the update is phi -= alpha * mean, applied
        # in the chunk layout); it is plain SGD with lr alpha, which is what that update is.
        self.units = [SyncUnit(params, lambda ps: torch.optim.SGD(ps, lr=self.outer_lr), anchor_device=device)]
        self._error = torch.zeros(self.codec.numel, dtype=torch.float32, device=dev)
        self._work = torch.zeros_like(self._error)
        self.last_offences: dict[int, str] = {}  # senders screened out at the last decode (position -> why)
        self.screened: list[tuple[int, int, str]] = []  # every screening: (step, member id, why)

    def resolve_aggregate(self, aggregate: Any) -> Any:
        return resolve_aggregate(self.transport, aggregate, allowed=("mean", "clip"), who="SparseLoCo")

    def detections(self) -> list[dict[str, Any]]:
        return [{"member": m, "kind": why, "step": st} for st, m, why in self.screened]

    @property
    def error(self) -> list[torch.Tensor]:
        """The error-feedback buffer of every parameter (new tensors, parameter shapes)."""
        return self.codec.from_chunks(self._error)

    def payload_bytes(self) -> int:
        """Bytes of one worker's payload per sync (sent to each of the W-1 peers by a p2p all-gather)."""
        return self.codec.payload_bytes()

    def after_inner_step(self) -> None:
        if self.work.due() if self.work is not None else self.local_step % self.sync_every == 0:
            self.sync()

    @torch.no_grad()
    def sync(self) -> bool:
        """Compress, all-gather, decode, step ``phi``, reset the locals. Returns whether it committed."""
        unit, codec = self.units[0], self.codec
        with self.compute_guard():
            # theta := phi - theta (reset after the sync anyway; offloaded: beside phi)
            grads = unit.pseudo_grads()
            if self.work is not None:  # sync_tokens: Delta weighted by this worker's tokens
                self.work.weigh(grads)
            work = codec.to_chunks(grads, self._work)  # Delta in the chunk layout ...
            work.add_(self._error, alpha=self.decay)  # ... + beta * e: the new buffer, beside the old one
            try:
                payload = codec.encode(work)
            except ValueError:
                unit.reset_locals()
                raise
            pos, sent = codec.decode(payload, who="own payload")
            work.scatter_add_(0, pos, sent.neg())  # e -= decode(S): distinct positions, one add each
        try:
            # every member's payload is checked before the commit vote: a malformed one fails the
            # sync on every member (rolled back, the sender named) instead of raising after it
            handle = self.transport.all_gather(payload, validate=lambda parts, member: codec.decode(
                parts, who=f"member {member}'s payload"))
        except CommError as e:  # cannot even start (e.g. no longer a member): fail like in flight
            handle = Handle.failed(e)
        pending = PendingSync(unit, handle, [], self.local_step, self._work_tokens())
        return self.finish(pending, self._apply)

    def _apply(self, pending: PendingSync) -> None:
        with self.compute_guard():
            self._apply_gathered(pending, pending.handle.wait(self.timeout))  # done: finish() waited for it

    def _apply_gathered(self, pending: PendingSync, gathered: list[list[torch.Tensor]]) -> None:
        unit, codec = pending.unit, self.codec
        members = self.transport.members()
        try:
            if len(gathered) != len(members):
                raise ValueError(f"all-gather returned {len(gathered)} payloads for {len(members)} members")
            decoded = [codec.decode(parts, who=f"member {m}'s payload") for m, parts in zip(members, gathered)]
        except ValueError:
            unit.reset_locals()  # error buffer and phi untouched: as after a failed sync
            raise
        norms = [float(v.double().norm()) if self.aggregate.robust else 0.0 for _, v in decoded]
        weights, self.last_offences = sender_factors(self.aggregate, norms)
        self.screened += [(self.local_step, members[i], why) for i, why in self.last_offences.items()]
        kept = sum(1 for w in weights if w != 0.0)
        if kept == 0:
            unit.reset_locals()
            raise ValueError(f"aggregate={self.aggregate.rule!r} screened out every member's payload")
        # Commit: the new error buffer becomes current; the old one is free to accumulate the sum.
        self._error, self._work = self._work, self._error
        acc = self._work.zero_()
        for (pos, vals), wt in zip(decoded, weights):  # member order: the same sums on every replica
            if wt != 0.0:
                acc.scatter_add_(0, pos, vals if wt == 1.0 else vals * wt)
        acc.div_(kept)
        for i, a in enumerate(unit.anchors):
            a.view(codec.blocked_shape(i)).add_(codec.chunk_view(acc, i), alpha=-self.outer_lr)
        unit.reset_locals()

    # ---- state -------------------------------------------------------------------------------------
    def extra_state_dict(self) -> dict[str, Any]:
        # A copy: the buffers are swapped every sync, so the live tensor is scratch later.
        return {"error": self._error.clone()}

    @torch.no_grad()
    def load_extra_state_dict(self, sd: dict[str, Any]) -> None:
        err = sd.get("error")
        if not isinstance(err, torch.Tensor) or err.numel() != self._error.numel():
            raise ValueError(f"state has no SparseLoCo error buffer of {self._error.numel()} entries; pass what "
                             f"SparseLoCo.state_dict() returned for the same model and chunk")
        self._error.copy_(err.reshape(-1))

    def __repr__(self) -> str:
        return (f"SparseLoCo(inner={type(self.inner).__name__}, world_size={self.transport.world_size}, "
                f"H={self.sync_every}, topk={self.topk}, chunk={self.chunk}, bins={self.codec.bins}, "
                f"payload={self.payload_bytes()} B)")


@dataclass
class SparseLoCoConfig(StrategyConfig):
    """SparseLoCo's knobs (defaults: templar's hparams, arXiv 2508.15706)."""

    sync_every: int = 30  # H, inner steps between syncs
    outer_lr: float = 0.6  # alpha: phi -= alpha * mean of the decoded sparse pseudo-gradients
    decay: float = 0.95  # beta, the error buffer's decay
    topk: int = 64  # entries kept per chunk (64 of a 64x64 block: 1.56%)
    chunk: int = 64  # target chunk edge
    bins: int | None = 4  # quantisation levels of the kept values (4: 2 bits; None: fp32)
    quant_range: float = 6.0  # width of the quantised range in standard deviations of the kept values
    anchor_device: str | None = None  # global weights and error buffers: None (parameters' device) or "cpu"
    aggregate: str = "mean"  # "mean" or "clip" (with knobs, e.g. "clip:clip_ratio=2"), applied per sender at decode
    sync_tokens: int | None = None  # N: sync when the group's tokens since the last sync reach N (replaces sync_every)

    def build(self, inner, transport, model=None) -> SparseLoCo:
        return SparseLoCo(inner, transport=transport, **schedule_kwargs(self), outer_lr=self.outer_lr,
                          decay=self.decay, topk=self.topk, chunk=self.chunk, bins=self.bins,
                          quant_range=self.quant_range, anchor_device=self.anchor_device, aggregate=self.aggregate)


register_strategy("sparseloco", SparseLoCoConfig,
                  "SparseLoCo: every H steps, all-gather the top-k of each chunk of the error-fed pseudo-gradient, "
                  "2-bit values; phi -= alpha * mean")
