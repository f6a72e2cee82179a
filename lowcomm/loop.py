"""What every training loop of lowcomm shares: the simulator's workers and ``lowcomm train`` alike.

- :func:`resolve_strategy`: a registered strategy's typed config from knobs (command line,
  recipe, the simulator's presets), and the inner optimizer and learning rate it runs with;
- :func:`make_inner`: the one place an inner optimizer is built from its name
  (:data:`INNER_OPTIMIZERS`: "adamw", "sgd", "muon" = Muon + AdamW; :func:`register_inner` adds one);
- :func:`lr_factor` / :func:`lr_at`: the learning-rate schedule (linear warmup, then cosine or constant);
- :func:`worker_step`: one inner step of one worker (forward/backward, clipping, ``opt.step()``);
- :func:`evaluate` and :func:`eval_batches`: the held-out loss.

Each loop keeps only what is its own: the simulator runs many workers on a simulated clock
(:mod:`lowcomm.sim.runner`), ``lowcomm train`` the torchrun layout, checkpoints and logging
(:mod:`lowcomm.train`). The same settings give the same numbers in both (tests/test_loop.py).
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .outer.base import OuterOptimizer
from .outer.registry import StrategyConfig, get_strategy

__all__ = ["DEFAULT_INNER", "HEAD_NAMES", "INNER_OPTIMIZERS", "INNER_KEYS", "StepResult", "StrategySetup",
           "eval_batches", "evaluate", "lr_at", "lr_factor", "make_inner", "muon_split", "register_inner",
           "resolve_strategy", "worker_step"]

DEFAULT_INNER = "adamw"
"""The inner optimizer when neither the run nor the strategy names one."""

INNER_KEYS = ("inner", "lr")
"""Knob names that configure the inner optimizer rather than the strategy."""

InnerFactory = Callable[..., torch.optim.Optimizer | list[torch.optim.Optimizer]]


def _adamw(params: list[torch.Tensor], lr: float, *, weight_decay: float, betas: tuple[float, float]):
    return torch.optim.AdamW(params, lr=lr, betas=betas, weight_decay=weight_decay)


def _sgd(params: list[torch.Tensor], lr: float, *, weight_decay: float, betas: tuple[float, float]):
    # Plain SGD: DeMo's inner optimizer, whose momentum and decoupled weight decay are DeMo's own.
    return torch.optim.SGD(params, lr=lr)


HEAD_NAMES = ("head", "lm_head", "output")
"""Module names of an output head: its 2-D weight goes to AdamW, not Muon."""


def muon_split(model: torch.nn.Module, params: Sequence[torch.Tensor] | None = None
               ) -> tuple[list[tuple[str, torch.Tensor]], list[tuple[str, torch.Tensor]]]:
    """(named parameters for Muon, named parameters for AdamW) among ``params`` (default: every
    trainable parameter of ``model``): Muon takes the 2-D hidden weights; AdamW the embeddings
    (every ``nn.Embedding`` weight, so a head tied to one too), the weight of a module named as in
    :data:`HEAD_NAMES`, and every parameter that is not 2-D (norms, biases)."""
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    wanted = None if params is None else {id(p) for p in params}
    muon, adamw = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad or (wanted is not None and id(p) not in wanted):
            continue
        module = name.rsplit(".", 2)[-2] if name.count(".") >= 1 else ""
        hidden = p.ndim == 2 and id(p) not in embeddings and module not in HEAD_NAMES
        (muon if hidden else adamw).append((name, p))
    if wanted is not None and len(muon) + len(adamw) != len(wanted):
        raise ValueError("inner='muon': some parameters given are not trainable parameters of the model")
    return muon, adamw


def _muon(params: list[torch.Tensor], lr: float, *, weight_decay: float, betas: tuple[float, float],
          model: torch.nn.Module) -> list[torch.optim.Optimizer]:
    # MuLoCo (arXiv 2505.23725): Muon for the hidden matrices, its update rescaled to AdamW's RMS
    # ("match_rms_adamw") so one lr and one schedule fit both; AdamW for the rest.
    hidden, rest = muon_split(model, params)
    if not hidden:
        raise ValueError("inner='muon': the model has no 2-D hidden weights for Muon; use inner='adamw'")
    opts: list[torch.optim.Optimizer] = [torch.optim.Muon(hidden, lr=lr, weight_decay=weight_decay,
                                                          adjust_lr_fn="match_rms_adamw")]
    if rest:
        opts.append(torch.optim.AdamW(rest, lr=lr, betas=betas, weight_decay=weight_decay))
    return opts


INNER_OPTIMIZERS: dict[str, InnerFactory] = {"adamw": _adamw, "sgd": _sgd, "muon": _muon}
"""Inner optimizers by name: ``factory(params, lr, *, weight_decay, betas) -> torch.optim.Optimizer``, or a
list of optimizers over disjoint parameters (every strategy takes a list as ``inner``). "muon" is
MuLoCo's split: ``[Muon, AdamW]`` over :func:`muon_split`."""

_NEEDS_MODEL = {"muon"}


def register_inner(name: str, factory: InnerFactory, replace: bool = False, needs_model: bool = False) -> None:
    """Make ``factory(params, lr, *, weight_decay, betas)`` available as inner optimizer ``name``.

    ``needs_model=True``: the factory is also given ``model=`` (e.g. to tell embeddings from hidden weights).
    """
    if name in INNER_OPTIMIZERS and not replace:
        raise ValueError(f"inner optimizer {name!r} is already registered; pass replace=True to overwrite it")
    INNER_OPTIMIZERS[name] = factory
    (_NEEDS_MODEL.add if needs_model else _NEEDS_MODEL.discard)(name)


def make_inner(kind: str, params: Sequence[torch.Tensor], lr: float, *, weight_decay: float = 0.1,
               betas: Sequence[float] = (0.9, 0.95), model: torch.nn.Module | None = None
               ) -> torch.optim.Optimizer | list[torch.optim.Optimizer]:
    """The inner optimizer ``kind`` over ``params`` (the only place one is built from a name).

    A factory registered with ``needs_model`` ("muon") also needs ``model``, the module the
    parameters belong to.
    """
    if kind not in INNER_OPTIMIZERS:
        raise ValueError(f"unknown inner optimizer {kind!r}; choose one of {', '.join(INNER_OPTIMIZERS)}")
    if not lr > 0:
        raise ValueError(f"the inner learning rate must be > 0, got {lr!r}")
    b = tuple(float(x) for x in betas)
    if len(b) != 2:
        raise ValueError(f"betas must be two numbers, got {betas!r}")
    if kind in _NEEDS_MODEL:
        if not isinstance(model, torch.nn.Module):
            raise ValueError(f"inner optimizer {kind!r} needs the model (make_inner(..., model=model)) to tell "
                             f"hidden 2-D weights from embeddings and the head")
        return INNER_OPTIMIZERS[kind](list(params), lr, weight_decay=weight_decay, betas=b, model=model)
    return INNER_OPTIMIZERS[kind](list(params), lr, weight_decay=weight_decay, betas=b)


@dataclass
class StrategySetup:
    """A strategy ready to build: its typed config, and the inner optimizer and peak lr it runs with."""

    name: str
    config: StrategyConfig
    inner: str
    lr: float

    def build(self, model: torch.nn.Module, transport: Any, *, weight_decay: float = 0.1,
              betas: Sequence[float] = (0.9, 0.95)) -> OuterOptimizer:
        """The inner optimizer over ``model``'s trainable parameters, wrapped in the strategy."""
        inner = make_inner(self.inner, [p for p in model.parameters() if p.requires_grad], self.lr,
                           weight_decay=weight_decay, betas=betas, model=model)
        opt = self.config.build(inner, transport, model)
        if not isinstance(opt, OuterOptimizer):
            raise ValueError(f"strategy {self.name!r} built a {type(opt).__name__}; a strategy must build a "
                             f"lowcomm.OuterOptimizer")
        return opt


def resolve_strategy(name: str, knobs: Mapping[str, Any] | None = None, *, preset: Mapping[str, Any] | None = None,
                     inner: str = "", lr: float = 0.0, default_lr: float = 1e-3,
                     ignore_unknown: bool = False) -> StrategySetup:
    """Strategy ``name`` configured by ``preset`` then ``knobs`` (values parsed against the field types).

    ``"inner"`` and ``"lr"`` among the knobs or the preset configure the inner optimizer;
    ``inner``/``lr`` given here (non-empty) win over both; then the strategy's own choice
    (``Config.inner``, ``Config.lr``), then :data:`DEFAULT_INNER` and ``default_lr``. An unknown knob
    is a ValueError listing the known ones, unless ``ignore_unknown`` (the simulator passes one
    command line to several strategies, each taking the knobs it has).
    """
    strat = get_strategy(name)
    merged = {**(preset or {}), **(knobs or {})}
    settings = {k: merged.pop(k) for k in INNER_KEYS if k in merged}
    if ignore_unknown:
        takes = set(strat.knob_names())
        merged = {k: v for k, v in merged.items() if k.strip().replace("-", "_") in takes}
    config = strat.make_config(merged)
    kind = inner or settings.get("inner") or strat.config.inner or DEFAULT_INNER
    peak = lr or settings.get("lr") or strat.config.lr or default_lr
    try:
        peak = float(peak)
    except (TypeError, ValueError):
        raise ValueError(f"lr takes a number, got {peak!r}") from None
    if kind not in INNER_OPTIMIZERS:
        raise ValueError(f"unknown inner optimizer {kind!r}; choose one of {', '.join(INNER_OPTIMIZERS)}")
    return StrategySetup(name, config, str(kind), peak)


def lr_factor(step: int, *, steps: int, warmup: int, schedule: str = "cosine", min_lr_ratio: float = 0.1) -> float:
    """The peak-lr multiplier at inner step ``step`` (0-based): linear warmup, then cosine or constant."""
    if step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    span = max(1, steps - warmup)
    progress = min(1.0, (step - warmup) / span)
    return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def lr_at(peak: float, step: int, **schedule: Any) -> float:
    """Learning rate at inner step ``step``: ``peak * lr_factor(step, ...)``."""
    return peak * lr_factor(step, **schedule)


@dataclass
class StepResult:
    """What one worker step did."""

    loss: float  # mean training loss over the step's micro-batches
    compute_seconds: float  # forward, backward and clipping
    step_seconds: float  # opt.step() (inner step and any communication)
    synced: bool  # opt.step() communicated (a sync record was added)


def worker_step(model: torch.nn.Module, opt: OuterOptimizer, x: torch.Tensor, y: torch.Tensor, *, lr: float,
                grad_accum: int = 1, grad_clip: float = 0.0, amp: bool = False, fwd: torch.nn.Module | None = None,
                compute: Callable[[], contextlib.AbstractContextManager[Any]] = contextlib.nullcontext,
                last: bool = False) -> StepResult:
    """One inner step: set the lr, forward/backward over ``grad_accum`` micro-batches, clip, ``opt.step()``.

    ``fwd``: the module to run (a ``DistributedDataParallel`` wrapper of ``model``; its gradient
    all-reduce is skipped on all but the last micro-batch). ``compute``: a context manager around
    the forward/backward (the simulator's compute lock). ``last``: the run's last step, after which
    a sync still in flight is landed (``opt.flush()``).
    """
    for g in opt.param_groups:
        g["lr"] = lr
    fwd = model if fwd is None else fwd
    micro = x.shape[0] // grad_accum
    loss_sum = 0.0
    with compute():
        t0 = time.perf_counter()
        for j in range(grad_accum):
            xs, ys = x[j * micro:(j + 1) * micro], y[j * micro:(j + 1) * micro]
            sync_grads = fwd is model or j == grad_accum - 1
            with (contextlib.nullcontext() if sync_grads else fwd.no_sync()), \
                    torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=amp):
                _, loss = fwd(xs, ys)
                # 1/A is a power of two for the usual A, so the accumulated gradient equals the
                # mean over micro-batches exactly as DDP's mean over ranks does.
                (loss / grad_accum).backward()
            loss_sum += float(loss.detach())
        if grad_clip > 0:
            torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], grad_clip)
        fb = time.perf_counter() - t0
    n_log = len(opt.sync_log)
    t1 = time.perf_counter()
    opt.count_tokens(int(y.numel()))  # weighs this step's work when syncs are called by tokens
    opt.step()
    if last:
        opt.flush()  # land a sync still in flight (Streaming DiLoCo) before the final eval and exit
    opt.zero_grad(set_to_none=True)
    return StepResult(loss_sum / grad_accum, fb, time.perf_counter() - t1, len(opt.sync_log) != n_log)


def eval_batches(corpus: Any, batch_size: int, sequences: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The held-out batches: ``sequences`` sequences in batches of at most ``batch_size``."""
    return corpus.eval_batches(max(1, min(batch_size, sequences)), sequences)


@torch.no_grad()
def evaluate(model: torch.nn.Module, batches: Sequence[tuple[torch.Tensor, torch.Tensor]],
             device: torch.device | None = None, amp: bool = False) -> float:
    """Mean held-out cross-entropy (nats per token) over ``batches``."""
    was = model.training
    model.eval()
    total, count = 0.0, 0
    for x, y in batches:
        if device is not None:
            x, y = x.to(device), y.to(device)
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=amp and x.device.type == "cuda"):
            _, loss = model(x, y)
        total += float(loss) * x.numel()
        count += x.numel()
    model.train(was)
    return total / max(1, count)


def environment() -> dict[str, Any]:
    """What the numbers of a run depend on besides its config: torch's version and threads, the CPU, Python.

    Losses are bitwise repeatable on one machine with one thread count; another CPU (its vector
    instructions choose other matmul kernels) or another thread count changes the last bits of
    the float arithmetic, and DeMo's sign() update turns those into a visibly different run (the
    README states the tolerance).
    """
    import platform

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    except OSError:
        pass
    return {"torch": torch.__version__, "threads": torch.get_num_threads(), "cpu": cpu,
            "python": platform.python_version()}
