"""A peer process for the ZeroMQ tests: trains a tiny model with a lowcomm strategy over ZeroMQ.

Run as ``python tests/_zmq_worker.py CONFIG_JSON``; writes its result to ``config["out"]``
(JSON: member id, final parameters as hex of their float32 bytes, global parameters, ledger).
The same functions run the local-transport reference inside the test process.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import threading
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
torch.set_num_threads(1)

import lowcomm  # noqa: E402
from lowcomm.outer.diloco import sgd_outer  # noqa: E402

_BUILD_LOCK = threading.Lock()  # the local reference builds models in threads: seed + init must not interleave


class Net(torch.nn.Module):
    """A tiny MLP whose middle layers are a ModuleList of blocks (what Streaming DiLoCo fragments)."""

    def __init__(self, width: int):
        super().__init__()
        self.inp = torch.nn.Linear(6, width)
        self.blocks = torch.nn.ModuleList([torch.nn.Linear(width, width) for _ in range(2)])
        self.out = torch.nn.Linear(width, 3)

    def forward(self, x):
        x = torch.tanh(self.inp(x))
        for b in self.blocks:
            x = torch.tanh(b(x))
        return self.out(x)


def make_model(seed=0, width=8):
    with _BUILD_LOCK:
        torch.manual_seed(seed)
        return Net(width)


def batch(rank, step):
    g = torch.Generator().manual_seed(1000 * step + rank)
    return torch.randn(5, 6, generator=g), torch.randn(5, 3, generator=g)


def flat(params):
    return torch.cat([p.detach().reshape(-1).float() for p in params])


def build(strategy, model, transport, knobs):
    inner = torch.optim.AdamW(model.parameters(), lr=1e-2)
    if strategy == "diloco":
        return lowcomm.DiLoCo(inner, transport=transport, sync_every=knobs.get("H", 2),
                              outer_optimizer=sgd_outer(0.7, 0.9, True), codec=knobs.get("codec"))
    from lowcomm.outer.registry import get_strategy

    return get_strategy(strategy).build(inner, transport, model, **knobs)


def train(transport, strategy="diloco", steps=6, knobs=None, hooks=None, start_after=None):
    """Train ``steps`` inner steps; ``hooks[step]`` runs before that step (test orchestration)."""
    # OpenMP's thread count is per thread: a worker thread of the local reference would otherwise use
    # the default (all cores), and kernels split differently round floats differently.
    torch.set_num_threads(1)
    knobs = dict(knobs or {})
    model = make_model(width=knobs.pop("width", 8))
    opt = build(strategy, model, transport, knobs)
    attach = getattr(transport, "attach", None)
    if attach is not None:
        attach(model, opt, verify_global=knobs.get("verify_global", strategy in ("diloco", "streaming")))
    while opt.local_step < steps:
        step = opt.local_step
        if hooks and step in hooks:
            hooks.pop(step)(transport, opt)  # once: a peer that catches up may land on a step again
        x, y = batch(transport.rank, step)
        opt.zero_grad()
        ((model(x) - y) ** 2).mean().backward()
        opt.step()
    return model, opt


def main(cfg):
    import faulthandler
    import signal

    faulthandler.register(signal.SIGUSR1)  # `kill -USR1 PID` prints every thread's stack (debugging hangs)
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s peer {os.getpid()} %(name)s: %(message)s")
    from lowcomm.comm.zmq import CurveConfig, connect_zmq

    # Warm up torch's lazy imports (the first optimizer imports torch._dynamo, seconds of work on a
    # loaded machine) before joining, so they do not delay this peer's first heartbeats.
    torch.optim.AdamW(make_model().parameters())
    kw = dict(cfg.get("transport", {}))
    if cfg.get("curve"):
        kw["curve"] = CurveConfig(**cfg["curve"])
    t = connect_zmq(cfg["coordinator"], **kw)
    hooks = {}
    # [step, id]: at that step wait until member `id` is an active member of the run
    for step, mid in cfg.get("waits", []):
        hooks[step] = lambda tr, opt, mid=mid: tr.wait_members(lambda ids: mid in ids, 60)
    # [step, seconds] or [step, seconds, member]: sleep before that step (only as that member)
    for step, secs, *who in cfg.get("pauses", []):
        if not who or who[0] == t.rank:
            hooks[step] = lambda tr, opt, secs=secs: time.sleep(secs)
    try:
        model, opt = train(t, cfg.get("strategy", "diloco"), cfg["steps"], cfg.get("knobs"), hooks)
        if cfg.get("strategy") == "noloco":
            # End the run together. NoLoCo draws each sync's groups from the membership each peer
            # sees then (no sync-start barrier); a peer that finished and left while others were
            # still drawing their last groups would change their view, and that sync would fail
            # and roll back (a known limitation, noted in the README), not what this test checks.
            t.all_reduce([torch.zeros(1)]).wait(60)
        out = {"member": t.rank, "params": flat(model.parameters()).numpy().tobytes().hex(),
               "anchors": flat(opt.units[0].anchors).numpy().tobytes().hex() if opt.units else "",
               "failed_syncs": opt.failed_syncs, "sync_count": opt.sync_count, "members": t.members(),
               "ledger": [r.__dict__ for r in t.ledger.records], "local_step": opt.local_step,
               "header_bytes": {str(k): v for k, v in t.header_bytes.items()}}
        with open(cfg["out"] + ".tmp", "w") as f:
            json.dump(out, f, default=str)
        os.replace(cfg["out"] + ".tmp", cfg["out"])
    finally:
        t.close()
    # Skip interpreter finalisation: once, NoLoCo peers were seen to hang in the garbage collector at
    # exit, after close() (not reproduced since); the test only needs the result file.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main(json.loads(sys.argv[1]))
