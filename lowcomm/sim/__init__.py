"""The simulator: W workers of a real model in one process, every byte counted, wall-clock simulated.

:mod:`.clock` holds the network model and the simulated clock; :mod:`.runner` trains the
workers through the local transport and turns their ledgers and sync logs into times;
:mod:`.report` writes the table, results.json, TensorBoard events and the plot.
"""

from .clock import ClockResult, CommEvent, Network, rounds, simulate_clock
from .runner import DEFAULT_BANDWIDTHS, Projection, RunResult, SimConfig, build_knobs, run_strategy

__all__ = ["DEFAULT_BANDWIDTHS", "ClockResult", "CommEvent", "Network", "Projection", "RunResult", "SimConfig",
           "build_knobs", "rounds", "run_strategy", "simulate_clock"]
