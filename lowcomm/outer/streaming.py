"""Streaming DiLoCo (Douillard et al. 2025, arXiv 2501.18512): partial, overlapped, quantized syncs.

DiLoCo (:mod:`.diloco`) with three changes:

1. **Fragments.** The model is split into F fragments of whole blocks
   (:func:`lowcomm.fragments.split_fragments`; strided by default). Each fragment has its own
   global copy ``phi_p`` and outer optimizer (a :class:`~.base.SyncUnit`), and syncs on its
   own schedule: fragment ``p`` is launched after inner steps ``(p+1)*H/F + k*H``
   (k = 0, 1, ...), so the F syncs of one round are spread over the H steps and only 1/F of
   the model is on the wire at a time (peak bandwidth / F).
2. **Overlap.** The launched pseudo-gradient ``phi_p - theta_p`` travels while training goes
   on for ``overlap`` (tau) more inner steps; it lands after step ``t + tau``. Then the
   fragment's outer optimizer steps ``phi_p`` with the averaged pseudo-gradient, and the local
   weights, which moved on meanwhile, are mixed with the new global ones (paper, Algorithm 2):
   ``theta_p = alpha * theta_p + (1 - alpha) * phi_p``.
3. **Quantization.** The pseudo-gradient is sent through a codec (4-bit E3M0 in the paper,
   see :mod:`lowcomm.codecs`), reduced in fp32 by each shard's owner; optional error
   feedback carries each fragment's quantization error into its next sync.

H must be a multiple of F and tau < H/F, so one fragment at most is in flight. With F=1,
tau=0, alpha=0 and no codec this is exactly DiLoCo (tests check it bit for bit).

Memory: besides DiLoCo's global copy and outer state, one fp32 buffer the size of the
largest fragment holds the in-flight pseudo-gradient (reused by every sync), and with error
feedback one fp32 error per parameter plus a pending one per fragment in flight.

Failure: a fragment sync that fails is rolled back for that fragment alone (its local
weights return to its global ones, its outer state and error-feedback state are untouched);
the other fragments go on undisturbed.

End of training: call :meth:`StreamingDiLoCo.flush` to land the sync still in flight (the
last fragment's launch is at step k*H; without a flush that collective is never waited for,
and a worker that closes its transport then leaves its peers waiting until their deadline).

Checkpoints: ``state_dict()`` is exact at any step. When a fragment is in flight it waits
for the collective to complete (every worker checkpoints at the same step) and stores the
averaged pseudo-gradient, which is applied at its scheduled step after a resume.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ..codecs import ErrorFeedback, wire_codec
from ..comm.base import CommError, Handle, Transport
from .base import OuterFactory, OuterOptimizer, PendingSync, SyncUnit, check_float, check_int
from .diloco import schedule_kwargs, sgd_outer
from .placement import mix_, resolve_anchor_device, sub_
from .registry import StrategyConfig, register_strategy
from .work import WorkTrigger, sync_schedule

__all__ = ["StreamingDiLoCo", "StreamingDiLoCoConfig"]


def _failed_handle(message: str) -> Handle:
    return Handle.failed(CommError(message))


class StreamingDiLoCo(OuterOptimizer):
    """Streaming DiLoCo around any inner optimizer (see the module docstring).

    Args:
        inner: the inner optimizer (AdamW in the paper).
        transport: where the pseudo-gradients are averaged.
        model: the model, to find its repeated blocks when ``fragments`` is a count > 1.
        sync_every: H, inner steps between two syncs of the same fragment.
        sync_tokens: N: instead of ``sync_every``, a fragment sync every N / F group tokens, the fragments
            in turn, each member's pseudo-gradient weighted by its tokens (:mod:`lowcomm.outer.work`).
        tokens_per_step: tokens of a step when ``opt.count_tokens(n)`` is not called (``sync_tokens``).
        fragments: F (a count; the blocks are split strided) or an explicit list of F module groups.
        overlap: tau, inner steps a fragment's sync stays in flight (0 = applied at once).
        alpha: mixing weight of the local weights when a sync lands (0 = take the global ones).
        codec: wire codec for the pseudo-gradients (name, spec, Codec or None for fp32).
        outer_lr, outer_momentum, nesterov: each fragment's outer SGD (as DiLoCo's: 0.7, 0.9, True).
        outer_optimizer: a factory ``params -> torch.optim.Optimizer``, one per fragment, used
            instead of that SGD.
        error_feedback: carry each fragment's quantization error into its next sync.
        fragment_mode: ``"strided"`` (paper) or ``"sequential"`` when ``fragments`` is a count.
        anchor_device: where the global weights, outer state, in-flight buffer and error feedback live
            (None: the parameters' device; "cpu": CPU memory, pinned when CUDA is present).
        aggregate: robust aggregation rule: ``"mean"`` (default, exact), ``"clip"``, ``"trimmed_mean"``,
            ``"centered_clip"``, with knobs as a spec (``"clip:clip_ratio=2"``) or an
            :class:`~lowcomm.comm.aggregate.Aggregate`; see :mod:`lowcomm.comm.aggregate`.
        strict: raise on a failed sync instead of rolling back.
        timeout: seconds a sync may wait.
    """

    shares_global_state = True
    supports_sharding = True  # elementwise per fragment: exact on each FSDP shard

    def __init__(self, inner: torch.optim.Optimizer, *, transport: Transport, model: torch.nn.Module | None = None,
                 sync_every: int = 100, fragments: int | list = 2, overlap: int = 1, alpha: float = 0.5,
                 codec: Any = "e3m0", outer_lr: float = 0.7, outer_momentum: float = 0.9, nesterov: bool = True,
                 outer_optimizer: OuterFactory | None = None, error_feedback: bool = False,
                 fragment_mode: str = "strided", anchor_device: Any = None, strict: bool = False,
                 timeout: float | None = None, aggregate: Any = "mean", sync_tokens: int | None = None,
                 tokens_per_step: int | None = None):
        super().__init__(inner, transport=transport, strict=strict, timeout=timeout, aggregate=aggregate)
        from ..fragments import split_fragments

        H = sync_schedule(sync_every, sync_tokens, 100)
        groups = split_fragments(model, fragments, params=self.params, mode=fragment_mode)
        F = len(groups)
        if sync_tokens is not None:
            self.work = WorkTrigger(transport, sync_tokens, tokens_per_step, window=F)
            self._next_fragment = 0
        elif H % F:
            raise ValueError(f"sync_every ({H}) must be a multiple of the number of fragments ({F}), so the "
                             f"fragments sync every H/F steps; e.g. sync_every={H - H % F or F}")
        tau = check_int("overlap", overlap, 0, "it is tau, the inner steps a sync stays in flight")
        if sync_tokens is None and tau >= H // F:
            raise ValueError(f"overlap ({tau}) must be < sync_every / fragments ({H // F}) so that only one fragment "
                             f"is in flight at a time; lower overlap or raise sync_every")
        self.alpha = check_float("alpha", alpha, 0.0, 1.0)
        self.sync_every, self.num_fragments, self.overlap = H, F, tau
        self.codec = wire_codec(codec)
        self.broadcast_initial()
        factory = outer_optimizer or sgd_outer(outer_lr, outer_momentum, nesterov)
        device = resolve_anchor_device(anchor_device)
        self.units = [SyncUnit(g, factory, name=f"fragment{i}", anchor_device=device) for i, g in enumerate(groups)]
        sizes = [sum(p.numel() for p in u.locals) for u in self.units]  # this rank's shard of each fragment
        self.fragment_sizes = sizes
        # The in-flight pseudo-gradient: one fp32 buffer the size of the largest fragment, reused, beside
        # the global weights (fragments span one device: split_fragments groups the model's blocks).
        if len({q.device for u in self.units for q in u.locals}) > 1:
            raise ValueError("StreamingDiLoCo needs every parameter on one device (its in-flight buffer is shared)")
        dev = self.units[0].anchors[0].device
        self._buf = torch.zeros(max(max(sizes), 1), device=dev)
        self._ef: list[ErrorFeedback] | None = None
        if error_feedback:
            if self.codec is None:
                raise ValueError("error_feedback needs a lossy codec (e.g. codec='e3m0'); with fp32 there is no error")
            self._ef = [ErrorFeedback(self.codec, n, device=dev) for n in sizes]
            self._ef_pending = torch.zeros(max(max(sizes), 1), device=dev)
        self._pending: PendingSync | None = None
        self._pending_fragment = -1

    # ---- schedule ----------------------------------------------------------------------------
    def fragment_due(self, step: int) -> int | None:
        """The fragment launched after inner step ``step``, if any."""
        if step <= 0:
            return None
        stride = self.sync_every // self.num_fragments
        off = step % self.sync_every
        if off % stride:
            return None
        return (off // stride - 1) % self.num_fragments

    def after_inner_step(self) -> None:
        t = self.local_step
        if self._pending is not None and t >= self._pending.launch_step + self.overlap:
            self._finish()
        if self.work is not None:  # by tokens: the fragments in turn, one every sync_tokens / F tokens
            p = self._next_fragment if self.work.due() else None
            if p is not None:
                self._next_fragment = (p + 1) % self.num_fragments
        else:
            p = self.fragment_due(t)
        if p is not None:
            if self._pending is not None:  # cannot happen with tau < H/F; kept as a guard
                self._finish()
            self._launch(p)
            if self.overlap == 0:
                self._finish()

    @property
    def in_flight(self) -> int | None:
        """The fragment whose sync is in flight, or None."""
        return None if self._pending is None else self._pending_fragment

    def flush(self) -> bool | None:
        """Land the in-flight sync now (e.g. before evaluating at the end of training)."""
        return None if self._pending is None else self._finish()

    # ---- one fragment sync ----------------------------------------------------------------------
    def _views(self, unit: SyncUnit) -> list[torch.Tensor]:
        out, off = [], 0
        for p in unit.locals:
            n = p.numel()
            out.append(self._buf[off:off + n].view(p.shape))
            off += n
        return out

    @torch.no_grad()
    def _launch(self, p: int) -> None:
        unit = self.units[p]
        n = self.fragment_sizes[p]
        flat = self._buf[:n]
        views = self._views(unit)
        # Pseudo-gradient phi_p - theta_p (global minus local, points like a gradient), in fp32.
        if unit.offloaded:  # formed beside the global weights, chunk by chunk
            for v, a, q in zip(views, unit.anchors, unit.locals):
                sub_(v, a, q)
        else:
            torch._foreach_copy_(views, unit.anchors)
            torch._foreach_sub_(views, [q.to(torch.float32) if q.dtype != torch.float32 else q for q in unit.locals])
        if self._ef is not None:
            ef = self._ef[p]
            ef.compensate_(flat)
            # the error of exactly what this worker sends: the all-reduce encodes one shard per member
            ef.residual(flat, shards=len(self.transport.members()), out=self._ef_pending[:n])
        if self.work is not None:
            self.work.weigh([flat])
        self._pending_fragment = p
        self._pending = self.launch_reduce(unit, [flat], codec=self.codec)

    @torch.no_grad()
    def _finish(self) -> bool:
        pending, p = self._pending, self._pending_fragment
        self._pending, self._pending_fragment = None, -1
        return self.finish(pending, lambda ps: self._apply(ps, p), lambda ps: self._rollback(ps, p))

    def _apply(self, pending: PendingSync, p: int) -> None:
        unit = pending.unit
        views = self._views(unit)
        grads = [v if a.dtype == torch.float32 else v.to(a.dtype) for v, a in zip(views, unit.anchors)]
        unit.outer_step(grads)
        if self.alpha == 0.0:
            unit.reset_locals()
        elif unit.offloaded:  # the same merge on the local weights' device, chunk by chunk
            for q, a in zip(unit.locals, unit.anchors):
                mix_(q, a, self.alpha)
        else:
            # theta_p = alpha * theta_p + (1 - alpha) * phi_p (Algorithm 2's merge of the landed fragment)
            locs = unit.locals
            torch._foreach_mul_(locs, self.alpha)
            torch._foreach_add_(locs, unit.anchors, alpha=1.0 - self.alpha)
        if self._ef is not None:
            self._ef[p].commit()  # the error of what was sent becomes the carried error

    def _rollback(self, pending: PendingSync, p: int) -> None:
        # This fragment alone: its locals return to its global weights; outer and error state stay.
        pending.unit.reset_locals()
        if self._ef is not None:
            self._ef[p].discard()

    # ---- state ------------------------------------------------------------------------------------
    def extra_state_dict(self) -> dict[str, Any]:
        sd: dict[str, Any] = {"config": {"sync_every": self.sync_every, "fragments": self.num_fragments,
                                         "overlap": self.overlap, "sizes": list(self.fragment_sizes)},
                              "pending": None, "next_fragment": getattr(self, "_next_fragment", 0),
                              "error": None if self._ef is None else [ef.error for ef in self._ef]}
        if self._pending is not None:
            p = self._pending_fragment
            n = self.fragment_sizes[p]
            failed = ""
            try:  # every worker checkpoints at the same step, so waiting here completes the collective
                self._pending.handle.wait(self.timeout)
            except CommError as e:
                failed = str(e) or type(e).__name__
                self._pending = PendingSync(self._pending.unit, _failed_handle(failed), self._pending.buffers,
                                            self._pending.launch_step)
            sd["pending"] = {"fragment": p, "launch_step": self._pending.launch_step, "failed": failed,
                             "reduced": self._buf[:n].clone(),
                             "ef_pending": None if self._ef is None else self._ef_pending[:n].clone()}
        return sd

    def load_extra_state_dict(self, sd: dict[str, Any]) -> None:
        cfg = sd.get("config", {})
        mine = {"sync_every": self.sync_every, "fragments": self.num_fragments, "overlap": self.overlap,
                "sizes": list(self.fragment_sizes)}
        if cfg and cfg != mine:
            raise ValueError(f"checkpoint was made with {cfg}, this optimizer has {mine}; build it with the same "
                             f"model, sync_every, fragments and overlap")
        if (sd.get("error") is None) != (self._ef is None):
            raise ValueError("checkpoint and optimizer disagree on error_feedback; build it with the same setting")
        if self._ef is not None:
            for ef, e in zip(self._ef, sd["error"]):
                ef.load_state_dict({"error": e})
        self._pending, self._pending_fragment = None, -1
        if self.work is not None:
            self._next_fragment = int(sd.get("next_fragment", 0)) % self.num_fragments
        pend = sd.get("pending")
        if pend is not None:
            p = int(pend["fragment"])
            n = self.fragment_sizes[p]
            self._buf[:n].copy_(pend["reduced"])
            if self._ef is not None:
                self._ef_pending[:n].copy_(pend["ef_pending"])
                self._ef[p].set_pending(self._ef_pending[:n])
            handle = _failed_handle(pend["failed"]) if pend["failed"] else Handle.completed(None)
            self._pending = PendingSync(self.units[p], handle, [self._buf[:n]], int(pend["launch_step"]))
            self._pending_fragment = p


@dataclass
class StreamingDiLoCoConfig(StrategyConfig):
    """Streaming DiLoCo's knobs (defaults: the class's, from arXiv 2501.18512)."""

    sync_every: int = 100  # H, inner steps between two syncs of the same fragment (a multiple of fragments)
    fragments: int = 2  # F, fragments of whole blocks, synced in turn
    overlap: int = 1  # tau, inner steps a fragment's sync stays in flight (< H/F)
    alpha: float = 0.5  # weight of the local weights when a sync lands (0: take the global ones)
    codec: str | None = "e3m0"  # wire codec of the pseudo-gradients (4-bit E3M0 in the paper); None: fp32
    outer_lr: float = 0.7  # each fragment's outer SGD learning rate
    outer_momentum: float = 0.9  # its momentum
    nesterov: bool = True  # Nesterov outer momentum
    error_feedback: bool = False  # carry each fragment's quantization error into its next sync
    fragment_mode: str = "strided"  # "strided" (block l in fragment l mod F, the paper's) or "sequential"
    anchor_device: str | None = None  # global weights and outer state: None (parameters' device) or "cpu"
    aggregate: str = "mean"  # robust aggregation rule spec, e.g. "clip", "trimmed_mean:trim=2" (lowcomm.comm.aggregate)
    sync_tokens: int | None = None  # N: each fragment syncs every N group tokens (one every N/F; replaces sync_every)

    def build(self, inner, transport, model=None) -> StreamingDiLoCo:
        return StreamingDiLoCo(inner, transport=transport, model=model, **schedule_kwargs(self),
                               fragments=self.fragments, overlap=self.overlap, alpha=self.alpha, codec=self.codec,
                               outer_lr=self.outer_lr, outer_momentum=self.outer_momentum, nesterov=self.nesterov,
                               error_feedback=self.error_feedback, fragment_mode=self.fragment_mode,
                               anchor_device=self.anchor_device, aggregate=self.aggregate)


register_strategy("streaming", StreamingDiLoCoConfig,
                  "Streaming DiLoCo: one fragment at a time, overlapped by tau steps, 4-bit E3M0 pseudo-gradients")
