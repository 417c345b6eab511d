"""When requests arrive in the queue model: recorded times, a Poisson process, a backlog."""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np

from moetrace.errors import ConfigError
from moetrace.store.reader import open_trace


def recorded_arrivals(
    paths: Sequence[str | os.PathLike[str]], request_ids: Sequence[str]
) -> np.ndarray | None:
    """Per routing request id (``rid``, or ``i:rid`` for the i-th of several traces), its
    recorded ``arrival_time`` in seconds; None unless every request has one."""
    by_trace = []
    for path in paths:
        table = open_trace(path, validate=False).requests()
        if "arrival_time" not in table.column_names:
            return None
        ids = table.column("request_id").to_pylist()
        times = table.column("arrival_time").to_pylist()
        by_trace.append(dict(zip(ids, times, strict=True)))
    out = np.empty(len(request_ids))
    for j, rid in enumerate(request_ids):
        i, local = 0, rid
        if len(paths) > 1:
            head, _, local = rid.partition(":")
            i = int(head)
        t = by_trace[i].get(local)
        if t is None:
            return None
        out[j] = float(t)
    return out


def arrival_times(
    n: int, rate: float | None, seed: int = 0, recorded: np.ndarray | None = None
) -> tuple[np.ndarray, str]:
    """Arrival second of each of ``n`` requests (arrival order): a Poisson process at
    ``rate`` requests/s; else the recorded times (relative to the first); else all at 0
    (a backlog). Returns the times and which it is."""
    if rate is not None:
        if not rate > 0:
            raise ConfigError(f"arrival rate must be > 0 requests/s, got {rate}")
        gaps = np.random.default_rng(seed).exponential(1.0 / rate, n)
        gaps[0] = 0.0
        return np.cumsum(gaps), f"poisson {rate:g}/s"
    if recorded is not None and len(recorded) == n and np.isfinite(recorded).all():
        t = np.maximum.accumulate(np.asarray(recorded, np.float64))
        return t - t[0], "recorded"
    return np.zeros(n), "backlog"
