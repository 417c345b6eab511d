"""Trace-replay simulator: events, numba replay kernel, timing model, metrics."""

from moetrace.tuner.sim.engine import (
    DEFAULT_BYTES_PER_EXPERT,
    make_plan,
    next_use_index,
    simulate,
    worst_case_bytes,
)
from moetrace.tuner.sim.layouts import mrc_layout, pool_layout, skew_layout, uniform_layout
from moetrace.tuner.sim.metrics import SimResult

__all__ = [
    "DEFAULT_BYTES_PER_EXPERT",
    "SimResult",
    "make_plan",
    "mrc_layout",
    "next_use_index",
    "pool_layout",
    "simulate",
    "skew_layout",
    "uniform_layout",
    "worst_case_bytes",
]
