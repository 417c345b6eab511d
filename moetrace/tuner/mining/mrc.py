"""Miss-ratio curves: LRU at every cache size from stack distances, plus reference sims.

See :mod:`moetrace.tuner.mining.streams` for the access definition. ``lru_hit_curve``
is exact: it equals a brute-force LRU simulation of the same stream at every size
(tests/tuner/test_mining_mrc.py checks this), because LRU is a stack algorithm under the
token-set definition too (after a token its experts are the most recent, rank 0 first).
"""

from __future__ import annotations

import numpy as np


def lru_hits_by_size(stack_hist: np.ndarray) -> np.ndarray:
    """Hits of an LRU cache of size 1..E (int64 (E,)) from a stack-distance histogram."""
    return np.cumsum(stack_hist).astype(np.int64)


def lru_hit_curve(stack_hist: np.ndarray, accesses: int) -> np.ndarray:
    """LRU hit rate at cache sizes 1..E (float64 (E,)); zeros when there are no accesses."""
    hits = lru_hits_by_size(stack_hist)
    return hits / accesses if accesses else np.zeros_like(hits, dtype=np.float64)


def smallest_size(curve: np.ndarray, target: float) -> int | None:
    """Smallest cache size (1-based) whose hit rate reaches ``target``, or None."""
    idx = np.flatnonzero(curve >= target - 1e-12)
    return int(idx[0]) + 1 if idx.size else None
