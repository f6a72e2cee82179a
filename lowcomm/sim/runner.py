"""Run W workers of a real model on real data through the local transport, and time them.

:func:`run_strategy` trains the small GPT with one registered strategy: W worker threads
(:func:`lowcomm.comm.local.run_local`), each with its own disjoint data shard, the same
initial weights and the same number of tokens. Each worker's compute (forward, backward
and the inner optimizer step) runs under one shared lock, one worker at a time, so the
measured seconds are those of a worker alone on the machine rather than of W threads
fighting over two cores. Communication runs outside the lock, in the transports' threads.

At evaluation points every worker's parameters are averaged and the averaged model is
evaluated on held-out text (for DiLoCo at a sync boundary this is the global model; for
NoLoCo, whose workers never agree exactly, it is their mean). At the end each worker is
also evaluated alone when the workers differ, and the worst is reported.

Attacks (``SimConfig.attackers`` K > 0 with ``attack``): the last K workers are attackers
(:mod:`lowcomm.comm.adversary`); evaluations average and judge the W - K honest workers only,
and the result records the attack, the aggregation rule, the offences detected and the members
ejected (``LocalWorld``'s offence book; NoLoCo's rejected partners count as detections).

Afterwards the simulated clock (:mod:`lowcomm.sim.clock`) places every communication in
time from ``opt.sync_log`` (launch and finish steps, ledger op ids) and sizes it from the
ledgers, at each bandwidth of the network model. A :class:`Projection` replays the same
schedule with a configured device speed and model size instead of the measured ones.
"""

from __future__ import annotations

import contextlib
import logging
import math
import threading
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from ..comm.adversary import ATTACKS, Adversary
from ..comm.local import LocalWorld, run_local
from ..data import Corpus, load_corpus
from ..loop import INNER_KEYS, eval_batches, evaluate, lr_factor, resolve_strategy, worker_step
from ..models import GPT, GPTConfig
from ..outer.registry import get_strategy
from .clock import CommEvent, Network, Projection, simulate_clock
from .presets import preset
from .uneven import TokenRun, check_speeds, phase_clock, sync_seconds

__all__ = ["DEFAULT_BANDWIDTHS", "Projection", "RunResult", "SimConfig", "build_knobs", "run_strategy"]

log = logging.getLogger(__name__)

DEFAULT_BANDWIDTHS = (10e6, 100e6, 1e9, 10e9)
"""Bits per second at which every run's wall-clock is simulated: 10 Mbit/s ... 10 Gbit/s."""


def bandwidth_label(bps: float) -> str:
    """``100e6 -> "100Mbit"``."""
    for unit, div in (("Gbit", 1e9), ("Mbit", 1e6), ("kbit", 1e3)):
        if bps >= div:
            v = bps / div
            return f"{v:g}{unit}"
    return f"{bps:g}bit"


@dataclass
class SimConfig:
    """Everything a simulated run depends on (the same for every strategy of a comparison)."""

    workers: int = 4  # W, simulated workers
    steps: int = 200  # inner steps per worker
    batch_size: int = 16  # sequences per worker per step
    model: GPTConfig = field(default_factory=GPTConfig)  # the GPT's shape (vocab set from the data)
    lr: float = 1e-3  # peak inner learning rate (a strategy or its preset may set its own "lr")
    warmup_steps: int = 20  # linear warmup steps, then cosine decay to min_lr_ratio * lr
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.1  # AdamW weight decay
    betas: tuple[float, float] = (0.9, 0.95)  # AdamW betas
    grad_clip: float = 0.0  # clip each worker's gradient to this global norm (0: off)
    seed: int = 0  # model init and data order
    data: str | None = None  # corpus path (None: the stdlib's source)
    vocab_size: int | None = None  # for pre-tokenized uint16 data
    eval_every: int = 25  # steps between held-out evaluations
    eval_sequences: int = 64  # held-out sequences per evaluation
    threads: int = 2  # torch threads for compute
    bandwidths: Sequence[float] = DEFAULT_BANDWIDTHS  # bits/s to simulate
    latency: float = 0.01  # seconds per communication round (wide-area)
    link_efficiency: float = 1.0  # share of each bandwidth the payload gets (headers, ACKs, TCP sharing)
    projection: Projection | None = None
    # Configured compute per inner step (a device speed), used by the clock instead of the
    # measured times, so runs on a busy machine or on different machines compare fairly.
    # None: measured. A strategy's own extra compute (DeMo's transforms) is then not charged.
    step_seconds: float | None = None
    init_state: str | None = None  # safetensors file of model weights to start from (warm start)
    save_state: str | None = None  # write the final averaged model here (safetensors)
    timeout: float = 600.0  # seconds any collective or barrier may wait
    attackers: int = 0  # K: the last K workers attack (see lowcomm.comm.adversary)
    attack: str | None = None  # scale | sign_flip | noise | alie | lying_owner
    max_offences: int = 3  # offences after which a member is ejected for the rest of the run
    audit: float = 0.1  # probability per all-reduce that a shard is recomputed by two other members
    speeds: Any = None  # relative compute speed per worker, e.g. (1, 1, 1, 0.33) (lowcomm.sim.uneven); None: equal
    warmup: int | None = None  # deprecated spelling of warmup_steps (kept one release)

    def __post_init__(self) -> None:
        if self.warmup is not None:
            warnings.warn("SimConfig(warmup=...) is deprecated; use warmup_steps=", DeprecationWarning, stacklevel=3)
            self.warmup_steps, self.warmup = self.warmup, None
        for name in ("workers", "steps", "batch_size", "eval_every", "eval_sequences", "threads"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        w = self.warmup_steps
        if isinstance(w, bool) or not isinstance(w, int) or w < 0:
            raise ValueError(f"warmup_steps must be a non-negative integer, got {w!r}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr!r}")
        if self.step_seconds is not None and not self.step_seconds > 0:
            raise ValueError(f"step_seconds must be > 0 seconds (or None to measure), got {self.step_seconds!r}")
        if not self.bandwidths:
            raise ValueError("give at least one bandwidth to simulate")
        if (self.attackers > 0) != (self.attack is not None):
            raise ValueError("give both --attackers K (>= 1) and --attack NAME, or neither")
        if self.attack is not None:
            if self.attack not in ATTACKS:
                raise ValueError(f"attack must be one of {ATTACKS}, got {self.attack!r}")
            if not 0 < self.attackers < self.workers:
                raise ValueError(f"attackers must be in [1, {self.workers - 1}] (at least one honest worker)")
        if not 0.0 <= self.audit <= 1.0:
            raise ValueError(f"audit must be a probability in [0, 1], got {self.audit!r}")
        for b in self.bandwidths:
            Network(float(b), self.latency, self.link_efficiency)  # validates
        self.speeds = check_speeds(self.speeds, self.workers)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["bandwidths"] = list(self.bandwidths)
        return d


@dataclass
class RunResult:
    """One strategy's simulated run (see :meth:`to_dict` for the JSON form)."""

    strategy: str
    knobs: dict[str, Any]
    workers: int
    steps: int
    params: int
    tokens: int
    final_eval_loss: float
    worst_worker_eval_loss: float
    bytes_sent: float  # per worker (mean over workers)
    bytes_sent_max: int  # the busiest worker
    peak_bytes: int  # most bytes one worker sent in one sync
    syncs: int
    failed_syncs: int
    compute_seconds: float  # measured, per worker (mean)
    sim_seconds: dict[str, float]
    utilisation: dict[str, float]
    curve: list[dict[str, float]]
    projection: dict[str, Any] | None = None
    real_seconds: float = 0.0
    attack: str | None = None  # the simulated attack (None: every worker honest)
    attackers: int = 0
    aggregate: str = "mean"  # the aggregation rule
    detections: list[dict[str, Any]] = field(default_factory=list)  # offences found (member, op, kind)
    ejections: list[dict[str, Any]] = field(default_factory=list)  # members ejected (member, op)
    audit: dict[str, Any] | None = None  # owner audits: ops, audits drawn, extra bytes, who was named at which op

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def build_knobs(name: str, overrides: dict[str, Any] | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
    """(inner-optimizer settings, the strategy's knobs) for strategy ``name`` in the simulator.

    The simulator's preset (:mod:`lowcomm.sim.presets`) and then ``overrides`` (the CLI's
    ``--sync-every``, ``--set k=v``) go over the strategy's defaults; a knob goes to a strategy
    only if it has it, so one command line can configure several strategies. The first dict
    holds "inner"/"lr" where the strategy, its preset or the overrides choose them.
    """
    cls = get_strategy(name).config
    setup = resolve_strategy(name, overrides, preset=preset(name), ignore_unknown=True)
    merged = {**preset(name), **(overrides or {})}
    inner = {k: v for k, v in (("inner", cls.inner), ("lr", cls.lr)) if v is not None}
    inner.update({k: merged[k] for k in INNER_KEYS if k in merged})
    return inner, setup.config.to_dict()


class _Shared:
    """What the worker threads share: the compute lock, an eval barrier, the eval model."""

    def __init__(self, cfg: SimConfig, workers: int):
        self.lock = threading.Lock()
        self.barrier = threading.Barrier(workers)
        self.params: list[list[torch.Tensor] | None] = [None] * workers
        self.transports: list[Any] = [None] * workers
        self.curve: list[dict[str, float]] = []
        self.final: dict[str, float] = {}


def _load_weights(model: torch.nn.Module, path: str) -> None:
    from safetensors.torch import load_model

    try:
        missing, unexpected = load_model(model, path, strict=False)
    except (OSError, RuntimeError) as e:
        raise ValueError(f"cannot load initial weights from {path}: {e}") from None
    if missing or unexpected:
        raise ValueError(f"weights in {path} do not match the model (missing {missing}, unexpected {unexpected}); "
                         f"warm-start from a run with the same model shape")


def run_strategy(name: str, cfg: SimConfig, overrides: dict[str, Any] | None = None,
                 progress: Callable[[str], None] | None = None, writer: Any = None,
                 on_step: Callable[[int], None] | None = None) -> RunResult:
    """Train with strategy ``name`` on ``cfg.workers`` simulated workers and simulate its wall-clock.

    ``progress`` gets a line at every evaluation; ``on_step(step)`` is called after every step of
    worker 0 (the progress bar).

    ``overrides``: knobs over the simulator's preset; as in :func:`build_knobs`, each goes to the
    strategy only if it has it (``lowcomm sim`` checks that every knob is taken by one strategy).
    """
    setup = resolve_strategy(name, overrides, preset=preset(name), default_lr=cfg.lr, ignore_unknown=True)
    knobs = setup.config.to_dict()
    data = load_corpus(cfg.data, cfg.vocab_size)
    mcfg = GPTConfig(**{**asdict(cfg.model), "vocab_size": data.vocab_size})
    corpus = Corpus(data, mcfg.seq_len)
    held_out = eval_batches(corpus, cfg.batch_size, cfg.eval_sequences)
    W = cfg.workers
    honest = W - cfg.attackers
    world = LocalWorld(W, cfg.timeout, max_offences=cfg.max_offences, audit=cfg.audit if cfg.attack else 0.0,
                       seed=cfg.seed, speeds=cfg.speeds,
                       adversary=Adversary(cfg.attack, cfg.attackers, W, cfg.seed) if cfg.attack else None)
    shared = _Shared(cfg, W)
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    eval_model = GPT(mcfg)
    eval_params = list(eval_model.parameters())
    tokens_per_step = W * cfg.batch_size * mcfg.seq_len
    t_start = time.monotonic()

    def ledger_bytes() -> float:
        return sum(t.ledger.bytes_sent for t in shared.transports) / W

    def do_eval(rank: int, step: int, model: torch.nn.Module, train_loss: float, final: bool) -> None:
        shared.params[rank] = [p.detach() for p in model.parameters()]
        shared.barrier.wait(cfg.timeout)
        if rank == 0:
            with shared.lock, torch.no_grad():
                per_worker = shared.params[:honest]  # attackers' models are not judged
                differ = False
                sq, count = 0.0, 0
                for i, p in enumerate(eval_params):
                    stack = torch.stack([ps[i] for ps in per_worker])
                    p.copy_(stack.mean(0))
                    differ = differ or bool((stack != stack[0]).any())
                    # in float64 around the float64 mean: identical workers give exactly 0
                    s64 = stack.double()
                    sq += float((s64 - s64.mean(0)).pow(2).sum())
                    count += stack.numel()
                loss = evaluate(eval_model, held_out)
                # spread: RMS over workers and parameters of theta_i - mean_j theta_j (NoLoCo's
                # reference code logs the same "weight std"); 0 where every worker agrees.
                point = {"step": step, "tokens": step * tokens_per_step, "bytes": ledger_bytes(),
                         "eval_loss": loss, "train_loss": train_loss, "spread": math.sqrt(sq / max(1, count)),
                         "elapsed": time.monotonic() - t_start}
                shared.curve.append(point)
                if writer is not None:
                    writer.add_scalar(f"{name}/eval_loss", loss, step)
                    writer.add_scalar(f"{name}/train_loss", train_loss, step)
                    writer.add_scalar(f"{name}/bytes_per_worker", point["bytes"], step)
                    writer.add_scalar(f"{name}/spread", point["spread"], step)
                if progress is not None:
                    shown = "-" if math.isnan(train_loss) else f"{train_loss:.3f}"  # no training loss before step 1
                    progress(f"[{name}] step {step}/{cfg.steps}  held-out {loss:.3f}  train {shown}  "
                             f"bytes/worker {point['bytes'] / 1e6:.1f} MB  ({point['elapsed']:.0f} s)")
                if final:
                    shared.final["eval_loss"] = loss
                    worst = loss
                    if differ:
                        # Workers disagree (e.g. NoLoCo): each one alone, report the worst.
                        for ps in per_worker:
                            for p, q in zip(eval_params, ps):
                                p.copy_(q)
                            worst = max(worst, evaluate(eval_model, held_out))
                    shared.final["worst"] = worst
                    if cfg.save_state:
                        from safetensors.torch import save_model

                        for i, p in enumerate(eval_params):
                            p.copy_(torch.stack([ps[i] for ps in per_worker]).mean(0))
                        save_model(eval_model, cfg.save_state)
        shared.barrier.wait(cfg.timeout)

    def worker(transport) -> dict[str, Any]:
        rank = transport.rank
        shared.transports[rank] = transport
        with shared.lock:
            # torch's default generator is process-wide: seed and build under the lock.
            torch.manual_seed(cfg.seed)
            model = GPT(mcfg)
            if cfg.init_state:
                _load_weights(model, cfg.init_state)
        opt = setup.build(model, transport, weight_decay=cfg.weight_decay, betas=cfg.betas)
        timer = {"t": 0.0, "t0": 0.0}

        # The inner step is compute: time it under the lock too. (Hooks, so a strategy's own
        # communication inside opt.step() stays outside the lock.)
        def pre(_o, _a, _k):
            shared.lock.acquire()
            timer["t0"] = time.perf_counter()

        def post(_o, _a, _k):
            timer["t"] += time.perf_counter() - timer["t0"]
            shared.lock.release()

        opt.inner.register_step_pre_hook(pre)
        opt.inner.register_step_post_hook(post)

        @contextlib.contextmanager
        def guard():
            with shared.lock:
                t0 = time.perf_counter()
                try:
                    yield
                finally:
                    timer["t"] += time.perf_counter() - t0

        # A strategy with compute of its own outside the inner step (e.g. DeMo's DCT and
        # top-k) runs it inside opt.compute_guard(): serialize and charge it as compute.
        opt.compute_guard = guard
        stream = corpus.stream(rank, W, cfg.batch_size, cfg.seed)
        ops_before = transport.ledger.ops
        op_step = [0] * ops_before  # the step at which each ledger op was started (0: set-up)
        compute: list[float] = []
        train_losses: list[float] = []
        shared.barrier.wait(cfg.timeout)
        do_eval(rank, 0, model, float("nan"), False)
        by_tokens = None if opt.work is None else TokenRun(world, cfg.steps, rank)
        horizon = cfg.steps if by_tokens is None else by_tokens.horizon
        step = 0
        while step < cfg.steps if by_tokens is None else not by_tokens.done(transport):
            step += 1
            x, y = next(stream)
            timer["t"] = 0.0
            lr = setup.lr * lr_factor(step - 1, steps=horizon, warmup=cfg.warmup_steps,
                                      min_lr_ratio=cfg.min_lr_ratio)
            # the last step lands a sync still in flight (Streaming DiLoCo's last fragment), so the
            # final model has every sync and no collective is left unfinished when the workers stop
            res = worker_step(model, opt, x, y, lr=lr, grad_clip=cfg.grad_clip, compute=lambda: shared.lock,
                              last=step == cfg.steps and by_tokens is None)
            compute.append(res.compute_seconds + timer["t"])
            train_losses.append(res.loss)
            op_step.extend([step] * (transport.ledger.ops - len(op_step)))
            if on_step is not None and rank == 0:
                on_step(step)
            if by_tokens is None and (step % cfg.eval_every == 0 or step == cfg.steps):
                recent = train_losses[-cfg.eval_every:]
                do_eval(rank, step, model, sum(recent) / len(recent), step == cfg.steps)
        if by_tokens is not None:  # every worker stops after the same sync
            opt.flush()
            recent = train_losses[-cfg.eval_every:]
            do_eval(rank, step, model, sum(recent) / len(recent), True)
        return {
            "compute": compute,
            "sync_log": list(opt.sync_log),
            "records": list(transport.ledger.records),
            "op_step": op_step,
            "syncs": opt.sync_count,
            "failed": opt.failed_syncs,
            "detections": [{**d, "by": rank} for d in opt.detections()],
            "aggregate": opt.aggregate.rule,
        }

    results = run_local(W, worker, timeout=cfg.timeout, world=world)
    real = time.monotonic() - t_start
    res = _summarise(name, cfg, knobs, results, shared, eval_model, tokens_per_step, real)
    book = world.book.summary()
    res.attack, res.attackers, res.aggregate = cfg.attack, cfg.attackers, results[0]["aggregate"]
    # NoLoCo's rejections are each honest worker's own; DeMo's screenings are the same on every worker
    res.detections = book["detections"] + [d for r in results[:honest] for d in r["detections"]
                                           if d["kind"] == "partner_rejected" or d["by"] == 0]
    res.ejections = book["ejections"]
    res.audit = world.audits.summary() if world.audits.probability > 0 else None
    return res


def _op_bytes(results: list[dict[str, Any]]) -> list[list[int]]:
    """Bytes that size each op of each worker: for a collective every worker took part in, in
    step with the others (same index, same kind), the busiest participant's bytes (everyone
    waits for it); otherwise the worker's own bytes."""
    W = len(results)
    out = []
    for r in results:
        sizes = []
        for i, rec in enumerate(r["records"]):
            peers = [s["records"][i] for s in results if i < len(s["records"])]
            if (rec.participants == W and len(peers) == W
                    and all(p.kind == rec.kind and p.participants == W for p in peers)):
                sizes.append(max(p.bytes_sent for p in peers))
            else:
                sizes.append(rec.bytes_sent)
        out.append(sizes)
    return out


def _events(result: dict[str, Any], sizes: list[int], net: Network, scale: float = 1.0) -> list[CommEvent]:
    """Communication events of one worker: one per sync record (its ops back to back), plus any
    ledger op no record claims, exposed at the step it was started."""
    records = result["records"]
    claimed: set[int] = set()
    events = []
    for s in result["sync_log"]:
        secs = 0.0
        for op in s.op_ids:
            if 0 <= op < len(records):
                claimed.add(op)
                secs += net.seconds(records[op].kind, records[op].participants, int(sizes[op] * scale))
        events.append(CommEvent(s.launch_step, s.finish_step, secs))
    for op, rec in enumerate(records):
        if op not in claimed:
            st = result["op_step"][op] if op < len(result["op_step"]) else 0
            events.append(CommEvent(st, st, net.seconds(rec.kind, rec.participants, int(sizes[op] * scale))))
    return events


def _summarise(name, cfg, knobs, results, shared, eval_model, tokens_per_step, real) -> RunResult:
    W = len(results)
    sizes = _op_bytes(results)
    # Identical devices: a step's compute is the mean of the W measured times (the spread
    # between workers is measurement noise on a shared machine, not stragglers).
    steps = min(len(r["compute"]) for r in results)
    compute = [sum(r["compute"][k] for r in results) / W for k in range(steps)]
    if cfg.step_seconds is not None:
        compute = [float(cfg.step_seconds)] * steps
    sim_seconds, util = {}, {}
    for b in cfg.bandwidths:
        net = Network(float(b), cfg.latency, cfg.link_efficiency)
        if cfg.speeds is not None or any(len(r["compute"]) != steps for r in results):
            # uneven workers: each phase lasts as long as its slowest worker (lowcomm.sim.uneven)
            own = [r["compute"] if cfg.step_seconds is None else [float(cfg.step_seconds)] * len(r["compute"])
                   for r in results]
            comm = sync_seconds(results[0], sizes[0], net)
            other = sum(e.seconds for e in _events(results[0], sizes[0], net)) - sum(comm)  # the set-up broadcast
            total = other + phase_clock(own, [r["sync_log"] for r in results], comm, cfg.speeds or [1.0] * W)
            sim_seconds[bandwidth_label(b)] = total
            busy = sum(sum(c) / v for c, v in zip(own, cfg.speeds or [1.0] * W)) / W
            util[bandwidth_label(b)] = busy / total if total > 0 else 1.0
            continue
        clocks = [simulate_clock(compute, _events(r, sz, net)) for r, sz in zip(results, sizes)]
        total = max(c.total for c in clocks)
        sim_seconds[bandwidth_label(b)] = total
        util[bandwidth_label(b)] = sum(compute) / total if total > 0 else 1.0
    per_worker = [sum(rec.bytes_sent for rec in r["records"]) for r in results]
    peak = 0
    for r in results:
        for s in r["sync_log"]:
            peak = max(peak, sum(r["records"][op].bytes_sent for op in s.op_ids if 0 <= op < len(r["records"])))
    params = sum(p.numel() for p in eval_model.parameters())
    proj = None
    if cfg.projection is not None:
        pj = cfg.projection
        scale = pj.params / params
        pcompute = [pj.step_seconds] * steps
        proj = {"label": "projection", **asdict(pj), "step_compute_seconds": pj.step_seconds,
                "bytes_sent": sum(per_worker) / W * scale, "peak_bytes": peak * scale,
                "sim_seconds": {}, "utilisation": {}}
        for b in cfg.bandwidths:
            net = Network(float(b), cfg.latency, cfg.link_efficiency)
            total = max(simulate_clock(pcompute, _events(r, sz, net, scale)).total for r, sz in zip(results, sizes))
            proj["sim_seconds"][bandwidth_label(b)] = total
            proj["utilisation"][bandwidth_label(b)] = sum(pcompute) / total
    return RunResult(
        strategy=name, knobs={k: (v if isinstance(v, (int, float, str, bool, type(None))) else repr(v))
                              for k, v in knobs.items()},
        workers=W, steps=steps, params=params, tokens=sum(len(r["compute"]) for r in results) * tokens_per_step // W,
        final_eval_loss=shared.final["eval_loss"], worst_worker_eval_loss=shared.final["worst"],
        bytes_sent=sum(per_worker) / W, bytes_sent_max=max(per_worker), peak_bytes=peak,
        syncs=max(r["syncs"] for r in results), failed_syncs=max(r["failed"] for r in results),
        compute_seconds=sum(compute), sim_seconds=sim_seconds, utilisation=util, curve=list(shared.curve),
        projection=proj, real_seconds=real)
