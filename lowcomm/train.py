"""The training loop shared by ``lowcomm train``, ``lowcomm peer`` and the recipes.

One loop for every registered strategy (DiLoCo, Douillard et al. 2023, arXiv 2311.08105, and the
others in :mod:`lowcomm.outer`): the strategy's typed config is built from the registry by name and
wraps the inner optimizer :func:`lowcomm.loop.make_inner` builds; the loop never knows which one it
drives. What it shares with the simulator (knobs, schedule, the worker step, evaluation) lives in
:mod:`lowcomm.loop`; this module keeps the torchrun layout, checkpoints and logging, and the run's
configuration lives in :mod:`lowcomm.train_config`.

Worlds:

- **Standalone**: a world of one replica (the local transport with one member), the full code path.
- **torchrun**: the world is split into replicas of ``replica_size`` ranks. Ranks inside a replica
  run ordinary data parallelism (torch ``DistributedDataParallel`` on the replica's process group),
  or with ``parallel="fsdp"`` shard the model with FSDP2 (:mod:`lowcomm.replica`); across replicas
  the outer optimizer syncs through the torch.distributed transport.
- **Any transport** passed in (the local transport in tests, the ZeroMQ transport for volunteers).

Batches: replica ``r`` draws ``batch_size`` sequences per step from its own disjoint shard of
the corpus; a replica of R ranks gives each rank a contiguous 1/R of the rows, and a rank may cut
its rows further into ``grad_accum`` micro-batches. The gradient is the mean over the replica's
rows in every layout: DDP averages ranks as ``sum(g_i / R)`` and accumulation adds ``g_j / A``
(scaling by a power of two is exact), which is what makes a 2-rank replica and a 1-rank replica
with 2 micro-batches agree to rounding.

Every ``checkpoint_every`` steps each replica's first rank writes
``<out>/checkpoints/step_<N>/replica_<r>`` (with FSDP every rank writes its shards to
``replica_<r>/rank_<k>``; safetensors + JSON, :mod:`lowcomm.checkpoint`):
model, optimizer state (inner, global parameters, outer state, counters), data position, RNG
states and the loop's counters; ``resume`` continues from the newest step that every replica
completed, on exactly the trajectory of an uninterrupted run.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import shutil
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import torch

from .checkpoint import load_checkpoint, rng_state, save_checkpoint, set_rng_state
from .comm.base import Transport
from .loop import environment, eval_batches, evaluate, lr_factor, worker_step
from .progress import Progress
from .replica import check_same_layout, checkpoint_name, full_parameters, full_state_dict, load_state, local_state, wrap
from .train_config import ModelConfig, TrainConfig, TrainResult, apply_overrides, load_recipe

__all__ = ["ModelConfig", "TrainConfig", "TrainResult", "add_arguments", "apply_overrides", "load_recipe", "main",
           "train"]

log = logging.getLogger(__name__)

# Model construction draws from torch's global RNG; threads of the local transport share it, so
# seeding and building happen under one lock (each worker then gets exactly the seeded weights).
_BUILD_LOCK = threading.Lock()


# ---- pieces -----------------------------------------------------------------------------------
def _device(cfg: TrainConfig) -> torch.device:
    if cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise ValueError("device='cuda' but no CUDA device is visible; use device='cpu' or 'auto'")
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())
    return torch.device("cpu")


class _Layout:
    """Where this process sits: replica index, number of replicas, rank inside the replica."""

    def __init__(self, transport: Transport, replica_size: int, parallel: str = "ddp"):
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
        # FSDP: each rank holds a shard (and writes it); a forward pass needs the whole replica
        self.sharded = parallel == "fsdp" and self.replica_size > 1
        self.evaluates = self.chief or (self.sharded and self.replica == transport.members()[0])

    def checkpoints(self) -> list[str]:
        """The folders one complete checkpoint step holds, one per writer."""
        ranks = range(self.replica_size) if self.sharded else [0]
        return [checkpoint_name(r, k, self.sharded) for r in range(self.n_replicas) for k in ranks]


def _checkpoint_root(out_dir: str) -> str:
    return os.path.join(out_dir, "checkpoints")


def newest_complete_checkpoint(out_dir: str, n_replicas: int | list[str]) -> tuple[int, str] | None:
    """(step, folder) of the newest checkpoint that every replica (every writer named) finished writing."""
    root = _checkpoint_root(out_dir)
    if not os.path.isdir(root):
        return None
    steps = sorted((int(n[5:]) for n in os.listdir(root) if n.startswith("step_") and n[5:].isdigit()), reverse=True)
    for s in steps:
        d = os.path.join(root, f"step_{s:08d}")
        names = [f"replica_{r}" for r in range(n_replicas)] if isinstance(n_replicas, int) else n_replicas
        if all(os.path.isfile(os.path.join(d, name, "state.json")) for name in names):
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
def _connect(cfg: TrainConfig) -> Transport:
    """``lowcomm.connect()`` for ``cfg``: under torchrun the hierarchical sync when ``cfg.hierarchical``."""
    from .comm import connect

    under_torchrun = "RANK" in os.environ and "WORLD_SIZE" in os.environ
    if under_torchrun and not os.environ.get("LOWCOMM_COORDINATOR"):
        # The slow cross-replica links carry one copy of the model per replica, not one per rank
        # (FSDP's ranks hold different shards: each syncs its own over the flat path).
        return connect(cfg.replica_size, hierarchical=cfg.hierarchical and cfg.parallel != "fsdp")
    return connect(cfg.replica_size)


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

    The phases, each a method of :class:`_Run`: set-up (``_Run.__init__``, :meth:`_Run.resume`),
    then per step :meth:`_Run.step`, :meth:`_Run.log`, :meth:`_Run.evaluate`,
    :meth:`_Run.checkpoint`, and at the end :meth:`_Run.finish`.
    """
    run = _Run(cfg, transport, progress, every_member_logs)
    run.resume(resume)
    run.open_outputs()
    try:
        while run.step_no < cfg.steps:
            if stop is not None and stop.is_set():
                run.say(f"stopping at step {run.step_no} (asked to)")
                break
            run.step()
            run.log()
            run.evaluate()
            run.checkpoint()
    finally:
        run.close()
    return run.finish()


class _Run:
    """One process's training run: its state, and the phases :func:`train` calls in order."""

    def __init__(self, cfg: TrainConfig, transport: Transport | None, progress: Callable[[str], None] | None,
                 every_member_logs: bool):
        from .models import GPT, GPTConfig

        cfg.validate()
        self.cfg, self.setup = cfg, cfg.setup()
        self.transport = transport = transport if transport is not None else _connect(cfg)
        self.layout = layout = _Layout(transport, cfg.replica_size, cfg.parallel)
        if every_member_logs:
            layout.chief = layout.leader
            layout.evaluates = layout.chief or layout.sharded
        if cfg.batch_size % (layout.replica_size * cfg.grad_accum):
            raise ValueError(f"batch_size {cfg.batch_size} must be divisible by ranks per replica x grad_accum "
                             f"({layout.replica_size} x {cfg.grad_accum})")
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        self.device = _device(cfg)
        self.out_dir = cfg.out_dir or os.path.join("runs", cfg.name)
        self.default_output = progress is _say
        self.say = progress if (progress is not None and layout.chief) else (lambda _s: None)

        m = cfg.model
        self.stream, self.held_out, vocab = _data(cfg, layout)
        mcfg = GPTConfig(vocab_size=vocab, n_layer=m.n_layer, n_embd=m.n_embd, n_head=m.n_head, seq_len=m.seq_len,
                         dropout=m.dropout)
        with _BUILD_LOCK:
            torch.manual_seed(cfg.seed)
            self.model = model = GPT(mcfg)
        model.to(self.device)
        self.n_params = sum(p.numel() for p in model.parameters())
        self.fwd = wrap(model, layout.replica_group, layout.replica_size, cfg.parallel, self.device)
        self.opt = self.setup.build(model, transport, weight_decay=cfg.weight_decay, betas=cfg.betas)
        # ZeroMQ: members snapshot their state for joiners; a joiner fetches a donor's state here.
        # Members of strategies that share global state hold the same one, which the joiner checks.
        transport.attach(model, self.opt, verify_global=self.opt.shares_global_state)
        self.step_no, self.bytes_base, self.elapsed_base = self.opt.local_step, 0, 0.0
        self.stream.step = self.step_no  # batch k depends only on (seed, shard, k): a joiner continues the schedule
        self.tokens = self.step_no * cfg.batch_size * m.seq_len
        self.eval_curve: list[tuple[int, float]] = []
        self.rows = cfg.batch_size // layout.replica_size
        self.lo = layout.replica_rank * self.rows
        self.amp = cfg.amp and self.device.type == "cuda"
        self.sync_seconds, self.lr = 0.0, 0.0
        self.last_loss = self.final_eval = float("nan")
        self.timeline: list[list] = []
        self.writer: Any = None
        self.bar: Progress | None = None

    # ---- set-up ---------------------------------------------------------------------------------
    def resume(self, resume: bool | str) -> None:
        """Continue from a checkpoint: model, optimizer, loader position, RNG and counters."""
        if not resume:
            return
        cfg, layout = self.cfg, self.layout
        if os.path.isfile(os.path.join(self.out_dir, "config.json")):
            with open(os.path.join(self.out_dir, "config.json")) as f:
                check_same_layout(cfg, json.load(f), f"the run in {self.out_dir}")
        found = (int(os.path.basename(os.path.normpath(resume))[5:]), resume) if isinstance(resume, str) \
            else newest_complete_checkpoint(self.out_dir, layout.checkpoints())
        if found is None:
            self.say(f"no checkpoint in {_checkpoint_root(self.out_dir)}; starting from scratch")
            return
        name = checkpoint_name(layout.replica, layout.replica_rank, layout.sharded)
        if not os.path.isfile(os.path.join(found[1], name, "state.json")):
            raise ValueError(f"checkpoint {found[1]} has no {name}: it was written with another replica size or "
                             f"parallelism; resume with the layout that wrote it")
        ck = load_checkpoint(os.path.join(found[1], name), device=self.device)
        if ck["config"]["strategy"] != cfg.strategy or ck["config"]["model"] != dataclasses.asdict(cfg.model):
            raise ValueError(f"checkpoint {found[1]} was written by a run with another strategy or model; "
                             f"resume with the recipe that wrote it")
        check_same_layout(cfg, ck["config"], f"checkpoint {found[1]}")
        load_state(self.model, self.opt, ck["model"], ck["optimizer"])
        self.stream.load_state_dict(ck["data"])
        set_rng_state(ck["rng"])
        c = ck["counters"]
        self.step_no, self.tokens, self.bytes_base, self.elapsed_base = (c["step"], c["tokens"], c["bytes_sent"],
                                                                         c["seconds"])
        self.eval_curve = [tuple(e) for e in c["eval_curve"]]
        self.say(f"resumed from {found[1]} at step {self.step_no}")

    def open_outputs(self) -> None:
        """TensorBoard, config.json, the first line, the progress bar; starts the clocks."""
        cfg, layout = self.cfg, self.layout
        if layout.chief and cfg.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(os.path.join(self.out_dir, "tb"), purge_step=self.step_no or None)
        if layout.chief:
            os.makedirs(self.out_dir, exist_ok=True)
            with open(os.path.join(self.out_dir, "config.json"), "w") as f:
                json.dump(cfg.to_dict(), f, indent=1)
        self.say(f"{cfg.name}: {cfg.strategy} ({self.setup.inner} lr {self.setup.lr:g}), "
                 f"{self.n_params / 1e6:.2f}M parameters, {layout.n_replicas} replica(s) x {layout.replica_size} "
                 f"rank(s), {cfg.steps} steps of {cfg.batch_size} x {cfg.model.seq_len} tokens per replica, "
                 f"on {self.device}")
        # A bar with an ETA on a terminal (the chief's default output only); plain lines otherwise.
        self.bar = Progress([(cfg.name, cfg.steps)], enabled=self.default_output and layout.chief)
        self.bar.update(self.step_no)
        if self.bar.tty:
            self.say = self.bar.write
        self.t_start = self.t_log = time.monotonic()
        self.start_step, self.tok_log = self.step_no, self.tokens

    # ---- per step -------------------------------------------------------------------------------
    def step(self) -> None:
        """One inner step (and the sync when one is due); follows a re-join from a donor."""
        cfg = self.cfg
        self.lr = self.setup.lr * lr_factor(self.step_no, steps=cfg.steps, warmup=cfg.warmup_steps,
                                            schedule=cfg.schedule, min_lr_ratio=cfg.min_lr_ratio)
        t_step = time.monotonic()
        x, y = next(self.stream)
        x, y = x[self.lo:self.lo + self.rows].to(self.device), y[self.lo:self.lo + self.rows].to(self.device)
        t_fetch = time.monotonic() - t_step
        res = worker_step(self.model, self.opt, x, y, lr=self.lr, grad_accum=cfg.grad_accum,
                          grad_clip=cfg.grad_clip, amp=self.amp, fwd=self.fwd, last=self.step_no + 1 == cfg.steps)
        if res.synced:
            self.sync_seconds += res.step_seconds
        self.timeline.append([t_fetch + res.compute_seconds, res.step_seconds, res.synced])
        self.step_no += 1
        self.bar.update()
        self.tokens += cfg.batch_size * cfg.model.seq_len
        if self.opt.local_step != self.step_no:
            # The run dropped this peer (it missed a sync) and it re-joined from a donor's snapshot
            # inside opt.step(): continue from the donor's step, on the schedule the run is on.
            self.say(f"re-joined the run at step {self.opt.local_step} (was at step {self.step_no})")
            self.step_no = int(self.opt.local_step)
            self.stream.step = self.step_no
            self.tokens = self.step_no * cfg.batch_size * cfg.model.seq_len
        self.last_loss = res.loss

    def log(self) -> None:
        """The progress line and the TensorBoard scalars, every ``log_every`` steps."""
        cfg, step = self.cfg, self.step_no
        if step % cfg.log_every and step != cfg.steps:
            return
        now = time.monotonic()
        tps = (self.tokens - self.tok_log) / max(1e-9, now - self.t_log)
        self.t_log, self.tok_log = now, self.tokens
        sent = self.bytes_base + self.transport.ledger.bytes_sent
        eta = (cfg.steps - step) * (now - self.t_start) / max(1, step - self.start_step)
        self.say(f"step {step}/{cfg.steps}  loss {self.last_loss:.4f}  lr {self.lr:.2e}  {tps:,.0f} tok/s  "
                 f"sent {sent / 1e6:.2f} MB  syncs {self.opt.sync_count}  eta {eta:.0f}s")
        # For whoever watches the run (the ZeroMQ coordinator's run page); other transports ignore it.
        self.transport.report_stats({"step": step, "tokens": self.tokens, "tokens_per_s": tps,
                                     "syncs": self.opt.sync_count, "rolled_back": self.opt.failed_syncs,
                                     **({} if math.isnan(self.last_loss) else {"train_loss": self.last_loss})})
        if self.writer is not None:
            for tag, value in (("train/loss", self.last_loss), ("train/lr", self.lr),
                               ("train/tokens_per_second", tps), ("comm/bytes_sent", sent),
                               ("comm/sync_seconds", self.sync_seconds), ("comm/failed_syncs", self.opt.failed_syncs)):
                self.writer.add_scalar(tag, value, step)

    def evaluate(self) -> None:
        """Held-out loss every ``eval_every`` steps and at the end (the chief only)."""
        cfg, step = self.cfg, self.step_no
        if not self.layout.evaluates or not (step == cfg.steps or (cfg.eval_every and step % cfg.eval_every == 0)):
            return
        ev = evaluate(self.model, self.held_out, self.device, self.amp)
        self.eval_curve.append((step, ev))
        self.final_eval = ev
        if math.isfinite(ev):
            self.transport.report_stats({"eval_loss": ev})
        self.say(f"step {step}: held-out loss {ev:.4f}")
        if self.writer is not None:
            self.writer.add_scalar("eval/loss", ev, step)
            self.writer.add_scalar("eval/loss_vs_tokens", ev, self.tokens)

    def checkpoint(self) -> None:
        """A checkpoint every ``checkpoint_every`` steps (not at the end: the final weights are saved then)."""
        cfg, step = self.cfg, self.step_no
        if cfg.checkpoint_every and step % cfg.checkpoint_every == 0 and step < cfg.steps:
            _save(cfg, self.out_dir, self.layout, self.model, self.opt, self.stream, step, self.tokens,
                  self.bytes_base + self.transport.ledger.bytes_sent,
                  self.elapsed_base + time.monotonic() - self.t_start, self.eval_curve)

    # ---- the end --------------------------------------------------------------------------------
    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.writer is not None:
            self.writer.flush()
            self.writer.close()
            self.writer = None

    def finish(self) -> TrainResult:
        """The result; each replica's final weights; result.json and report.html (the chief)."""
        layout, out_dir, step = self.layout, self.out_dir, self.step_no
        seconds = self.elapsed_base + time.monotonic() - self.t_start
        sent = self.bytes_base + self.transport.ledger.bytes_sent
        opt = self.opt
        res = TrainResult(step, self.tokens, self.final_eval, self.eval_curve, sent, opt.sync_count,
                          opt.failed_syncs, seconds, full_parameters(self.model),
                          out_dir, self.timeline, self.start_step, list(opt.sync_log))
        weights = full_state_dict(self.model)  # an all-gather inside a sharded replica: every rank calls it
        if layout.leader:
            # Each replica's final weights (its local parameters), for inspection and comparisons.
            from safetensors.torch import save_file

            os.makedirs(os.path.join(out_dir, "final"), exist_ok=True)
            save_file({k: v for k, v in weights.items()
                       if k != "head.weight"},  # tied to tok_emb.weight; safetensors refuses aliases
                      os.path.join(out_dir, "final", f"replica_{layout.replica}.safetensors"))
        if layout.chief:
            with open(os.path.join(out_dir, "result.json"), "w") as f:
                json.dump({"steps": res.steps, "tokens": res.tokens, "final_eval_loss": res.final_eval_loss,
                           "eval_curve": res.eval_curve, "bytes_sent": res.bytes_sent, "syncs": res.syncs,
                           "failed_syncs": res.failed_syncs, "seconds": res.seconds,
                           "last_train_loss": self.last_loss, "environment": environment()}, f, indent=1)
            _write_report(self.cfg, out_dir, res)
            self.say(f"done: {step} steps, held-out loss {self.final_eval:.4f}, {sent / 1e6:.2f} MB sent, "
                     f"{res.syncs} syncs ({res.failed_syncs} rolled back), {seconds:.1f} s")
        return res


def _write_report(cfg: TrainConfig, out_dir: str, res: TrainResult) -> None:
    """``report.html``: the run page (:mod:`lowcomm.web`) with the held-out loss curve and the run's figures."""
    from .web import page_data, write_report

    write_report(os.path.join(out_dir, "report.html"), page_data(
        f"lowcomm train: {cfg.name}", f"{cfg.strategy}, {res.steps} steps",
        summary=[("steps", res.steps), ("tokens", res.tokens), ("held-out loss", res.final_eval_loss),
                 ("bytes sent", res.bytes_sent), ("syncs", res.syncs), ("rolled back", res.failed_syncs),
                 ("seconds", round(res.seconds, 1))],
        charts=[{"id": "loss", "title": "held-out loss", "x": "step", "y": "nats/token", "log_x": False,
                 "lines": {cfg.strategy: [[s, v] for s, v in res.eval_curve]}}]))


def _data(cfg: TrainConfig, layout: _Layout) -> tuple:
    """This replica's batch stream (a ``StatefulDataLoader``), the held-out batches and the vocabulary size.

    From the corpus (``cfg.data``), or from the recipe's own Dataset (``cfg.dataset``).
    """
    from .data import Corpus, ShardLoader, held_out_batches, load_corpus, load_dataset

    shard, shards = ((layout.replica % cfg.data_shards, cfg.data_shards) if cfg.data_shards
                     else (layout.replica, layout.n_replicas))
    L = cfg.model.seq_len
    if cfg.dataset:
        train_ds = load_dataset(cfg.dataset, seq_len=L, split="train")
        eval_ds = load_dataset(cfg.dataset, seq_len=L, split="eval")
        return (ShardLoader(train_ds, shard, shards, cfg.batch_size, seed=cfg.seed),
                held_out_batches(eval_ds, max(1, min(cfg.batch_size, cfg.eval_sequences)), cfg.eval_sequences),
                cfg.model.vocab_size)
    data = load_corpus(None if cfg.data == "stdlib" else cfg.data, cfg.vocab_size or None)
    vocab = cfg.model.vocab_size or data.vocab_size
    if vocab < data.vocab_size:
        raise ValueError(f"model.vocab_size {vocab} is smaller than the corpus's vocabulary {data.vocab_size}")
    corpus = Corpus(data, L)
    return (corpus.stream(shard, shards, cfg.batch_size, seed=cfg.seed),
            eval_batches(corpus, cfg.batch_size, cfg.eval_sequences), vocab)


def _save(cfg, out_dir, layout, model, opt, stream, step, tokens, sent, seconds, eval_curve) -> None:
    d = os.path.join(_checkpoint_root(out_dir), f"step_{step:08d}")
    if layout.leader or layout.sharded:  # with FSDP every rank writes its own shards
        save_checkpoint(os.path.join(d, checkpoint_name(layout.replica, layout.replica_rank, layout.sharded)), {
            "config": cfg.to_dict(),
            **local_state(model, opt),
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
        transport = _connect(cfg)
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
