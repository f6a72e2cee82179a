"""What a simulated comparison leaves behind: a terminal table, results.json and a plot.

TensorBoard scalars are written while the runs go (the runner takes a ``SummaryWriter``).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from typing import Any

from .runner import RunResult, SimConfig

__all__ = ["format_bytes", "format_seconds", "plot", "report_data", "table", "write_results"]


def format_bytes(n: float) -> str:
    for unit, div in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= div:
            return f"{n / div:.1f} {unit}"
    return f"{n:.0f} B"


def format_seconds(s: float) -> str:
    if s >= 3600:
        return f"{s / 3600:.1f} h"
    if s >= 60:
        return f"{s / 60:.1f} min"
    return f"{s:.1f} s"


def _grid(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows)]
    line = lambda cells: "  ".join(str(c).rjust(w) if i else str(c).ljust(w) for i, (c, w) in
                                   enumerate(zip(cells, widths)))
    return "\n".join([line(header), line(["-" * w for w in widths]), *(line(r) for r in rows)])


def _rows(runs: Sequence[RunResult], bws: Sequence[str], util_bw: str) -> list[list[str]]:
    rows = []
    for r in runs:
        worst = "" if math.isclose(r.worst_worker_eval_loss, r.final_eval_loss) else f"{r.worst_worker_eval_loss:.4f}"
        rows.append([r.strategy, f"{r.final_eval_loss:.4f}", worst, f"{r.tokens:,}", format_bytes(r.bytes_sent),
                     format_bytes(r.peak_bytes), *[format_seconds(r.sim_seconds[b]) for b in bws],
                     f"{100 * r.utilisation[util_bw]:.0f}%"])
        if _robust(runs):
            rows[-1] += [f"{r.attack} x{r.attackers}" if r.attack else "none", r.aggregate, str(len(r.detections)),
                         ",".join(str(e["member"]) for e in r.ejections) or "-"]
    return rows


def _robust(runs: Sequence[RunResult]) -> bool:
    """Whether the attack / rule / detections / ejected columns are shown (an attack or a rule but mean)."""
    return any(r.attack or r.aggregate != "mean" for r in runs)


def _header(bws: Sequence[str], util_bw: str, runs: Sequence[RunResult] = ()) -> list[str]:
    return ["strategy", "held-out loss", "worst worker", "tokens", "bytes/worker", "peak sync",
            *[f"time@{b}" for b in bws], f"util@{util_bw}",
            *(["attack", "rule", "detections", "ejected"] if _robust(runs) else [])]


def report_data(runs: Sequence[RunResult], cfg: SimConfig) -> dict[str, Any]:
    """The run page's data (:mod:`lowcomm.web`) for ``report.html``: the table and the loss curves."""
    from ..web import page_data

    bws = list(runs[0].sim_seconds) if runs else []
    util_bw = "100Mbit" if "100Mbit" in bws else (bws[0] if bws else "")
    curves = {r.strategy: [p for p in r.curve if p["step"] > 0] for r in runs}
    return page_data(
        "lowcomm sim", f"{cfg.workers} workers x {cfg.steps} steps"
        + (f", {runs[0].params:,}-parameter GPT" if runs else ""),
        summary=[("workers", cfg.workers), ("steps", cfg.steps), ("strategies", len(runs)),
                 ("seed", cfg.seed)],
        tables=[{"id": "runs", "title": "Strategies", "columns": _header(bws, util_bw, runs),
                 "rows": _rows(runs, bws, util_bw)}],
        charts=[{"id": "loss-tokens", "title": "held-out loss against tokens", "x": "tokens (all workers)",
                 "y": "nats/token", "log_x": False,
                 "lines": {n: [[p["tokens"], p["eval_loss"]] for p in c] for n, c in curves.items()}},
                {"id": "loss-bytes", "title": "held-out loss against bytes sent", "x": "bytes sent per worker",
                 "y": "nats/token", "log_x": True,
                 "lines": {n: [[max(p["bytes"], 1.0), p["eval_loss"]] for p in c] for n, c in curves.items()}}])


def _environment_line() -> str:
    from ..loop import environment

    e = environment()
    return f"(torch {e['torch']}, {e['threads']} thread(s), {e['cpu']}, Python {e['python']})"


def table(runs: Sequence[RunResult], cfg: SimConfig) -> str:
    """The comparison table (one row per strategy), and the projection's if one was asked for."""
    if not runs:
        return "(no runs)"
    bws = list(runs[0].sim_seconds)
    util_bw = "100Mbit" if "100Mbit" in bws else bws[0]
    out = [_grid(_header(bws, util_bw, runs), _rows(runs, bws, util_bw)),
           f"({runs[0].workers} workers x {runs[0].steps} steps, {runs[0].params:,}-parameter GPT; loss in nats per "
           f"token; time = simulated wall-clock with "
           + ("measured compute" if cfg.step_seconds is None
              else f"{cfg.step_seconds:g} s compute per step")
           + f" and {cfg.latency * 1e3:g} ms latency per round"
           + (f", links at {cfg.link_efficiency:.0%} of their rate" if cfg.link_efficiency != 1.0 else "")
           + ")", _environment_line()]
    if any(r.projection for r in runs):
        pj = next(r.projection for r in runs if r.projection)
        header = ["strategy (PROJECTION)", "bytes/worker", "peak sync", *[f"time@{b}" for b in bws],
                  f"util@{util_bw}"]
        rows = [[r.strategy, format_bytes(r.projection["bytes_sent"]), format_bytes(r.projection["peak_bytes"]),
                 *[format_seconds(r.projection["sim_seconds"][b]) for b in bws],
                 f"{100 * r.projection['utilisation'][util_bw]:.0f}%"] for r in runs if r.projection]
        out += ["", _grid(header, rows),
                f"(projection: {pj['params']:.3g} parameters, {pj['step_compute_seconds']:.2f} s compute per step "
                f"({pj['tokens_per_step']:,} tokens at {pj['flops'] / 1e12:g} TFLOP/s x {pj['mfu']:g} MFU), the same "
                f"sync schedule and the ledger's per-sync bytes scaled to the model size)"]
    return "\n".join(out)


def write_results(path: str, runs: Sequence[RunResult], cfg: SimConfig, extra: dict[str, Any] | None = None) -> None:
    """``results.json``: the config and one entry per strategy under ``"runs"``."""
    from ..loop import environment

    doc = {"config": cfg.to_dict(), "environment": environment(), "runs": [r.to_dict() for r in runs],
           **(extra or {})}
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(doc, f, indent=1, default=str)
    os.replace(tmp, path)


def plot(path: str, runs: Sequence[RunResult], title: str = "") -> None:
    """PNG: held-out loss against tokens (left) and against bytes sent per worker (right)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4.5))
    for r in runs:
        pts = [p for p in r.curve if p["step"] > 0]
        if not pts:
            continue
        a.plot([p["tokens"] for p in pts], [p["eval_loss"] for p in pts], marker=".", label=r.strategy)
        b.plot([max(p["bytes"], 1.0) for p in pts], [p["eval_loss"] for p in pts], marker=".", label=r.strategy)
    a.set_xlabel("tokens (all workers)")
    b.set_xlabel("bytes sent per worker")
    b.set_xscale("log")
    for ax in (a, b):
        ax.set_ylabel("held-out loss (nats/token)")
        ax.grid(True, alpha=0.3)
        ax.legend()
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
