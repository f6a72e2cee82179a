"""The training loop shared by ``lowcomm train``, ``lowcomm peer`` and the recipes.

One loop for every registered strategy (DiLoCo, Douillard et al. 2023, arXiv 2311.08105, and the
others in :mod:`lowcomm.outer`): the strategy is built from the registry by name, wraps an
AdamW (or SGD) inner optimizer, and the loop never knows which one it drives.

Worlds:

- **Standalone**: a world of one replica (the local transport with one member), the full code path.
- **torchrun**: the world is split into replicas of ``replica_size`` ranks. Ranks inside a replica
  run ordinary data parallelism (torch ``DistributedDataParallel`` on the replica's process group);
  across replicas the outer optimizer syncs through the torch.distributed transport.
- **Any transport** passed in (the local transport in tests, the ZeroMQ transport for volunteers).

Batches: replica ``r`` draws ``batch_size`` sequences per step from its own disjoint shard of
the corpus; a replica of R ranks gives each rank a contiguous 1/R of the rows, and a rank may cut
its rows further into ``grad_accum`` micro-batches. The gradient is the mean over the replica's
rows in every layout: DDP averages ranks as ``sum(g_i / R)`` and accumulation adds ``g_j / A``
(scaling by a power of two is exact), which is what makes a 2-rank replica and a 1-rank replica
with 2 micro-batches agree to rounding.

Every ``checkpoint_every`` steps each replica's first rank writes
``<out>/checkpoints/step_<N>/replica_<r>`` (safetensors + JSON, :mod:`lowcomm.checkpoint`):
model, optimizer state (inner, global parameters, outer state, counters), data position, RNG
states and the loop's counters; ``resume`` continues from the newest step that every replica
completed, on exactly the trajectory of an uninterrupted run.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import json
import logging
import math
import os
import shutil
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from .checkpoint import load_checkpoint, rng_state, save_checkpoint, set_rng_state
from .comm.base import Transport
from .outer.base import OuterOptimizer
from .outer.registry import available, get_strategy

__all__ = ["ModelConfig", "TrainConfig", "TrainResult", "add_arguments", "apply_overrides", "load_recipe", "main",
           "train"]

log = logging.getLogger(__name__)

# Model construction draws from torch's global RNG; threads of the local transport share it, so
# seeding and building happen under one lock (each worker then gets exactly the seeded weights).
_BUILD_LOCK = threading.Lock()


@dataclass
class ModelConfig:
    """The GPT's shape (see :class:`lowcomm.models.GPTConfig`); vocab_size 0 takes the corpus's."""

    n_layer: int = 4  # transformer blocks
    n_embd: int = 128  # width
    n_head: int = 4  # attention heads
    seq_len: int = 128  # context (tokens)
    vocab_size: int = 0  # 0: the corpus's vocabulary (256 for text); larger pads the embedding
    dropout: float = 0.0  # dropout (draws from the RNG; 0 keeps replicas' runs independent of thread timing)


@dataclass
class TrainConfig:
    """Everything a run needs; recipes return one of these. Every field is documented in place."""

    name: str = "run"  # run name; the output goes to <out_dir>
    description: str = ""  # what the recipe is for
    strategy: str = "diloco"  # a registered strategy (lowcomm.available())
    knobs: dict[str, Any] = field(default_factory=dict)  # strategy knobs over its registry defaults
    inner: str = ""  # inner optimizer: "adamw" | "sgd"; "" takes the strategy's default (else adamw)
    lr: float = 0.0  # peak inner learning rate; 0 takes the strategy's default (else 1e-3)
    weight_decay: float = 0.1  # AdamW decoupled weight decay
    betas: tuple[float, float] = (0.9, 0.95)  # AdamW betas
    warmup_steps: int = 0  # linear warmup from lr/warmup to lr
    schedule: str = "cosine"  # "cosine" (to min_lr_ratio*lr at `steps`) | "constant"
    min_lr_ratio: float = 0.1  # final lr of the cosine as a fraction of the peak
    grad_clip: float = 1.0  # clip the gradient's global norm (0: off)
    steps: int = 200  # inner steps per replica
    batch_size: int = 16  # sequences per replica per step (split over the replica's ranks)
    grad_accum: int = 1  # micro-batches per rank per step (gradient accumulation)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: str = "stdlib"  # text file/folder, "stdlib" (default corpus), or a uint16 token file/folder
    vocab_size: int = 0  # >0: `data` holds uint16 token files with this vocabulary
    data_shards: int = 0  # disjoint data shards (0: one per replica); volunteers take shard member_id % data_shards
    eval_every: int = 50  # held-out evaluation every N steps (0: only at the end)
    eval_sequences: int = 32  # held-out sequences per evaluation
    seed: int = 0  # model init and data order
    log_every: int = 10  # progress line / TensorBoard scalars every N steps
    checkpoint_every: int = 0  # checkpoint every N steps (0: never)
    keep_checkpoints: int = 2  # newest checkpoints kept on disk
    out_dir: str = ""  # output folder ("" = runs/<name>)
    replica_size: int = 1  # ranks per replica under torchrun (ordinary data parallelism inside)
    hierarchical: bool = True  # torchrun: each of a replica's R ranks syncs 1/R across replicas, then all-gathers
    device: str = "auto"  # "auto" (cuda when present) | "cpu" | "cuda"
    amp: bool = True  # bf16 autocast on CUDA
    threads: int = 0  # torch CPU threads (0: leave as is)
    tensorboard: bool = True  # write TensorBoard event files

    def __post_init__(self) -> None:
        if isinstance(self.model, dict):
            self.model = ModelConfig(**self.model)
        self.betas = tuple(self.betas)

    def validate(self) -> None:
        if self.strategy not in available():
            raise ValueError(f"unknown strategy {self.strategy!r}; available: {', '.join(available())}")
        for name, lo in (("steps", 1), ("batch_size", 1), ("grad_accum", 1), ("eval_every", 0), ("log_every", 1),
                         ("checkpoint_every", 0), ("keep_checkpoints", 1), ("replica_size", 1),
                         ("eval_sequences", 1), ("warmup_steps", 0), ("data_shards", 0)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < lo:
                raise ValueError(f"{name} must be an integer >= {lo}, got {v!r}")
        if self.schedule not in ("cosine", "constant"):
            raise ValueError(f"schedule must be 'cosine' or 'constant', got {self.schedule!r}")
        if self.inner not in ("", "adamw", "sgd"):
            raise ValueError(f"inner must be 'adamw' or 'sgd' (or '' for the strategy's default), got {self.inner!r}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"device must be 'auto', 'cpu' or 'cuda', got {self.device!r}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class TrainResult:
    """What a finished run reports (one per process)."""

    steps: int
    tokens: int
    final_eval_loss: float
    eval_curve: list[tuple[int, float]]
    bytes_sent: int
    syncs: int
    failed_syncs: int
    seconds: float
    params: list[torch.Tensor]  # this process's final parameters (CPU copies)
    out_dir: str
    # Per step of this session: [seconds of forward/backward (+clip), seconds of opt.step(), whether
    # opt.step() communicated]; the network lab feeds it to the simulator's clock.
    timeline: list[list] = field(default_factory=list)
    first_step: int = 0  # the step this session started from (timeline[i] is step first_step + i + 1)
    sync_log: list[Any] = field(default_factory=list)  # the optimizer's SyncRecords


# ---- recipes ----------------------------------------------------------------------------------
def load_recipe(path: str) -> TrainConfig:
    """Load a recipe: a Python file defining ``config() -> TrainConfig`` (lowcomm never imports recipes/)."""
    if not os.path.isfile(path):
        raise ValueError(f"recipe {path!r} is not a file; pass the path of a recipe such as recipes/tiny_diloco.py")
    spec = importlib.util.spec_from_file_location(f"lowcomm_recipe_{abs(hash(os.path.abspath(path)))}", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    fn = getattr(mod, "config", None)
    if not callable(fn):
        raise ValueError(f"recipe {path} must define a function config() returning lowcomm.train.TrainConfig")
    cfg = fn()
    if not isinstance(cfg, TrainConfig):
        raise ValueError(f"recipe {path}: config() returned {type(cfg).__name__}, expected lowcomm.train.TrainConfig")
    return cfg


def _coerce(text: str, like: Any) -> Any:
    if isinstance(like, bool):
        if text.lower() in ("1", "true", "yes", "on"):
            return True
        if text.lower() in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"expected a boolean, got {text!r}")
    if isinstance(like, int):
        return int(text)
    if isinstance(like, float):
        return float(text)
    if isinstance(like, str):
        return text
    return json.loads(text)


def apply_overrides(cfg: TrainConfig, sets: list[str]) -> TrainConfig:
    """Apply ``key=value`` overrides: ``steps=50``, ``model.n_layer=2``, ``knobs.sync_every=10``."""
    for item in sets:
        if "=" not in item:
            raise ValueError(f"override {item!r} must look like key=value (e.g. steps=100 or knobs.sync_every=10)")
        key, text = item.split("=", 1)
        parts = key.strip().split(".")
        if parts[0] == "knobs" and len(parts) == 2:
            try:
                cfg.knobs[parts[1]] = json.loads(text)
            except json.JSONDecodeError:
                cfg.knobs[parts[1]] = text
            continue
        obj = cfg
        for p in parts[:-1]:
            if not dataclasses.is_dataclass(obj) or not hasattr(obj, p):
                raise ValueError(f"unknown config field {key!r}")
            obj = getattr(obj, p)
        last = parts[-1]
        if not dataclasses.is_dataclass(obj) or last not in {f.name for f in dataclasses.fields(obj)}:
            raise ValueError(f"unknown config field {key!r}; fields: "
                             f"{', '.join(f.name for f in dataclasses.fields(TrainConfig))}")
        try:
            setattr(obj, last, _coerce(text, getattr(obj, last)))
        except ValueError as e:
            raise ValueError(f"bad value for {key}: {e}") from None
    cfg.__post_init__()
    return cfg


# ---- pieces -----------------------------------------------------------------------------------
def lr_at(cfg: TrainConfig, lr: float, step: int) -> float:
    """Learning rate for inner step ``step`` (0-based): linear warmup, then cosine or constant."""
    if step < cfg.warmup_steps:
        return lr * (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return lr
    span = max(1, cfg.steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    return lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def _strategy_settings(cfg: TrainConfig) -> tuple[str, float, dict[str, Any]]:
    strat = get_strategy(cfg.strategy)
    knobs = {**strat.defaults, **cfg.knobs}
    inner = cfg.inner or knobs.get("inner", "adamw")
    lr = cfg.lr or float(knobs.get("lr", 1e-3))
    for k in ("inner", "lr"):
        knobs.pop(k, None)
    return inner, lr, knobs


def _make_inner(kind: str, params: list[torch.Tensor], lr: float, cfg: TrainConfig) -> torch.optim.Optimizer:
    if kind == "adamw":
        return torch.optim.AdamW(params, lr=lr, betas=cfg.betas, weight_decay=cfg.weight_decay)
    return torch.optim.SGD(params, lr=lr)


def _device(cfg: TrainConfig) -> torch.device:
    if cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise ValueError("device='cuda' but no CUDA device is visible; use device='cpu' or 'auto'")
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())
    return torch.device("cpu")


@torch.no_grad()
def evaluate(model: torch.nn.Module, batches, device: torch.device, amp: bool) -> float:
    """Mean held-out cross-entropy (nats per token)."""
    was = model.training
    model.eval()
    total, count = 0.0, 0
    for x, y in batches:
        x, y = x.to(device), y.to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp and device.type == "cuda"):
            _, loss = model(x, y)
        total += float(loss) * x.numel()
        count += x.numel()
    model.train(was)
    return total / max(1, count)


class _Layout:
    """Where this process sits: replica index, number of replicas, rank inside the replica."""

    def __init__(self, transport: Transport, replica_size: int):
        self.transport = transport
        self.replica_group = transport.replica_group
        if self.replica_group is not None:
            import torch.distributed as dist

            self.replica_rank = dist.get_rank(self.replica_group)
            self.replica_size = dist.get_world_size(self.replica_group)
        else:
            self.replica_rank, self.replica_size = 0, 1
        if self.replica_size != replica_size:
            raise ValueError(f"the config asks for replica_size={replica_size} but the transport's replicas have "
                             f"{self.replica_size} ranks; launch with a matching replica size")
        self.replica = transport.rank
        self.n_replicas = transport.world_size
        self.leader = self.replica_rank == 0  # writes this replica's checkpoint
        self.chief = self.leader and self.replica == transport.members()[0]  # logs and evaluates


def _checkpoint_root(out_dir: str) -> str:
    return os.path.join(out_dir, "checkpoints")


def newest_complete_checkpoint(out_dir: str, n_replicas: int) -> tuple[int, str] | None:
    """(step, folder) of the newest checkpoint that every replica finished writing."""
    root = _checkpoint_root(out_dir)
    if not os.path.isdir(root):
        return None
    steps = sorted((int(n[5:]) for n in os.listdir(root) if n.startswith("step_") and n[5:].isdigit()), reverse=True)
    for s in steps:
        d = os.path.join(root, f"step_{s:08d}")
        if all(os.path.isfile(os.path.join(d, f"replica_{r}", "state.json")) for r in range(n_replicas)):
            return s, d
    return None


def _prune(out_dir: str, keep: int) -> None:
    root = _checkpoint_root(out_dir)
    steps = sorted(int(n[5:]) for n in os.listdir(root) if n.startswith("step_") and n[5:].isdigit())
    for s in steps[:-keep]:
        shutil.rmtree(os.path.join(root, f"step_{s:08d}"), ignore_errors=True)


def _barrier(layout: _Layout) -> None:
    if layout.replica_group is not None:
        import torch.distributed as dist

        dist.barrier()


# ---- the loop ---------------------------------------------------------------------------------
def _say(text: str) -> None:
    print(text, flush=True)  # flushed: progress must show through pipes (torchrun, peers, the lab)


def train(cfg: TrainConfig, transport: Transport | None = None, resume: bool | str = False,
          progress: Callable[[str], None] | None = _say, stop: threading.Event | None = None,
          every_member_logs: bool = False) -> TrainResult:
    """Train ``cfg`` on ``transport`` (default: ``lowcomm.connect(cfg.replica_size)``).

    ``resume=True`` continues from the newest complete checkpoint in the run's folder (a path:
    from that checkpoint folder). ``stop``, when set, ends the loop after the current step (the
    volunteer peer uses it for a clean leave). ``every_member_logs``: every replica evaluates and
    logs into its own ``out_dir`` (volunteer peers), not only the first. A transport with
    ``attach`` (ZeroMQ) is given the model and optimizer, so a peer joining a run under way
    fetches the current state first. Returns this process's :class:`TrainResult`.
    """
    from .data import Corpus, load_corpus
    from .models import GPT, GPTConfig

    cfg.validate()
    if transport is None:
        from .comm import connect

        transport = connect(cfg.replica_size)  # flat sync; main() asks torchrun runs for the hierarchical one
    layout = _Layout(transport, cfg.replica_size)
    if every_member_logs:
        layout.chief = layout.leader
    if cfg.batch_size % (layout.replica_size * cfg.grad_accum):
        raise ValueError(f"batch_size {cfg.batch_size} must be divisible by ranks per replica x grad_accum "
                         f"({layout.replica_size} x {cfg.grad_accum})")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = _device(cfg)
    out_dir = cfg.out_dir or os.path.join("runs", cfg.name)
    say = progress if (progress is not None and layout.chief) else (lambda _s: None)

    data = load_corpus(None if cfg.data == "stdlib" else cfg.data, cfg.vocab_size or None)
    m = cfg.model
    vocab = m.vocab_size or data.vocab_size
    if vocab < data.vocab_size:
        raise ValueError(f"model.vocab_size {vocab} is smaller than the corpus's vocabulary {data.vocab_size}")
    mcfg = GPTConfig(vocab_size=vocab, n_layer=m.n_layer, n_embd=m.n_embd, n_head=m.n_head, seq_len=m.seq_len,
                     dropout=m.dropout)
    corpus = Corpus(data, m.seq_len)
    if cfg.data_shards:
        stream = corpus.stream(layout.replica % cfg.data_shards, cfg.data_shards, cfg.batch_size, seed=cfg.seed)
    else:
        stream = corpus.stream(layout.replica, layout.n_replicas, cfg.batch_size, seed=cfg.seed)
    eval_batches = corpus.eval_batches(max(1, min(cfg.batch_size, cfg.eval_sequences)), cfg.eval_sequences)

    with _BUILD_LOCK:
        torch.manual_seed(cfg.seed)
        model = GPT(mcfg)
    model.to(device)
    n_params = sum(p.numel() for p in model.parameters())
    fwd = model
    if layout.replica_group is not None and layout.replica_size > 1:
        from torch.nn.parallel import DistributedDataParallel

        # Ordinary data parallelism inside the replica; DDP broadcasts the first rank's weights.
        fwd = DistributedDataParallel(model, process_group=layout.replica_group,
                                      device_ids=[device.index] if device.type == "cuda" else None)
    inner_kind, peak_lr, knobs = _strategy_settings(cfg)
    inner = _make_inner(inner_kind, [p for p in model.parameters() if p.requires_grad], peak_lr, cfg)
    opt = get_strategy(cfg.strategy).build(inner, transport, model, **knobs)
    if not isinstance(opt, OuterOptimizer):
        raise ValueError(f"strategy {cfg.strategy!r} built a {type(opt).__name__}; a strategy must build a "
                         f"lowcomm.OuterOptimizer")

    # ZeroMQ: members snapshot their state for joiners; a joiner fetches a donor's state here.
    # Members of strategies that share global state hold the same one, which the joiner checks.
    transport.attach(model, opt, verify_global=opt.shares_global_state)
    step, bytes_base, elapsed_base = opt.local_step, 0, 0.0
    stream.step = step  # batch k depends only on (seed, shard, k): the joiner continues the schedule
    tokens = step * cfg.batch_size * m.seq_len
    eval_curve: list[tuple[int, float]] = []
    if resume:
        found = (int(os.path.basename(os.path.normpath(resume))[5:]), resume) if isinstance(resume, str) \
            else newest_complete_checkpoint(out_dir, layout.n_replicas)
        if found is None:
            say(f"no checkpoint in {_checkpoint_root(out_dir)}; starting from scratch")
        else:
            ck = load_checkpoint(os.path.join(found[1], f"replica_{layout.replica}"), device=device)
            if ck["config"]["strategy"] != cfg.strategy or ck["config"]["model"] != dataclasses.asdict(cfg.model):
                raise ValueError(f"checkpoint {found[1]} was written by a run with another strategy or model; "
                                 f"resume with the recipe that wrote it")
            model.load_state_dict(ck["model"])
            opt.load_state_dict(ck["optimizer"])
            stream.load_state_dict(ck["data"])
            set_rng_state(ck["rng"])
            c = ck["counters"]
            step, tokens, bytes_base, elapsed_base = c["step"], c["tokens"], c["bytes_sent"], c["seconds"]
            eval_curve = [tuple(e) for e in c["eval_curve"]]
            say(f"resumed from {found[1]} at step {step}")

    writer = None
    if layout.chief and cfg.tensorboard:
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(os.path.join(out_dir, "tb"), purge_step=step if step else None)
    if layout.chief:
        os.makedirs(out_dir, exist_ok=True)
        with open(os.path.join(out_dir, "config.json"), "w") as f:
            json.dump(cfg.to_dict(), f, indent=1)
    say(f"{cfg.name}: {cfg.strategy} ({inner_kind} lr {peak_lr:g}), {n_params / 1e6:.2f}M parameters, "
        f"{layout.n_replicas} replica(s) x {layout.replica_size} rank(s), {cfg.steps} steps of "
        f"{cfg.batch_size} x {m.seq_len} tokens per replica, on {device}")

    rows = cfg.batch_size // layout.replica_size
    micro = rows // cfg.grad_accum
    lo = layout.replica_rank * rows
    amp = cfg.amp and device.type == "cuda"
    t_start = time.monotonic()
    start_step = step
    t_log, tok_log = t_start, tokens
    sync_seconds = 0.0
    last_loss = float("nan")
    params = [p for p in model.parameters() if p.requires_grad]
    final_eval = float("nan")
    timeline: list[list] = []
    while step < cfg.steps:
        if stop is not None and stop.is_set():
            say(f"stopping at step {step} (asked to)")
            break
        lr = lr_at(cfg, peak_lr, step)
        for g in opt.param_groups:
            g["lr"] = lr
        t_step = time.monotonic()
        x, y = next(stream)
        x, y = x[lo:lo + rows].to(device), y[lo:lo + rows].to(device)
        loss_sum = 0.0
        for j in range(cfg.grad_accum):
            xs, ys = x[j * micro:(j + 1) * micro], y[j * micro:(j + 1) * micro]
            last = j == cfg.grad_accum - 1
            ctx = fwd.no_sync() if (fwd is not model and not last) else contextlib.nullcontext()
            with ctx, torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                _, loss = fwd(xs, ys)
                # 1/A is a power of two for the usual A, so the accumulated gradient equals the
                # mean over micro-batches exactly as DDP's mean over ranks does.
                (loss / cfg.grad_accum).backward()
            loss_sum += float(loss.detach())
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        n_log = len(opt.sync_log)
        t0 = time.monotonic()
        t_fb = t0 - t_step
        opt.step()
        if step + 1 == cfg.steps:
            opt.flush()  # land a sync still in flight (Streaming DiLoCo) before the final eval and exit
        opt.zero_grad(set_to_none=True)
        t_opt = time.monotonic() - t0
        synced = len(opt.sync_log) != n_log
        if synced:
            sync_seconds += t_opt
        timeline.append([t_fb, t_opt, synced])
        step += 1
        tokens += cfg.batch_size * m.seq_len
        if opt.local_step != step:
            # The run dropped this peer (it missed a sync) and it re-joined from a donor's snapshot
            # inside opt.step(): continue from the donor's step, on the schedule the run is on.
            say(f"re-joined the run at step {opt.local_step} (was at step {step})")
            step = int(opt.local_step)
            stream.step = step
            tokens = step * cfg.batch_size * m.seq_len
        last_loss = loss_sum / cfg.grad_accum

        if step % cfg.log_every == 0 or step == cfg.steps:
            now = time.monotonic()
            tps = (tokens - tok_log) / max(1e-9, now - t_log)
            t_log, tok_log = now, tokens
            sent = bytes_base + transport.ledger.bytes_sent
            syncs = opt.sync_count
            eta = (cfg.steps - step) * (now - t_start) / max(1, step - start_step)
            say(f"step {step}/{cfg.steps}  loss {last_loss:.4f}  lr {lr:.2e}  {tps:,.0f} tok/s  "
                f"sent {sent / 1e6:.2f} MB  syncs {syncs}  eta {eta:.0f}s")
            if writer is not None:
                writer.add_scalar("train/loss", last_loss, step)
                writer.add_scalar("train/lr", lr, step)
                writer.add_scalar("train/tokens_per_second", tps, step)
                writer.add_scalar("comm/bytes_sent", sent, step)
                writer.add_scalar("comm/sync_seconds", sync_seconds, step)
                writer.add_scalar("comm/failed_syncs", opt.failed_syncs, step)
        do_eval = step == cfg.steps or (cfg.eval_every and step % cfg.eval_every == 0)
        if do_eval and layout.chief:
            ev = evaluate(model, eval_batches, device, amp)
            eval_curve.append((step, ev))
            final_eval = ev
            say(f"step {step}: held-out loss {ev:.4f}")
            if writer is not None:
                writer.add_scalar("eval/loss", ev, step)
                writer.add_scalar("eval/loss_vs_tokens", ev, tokens)
        if cfg.checkpoint_every and step % cfg.checkpoint_every == 0 and step < cfg.steps:
            _save(cfg, out_dir, layout, model, opt, stream, step, tokens,
                  bytes_base + transport.ledger.bytes_sent, elapsed_base + time.monotonic() - t_start, eval_curve)
    if writer is not None:
        writer.flush()
        writer.close()
    seconds = elapsed_base + time.monotonic() - t_start
    sent = bytes_base + transport.ledger.bytes_sent
    res = TrainResult(step, tokens, final_eval, eval_curve, sent, opt.sync_count, opt.failed_syncs, seconds,
                      [p.detach().to("cpu", copy=True) for p in model.parameters()], out_dir, timeline, start_step,
                      list(opt.sync_log))
    if layout.leader:
        # Each replica's final weights (its local parameters), for inspection and comparisons.
        from safetensors.torch import save_file

        os.makedirs(os.path.join(out_dir, "final"), exist_ok=True)
        save_file({k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()
                   if k != "head.weight"},  # tied to tok_emb.weight; safetensors refuses aliases
                  os.path.join(out_dir, "final", f"replica_{layout.replica}.safetensors"))
    if layout.chief:
        with open(os.path.join(out_dir, "result.json"), "w") as f:
            json.dump({"steps": res.steps, "tokens": res.tokens, "final_eval_loss": res.final_eval_loss,
                       "eval_curve": res.eval_curve, "bytes_sent": res.bytes_sent, "syncs": res.syncs,
                       "failed_syncs": res.failed_syncs, "seconds": res.seconds, "last_train_loss": last_loss},
                      f, indent=1)
        say(f"done: {step} steps, held-out loss {final_eval:.4f}, {sent / 1e6:.2f} MB sent, "
            f"{res.syncs} syncs ({res.failed_syncs} rolled back), {seconds:.1f} s")
    return res


def _save(cfg, out_dir, layout, model, opt, stream, step, tokens, sent, seconds, eval_curve) -> None:
    d = os.path.join(_checkpoint_root(out_dir), f"step_{step:08d}")
    if layout.leader:
        save_checkpoint(os.path.join(d, f"replica_{layout.replica}"), {
            "config": cfg.to_dict(),
            "model": model.state_dict(),
            "optimizer": opt.state_dict(),
            "data": stream.state_dict(),
            "rng": rng_state(),
            "counters": {"step": step, "tokens": tokens, "bytes_sent": sent, "seconds": seconds,
                         "eval_curve": [list(e) for e in eval_curve]},
        })
    _barrier(layout)
    if layout.chief:
        _prune(out_dir, cfg.keep_checkpoints)


def add_arguments(ap) -> None:
    """Arguments of ``lowcomm train``."""
    ap.add_argument("--recipe", required=True, help="path of a recipe file (e.g. recipes/tiny_diloco.py)")
    ap.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in the run folder")
    ap.add_argument("--out", default=None, help="output folder (default: runs/<recipe name>)")
    ap.add_argument("--steps", type=int, default=None, help="override the recipe's number of steps")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="override a config field: --set lr=3e-4 --set model.n_layer=2 --set knobs.sync_every=20")


def main(args) -> int:
    """Run ``lowcomm train`` with parsed arguments."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    cfg = load_recipe(args.recipe)
    sets = list(args.set)
    if args.steps is not None:
        sets.append(f"steps={args.steps}")
    if args.out is not None:
        sets.append(f"out_dir={args.out}")
    apply_overrides(cfg, sets)
    transport = None
    try:
        from .comm import connect

        under_torchrun = "RANK" in os.environ and "WORLD_SIZE" in os.environ
        if under_torchrun and not os.environ.get("LOWCOMM_COORDINATOR"):
            # The slow cross-replica links carry one copy of the model per replica, not one per rank.
            transport = connect(cfg.replica_size, hierarchical=cfg.hierarchical)
        else:
            transport = connect(cfg.replica_size)
        train(cfg, transport=transport, resume=args.resume)
    finally:
        if transport is not None:
            transport.close()
    return 0


def _cli(argv: list[str] | None = None) -> int:
    """``python -m lowcomm.train --recipe R ...`` (the same as ``lowcomm train``; handy under torchrun)."""
    import argparse

    ap = argparse.ArgumentParser(prog="lowcomm train", description="Train with a recipe (standalone or torchrun).")
    add_arguments(ap)
    return main(ap.parse_args(argv))


if __name__ == "__main__":
    # Run through the package module, so recipes' TrainConfig is the same class as ours.
    from lowcomm.train import _cli

    sys.exit(_cli())
