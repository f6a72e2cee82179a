"""``lowcomm peer``: a volunteer joins a run over the ZeroMQ transport, trains, syncs and leaves cleanly.

The peer connects to the coordinator (:mod:`lowcomm.comm.zmq`), builds the recipe's model and
strategy (DiLoCo, Douillard et al. 2023, arXiv 2311.08105, or any registered one), and, if the
run is already under way, fetches the state of a live donor (model, inner and outer optimizer
state, counters) before it takes part from the next sync. Then it runs the same training loop
as ``lowcomm train`` (:func:`lowcomm.train.train`).

Leaving: the first SIGINT or SIGTERM only sets a flag. The loop finishes the step it is in (a
sync in flight completes, it is never abandoned half-way), then the peer tells the coordinator
it leaves and closes its sockets, so the others start their next sync without it instead of
waiting for a deadline, and no sync is rolled back. A second signal interrupts at once.

A peer far slower than the others misses the sync-start barrier; the coordinator drops it from
the epoch (the others go on) and reports it, and the peer fetches the current state again and
rejoins (the transport does this on its next operation).

Data: volunteers come and go, so member ids grow without bound; a peer trains on shard
``member_id % data_shards`` of the corpus (``data_shards`` from the recipe, default 16).
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import threading
from typing import Any

__all__ = ["add_arguments", "main", "run_peer"]

log = logging.getLogger(__name__)


def add_arguments(ap) -> None:
    """Arguments of ``lowcomm peer``."""
    ap.add_argument("--coordinator", required=True, help="the coordinator's endpoint, tcp://HOST:PORT")
    ap.add_argument("--recipe", required=True, help="path of a recipe file (e.g. recipes/tiny_diloco.py)")
    ap.add_argument("--bind", default=None,
                    help="where this peer listens, e.g. tcp://0.0.0.0:7000 (default $LOWCOMM_BIND, else "
                         "tcp://127.0.0.1 on a free port)")
    ap.add_argument("--announce", default=None,
                    help="address others dial to reach this peer (default: the bound address; set it behind "
                         "port forwarding or when binding 0.0.0.0)")
    ap.add_argument("--insecure", action="store_true",
                    help="allow a non-loopback --bind/--announce without CURVE (only on a network you trust)")
    ap.add_argument("--out", default=None, help="output folder (default: runs/<recipe name>/member_<id>)")
    ap.add_argument("--steps", type=int, default=None, help="override the recipe's number of steps")
    ap.add_argument("--progress-timeout", type=float, default=30.0,
                    help="seconds without bytes from an awaited peer before it counts as lost")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config field")


def _announce_for(bind: str | None, announce: str | None) -> str | None:
    announce = announce or os.environ.get("LOWCOMM_ANNOUNCE")
    if announce:
        return announce
    bind = bind or os.environ.get("LOWCOMM_BIND") or ""
    if "0.0.0.0" in bind:
        raise ValueError("--bind listens on every interface (0.0.0.0); pass --announce tcp://HOST:PORT with an "
                         "address the other peers can reach, or bind a specific address")
    return None


def run_peer(args: Any, stop: threading.Event | None = None) -> int:
    """Join, train, leave. Returns the process exit status."""
    from .comm.zmq import connect_zmq
    from .train import apply_overrides, load_recipe, train

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    cfg = load_recipe(args.recipe)
    sets = list(args.set)
    if args.steps is not None:
        sets.append(f"steps={args.steps}")
    apply_overrides(cfg, sets)
    if not cfg.data_shards:
        cfg.data_shards = 16
    cfg.validate()
    stop = stop or threading.Event()

    def on_signal(signum, frame):
        if stop.is_set():
            raise KeyboardInterrupt
        log.info("signal %d: leaving after the current step (send it again to stop at once)", signum)
        stop.set()

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, on_signal)
        signal.signal(signal.SIGTERM, on_signal)
    bind = args.bind
    announce = _announce_for(bind, args.announce)
    kw: dict[str, Any] = {"progress_timeout": args.progress_timeout, "insecure": args.insecure}
    if bind:
        kw["bind"] = bind
    if announce:
        kw["announce"] = announce
    transport = connect_zmq(args.coordinator, **kw)
    try:
        if args.out is None:
            cfg.out_dir = os.path.join(cfg.out_dir or os.path.join("runs", cfg.name), f"member_{transport.rank}")
        else:
            cfg.out_dir = args.out
        res = train(cfg, transport=transport, stop=stop, every_member_logs=True)
        with open(os.path.join(cfg.out_dir, "peer.json"), "w") as f:
            json.dump({"member": transport.rank, "steps": res.steps, "syncs": res.syncs,
                       "failed_syncs": res.failed_syncs, "bytes_sent": res.bytes_sent,
                       "final_eval_loss": res.final_eval_loss, "left_early": stop.is_set(),
                       "seconds": res.seconds}, f)
        # What the network lab compares with the simulator: per-step times, syncs, bytes per op.
        with open(os.path.join(cfg.out_dir, "timeline.json"), "w") as f:
            json.dump({"timeline": res.timeline, "first_step": res.first_step, "seconds": res.seconds,
                       "members": transport.members(),
                       "syncs": [[r.unit, r.launch_step, r.finish_step, r.op_ids, r.committed]
                                 for r in res.sync_log],
                       "ops": [[r.op_id, r.kind, r.participants, r.bytes_sent] for r in transport.ledger.records]},
                      f)
        print(f"member {transport.rank} leaves after step {res.steps}: {res.syncs} syncs committed, "
              f"{res.failed_syncs} rolled back, {res.bytes_sent / 1e6:.2f} MB sent", flush=True)
    finally:
        transport.close(leave=True)
    return 0


def main(args: Any) -> int:
    """Run ``lowcomm peer`` with parsed arguments."""
    return run_peer(args)


def _cli(argv: list[str] | None = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(prog="lowcomm peer", description="Join a volunteer run over ZeroMQ.")
    add_arguments(ap)
    return main(ap.parse_args(argv))


if __name__ == "__main__":
    from lowcomm.peer import _cli

    sys.exit(_cli())
