"""Reuse distances in one pass: LRU stack distance and token distance of every access.

The stack distance of an access is the number of *distinct* other experts used in the
layer since the token that last used the same expert (-1 for a first use), i.e. its depth
in the LRU stack as it stood before the current token. After each token its experts go
on top of the stack (rank 0 topmost). An LRU cache of size C (token-set accesses, see
:mod:`moetrace.tuner.mining.streams`) hits exactly the accesses with stack distance < C
(Mattson et al., 1970), so one pass gives the whole miss-ratio curve. The token distance
is the number of tokens of the layer's stream between the two uses.
"""

from __future__ import annotations

from dataclasses import dataclass

import numba
import numpy as np

QUANTILES = (0.5, 0.9, 0.99)
TOKEN_BINS = 24
"""Token distance histogram bins: [1,2), [2,4), ... [2^22, 2^23), >= 2^23."""


@numba.njit(cache=True, nogil=True)
def _stack_distances(
    experts: np.ndarray, row: np.ndarray, num_experts: int
) -> tuple[np.ndarray, np.ndarray]:
    n = experts.shape[0]
    stack = np.empty(num_experts, np.int32)
    depth = 0
    last = np.full(num_experts, -1, np.int64)
    sd = np.empty(n, np.int32)
    td = np.empty(n, np.int64)
    i = 0
    while i < n:
        j = i
        while j < n and row[j] == row[i]:
            j += 1
        for a in range(i, j):  # depths in the stack as it was before the token
            e = experts[a]
            p = 0
            while p < depth and stack[p] != e:
                p += 1
            sd[a] = p if p < depth else -1
            td[a] = row[a] - last[e] if last[e] >= 0 else -1
            last[e] = row[a]
        for a in range(j - 1, i - 1, -1):  # the token's experts on top, rank 0 first
            e = experts[a]
            p = 0
            while p < depth and stack[p] != e:
                p += 1
            if p == depth:
                depth += 1
            for m in range(p, 0, -1):
                stack[m] = stack[m - 1]
            stack[0] = e
        i = j
    return sd, td


def stack_distances(
    experts: np.ndarray, row: np.ndarray, num_experts: int
) -> tuple[np.ndarray, np.ndarray]:
    """(stack distance int32, token distance int64) per access; -1 marks a first use."""
    return _stack_distances(
        np.ascontiguousarray(experts, dtype=np.int16),
        np.ascontiguousarray(row, dtype=np.int64),
        int(num_experts),
    )


@dataclass(frozen=True)
class ReuseSummary:
    """Reuse distances of one stream, summarized."""

    stack_hist: np.ndarray
    """int64 (E,): accesses with stack distance d = 0..E-1."""
    cold: int
    """First uses (no previous access)."""
    token_hist: np.ndarray
    """int64 (TOKEN_BINS,): token distances in log2 bins."""
    token_quantiles: tuple[float, ...]
    distinct_quantiles: tuple[float, ...]


def summarize(sd: np.ndarray, td: np.ndarray, num_experts: int) -> ReuseSummary:
    reused = sd >= 0
    stack_hist = np.bincount(sd[reused], minlength=num_experts).astype(np.int64)
    tdr = td[td > 0]
    bins = np.minimum(np.floor(np.log2(tdr)).astype(np.int64), TOKEN_BINS - 1)
    token_hist = np.bincount(bins, minlength=TOKEN_BINS).astype(np.int64)
    nan = tuple(float("nan") for _ in QUANTILES)
    return ReuseSummary(
        stack_hist=stack_hist,
        cold=int((~reused).sum()),
        token_hist=token_hist,
        token_quantiles=tuple(float(x) for x in np.quantile(tdr, QUANTILES)) if tdr.size else nan,
        distinct_quantiles=tuple(float(x) for x in np.quantile(sd[reused], QUANTILES))
        if reused.any()
        else nan,
    )


def hist_quantiles(hist: np.ndarray, quantiles: tuple[float, ...] = QUANTILES) -> tuple[float, ...]:
    """Quantiles (lower value) of integer values 0..len-1 given by a count histogram."""
    total = hist.sum()
    if total == 0:
        return tuple(float("nan") for _ in quantiles)
    cum = np.cumsum(hist)
    return tuple(float(np.searchsorted(cum, q * total, side="left")) for q in quantiles)
