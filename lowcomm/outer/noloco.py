"""NoLoCo: No-all-reduce Low Communication training (Kolehmainen et al. 2025, arXiv 2506.10911).

Workers never join a global collective. Every ``sync_every`` (H) inner steps, all workers
draw the same random permutation of the current members from a shared seed and the sync
number, cut it into groups of ``group_size`` (n, default 2), and each worker averages only
with its own group (one ``transport.group_reduce``; point-to-point sends, no process groups).

Each worker ``i`` keeps its own global (slow) weights ``phi_i`` and outer momentum ``m_i``.
With ``theta_j`` the fast weights after H inner steps and ``mean_G`` the mean over the group:

    m_i   = mu * m_i + eta * (mean_G(theta_j) - phi_i)              (1)
    phi_i = phi_i + m_i
    theta_i = phi_i

Only ``theta_i`` travels: P values per worker per sync for n=2, independent of W.

**Relation to the paper's update.** The paper writes the outer step with three weights, a
momentum ``alpha``, a pseudo-gradient weight ``beta`` and a consensus weight ``gamma``::

    Delta_i = alpha * Delta_i - beta * mean_G(phi_j - theta_j) - gamma * (phi_i - mean_G(phi_j))
    phi_i   = phi_i + Delta_i

(the group mean of the pseudo-gradients ``delta_j = phi_j - theta_j``, plus a term that pulls
``phi_i`` towards the group's mean slow weights). Since
``mean_G(phi_j - theta_j) + (phi_i - mean_G(phi_j)) = phi_i - mean_G(theta_j)``, choosing
``beta = gamma = eta`` gives exactly (1) with ``alpha = mu``, and that is what the authors'
reference code does (outer lr 0.7 on both terms, heavy-ball momentum). ``consensus_lr``
selects the general form: ``gamma = consensus_lr``, ``beta = outer_lr``. Then the group
needs ``mean_G(phi_j)`` as well, so each worker sends ``[theta_i, phi_i]`` (2P values).
``consensus_lr=0`` drops the consensus term (workers only share pseudo-gradients and drift
apart), the ablation the benchmark runs; then only ``phi_i - theta_i`` travels (P values).

**Stock optimizer.** The outer step is ``torch.optim.SGD(lr=eta, momentum=mu, dampening=0)``
stepping ``phi_i`` with gradient ``g = phi_i - mean_G(theta_j)``. SGD keeps
``b = mu*b + g`` and does ``phi -= eta*b`` (its first step sets ``b = g``, the same as
``b = 0`` before it). With ``m := -eta*b``: ``m = mu*m - eta*g = mu*m + eta*(mean_G(theta_j)
- phi_i)`` and ``phi += m``: equation (1), term for term (tests check it against the
closed form). In the general form ``g = mean_G(phi_j - theta_j) + (gamma/eta)(phi_i -
mean_G(phi_j))``, so ``-eta*g`` is the paper's ``-beta*... - gamma*...``.

**Groups.** :func:`noloco_groups` is a pure function of (members, n, seed, sync number), so
every worker computes the same groups without talking; member ids (not positions) make it
consistent across membership changes. When n does not divide W the last group absorbs the
remainder (W=5, n=2: groups of 2 and 3); W < n gives one group of everyone; W=1 a group of
one, which runs update (1) with ``mean_G(theta) = theta_i``.

**Failure.** A failed group exchange rolls back like every lowcomm sync: ``theta_i =
phi_i``, momentum and ``phi_i`` untouched, the failure counted and logged in ``sync_log``.
Other groups are not affected. Each sync first calls ``transport.refresh()`` so that every
worker draws its groups over the same (current) member set; workers whose views disagree
(a death not yet seen by everyone) fail that one exchange and roll back.

**Partner screening** (``aggregate=`` any rule but ``"mean"``): a group of two has no majority,
so instead of a coordinate-wise rule each worker rejects a partner whose tensors are farther from
its own than ``clip_ratio`` (default 3) x the running median of the distances of the partners it
accepted before (:class:`~lowcomm.outer.robust.PartnerScreen`; through
``transport.group_reduce(..., check=...)``): the whole group's exchange fails, is rolled back
like any failure, and the partner is named in the error (and in :meth:`NoLoCo.detections`).

**Initial alignment.** By default the constructor broadcasts the first member's parameters
once (as the other strategies do), so workers start from one model; it is the only
operation that involves everyone and happens once. ``broadcast_initial=False`` skips it
when every worker builds the model from the same seed; after that, every operation is a
``group_reduce``.
"""

from __future__ import annotations

import hashlib
import logging
import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from ..comm.base import RULES, CommError, Handle, Transport
from .base import OuterOptimizer, PendingSync, SyncUnit, check_float, check_int
from .placement import resolve_anchor_device
from .registry import StrategyConfig, register_strategy
from .robust import PartnerScreen

__all__ = ["NoLoCo", "NoLoCoConfig", "noloco_groups"]

log = logging.getLogger(__name__)


def _round_seed(seed: int, sync_round: int) -> int:
    # A stable 63-bit seed from (seed, round): sha256 does not depend on PYTHONHASHSEED
    # or the platform, so every worker derives the same generator state.
    digest = hashlib.sha256(f"lowcomm.noloco:{int(seed)}:{int(sync_round)}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def noloco_groups(members: Sequence[int], group_size: int, seed: int, sync_round: int) -> list[list[int]]:
    """The groups of sync number ``sync_round``: a seeded permutation of ``members`` cut into groups.

    Members are sorted first, so the result depends only on the set of member ids. Groups of
    ``group_size``; the last group absorbs the remainder; fewer members than ``group_size``
    make one group. Each group is returned sorted.
    """
    check_int("group_size", group_size, 1)
    ids = sorted(int(m) for m in members)
    if not ids:
        raise ValueError("noloco_groups needs at least one member")
    g = torch.Generator().manual_seed(_round_seed(seed, sync_round))
    perm = [ids[i] for i in torch.randperm(len(ids), generator=g, device="cpu").tolist()]
    k = max(1, len(perm) // group_size)
    groups = [perm[j * group_size:(j + 1) * group_size] for j in range(k)]
    groups[-1].extend(perm[k * group_size:])  # remainder joins the last group
    return [sorted(grp) for grp in groups]


class NoLoCo(OuterOptimizer):
    """NoLoCo around any inner optimizer (see the module docstring for the update).

    Args:
        inner: the inner optimizer (AdamW in the paper).
        transport: a lowcomm transport; only ``group_reduce`` is used after construction.
        sync_every: H, inner steps between group exchanges (reference code: 50).
        group_size: n, workers per group (default 2: pairwise averaging).
        outer_lr: eta (the paper's beta), weight of the pseudo-gradient term (default 0.7).
        outer_momentum: mu (the paper's alpha), outer heavy-ball momentum (default 0.5); the
            older spelling ``momentum=`` still works for one release, with a DeprecationWarning.
        consensus_lr: gamma, weight of the consensus term; None means ``outer_lr`` (the
            reference's choice, only theta travels); any other value sends theta and phi.
        nesterov: use Nesterov momentum in the stock SGD instead of heavy-ball.
        seed: shared seed of the group draws; must be equal on every worker.
        broadcast_initial: align every worker to the first member's weights at construction.
        anchor_device: where the global weights and outer momentum live (None: the parameters' device;
            "cpu": CPU memory, pinned when CUDA is present; the exchanged copies are made there).
        aggregate: any rule but ``"mean"`` turns partner screening on (see the module docstring).
        strict: raise on a failed exchange instead of rolling back.
        timeout: seconds an exchange may wait.
    """

    supports_sharding = True  # elementwise: exact on each FSDP shard (groups are drawn per replica)

    def __init__(self, inner: torch.optim.Optimizer, *, transport: Transport, sync_every: int = 50,
                 group_size: int = 2, outer_lr: float = 0.7, outer_momentum: float = 0.5,
                 consensus_lr: float | None = None, nesterov: bool = False, seed: int = 0,
                 broadcast_initial: bool = True, anchor_device: Any = None, strict: bool = False,
                 timeout: float | None = None, momentum: float | None = None, aggregate: Any = "mean"):
        super().__init__(inner, transport=transport, strict=strict, timeout=timeout, aggregate=aggregate)
        self.partner_screen = PartnerScreen(self.aggregate.clip_ratio) if self.aggregate.robust else None
        if momentum is not None:
            warnings.warn("NoLoCo(momentum=...) is deprecated; use outer_momentum=", DeprecationWarning, stacklevel=2)
            outer_momentum = momentum
        self.sync_every = check_int("sync_every", sync_every, 1, "it is H, the number of inner steps between syncs")
        self.group_size = check_int("group_size", group_size, 1, "2 averages pairs, as in the paper")
        self.outer_lr = check_float("outer_lr", outer_lr, 0.0)
        if self.outer_lr <= 0:
            raise ValueError(f"outer_lr must be > 0 (the paper and reference use 0.7), got {outer_lr!r}")
        self.outer_momentum = check_float("outer_momentum", outer_momentum, 0.0)
        if self.outer_momentum >= 1:
            raise ValueError(f"outer_momentum must be in [0, 1) (reference: 0.5), got {outer_momentum!r}")
        self.consensus_lr = None if consensus_lr is None else check_float("consensus_lr", consensus_lr, 0.0)
        if nesterov and self.outer_momentum == 0:
            raise ValueError("nesterov=True needs outer_momentum > 0")
        self.nesterov = bool(nesterov)
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"seed must be an integer shared by every worker, got {seed!r}")
        self.seed = seed
        self.last_group: list[int] = []
        device = resolve_anchor_device(anchor_device)
        if broadcast_initial:
            self.broadcast_initial()
        lr, mu, nest = self.outer_lr, self.outer_momentum, self.nesterov
        self.units = [SyncUnit(self.params, lambda ps: torch.optim.SGD(ps, lr=lr, momentum=mu, dampening=0.0,
                                                                        nesterov=nest), anchor_device=device)]

    def detections(self) -> list[dict[str, Any]]:
        rejected = [] if self.partner_screen is None else self.partner_screen.rejected
        return [{"member": m, "kind": "partner_rejected", "step": st, "detail": f"distance {d:.3g} > {lim:.3g}"}
                for st, m, d, lim in rejected]

    def resolve_aggregate(self, aggregate: Any) -> Any:
        from .robust import resolve_aggregate

        return resolve_aggregate(self.transport, aggregate, allowed=RULES, who="NoLoCo")

    @property
    def sends_phi(self) -> bool:
        """Whether the general form is on (theta and phi travel: 2P values per peer)."""
        return self.consensus_lr is not None and self.consensus_lr not in (0.0, self.outer_lr)

    @property
    def sends_pseudo_grad(self) -> bool:
        """``consensus_lr=0``: only ``phi_i - theta_i`` travels (P values), averaged in the group."""
        return self.consensus_lr == 0.0 and self.outer_lr != 0.0

    @property
    def sync_round(self) -> int:
        """Number of the sync due at the current step (the same on every worker in lockstep)."""
        return self.local_step // self.sync_every

    def groups(self, sync_round: int | None = None) -> list[list[int]]:
        """All groups of a sync round (default: the current one) over the current members."""
        r = self.sync_round if sync_round is None else sync_round
        return noloco_groups(self.transport.members(), self.group_size, self.seed, r)

    def after_inner_step(self) -> None:
        if self.local_step % self.sync_every == 0:
            self.sync()

    @torch.no_grad()
    def sync(self) -> bool:
        """Exchange weights with this round's group and take the outer step. Returns success."""
        unit = self.units[0]
        # Groups are drawn over the members every worker currently sees: bring the view up
        # to date first (a no-op on fixed-membership transports), so a peer that died since
        # the last sync is left out by everyone alike rather than by its last partner only.
        try:
            self.transport.refresh()
        except CommError as e:
            log.warning("could not refresh membership before a NoLoCo sync: %s", e)
        me = self.transport.rank
        group = next((g for g in self.groups() if me in g), [me])
        self.last_group = group
        # theta travels as is: group_reduce writes mean_G(theta) into the parameters only on
        # success, and the parameters are reset to phi afterwards either way.
        check = None
        if self.partner_screen is not None:
            moved = math.sqrt(sum(float((p.double() - a.double().to(p.device)).pow(2).sum())
                                  for p, a in zip(unit.locals, unit.anchors)))
            check = self.partner_screen.check(me, moved, self.local_step)
        if self.sends_pseudo_grad:
            # theta := phi - theta in place (the sync resets theta anyway): the group averages
            # pseudo-gradients only, as DiLoCo does globally.
            buffers = unit.pseudo_grads()
        else:  # theta itself (offloaded: a copy beside phi)
            buffers = list(unit.working_copies())
        if self.sends_phi:
            buffers += [a.clone() for a in unit.anchors]
        try:
            handle = (self.transport.group_reduce(group, buffers, op="mean") if check is None
                      else self.transport.group_reduce(group, buffers, op="mean", check=check))
        except CommError as e:  # could not even start (e.g. no longer a member): roll back the same way
            handle = Handle.failed(e)
        pending = PendingSync(unit, handle, buffers, self.local_step)
        return self.finish(pending, self._apply)

    def _apply(self, pending: PendingSync) -> None:
        unit = pending.unit
        n = len(unit.params)
        mean_theta = pending.buffers[:n]  # the parameters themselves, or their copies beside phi
        if self.sends_pseudo_grad:
            pass  # the buffers already hold mean_G(phi_j - theta_j), the gradient to step with
        elif self.sends_phi:
            # g = mean(phi_j - theta_j) + (gamma/eta) (phi_i - mean(phi_j)), built in the
            # parameters (overwritten by reset_locals below).
            c = self.consensus_lr / self.outer_lr
            for p, a, mphi in zip(mean_theta, unit.anchors, pending.buffers[n:]):
                p.neg_().add_(mphi)
                if c != 0:
                    p.add_(a - mphi, alpha=c)
        else:
            # g = phi_i - mean_G(theta_j): SGD(lr=eta, momentum=mu) on it is equation (1).
            for p, a in zip(mean_theta, unit.anchors):
                p.neg_().add_(a)
        unit.outer_step(mean_theta)
        unit.reset_locals()

    def extra_state_dict(self) -> dict:
        return {"seed": self.seed, "group_size": self.group_size, "sync_every": self.sync_every}

    def load_extra_state_dict(self, sd: dict) -> None:
        for key in ("seed", "group_size", "sync_every"):
            if key in sd and sd[key] != getattr(self, key):
                raise ValueError(f"checkpoint was saved with {key}={sd[key]!r} but this NoLoCo has "
                                 f"{key}={getattr(self, key)!r}; build it with the same settings so the "
                                 f"group draws agree with the other workers")


@dataclass
class NoLoCoConfig(StrategyConfig):
    """NoLoCo's knobs (defaults: the authors' reference code, arXiv 2506.10911)."""

    deprecated: ClassVar[dict[str, str]] = {"momentum": "outer_momentum"}

    sync_every: int = 50  # H, inner steps between group exchanges
    group_size: int = 2  # n, workers per group (2: pairwise averaging)
    outer_lr: float = 0.7  # eta, weight of the pseudo-gradient term
    outer_momentum: float = 0.5  # mu, outer heavy-ball momentum
    consensus_lr: float | None = None  # gamma; None: outer_lr (only theta travels)
    nesterov: bool = False  # Nesterov instead of heavy-ball outer momentum
    seed: int = 0  # shared seed of the group draws (equal on every worker)
    anchor_device: str | None = None  # global weights and outer momentum: None (parameters' device) or "cpu"
    aggregate: str = "mean"  # robust aggregation rule spec, e.g. "clip", "trimmed_mean:trim=2" (lowcomm.comm.aggregate)

    def build(self, inner, transport, model=None) -> NoLoCo:
        return NoLoCo(inner, transport=transport, sync_every=self.sync_every, group_size=self.group_size,
                      outer_lr=self.outer_lr, outer_momentum=self.outer_momentum, consensus_lr=self.consensus_lr,
                      nesterov=self.nesterov, seed=self.seed, anchor_device=self.anchor_device,
                      aggregate=self.aggregate)


register_strategy("noloco", NoLoCoConfig,
                  "NoLoCo: no all-reduce; each sync averages weights in random groups of n (pairs), "
                  "heavy-ball outer step")
