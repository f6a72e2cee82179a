"""Robust aggregation under simulated attacks (issue 13's benchmark; results in benchmarks/README.md).

Three phases (``--phase``), each printing markdown tables and writing JSON:

``choose``: the default rule. DiLoCo (H=50), W=8 with the last 2 workers attacking, 150 steps, one
seed, every attack x every rule, plus each rule without attackers. A rule qualifies when, without
attackers, its held-out loss is within 1% of ``mean``; among those the chosen one has the smallest
worst-case loss over the value attacks (scale, sign_flip, noise, alie; ``lying_owner`` is caught by the
audit whatever the rule, so it is shown but does not decide).

``compare --rule R``: ``mean`` against R at W=8 on DiLoCo (H=50) and Streaming DiLoCo (its registry
defaults: H=50, 2 fragments, overlap 1, 4-bit E3M0), 300 steps, each attack with 1 and with 2
attackers, and without attackers; the held-out loss of the honest workers' model, its change
against the same strategy's ``mean`` run without attackers (the target: within 3% for R under
every attack; R within 1% of ``mean`` without attackers), the offences detected and the members
ejected. Then bytes per sync of each rule next to ``mean`` (from the byte ledger of one all-reduce
of the model's P floats, W=8) and the owners' aggregation compute per sync (all W shards of one
sync, timed in this process).

``lying``: a lying shard owner (``-10 x`` its true result) among W=8, audits at ``--audit``
(default 0.1): all-reduces of P floats until the liar is named, over ``--seeds``; ops until
detection (mean), whether the liar (and only it) was named every time, and the audits' extra
bytes per op against the all-reduce's.

Full runs (on an idle machine; the default model is ``lowcomm sim``'s):

    PYTHONPATH=. nice -n 10 python3 benchmarks/robust_bench.py --phase choose --out runs/robust_choose.json
    PYTHONPATH=. nice -n 10 python3 benchmarks/robust_bench.py --phase compare --rule RULE \
        --out runs/robust_compare.json
    PYTHONPATH=. nice -n 10 python3 benchmarks/robust_bench.py --phase lying --seeds 0 1 2 3 4 5 6 7 8 9 \\
        --out runs/robust_lying.json

Smoke (seconds): add ``--steps 4 --sync-every 2 --tiny`` (and ``--lying-ops 20`` for ``lying``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from typing import Any

import torch

from lowcomm.comm.adversary import ATTACKS, Adversary
from lowcomm.comm.aggregate import RULES, aggregate
from lowcomm.comm.local import LocalWorld, run_local
from lowcomm.models import GPT, GPTConfig
from lowcomm.sim.cli import DEFAULT_MODEL
from lowcomm.sim.runner import SimConfig, run_strategy

TINY = GPTConfig(n_layer=2, n_embd=16, n_head=2, seq_len=16)


def sim(args, strategy: str, rule: str, attack: str | None, attackers: int, steps: int) -> dict[str, Any]:
    model = TINY if args.tiny else DEFAULT_MODEL
    cfg = SimConfig(workers=args.workers, steps=steps, batch_size=4 if args.tiny else 16, model=model,
                    seed=args.seed, eval_every=max(1, steps), eval_sequences=8 if args.tiny else 64,
                    threads=args.threads, bandwidths=(100e6,), warmup_steps=max(1, steps // 15),
                    attackers=attackers if attack else 0, attack=attack, audit=args.audit)
    knobs = {"aggregate": rule}
    if args.sync_every:
        knobs["sync_every"] = args.sync_every
    t0 = time.monotonic()
    r = run_strategy(strategy, cfg, knobs)
    row = {"strategy": strategy, "rule": rule, "attack": attack or "none", "attackers": attackers if attack else 0,
           "final_eval_loss": r.final_eval_loss, "syncs": r.syncs, "failed_syncs": r.failed_syncs,
           "bytes_sent": r.bytes_sent, "detections": len(r.detections),
           "ejected": [e["member"] for e in r.ejections], "params": r.params, "seconds": time.monotonic() - t0}
    print(f"  {strategy:9s} {rule:13s} {row['attack']:11s} x{row['attackers']}: held-out {r.final_eval_loss:.4f} "
          f"detections {row['detections']} ejected {row['ejected'] or '-'} ({row['seconds']:.0f} s)", flush=True)
    return row


def choose(args) -> dict[str, Any]:
    steps = args.steps or 150
    rows = []
    rules = list(args.rules)
    if "mean" not in rules:  # the baseline every row is compared with
        rows.append(sim(args, "diloco", "mean", None, 0, steps))
    for rule in rules:
        rows.append(sim(args, "diloco", rule, None, 0, steps))
        for attack in ATTACKS:
            rows.append(sim(args, "diloco", rule, attack, 2, steps))
    base = next(r["final_eval_loss"] for r in rows if r["rule"] == "mean" and r["attack"] == "none")
    print(f"\nDiLoCo, W={args.workers}, 2 attackers, {steps} steps, seed {args.seed}: held-out loss "
          f"(change against mean without attackers)\n")
    print("| attack | " + " | ".join(rules) + " |")
    print("|---|" + "---|" * len(rules))
    verdict = {}
    for attack in ("none", *ATTACKS):
        cells = []
        for rule in rules:
            r = next(x for x in rows if x["rule"] == rule and x["attack"] == attack)
            cells.append(f"{r['final_eval_loss']:.4f} ({100 * (r['final_eval_loss'] / base - 1):+.1f}%)"
                         + (f", ejected {r['ejected']}" if r["ejected"] else ""))
        print(f"| {attack} | " + " | ".join(cells) + " |")
    for rule in rules:
        mine = [x for x in rows if x["rule"] == rule]
        clean = next(x["final_eval_loss"] for x in mine if x["attack"] == "none")
        # lying_owner is the audit's to catch and hurts every rule alike: it does not decide the rule
        worst = max(x["final_eval_loss"] for x in mine if x["attack"] not in ("none", "lying_owner"))
        verdict[rule] = {"clean_vs_mean": clean / base - 1, "worst_vs_clean_mean": worst / base - 1}
    ok = [r for r in rules if abs(verdict[r]["clean_vs_mean"]) <= 0.01]
    chosen = min(ok, key=lambda r: verdict[r]["worst_vs_clean_mean"]) if ok else None
    print("\n| rule | no attack vs mean | worst value attack vs mean without attackers |\n|---|---|---|")
    for rule in rules:
        v = verdict[rule]
        print(f"| {rule} | {100 * v['clean_vs_mean']:+.2f}% | {100 * v['worst_vs_clean_mean']:+.1f}% |")
    print(f"\nchosen default: {chosen}")
    return {"runs": rows, "verdict": verdict, "chosen": chosen}


def sync_costs(P: int, W: int, rules) -> list[dict[str, Any]]:
    """Bytes one member sends for one all-reduce of P fp32 (ledger), and the owners' compute."""
    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(P, generator=g) for _ in range(W)]
    out = []
    for rule in rules:
        def fn(t, rule=rule):
            x = xs[t.rank].clone()
            t.all_reduce([x], aggregate=rule).wait(600)
            return t.ledger.records[-1].bytes_sent

        nbytes = max(run_local(W, fn, timeout=600))
        aggregate(xs, rule, shards=W)  # warm-up
        t0 = time.perf_counter()
        aggregate(xs, rule, shards=W)
        out.append({"rule": rule, "bytes_per_sync": nbytes, "owner_compute_s": time.perf_counter() - t0})
    return out


def compare(args) -> dict[str, Any]:
    if args.rule not in RULES:
        raise SystemExit(f"--rule must be one of {RULES} (run --phase choose first)")
    steps = args.steps or 300
    rules = ["mean"] if args.rule == "mean" else ["mean", args.rule]
    rows = []
    for strategy in args.strategies:
        for rule in rules:
            rows.append(sim(args, strategy, rule, None, 0, steps))
            if rule == "mean" and args.mean_clean_only and len(rules) > 1:
                continue
            for attack in ATTACKS:
                for k in (1, 2):
                    rows.append(sim(args, strategy, rule, attack, k, steps))
    print(f"\nW={args.workers}, {steps} steps, seed {args.seed}: held-out loss of the honest workers' model "
          f"(change against the same strategy with mean and no attackers)\n")
    print("| strategy | attack | attackers | " + " | ".join(rules) + " | detections | ejected |")
    print("|---|---|---|" + "---|" * len(rules) + "---|---|")
    for strategy in args.strategies:
        base = next(r["final_eval_loss"] for r in rows if r["strategy"] == strategy and r["rule"] == "mean"
                    and r["attack"] == "none")
        for attack in ("none", *ATTACKS):
            for k in ((0,) if attack == "none" else (1, 2)):
                sel = {r["rule"]: r for r in rows if r["strategy"] == strategy and r["attack"] == attack
                       and r["attackers"] == k}
                cells = [f"{sel[u]['final_eval_loss']:.4f} ({100 * (sel[u]['final_eval_loss'] / base - 1):+.1f}%)"
                         if u in sel else "not run" for u in rules]
                last = sel[rules[-1]]
                print(f"| {strategy} | {attack} | {k} | " + " | ".join(cells)
                      + f" | {last['detections']} | {last['ejected'] or '-'} |")
    P = rows[0]["params"]
    costs = sync_costs(P, args.workers, rules)
    print(f"\nper sync, W={args.workers}, P={P} fp32 (bytes: one member's ledger; compute: the W owners' "
          f"aggregation of one sync, one process)\n")
    print("| rule | bytes/sync | vs mean | owner compute | vs mean |\n|---|---|---|---|---|")
    b0, c0 = costs[0]["bytes_per_sync"], costs[0]["owner_compute_s"]
    for c in costs:
        print(f"| {c['rule']} | {c['bytes_per_sync']} | {100 * (c['bytes_per_sync'] / b0 - 1):+.3f}% "
              f"| {1e3 * c['owner_compute_s']:.2f} ms | x{c['owner_compute_s'] / c0:.1f} |")
    return {"runs": rows, "costs": costs}


def lying(args) -> dict[str, Any]:
    W = args.workers
    P = sum(p.numel() for p in GPT(GPTConfig(**{**(TINY if args.tiny else DEFAULT_MODEL).__dict__,
                                                 "vocab_size": 256})).parameters())
    rows = []
    for seed in args.seeds:
        world = LocalWorld(W, 600.0, adversary=Adversary("lying_owner", 1, W, seed), audit=args.audit, seed=seed,
                           max_offences=10 ** 6)

        def fn(t, seed=seed):
            g = torch.Generator().manual_seed(seed * 1000 + t.rank)
            nbytes = 0
            for _ in range(args.lying_ops):
                x = torch.randn(P, generator=g)
                try:
                    t.all_reduce([x], aggregate=args.rule if args.rule in RULES else None).wait(600)
                except Exception:  # noqa: BLE001 - a detected lie fails the op
                    pass
                nbytes += t.ledger.records[-1].bytes_sent
            return nbytes

        sent = run_local(W, fn, timeout=600, world=world)
        s = world.audits.summary()
        named = s["named"]
        liar_audits = [a["op"] for a in world.audits.audits if a["owner"] == W - 1]
        rows.append({"seed": seed, "ops": s["ops"], "first_detection": named[0]["op"] if named else None,
                     "named_every_time": [n["op"] for n in named] == liar_audits
                     and all(n["member"] == W - 1 and n["kind"] == "owner" for n in named),
                     "detections": len(named), "audits": s["audits"], "extra_bytes": s["extra_bytes"],
                     "allreduce_bytes_per_member": statistics.mean(sent)})
        print(f"  seed {seed}: first named at op {rows[-1]['first_detection']}, {len(named)} detections in "
              f"{s['ops']} ops ({s['audits']} audits)", flush=True)
    found = [r["first_detection"] for r in rows if r["first_detection"] is not None]
    ops = sum(r["ops"] for r in rows)
    extra = sum(r["extra_bytes"] for r in rows) / ops / W
    base = statistics.mean(r["allreduce_bytes_per_member"] for r in rows) / args.lying_ops
    print(f"\nlying owner among W={W}, audit {args.audit}, P={P}, {len(rows)} seeds x {args.lying_ops} ops "
          f"(one shard of W audited per drawn op: {W / args.audit:g} ops to the first detection expected)\n")
    print("| ops until detection (mean) | detected in | liar named every time, nobody else | audit bytes/op/member "
          "| vs all-reduce bytes/op/member |\n|---|---|---|---|---|")
    print(f"| {statistics.mean(found) if found else 'n/a'} | {len(found)}/{len(rows)} seeds | "
          f"{all(r['named_every_time'] for r in rows)} | {extra:.0f} | {100 * extra / base:.2f}% |")
    return {"runs": rows, "params": P}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--phase", choices=("choose", "compare", "lying"), required=True)
    ap.add_argument("--rule", default="mean", help="compare: the chosen rule against mean; lying: the rule in use")
    ap.add_argument("--rules", nargs="+", choices=RULES, default=list(RULES),
                    help="choose: the rules to run (mean's run without attackers is always made: the baseline)")
    ap.add_argument("--strategies", nargs="+", choices=("diloco", "streaming"), default=["diloco", "streaming"],
                    help="compare: the strategies to run")
    ap.add_argument("--mean-clean-only", action="store_true",
                    help="compare: run mean only without attackers (its ruin under scale/sign_flip is in the choose "
                         "phase), to save time")
    ap.add_argument("--workers", type=int, default=8)
    ap.add_argument("--steps", type=int, default=None, help="default: 150 (choose), 300 (compare)")
    ap.add_argument("--sync-every", type=int, default=None, help="default: each strategy's (50)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    ap.add_argument("--audit", type=float, default=0.1)
    ap.add_argument("--lying-ops", type=int, default=1000, help="all-reduces per seed in the lying phase")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tiny", action="store_true", help="a tiny model (smoke runs)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    t0 = time.monotonic()
    doc = {"choose": choose, "compare": compare, "lying": lying}[args.phase](args)
    out = args.out or f"runs/robust_{args.phase}.json"
    os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
    with open(out, "w") as f:
        json.dump({"args": vars(args), **doc}, f, indent=1)
    print(f"\nwrote {out} ({time.monotonic() - t0:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
