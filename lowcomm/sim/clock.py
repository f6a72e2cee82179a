"""Network model and simulated clock.

Network model: every worker has one link of ``bandwidth`` bits per second (its uplink; the
messages it sends in one operation go out one after another on it) and a ``latency`` per
communication round. An operation of ``kind`` among ``n`` participants takes

    rounds(kind, n) * latency + bytes / (bandwidth * efficiency)

where ``bytes`` is what the busiest participant put on the wire for it (read from the
transports' byte ledgers, never computed from a formula), ``bandwidth`` is scaled by the
link's ``efficiency`` (the share of the nominal rate a transport's payload really gets:
TCP/IP headers, ACKs, TCP flows sharing a link; 1.0 by default, measured for a real network
with e.g. :func:`tools.netlab.link_efficiency`), and the rounds follow the
collective's shape: a ring all-reduce is a reduce-scatter and an all-gather, 2(n-1) rounds
of S/n bytes each (so its per-worker bytes, 2(n-1)/n S, are the ledger's); an all-gather
n-1 rounds; a pairwise or group exchange and a broadcast one round.

Clock: the compute of step k (k = 1..N) takes ``compute[k-1]`` seconds. After step k's
compute, the communication launched at step k starts as soon as the link is free (one
operation at a time, in launch order); communication finishing at step k blocks until it
is done. So a transfer launched at step k and finished at step k + tau is hidden by the
compute of those tau steps as far as that compute covers it; launched and finished at the
same step, it is fully exposed. Step 0 is before the first step (the initial broadcast).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ["ClockResult", "CommEvent", "Network", "Projection", "rounds", "simulate_clock"]


def rounds(kind: str, participants: int) -> int:
    """Latency rounds of one operation of ``kind`` among ``participants`` members."""
    n = int(participants)
    if n <= 1:
        return 0
    if kind == "all_reduce":
        return 2 * (n - 1)  # ring: reduce-scatter then all-gather
    if kind == "all_gather":
        return n - 1
    return 1  # group_reduce / pairwise exchange / broadcast / anything point to point


@dataclass(frozen=True)
class Network:
    """A network: ``bandwidth`` bits/s per worker link, ``latency`` seconds per round, and the
    share ``efficiency`` of the bandwidth that payload bytes get (see the module docstring)."""

    bandwidth: float
    latency: float = 0.0
    efficiency: float = 1.0

    def __post_init__(self) -> None:
        if not self.bandwidth > 0:
            raise ValueError(f"bandwidth must be > 0 bits/s (e.g. 100e6 for 100 Mbit/s), got {self.bandwidth!r}")
        if not self.latency >= 0:
            raise ValueError(f"latency must be >= 0 seconds, got {self.latency!r}")
        if not 0 < self.efficiency <= 1:
            raise ValueError(f"efficiency must be in (0, 1] (payload share of the link rate, e.g. 0.8), "
                             f"got {self.efficiency!r}")

    def seconds(self, kind: str, participants: int, nbytes: int) -> float:
        """Time of one operation (see the module docstring)."""
        if participants <= 1:
            return 0.0
        return rounds(kind, participants) * self.latency + 8.0 * nbytes / (self.bandwidth * self.efficiency)


@dataclass(frozen=True)
class CommEvent:
    """Communication launched after step ``launch_step``'s compute and needed at ``finish_step``."""

    launch_step: int
    finish_step: int
    seconds: float


@dataclass(frozen=True)
class ClockResult:
    """Simulated wall-clock of one worker."""

    total: float  # seconds from start to the end of the last step (and of every transfer)
    compute: float  # seconds of compute
    exposed_comm: float  # seconds spent waiting for communication

    @property
    def utilisation(self) -> float:
        """Share of the wall-clock spent computing."""
        return self.compute / self.total if self.total > 0 else 1.0


def simulate_clock(compute: Sequence[float], events: Sequence[CommEvent]) -> ClockResult:
    """Wall-clock of a worker that computes ``compute[k-1]`` seconds in step k and communicates ``events``."""
    n = len(compute)
    launches: dict[int, list[int]] = {}
    finishes: dict[int, list[int]] = {}
    for i, e in enumerate(events):
        if e.launch_step < 0 or e.finish_step < e.launch_step:
            raise ValueError(f"communication event {e} must have 0 <= launch_step <= finish_step")
        if e.seconds < 0:
            raise ValueError(f"communication event {e} has negative duration")
        launches.setdefault(min(e.launch_step, n), []).append(i)
        finishes.setdefault(min(e.finish_step, n), []).append(i)
    done = [0.0] * len(events)
    t = 0.0
    link_free = 0.0
    total_compute = 0.0
    for k in range(n + 1):
        if k > 0:
            c = float(compute[k - 1])
            if c < 0:
                raise ValueError(f"compute time of step {k} is negative")
            t += c
            total_compute += c
        for i in launches.get(k, ()):
            start = max(t, link_free)
            done[i] = link_free = start + events[i].seconds
        for i in finishes.get(k, ()):
            t = max(t, done[i])
    total = max([t, *done])
    return ClockResult(total, total_compute, total - total_compute)


@dataclass
class Projection:
    """A configured device and model size to project wall-clock onto (labelled a projection).

    Compute per worker step is ``6 * params * tokens_per_step / (flops * mfu)`` (forward and
    backward of a dense transformer); every transfer's bytes are the ledger's bytes of the
    simulated run scaled by ``params / simulated params`` (each strategy's payload is
    proportional to the parameter count). The sync schedule is the simulated run's.
    """

    params: float = 1e9  # parameters of the projected model
    flops: float = 989e12  # peak FLOP/s of one worker's device (H100 SXM, dense bf16)
    mfu: float = 0.4  # achieved share of peak
    tokens_per_step: int = 524288  # tokens per worker step (e.g. 256 sequences of 2048)

    def __post_init__(self) -> None:
        for name in ("params", "flops", "tokens_per_step"):
            if not float(getattr(self, name)) > 0:
                raise ValueError(f"projection {name} must be > 0, got {getattr(self, name)!r}")
        if not 0 < self.mfu <= 1:
            raise ValueError(f"projection mfu must be in (0, 1], got {self.mfu!r}")

    @property
    def step_seconds(self) -> float:
        return 6.0 * self.params * self.tokens_per_step / (self.flops * self.mfu)
