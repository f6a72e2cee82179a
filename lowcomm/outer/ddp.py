"""Data-parallel baseline: all-reduce (mean) of the gradients before every inner step.

This is ordinary synchronous data parallelism (as torch's DistributedDataParallel does it,
without bucketing): the reference every low-communication strategy is compared with. It
is an :class:`~lowcomm.outer.base.OuterOptimizer` so it runs through the same transports,
ledger and simulator as the others; every step logs one :class:`SyncRecord` whose
communication is launched and finished in the same step (nothing overlaps compute).

W workers with batch B each take exactly the step a single worker would take with batch
W*B (the mean of equal-size batch means is the mean over the big batch), up to float
summation order.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from ..codecs import wire_codec
from ..comm.base import CommError, Handle, Transport
from .base import OuterOptimizer, SyncRecord
from .registry import StrategyConfig, register_strategy

__all__ = ["DDP", "DDPConfig"]

log = logging.getLogger(__name__)


class DDP(OuterOptimizer):
    """All-reduce the gradients every step, then take the inner step.

    Args:
        inner: the inner optimizer.
        transport: where the gradients are averaged.
        codec: optional wire codec for the all-reduce (None: fp32 as the gradients are).
        strict: raise on a failed all-reduce instead of skipping that step.
        timeout: seconds an all-reduce may wait.
        aggregate: robust aggregation rule: ``"mean"`` (default, exact), ``"clip"``, ``"trimmed_mean"``,
            ``"centered_clip"``, with knobs as a spec (``"clip:clip_ratio=2"``) or an
            :class:`~lowcomm.comm.aggregate.Aggregate`; see :mod:`lowcomm.comm.aggregate`.

    A failed all-reduce skips the step (the gradients are dropped, parameters unchanged,
    so the replicas stay identical), is logged and counted, and membership is refreshed.
    """

    sharding_reason = "inside a replica FSDP reduces the gradients itself; DDP across FSDP replicas is not implemented"

    def __init__(self, inner: torch.optim.Optimizer, *, transport: Transport, codec: Any = None,
                 strict: bool = False, timeout: float | None = None, aggregate: Any = "mean"):
        super().__init__(inner, transport=transport, strict=strict, timeout=timeout, aggregate=aggregate)
        self.codec = wire_codec(codec)
        self.broadcast_initial()

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        params = self.params
        for p in params:
            if p.grad is None:  # a parameter unused this step still takes part (with zeros)
                p.grad = torch.zeros_like(p)
        grads = [p.grad for p in params]
        step = self.local_step + 1
        try:
            handle = self.transport.all_reduce(grads, op="mean", codec=self.codec, **self.reduce_kwargs("grads"))
        except CommError as e:  # could not even start (e.g. no longer a member): same path as a failure
            handle = Handle.failed(e)
        op_ids = [] if handle.op_id is None else [handle.op_id]
        try:
            handle.wait(self.timeout)
        except CommError as e:
            self.failed_syncs += 1
            self.sync_log.append(SyncRecord("grads", step, step, op_ids, False, str(e)))
            log.warning("gradient all-reduce at step %d failed; step skipped: %s", step, e)
            self.inner.zero_grad(set_to_none=True)
            try:
                self.transport.refresh()
            except CommError as e2:
                log.warning("could not refresh membership after a failed all-reduce: %s", e2)
            if self.strict:
                raise
            self.local_step = step
            return loss
        self.sync_count += 1
        self.remember_center("grads", grads)
        self.sync_log.append(SyncRecord("grads", step, step, op_ids, True))
        self.inner.step()
        self.local_step = step
        return loss


@dataclass
class DDPConfig(StrategyConfig):
    """The data-parallel baseline's knobs."""

    codec: str | None = None  # wire codec of the gradient all-reduce; None: fp32
    aggregate: str = "mean"  # robust aggregation rule spec, e.g. "clip", "trimmed_mean:trim=2" (lowcomm.comm.aggregate)

    def build(self, inner, transport, model=None) -> DDP:
        return DDP(inner, transport=transport, codec=self.codec, aggregate=self.aggregate)


register_strategy("ddp", DDPConfig, "data parallel: all-reduce (mean) of gradients every step")
