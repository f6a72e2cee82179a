"""``lowcomm sim``: train the small GPT with each strategy on W simulated workers and compare.

Default scale (chosen so that the default set of strategies, up to about six of them,
finishes in about five minutes on two CPU cores): a 4-layer GPT of width 64 with context
64 (about 0.22M parameters), 4 workers, batch 16 per worker, 300 steps; each strategy
takes about 40-60 s. The benchmarks (``benchmarks/convergence.py``) use the 0.84M
calibration model and longer runs.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from typing import Any

from ..comm.adversary import ATTACKS
from ..comm.aggregate import RULES
from ..loop import INNER_KEYS
from ..models import GPTConfig
from ..outer.registry import get_strategy
from ..progress import Progress
from .runner import DEFAULT_BANDWIDTHS, Projection, RunResult, SimConfig, build_knobs, run_strategy

__all__ = ["DEFAULT_MODEL", "add_arguments", "main", "parse_knobs", "run"]

DEFAULT_MODEL = GPTConfig(n_layer=4, n_embd=64, n_head=4, seq_len=64)
DEFAULT_STEPS = 300


def _positive_int(s: str) -> int:
    try:
        v = int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {s!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {s!r}")
    return v


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--strategies", default=None,
                   help="comma-separated strategies (default: every registered strategy flagged for the default run)")
    p.add_argument("--workers", type=_positive_int, default=4, help="simulated workers W (default 4)")
    p.add_argument("--steps", type=_positive_int, default=DEFAULT_STEPS, help="inner steps per worker (default 300)")
    p.add_argument("--batch-size", type=_positive_int, default=16, help="sequences per worker per step (default 16)")
    p.add_argument("--data", default=None,
                   help="text file or folder (byte-level), or a uint16 token file with --vocab-size "
                        "(default: this Python's standard-library source)")
    p.add_argument("--vocab-size", type=_positive_int, default=None, help="vocabulary of a pre-tokenized --data file")
    p.add_argument("--seed", type=int, default=0, help="seed of model init and data order (default 0)")
    p.add_argument("--out", default="runs/sim", help="output folder (default runs/sim)")
    p.add_argument("--layers", type=_positive_int, default=DEFAULT_MODEL.n_layer, help="GPT layers (default 4)")
    p.add_argument("--width", type=_positive_int, default=DEFAULT_MODEL.n_embd, help="GPT width (default 64)")
    p.add_argument("--heads", type=_positive_int, default=DEFAULT_MODEL.n_head, help="attention heads (default 4)")
    p.add_argument("--context", type=_positive_int, default=DEFAULT_MODEL.seq_len, help="context length (default 64)")
    p.add_argument("--lr", type=float, default=None, help="peak inner learning rate (default: strategy's, else 1e-3)")
    p.add_argument("--warmup-steps", "--warmup", dest="warmup_steps", type=int, default=None,
                   help="linear warmup steps (default: steps/15; --warmup is the older spelling)")
    p.add_argument("--eval-every", type=_positive_int, default=25, help="steps between held-out evaluations")
    p.add_argument("--sync-every", type=_positive_int, default=None,
                   help="H, inner steps between syncs, for every strategy that takes sync_every")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="a strategy knob, passed to every selected strategy that takes it (repeatable), parsed "
                        "as the knob's type, e.g. --set outer_lr=0.5 --set nesterov=false")
    p.add_argument("--step-seconds", type=float, default=None,
                   help="configured compute seconds per inner step for the clock (default: measured)")
    p.add_argument("--latency", type=float, default=0.01, help="seconds per communication round (default 0.01)")
    p.add_argument("--link-efficiency", type=float, default=1.0,
                   help="share of each bandwidth the payload gets (TCP/IP headers, ACKs, flows sharing a link); "
                        "measure it for your network, e.g. with tools/netlab.py's all-to-all probe (default 1.0)")
    p.add_argument("--bandwidths", default=None,
                   help="comma-separated bits/s to simulate (default 10e6,100e6,1e9,10e9)")
    p.add_argument("--projection", nargs="?", const="", default=None, metavar="K=V,...",
                   help="also project wall-clock to a bigger model on a faster device "
                        "(default 1B parameters, 989 TFLOP/s at 0.4 MFU, 524288 tokens per step; "
                        "override with e.g. params=7e9,flops=989e12,mfu=0.4,tokens_per_step=1048576)")
    p.add_argument("--attackers", type=int, default=0,
                   help="K: the last K workers attack (with --attack; the held-out loss is the honest workers')")
    p.add_argument("--attack", default=None, choices=ATTACKS,
                   help="scale (x1e4), sign_flip (x-10), noise (100x the honest norm), alie (mean - z std of the "
                        "honest contributions), lying_owner (a shard owner returns a wrong result)")
    p.add_argument("--aggregate", default=None,
                   help=f"aggregation rule for every strategy: {', '.join(RULES)} (default mean), with knobs as a "
                        f"spec, e.g. clip:clip_ratio=2, trimmed_mean:trim=2, centered_clip:iters=5")
    p.add_argument("--audit", type=float, default=0.1,
                   help="with an attack: probability per all-reduce that two members recompute a shard (default 0.1)")
    p.add_argument("--max-offences", type=_positive_int, default=3,
                   help="offences after which a member is ejected (default 3)")
    p.add_argument("--speeds", default=None, metavar="S,S,...",
                   help="relative compute speed per worker, e.g. 1,1,1,0.33 (default: equal); the clock advances by "
                        "the slowest worker of each phase; see lowcomm.sim.uneven")
    p.add_argument("--threads", type=_positive_int, default=2, help="torch threads (default 2)")
    p.add_argument("--no-plot", action="store_true", help="skip the PNG")
    p.add_argument("--quiet", action="store_true", help="no progress lines")


def parse_knobs(items: list[str]) -> dict[str, str]:
    """``["a=1", "b=x"] -> {"a": "1", "b": "x"}``: each strategy parses the values against its knobs' types."""
    out = {}
    for it in items:
        if "=" not in it:
            raise ValueError(f"--set takes KEY=VALUE, got {it!r}")
        k, v = it.split("=", 1)
        k = k.strip().replace("-", "_")
        if not k:
            raise ValueError(f"--set takes KEY=VALUE, got {it!r}")
        out[k] = v.strip()
    return out


def _projection(spec: str | None) -> Projection | None:
    if spec is None:
        return None
    kw = {}
    for k, v in parse_knobs([x for x in spec.split(",") if x.strip()]).items():
        if k not in ("params", "flops", "mfu", "tokens_per_step"):
            raise ValueError(f"unknown projection setting {k!r}; use params, flops, mfu, tokens_per_step")
        try:
            kw[k] = int(float(v)) if k == "tokens_per_step" else float(v)
        except ValueError:
            raise ValueError(f"projection {k} takes a number, got {v!r}") from None
    return Projection(**kw)


def _select(spec: str | None) -> list[str]:
    from .. import outer  # noqa: F401 - registers the built-in strategies
    from ..outer.registry import available, default_strategies, get_strategy

    if spec is None:
        # The baselines first (stable sort), then the others in registration order.
        names = sorted(default_strategies(), key=lambda n: (n != "ddp", n != "diloco"))
    else:
        names = [s.strip() for s in spec.split(",") if s.strip()]
    if not names:
        raise ValueError(f"no strategies selected; available: {', '.join(available())}")
    for n in names:
        get_strategy(n)  # unknown names: ValueError listing what exists
    return names


def config_from_args(args: argparse.Namespace) -> SimConfig:
    bws = DEFAULT_BANDWIDTHS
    if args.bandwidths:
        try:
            bws = tuple(float(x) for x in args.bandwidths.split(","))
        except ValueError:
            raise ValueError(f"--bandwidths takes comma-separated bits/s such as 10e6,1e9, got {args.bandwidths!r}") \
                from None
    model = GPTConfig(n_layer=args.layers, n_embd=args.width, n_head=args.heads, seq_len=args.context)
    return SimConfig(workers=args.workers, steps=args.steps, batch_size=args.batch_size, model=model,
                     lr=args.lr if args.lr is not None else 1e-3,
                     warmup_steps=args.warmup_steps if args.warmup_steps is not None else max(1, args.steps // 15),
                     seed=args.seed, data=args.data, vocab_size=args.vocab_size, eval_every=args.eval_every,
                     threads=args.threads, bandwidths=bws, latency=args.latency,
                     link_efficiency=args.link_efficiency, step_seconds=args.step_seconds,
                     projection=_projection(args.projection), attackers=args.attackers, attack=args.attack,
                     audit=args.audit, max_offences=args.max_offences, speeds=args.speeds)


def run(names: list[str], cfg: SimConfig, knobs: dict[str, Any], out: str | None, plot: bool = True,
        progress: Progress | None = None, lr_given: bool = False) -> list[RunResult]:
    """Run every strategy in ``names`` on ``cfg`` and write the outputs into ``out``.

    ``progress``: a :class:`~lowcomm.progress.Progress` with bars ``"all"`` and ``"strategy"``
    (ETA of the whole job and of the strategy running), and the evaluation lines.
    """
    from ..web import write_report
    from .report import plot as write_plot
    from .report import report_data, write_results

    if knobs:
        known = {k for n in names for k in get_strategy(n).knob_names()} | set(INNER_KEYS)
        unused = [k for k in knobs if k not in known]
        if unused:
            raise ValueError(f"no selected strategy takes {', '.join(unused)}; known knobs: "
                             f"{', '.join(sorted(known))} (strategies: {', '.join(names)})")
        for n in names:
            build_knobs(n, knobs)  # every value parses against the knob's type, before any run starts
    writer = None
    if out:
        os.makedirs(out, exist_ok=True)
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(os.path.join(out, "tensorboard"))
    runs: list[RunResult] = []
    try:
        for n in names:
            over = dict(knobs)
            if lr_given:
                over["lr"] = cfg.lr
            if progress is not None:
                progress.reset("strategy", cfg.steps, n)
            runs.append(run_strategy(n, cfg, over, progress=None if progress is None else progress.write,
                                     writer=writer, on_step=None if progress is None else lambda _s: progress.update()))
            if out:
                write_results(os.path.join(out, "results.json"), runs, cfg)
    finally:
        if writer is not None:
            writer.close()
    if out and plot and runs:
        write_plot(os.path.join(out, "loss.png"), runs,
                   f"{cfg.workers} workers, {cfg.steps} steps each, {runs[0].params:,}-parameter GPT")
    if out and runs:
        write_report(os.path.join(out, "report.html"), report_data(runs, cfg))
    return runs


def main(args: argparse.Namespace) -> int:
    from .report import table

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    names = _select(args.strategies)
    cfg = config_from_args(args)
    knobs = parse_knobs(args.set)
    if args.sync_every is not None:
        knobs["sync_every"] = args.sync_every
    if args.aggregate is not None:
        knobs["aggregate"] = args.aggregate
    t0 = time.monotonic()
    print(f"lowcomm sim: {', '.join(names)} | {cfg.workers} workers x {cfg.steps} steps, batch {cfg.batch_size} "
          f"x {cfg.model.seq_len} tokens | data: {cfg.data or 'python stdlib source'}"
          + (f" | attack: {cfg.attack} by the last {cfg.attackers}" if cfg.attack else "") + f" | out: {args.out}",
          flush=True)
    progress = None if args.quiet else Progress([("all", len(names) * cfg.steps), ("strategy", cfg.steps)])
    try:
        runs = run(names, cfg, knobs, args.out, plot=not args.no_plot, progress=progress,
                   lr_given=args.lr is not None)
    finally:
        if progress is not None:
            progress.close()
    print()
    print(table(runs, cfg))
    print(f"\nwrote {os.path.join(args.out, 'results.json')}, {os.path.join(args.out, 'loss.png')}, "
          f"{os.path.join(args.out, 'report.html')} and TensorBoard "
          f"events in {os.path.join(args.out, 'tensorboard')} ({time.monotonic() - t0:.0f} s)")
    sys.stdout.flush()
    return 0
