"""``lowcomm coordinator``: run the membership coordinator of a ZeroMQ run (see :mod:`.coordinator`).

SIGHUP makes it re-read its CURVE allowlist; members whose key was removed are ejected.
"""

from __future__ import annotations

import logging
import signal
import threading

from .coordinator import Coordinator
from .security import CurveConfig

__all__ = ["add_arguments", "main", "run_coordinator"]

def run_coordinator(bind: str, status_every: float | None = None, **kwargs) -> None:
    """Run a coordinator in this process until interrupted (what ``lowcomm coordinator`` does)."""
    c = Coordinator(bind, **kwargs)
    print(f"lowcomm coordinator listening on {c.endpoint} (epoch {c.epoch})", flush=True)
    if c.page is not None:
        print(f"run page at {c.page.url}", flush=True)
    if hasattr(signal, "SIGHUP") and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGHUP, lambda *_: c.request_reload())  # re-read the allowlist
    try:
        c.serve(status_every=status_every)
    except KeyboardInterrupt:
        pass


def add_arguments(ap) -> None:
    """Arguments of ``lowcomm coordinator``."""
    ap.add_argument("--bind", required=True, help="where to listen, e.g. tcp://0.0.0.0:5555")
    ap.add_argument("--min-peers", type=int, default=1, help="peers needed before the run starts")
    ap.add_argument("--heartbeat", type=float, default=2.0, help="seconds between peer heartbeats")
    ap.add_argument("--heartbeat-timeout", type=float, default=None,
                    help="drop a peer silent for this long (default 5 heartbeats)")
    ap.add_argument("--barrier-timeout", type=float, default=600.0,
                    help="seconds the sync-start barrier waits for the slowest member before going on "
                         "without it (it misses that sync); "
                         "allow for the slowest expected compute between syncs")
    ap.add_argument("--max-misses", type=int, default=3,
                    help="consecutive missed syncs after which a slow peer is dropped (it may join again); "
                         "below that a peer that missed a sync catches up from a snapshot")
    ap.add_argument("--status-every", type=float, default=10.0,
                    help="seconds between status lines (members and progress); 0 for none")
    ap.add_argument("--state", default=None,
                    help="file keeping the epoch, member ids, the keys (or tokens) they are bound to and the "
                         "verdict secret across coordinator restarts (keep it private)")
    ap.add_argument("--curve-secret", default=None, help="the coordinator's .key_secret (from lowcomm keygen)")
    ap.add_argument("--curve-allow", default=None,
                    help="directory of allowed peers' public .key files (re-read on SIGHUP; removed keys are ejected)")
    ap.add_argument("--dashboard", default=None, metavar="HOST:PORT",
                    help="serve a live run page and /status.json here (loopback unless a non-loopback HOST is "
                         "given; e.g. 127.0.0.1:8080)")
    ap.add_argument("--dashboard-addresses", action="store_true",
                    help="show the peers' announced addresses on the run page (hidden by default)")
    ap.add_argument("--insecure", action="store_true",
                    help="allow a non-loopback --bind without CURVE (only on a network you trust)")


def main(args) -> int:
    """Run ``lowcomm coordinator`` with parsed arguments."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    curve = None
    if args.curve_secret or args.curve_allow:
        if not (args.curve_secret and args.curve_allow):
            raise ValueError("CURVE needs both --curve-secret and --curve-allow")
        curve = CurveConfig(args.curve_secret, args.curve_allow)
    run_coordinator(args.bind, min_peers=args.min_peers, heartbeat=args.heartbeat,
                    heartbeat_timeout=args.heartbeat_timeout, barrier_timeout=args.barrier_timeout,
                    max_misses=args.max_misses, state_file=args.state, curve=curve, insecure=args.insecure,
                    dashboard=args.dashboard, dashboard_addresses=args.dashboard_addresses,
                    status_every=None if args.status_every == 0 else args.status_every)
    return 0
