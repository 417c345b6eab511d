"""Fixed-size cache simulations of one layer stream: LFU and Belady-MIN (the optimum).

Both follow the token-set access definition of :mod:`moetrace.tuner.mining.streams`:
an expert is a hit when cached before its token; each missing expert is loaded (demand
loading) and evicts a cached expert that the current token does not use, so sizes must
be at least top-k. Belady-MIN evicts the one whose next use is farthest in the future,
the offline optimum under these rules, so its hit rate is never below LRU's or LFU's.
LFU counts every access since the start of the stream (perfect LFU; counts survive
eviction) and evicts the least counted, ties to the least recently used (within a
token, rank 0 counts as the most recent, as in the LRU stack).
"""

from __future__ import annotations

from collections.abc import Callable

import numba
import numpy as np

from moetrace.errors import AnalysisError


@numba.njit(cache=True, nogil=True)
def _next_use(experts: np.ndarray, num_experts: int) -> np.ndarray:
    n = experts.shape[0]
    nxt = np.empty(n, np.int64)
    upcoming = np.full(num_experts, n, np.int64)
    for i in range(n - 1, -1, -1):
        e = experts[i]
        nxt[i] = upcoming[e]
        upcoming[e] = i
    return nxt


@numba.njit(cache=True, nogil=True)
def _simulate(
    experts: np.ndarray,
    row: np.ndarray,
    nxt: np.ndarray,
    num_experts: int,
    capacity: int,
    belady: bool,
) -> int:
    """Hits of Belady-MIN (``belady``) or perfect LFU with token-set accesses."""
    cached = np.zeros(num_experts, np.bool_)
    current = np.zeros(num_experts, np.bool_)
    next_of = np.zeros(num_experts, np.int64)
    count = np.zeros(num_experts, np.int64)
    last = np.zeros(num_experts, np.int64)
    slots = np.empty(capacity, np.int32)
    used = 0
    hits = 0
    stamp = 0
    n = experts.shape[0]
    i = 0
    while i < n:
        j = i
        while j < n and row[j] == row[i]:
            j += 1
        for a in range(i, j):
            e = experts[a]
            current[e] = True
            if belady:
                next_of[e] = nxt[a]
            count[e] += 1
            if cached[e]:
                hits += 1
        for a in range(i, j):
            e = experts[a]
            if cached[e]:
                continue
            if used < capacity:
                slots[used] = e
                used += 1
            else:
                best = -1
                for s in range(capacity):
                    x = slots[s]
                    if current[x]:
                        continue
                    if best < 0:
                        best = s
                        continue
                    b = slots[best]
                    if belady:
                        better = next_of[x] > next_of[b]
                    else:
                        better = count[x] < count[b] or (count[x] == count[b] and last[x] < last[b])
                    if better:
                        best = s
                cached[slots[best]] = False
                slots[best] = e
            cached[e] = True
        for a in range(j - 1, i - 1, -1):  # recency stamps: rank 0 most recent
            e = experts[a]
            current[e] = False
            stamp += 1
            last[e] = stamp
        i = j
    return hits


def widest_token(row: np.ndarray) -> int:
    """Most accesses one token makes (``row`` is grouped by token)."""
    if row.size == 0:
        return 0
    edges = np.flatnonzero(np.diff(row)) + 1
    return int(np.diff(np.concatenate(([0], edges, [row.size]))).max())


def _check_capacity(capacity: int, widest: int) -> None:
    if capacity < widest:
        raise AnalysisError(
            f"cache size {capacity} is smaller than the {widest} experts one token needs at "
            f"once (top-k); token-set simulations need a size >= top-k"
        )


class TokenStream:
    """One layer stream prepared for repeated fixed-size simulations.

    Holds 6 bytes per access (int16 expert, int32 token); the next-use array Belady needs
    (8 bytes per access) is rebuilt for each simulation, which costs a small fraction of
    the simulation itself and keeps many layers' streams cheap to hold at once.
    """

    def __init__(self, experts: np.ndarray, row: np.ndarray, num_experts: int) -> None:
        self.experts = np.ascontiguousarray(experts, dtype=np.int16)
        small = row.size == 0 or int(row.max()) < np.iinfo(np.int32).max
        self.row = np.ascontiguousarray(row, dtype=np.int32 if small else np.int64)
        self.num_experts = int(num_experts)
        self.widest = widest_token(self.row)
        self.distinct = int(np.count_nonzero(np.bincount(self.experts, minlength=1)))

    @property
    def num_accesses(self) -> int:
        return int(self.experts.shape[0])

    def _run(self, capacity: int, belady: bool) -> int:
        capacity = int(capacity)
        _check_capacity(capacity, self.widest)
        if capacity >= self.num_experts:
            return int(self.experts.shape[0] - self.distinct)
        nxt = _next_use(self.experts, self.num_experts) if belady else np.zeros(0, np.int64)
        return int(_simulate(self.experts, self.row, nxt, self.num_experts, capacity, belady))

    def belady_hits(self, capacity: int) -> int:
        return self._run(capacity, True)

    def lfu_hits(self, capacity: int) -> int:
        return self._run(capacity, False)


def belady_hits(experts: np.ndarray, row: np.ndarray, num_experts: int, capacity: int) -> int:
    """Hits of Belady-MIN with ``capacity`` slots (``row``: token of each access)."""
    return TokenStream(experts, row, num_experts).belady_hits(capacity)


def lfu_hits(experts: np.ndarray, row: np.ndarray, num_experts: int, capacity: int) -> int:
    """Hits of perfect LFU (ties: least recently used) with ``capacity`` slots."""
    return TokenStream(experts, row, num_experts).lfu_hits(capacity)


def smallest_size_reaching(
    hit_rate: Callable[[int], float],
    low: int,
    high: int,
    target: float,
    known: dict[int, float] | None = None,
) -> int | None:
    """Smallest size in [low, high] with ``hit_rate(size) >= target`` (monotone policy).

    ``known`` rates (size -> rate) bracket the answer before any new evaluation; the
    search interpolates linearly on the curve and probes the guess's neighbour (every
    third step bisects), so smooth curves need few evaluations.
    """
    rates = dict(known or {})

    def rate(c: int) -> float:
        if c not in rates:
            rates[c] = hit_rate(c)
        return rates[c]

    eps = 1e-12
    if rate(high) < target - eps:
        return None
    below = max(
        (c for c, r in rates.items() if c < high and c >= low and r < target - eps), default=low - 1
    )
    above = min(
        (c for c, r in rates.items() if low <= c <= high and r >= target - eps), default=high
    )
    step = 0
    while above - below > 1:
        mid = (below + above) // 2
        r_lo, r_hi = rates.get(below, 0.0), rates[above]
        if step % 3 != 2 and r_hi > r_lo:  # interpolate, then probe the neighbour
            guess = below + round((target - r_lo) / (r_hi - r_lo) * (above - below))
            mid = min(max(guess, below + 1), above - 1)
        step += 1
        if rate(mid) >= target - eps:
            above = mid
            if mid - 1 > below and rate(mid - 1) < target - eps:
                below = mid - 1
        else:
            below = mid
            if mid + 1 < above and rate(mid + 1) >= target - eps:
                above = mid + 1
    return above
