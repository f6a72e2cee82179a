"""OuterOptimizer: the machinery every low-communication strategy shares.

An :class:`OuterOptimizer` wraps an inner ``torch.optim`` optimizer, or a list of them over
disjoint parameters (``inner=[muon, adamw]``, see :mod:`.multi`), and *is* a
``torch.optim.Optimizer``: its ``param_groups`` are the inner optimizers' (concatenated, so one LR
scheduler built on the wrapper drives every inner learning rate), ``step()`` runs the inner step(s)
and then whatever outer work the strategy has due, and ``state_dict()`` holds the inner states
(``"inner"``: a list, one per inner optimizer; a single-inner checkpoint's one state dict still
loads), the global (anchor) parameters, the outer optimizers' state and the counters.

A sync is two phases, :meth:`OuterOptimizer.launch_reduce` (start a non-blocking
collective) and :meth:`OuterOptimizer.finish` (wait, then apply, or roll back), so a
strategy can overlap communication with compute by finishing later.

Failure: a collective that fails raises :class:`~lowcomm.comm.base.CommError` from its
handle. ``finish`` then rolls back (global parameters and outer state are untouched, since
the outer step only runs after success; the local parameters return to the global ones,
dropping the local work since the last sync, as torchft does), logs, counts the failure,
refreshes the transport's membership and returns ``False``; training goes on. With
``strict=True`` the error is raised instead.

A new strategy subclasses :class:`OuterOptimizer` and implements :meth:`after_inner_step`.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ..comm.base import CommError, Handle, Transport, check_transport
from . import placement
from .multi import as_inner, inner_list, load_inner

__all__ = ["OuterFactory", "OuterOptimizer", "PendingSync", "SyncRecord", "SyncUnit", "default_outer_optimizer"]

log = logging.getLogger(__name__)

OuterFactory = Callable[[Iterable[torch.Tensor]], torch.optim.Optimizer]


def default_outer_optimizer(params: Iterable[torch.Tensor]) -> torch.optim.Optimizer:
    """DiLoCo's outer optimizer: SGD, lr 0.7, momentum 0.9, Nesterov (arXiv 2311.08105)."""
    return torch.optim.SGD(params, lr=0.7, momentum=0.9, nesterov=True)


def check_int(name: str, value: Any, minimum: int, hint: str = "") -> int:
    """``value`` as an int >= ``minimum``, else a ValueError that says what to pass."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}" + (f"; {hint}" if hint else ""))
    return value


def check_float(name: str, value: Any, lo: float | None = None, hi: float | None = None) -> float:
    """``value`` as a float in [lo, hi], else a ValueError."""
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number, got {value!r}") from None
    if v != v or (lo is not None and v < lo) or (hi is not None and v > hi):
        rng = f"[{'-inf' if lo is None else lo}, {'inf' if hi is None else hi}]"
        raise ValueError(f"{name} must be in {rng}, got {value!r}")
    return v


class SyncUnit:
    """A set of parameters synced together: their global (anchor) copies and an outer optimizer.

    DiLoCo has one unit (the whole model); Streaming DiLoCo has one per fragment.
    """

    def __init__(self, params: Sequence[torch.Tensor], factory: OuterFactory | None, name: str = "all",
                 anchor_device: torch.device | None = None):
        self.name = name
        self.params = list(params)
        if not self.params:
            raise ValueError(f"sync unit {name!r} has no parameters")
        # Anchors are leaves of their own, so a stock torch optimizer can step them. They are plain
        # tensors of the local shard (see placement.py), on anchor_device when one is given.
        self.offloaded = anchor_device is not None
        self.anchors = [placement.anchor_copy(p, anchor_device) for p in self.locals]
        self._scratch: list[torch.Tensor] | None = None
        factory = factory or default_outer_optimizer
        if not callable(factory):
            raise ValueError("outer_optimizer must be a callable taking an iterable of parameters and returning a "
                             "torch.optim.Optimizer, e.g. lambda ps: torch.optim.SGD(ps, lr=0.7, momentum=0.9, "
                             f"nesterov=True); got {factory!r}")
        outer = factory(self.anchors)
        if not isinstance(outer, torch.optim.Optimizer):
            raise ValueError("outer_optimizer must return a torch.optim.Optimizer built on the parameters it is "
                             f"given (e.g. lambda ps: torch.optim.SGD(ps, lr=0.7)); it returned {type(outer).__name__}")
        self.outer = outer

    @torch.no_grad()
    def outer_step(self, pseudo_grads: Sequence[torch.Tensor]) -> None:
        """Step the global parameters with ``pseudo_grads`` (global minus local, averaged) as gradient."""
        for a, g in zip(self.anchors, pseudo_grads):
            a.grad = g.detach()
        self.outer.step()
        for a in self.anchors:
            a.grad = None

    @property
    def locals(self) -> list[torch.Tensor]:
        """The parameters as plain tensors (a DTensor's local shard), sharing their storage."""
        return [placement.local_tensor(p) for p in self.params]

    def _beside(self) -> list[torch.Tensor]:
        if self._scratch is None:  # offloaded: one reused buffer beside the anchors
            self._scratch = [placement.anchor_copy(a, a.device) for a in self.anchors]
        return self._scratch

    def working_copies(self) -> list[torch.Tensor]:
        """The local weights where the anchors are: the parameters themselves, or (offloaded) a reused
        buffer beside the anchors holding a copy. Either may be overwritten: the sync resets the locals."""
        if not self.offloaded:
            return self.locals
        for s, p in zip(self._beside(), self.locals):
            placement.copy_(s, p)
        return self._scratch

    @torch.no_grad()
    def pseudo_grads(self) -> list[torch.Tensor]:
        """Global minus local weights (points like a gradient), beside the anchors: in the local weights
        themselves, or offloaded in a reused buffer, formed chunk by chunk."""
        locs = self.locals
        out = self._beside() if self.offloaded else locs
        for o, p, a in zip(out, locs, self.anchors):
            placement.pseudo_grad_(o, p, a)
        return out

    @torch.no_grad()
    def reset_locals(self) -> None:
        """Local parameters := global parameters."""
        if not self.offloaded:
            torch._foreach_copy_(self.locals, self.anchors)
            return
        for p, a in zip(self.locals, self.anchors):
            placement.copy_(p, a)

    def state_dict(self) -> dict[str, Any]:
        return {"anchors": list(self.anchors), "outer": self.outer.state_dict()}

    @torch.no_grad()
    def load_state_dict(self, sd: dict[str, Any]) -> None:
        anchors = sd["anchors"]
        if len(anchors) != len(self.anchors):
            raise ValueError(f"state for unit {self.name!r} has {len(anchors)} anchors, expected {len(self.anchors)}")
        for a, b in zip(self.anchors, anchors):
            if a.shape != b.shape:
                raise ValueError(f"anchor shape {tuple(b.shape)} does not match parameter shape {tuple(a.shape)}")
            a.copy_(b)
        self.outer.load_state_dict(sd["outer"])


@dataclass
class PendingSync:
    """A launched, not yet finished sync (``unit`` None for a strategy without global copies, e.g. DeMo)."""

    unit: SyncUnit | None
    handle: Handle
    buffers: list[torch.Tensor]
    launch_step: int
    tokens: dict[int, int] | None = None  # every member's tokens since the last sync (sync_tokens)

    @property
    def name(self) -> str:
        """The synced unit's name in ``sync_log`` ("all" for the whole model)."""
        return "all" if self.unit is None else self.unit.name


@dataclass
class SyncRecord:
    """What happened to one sync (read by the simulator to place communication in time)."""

    unit: str
    launch_step: int
    finish_step: int
    op_ids: list[int]
    committed: bool
    error: str = ""
    tokens: dict[int, int] = field(default_factory=dict)  # sync_tokens: each member's tokens in this sync
    weights: dict[int, float] = field(default_factory=dict)  # ... and its weight (lowcomm.comm.tokens)


class OuterOptimizer(torch.optim.Optimizer):
    """Base class of lowcomm's strategies (see the module docstring).

    Args:
        inner: the inner optimizer, or a list of them over disjoint parameters (e.g. Muon for the
            2-D weights and AdamW for the rest); every parameter must be floating point and require grad.
        transport: a lowcomm transport (``lowcomm.connect()``, a local transport, ...).
        strict: raise on a failed sync instead of rolling back and going on.
        timeout: seconds a sync may wait (default: the transport's own deadline).
        aggregate: how the members' contributions are combined: ``"mean"`` (default, exact),
            ``"clip"``, ``"trimmed_mean"``, ``"centered_clip"``, a dict or an
            :class:`~lowcomm.comm.aggregate.Aggregate` with its knobs (clip_ratio 3, trim 1,
            iters 3, hard_bound 100); see :mod:`lowcomm.comm.aggregate`. A rule the transport
            cannot serve raises ValueError here.

    Capabilities a training loop may rely on (declared here, overridden by the strategies that
    have them; loops never probe for attributes):

    - :attr:`shares_global_state`: every member holds bit-identical global parameters, outer
      state and counters after each committed sync (DiLoCo, Streaming DiLoCo), so a joining
      member can check a donor's snapshot against the others'.
    - :meth:`flush`: land a sync still in flight (call it after the last step).
    - :attr:`compute_guard`: a context-manager factory around the strategy's own compute outside
      the inner step (DeMo's transforms); a simulator that serializes compute sets it to its lock.
    - :meth:`detections`: members this strategy itself screened out or rejected (robust
      aggregation applied outside the transport: DeMo's decode, NoLoCo's partner screening).
    - :attr:`supports_sharding`: the strategy is exact on DTensor (FSDP2) shards, one shard per rank
      (:mod:`.placement`); strategies without it raise ValueError at construction, with
      :attr:`sharding_reason`.
    """

    shares_global_state: bool = False
    supports_sharding: bool = False
    sharding_reason: str = "it has not been shown exact on FSDP shards"

    def __init__(self, inner: torch.optim.Optimizer | Sequence[torch.optim.Optimizer], *, transport: Transport,
                 strict: bool = False, timeout: float | None = None, aggregate: Any = None):
        inner = as_inner(inner)
        if isinstance(inner, OuterOptimizer):
            raise ValueError("inner is already a lowcomm OuterOptimizer; wrap the plain torch optimizer instead")
        if not isinstance(inner, torch.optim.Optimizer):
            raise ValueError(f"inner must be a torch.optim.Optimizer (e.g. torch.optim.AdamW(model.parameters())), "
                             f"got {type(inner).__name__}")
        if transport is None:
            raise ValueError("transport is required: pass transport=lowcomm.connect() (a world of one when not "
                             "launched by torchrun or a coordinator)")
        self.transport = check_transport(transport)
        params = [p for g in inner.param_groups for p in g["params"]]
        for i, p in enumerate(params):
            if not torch.is_floating_point(p):
                raise ValueError(f"parameter {i} has dtype {p.dtype}; lowcomm syncs floating-point parameters only - "
                                 f"keep integer buffers out of the optimizer")
            if not p.requires_grad:
                raise ValueError(f"parameter {i} (shape {tuple(p.shape)}) does not require grad; build the inner "
                                 f"optimizer from the trainable parameters only, e.g. "
                                 f"[p for p in model.parameters() if p.requires_grad]")
        if len({id(p) for p in params}) != len(params):
            raise ValueError("a parameter appears twice in the inner optimizer's param_groups")
        if timeout is not None and timeout <= 0:
            raise ValueError(f"timeout must be positive seconds, got {timeout!r}")
        self.sharded = placement.check_sharded(params, self.transport, type(self).__name__, self.supports_sharding,
                                               self.sharding_reason)
        if self.sharded:
            for opt in inner_list(inner):
                placement.check_inner_on_shards(opt)
        # torch's own initialisation (hook registries, step patching, ...). The param_groups, state
        # and defaults it assigns are properties forwarding to the inner optimizer (so schedulers and
        # hooks act on the inner groups, even after inner.load_state_dict); until ``self.inner`` is
        # set those assignments are dropped, and the inner optimizer keeps its own.
        super().__init__(inner.param_groups, inner.defaults)
        self.inner = inner
        self.aggregate = self.resolve_aggregate(aggregate)
        if self.sharded and self.aggregate.robust:
            raise ValueError("robust aggregation judges each member's contribution by its norm, but with FSDP each "
                             "rank holds a shard and would judge its shard alone (another rule per shard); use "
                             "aggregate='mean' with sharded parameters, or DistributedDataParallel inside the replica")
        # centered_clip starts each sync from the previous committed aggregate of the same unit
        self._centers: dict[str, list[torch.Tensor]] = {}
        self.strict = bool(strict)
        self.timeout = timeout
        self.local_step = 0  # inner steps taken
        self.sync_count = 0  # syncs committed
        self.failed_syncs = 0  # syncs rolled back
        self.sync_log: list[SyncRecord] = []
        self.units: list[SyncUnit] = []
        self.compute_guard: Callable[[], contextlib.AbstractContextManager[Any]] = contextlib.nullcontext
        self.work: Any = None  # a WorkTrigger (lowcomm.outer.work) when syncs are called by tokens

    # ---- torch.optim.Optimizer surface ------------------------------------------------------
    @property
    def param_groups(self) -> list[dict[str, Any]]:  # type: ignore[override]
        """The inner optimizers' param groups (shared, so LR schedulers drive the inner lrs)."""
        return self.inner.param_groups

    @param_groups.setter
    def param_groups(self, value: list[dict[str, Any]]) -> None:
        if "inner" in self.__dict__:  # not while torch's __init__ runs (see __init__)
            self.inner.param_groups = value

    @property
    def state(self) -> Any:  # type: ignore[override]
        """The inner optimizer's per-parameter state."""
        return self.inner.state

    @state.setter
    def state(self, value: Any) -> None:
        if "inner" in self.__dict__:
            self.inner.state = value

    @property
    def defaults(self) -> dict[str, Any]:  # type: ignore[override]
        return self.inner.defaults

    @defaults.setter
    def defaults(self, value: dict[str, Any]) -> None:
        if "inner" in self.__dict__:
            self.inner.defaults = value

    @property
    def inners(self) -> list[torch.optim.Optimizer]:
        """The plain inner optimizers (one, or those of the list given as ``inner``)."""
        return inner_list(self.inner)

    @property
    def params(self) -> list[torch.Tensor]:
        """Every parameter of the inner optimizer, in param-group order."""
        return [p for g in self.inner.param_groups for p in g["params"]]

    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Inner step, then the strategy's outer work if any is due."""
        loss = self.inner.step(closure)
        self.local_step += 1
        self.after_inner_step()
        return loss

    def count_tokens(self, tokens: int) -> None:
        """Tokens of the next inner step (weighs the contributions of ``sync_tokens=``; ignored otherwise)."""
        if self.work is not None:
            self.work.count(tokens)

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.inner.zero_grad(set_to_none=set_to_none)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        if "inner" not in self.__dict__:  # torch's __init__ adding the inner optimizer's own groups
            return
        raise ValueError("add parameter groups to the inner optimizer before wrapping it in a lowcomm optimizer")

    def __repr__(self) -> str:
        return f"{type(self).__name__}(inner={type(self.inner).__name__}, world_size={self.transport.world_size})"

    # ---- what a strategy implements ------------------------------------------------------------
    def after_inner_step(self) -> None:
        """Called after every inner step (``self.local_step`` already counts it)."""
        raise NotImplementedError

    def flush(self) -> bool | None:
        """Land a sync still in flight, if any (None when nothing was in flight, else whether it
        committed). Strategies whose syncs finish inside :meth:`step` have nothing to land."""
        return None

    def extra_state_dict(self) -> dict[str, Any]:
        """Strategy-specific state (tensors and plain values) to save beside the common state."""
        return {}

    def load_extra_state_dict(self, sd: dict[str, Any]) -> None:
        """Restore what :meth:`extra_state_dict` saved."""

    def resolve_aggregate(self, aggregate: Any) -> Any:
        """Check ``aggregate=`` against the transport (strategies that apply rules elsewhere override)."""
        from .robust import resolve_aggregate

        return resolve_aggregate(self.transport, aggregate)

    def detections(self) -> list[dict[str, Any]]:
        """What this strategy screened out itself, oldest first: ``{"member", "kind", "step", ...}``
        (the transport's own offences are counted by the transport)."""
        return []

    def reduce_kwargs(self, name: str) -> dict[str, Any]:
        """The robust-aggregation keywords of ``all_reduce`` for the unit ``name`` (none for the mean)."""
        if not self.aggregate.robust:
            return {}
        return {"aggregate": self.aggregate, "center": self._centers.get(name)}

    def remember_center(self, name: str, result: Sequence[torch.Tensor]) -> None:
        """After a committed all-reduce: its result is the next ``centered_clip`` start of ``name``."""
        if self.aggregate.rule == "centered_clip":
            self._centers[name] = [b.detach().clone() for b in result]

    # ---- shared machinery ------------------------------------------------------------------------
    @torch.no_grad()
    def broadcast_initial(self, tensors: Sequence[torch.Tensor] | None = None) -> None:
        """Make every member start from the first member's parameters (one broadcast)."""
        tensors = [placement.local_tensor(p) for p in (self.params if tensors is None else tensors)]
        src = self.transport.members()[0]
        self.transport.broadcast(tensors, src=src).wait(self.timeout)

    def launch_reduce(self, unit: SyncUnit, buffers: list[torch.Tensor], codec: Any = None) -> PendingSync:
        """Start the mean all-reduce of ``buffers`` (the unit's pseudo-gradients).

        An operation that cannot even start (e.g. this worker is no longer a member) gives a
        failed handle, so :meth:`finish` rolls back the same way as for a failure in flight.
        """
        try:
            handle = self.transport.all_reduce(buffers, op="mean", codec=codec, **self.reduce_kwargs(unit.name))
        except CommError as e:
            handle = Handle.failed(e)
        return PendingSync(unit, handle, buffers, self.local_step, self._work_tokens())

    def _work_tokens(self) -> dict[int, int] | None:
        return None if self.work is None else dict(self.work.last)

    def finish(self, pending: PendingSync, apply: Callable[[PendingSync], None],
               rollback: Callable[[PendingSync], None] | None = None) -> bool:
        """Wait for ``pending``; on success run ``apply`` and count the sync, else roll back.

        ``rollback`` defaults to resetting the unit's local parameters to its global ones.
        Returns whether the sync committed.
        """
        try:
            pending.handle.wait(self.timeout)
        except CommError as e:
            self.handle_failure(pending, e, rollback)
            return False
        self.remember_center(pending.unit.name, pending.buffers)
        apply(pending)
        self.sync_count += 1
        self.sync_log.append(self._sync_record(pending, True))
        self.transport.on_sync_applied(self)  # lets a transport snapshot committed state (joining peers)
        return True

    def _sync_record(self, pending: PendingSync, committed: bool, error: str = "") -> SyncRecord:
        from ..comm.tokens import token_weights

        tokens = pending.tokens or {}
        return SyncRecord(pending.name, pending.launch_step, self.local_step,
                          [] if pending.handle.op_id is None else [pending.handle.op_id], committed, error,
                          dict(tokens), token_weights(tokens) if tokens else {})

    def handle_failure(self, pending: PendingSync, err: CommError,
                       rollback: Callable[[PendingSync], None] | None = None) -> None:
        """Roll a failed sync back, log and count it, refresh membership (or raise if strict)."""
        (rollback or (lambda p: p.unit.reset_locals()))(pending)
        self.failed_syncs += 1
        self.sync_log.append(self._sync_record(pending, False, str(err)))
        log.warning("sync of %s launched at step %d failed and was rolled back: %s",
                    pending.name, pending.launch_step, err)
        try:
            self.transport.refresh()
        except CommError as e2:  # membership could not be refreshed now; the next sync will tell
            log.warning("could not refresh membership after a failed sync: %s", e2)
        if self.strict:
            raise err

    # ---- state ---------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Inner state, global parameters, outer state and counters (tensors are references, as in torch).

        Hooks registered with ``register_state_dict_pre_hook``/``_post_hook`` run as in torch: the
        pre-hooks before, the post-hooks after, each post-hook may return a replacement dict.
        """
        for pre_hook in self._optimizer_state_dict_pre_hooks.values():
            pre_hook(self)
        sd = {
            "inner": [o.state_dict() for o in self.inners],
            "units": [u.state_dict() for u in self.units],
            "counters": {"local_step": self.local_step, "sync_count": self.sync_count,
                         "failed_syncs": self.failed_syncs},
            "extra": self.extra_state_dict(),
            **({"centers": {k: list(v) for k, v in self._centers.items()}} if self._centers else {}),
            **({"work": self.work.state_dict()} if self.work is not None else {}),
        }
        if self.sharded:  # each rank's state is its own shard: 1/replica_size of the model
            sd["placement"] = {"replica_size": len(self.transport.replica_ranks)}
        for post_hook in self._optimizer_state_dict_post_hooks.values():
            result = post_hook(self, sd)
            if result is not None:
                sd = result
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`'s result; load-state-dict pre/post hooks run as in torch."""
        state_dict = dict(state_dict)  # shallow copy, as torch's
        for pre_hook in self._optimizer_load_state_dict_pre_hooks.values():
            result = pre_hook(self, state_dict)
            if result is not None:
                state_dict = result
        self._load_state_dict(state_dict)
        for post_hook in self._optimizer_load_state_dict_post_hooks.values():
            post_hook(self)

    def check_placement(self, saved: dict[str, Any] | None) -> None:
        """A ValueError unless ``saved`` (a state_dict's "placement") matches how this optimizer is sharded."""
        mine = {"replica_size": len(self.transport.replica_ranks)} if self.sharded else None
        if saved != mine:
            what = lambda p: f"sharded over replicas of {p['replica_size']} ranks" if p else "not sharded"  # noqa: E731
            raise ValueError(f"the state was saved {what(saved)}, this optimizer is {what(mine)}: each rank's state is "
                             f"its own shard, so resume with the same replica size and parallelism")

    def _load_state_dict(self, state_dict: dict[str, Any]) -> None:
        missing = {"inner", "units", "counters"} - set(state_dict)
        if missing:
            raise ValueError(f"not a lowcomm optimizer state_dict (missing {sorted(missing)}); "
                             f"pass what {type(self).__name__}.state_dict() returned")
        if len(state_dict["units"]) != len(self.units):
            raise ValueError(f"state has {len(state_dict['units'])} sync units, this optimizer has "
                             f"{len(self.units)}: build it with the same model and settings")
        self.check_placement(state_dict.get("placement"))
        load_inner(self.inners, state_dict["inner"])
        for u, sd in zip(self.units, state_dict["units"]):
            u.load_state_dict(sd)
        c = state_dict["counters"]
        self.local_step = int(c["local_step"])
        self.sync_count = int(c["sync_count"])
        self.failed_syncs = int(c.get("failed_syncs", 0))
        self.load_extra_state_dict(state_dict.get("extra", {}))
        self._centers = {k: [t.detach().clone() for t in v] for k, v in state_dict.get("centers", {}).items()}
        if self.work is not None:
            self.work.load_state_dict(state_dict.get("work", {}))
