"""Reuse distances and cache curves of every MoE layer (the costly part of analyze).

Layers are independent caches, so the model's figures are an exact combination of each
layer's (:func:`combine_reuse`); a layer's reuse figures come from its stream's
:class:`~moetrace.tuner.mining.partial.StreamPartial` (merged over shards), its Belady
and LFU rates from its whole stream (:func:`policy_reuse`).
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from moetrace.tuner.mining.mrc import lru_hit_curve, smallest_size
from moetrace.tuner.mining.partial import StreamPartial, distance_quantiles
from moetrace.tuner.mining.replacement import TokenStream, smallest_size_reaching
from moetrace.tuner.mining.report import MRCStats, ReuseStats
from moetrace.tuner.mining.reuse import (
    QUANTILES,
    TOKEN_BINS,
    ReuseSummary,
    hist_quantiles,
)

TARGETS = (0.8, 0.9)
MRC_DEFINITION = (
    "independent cache per MoE layer, same size for every layer; requests replayed one "
    "after another in arrival order; a token's k experts are needed together: each is a "
    "hit if cached before the token, misses are loaded on demand and evict only experts "
    "the token does not use (dropped slots skipped)"
)


def default_workers() -> int:
    return max(1, min(4, os.cpu_count() or 1))


def _rows(a: np.ndarray) -> tuple[tuple[float, ...], ...]:
    return tuple(tuple(float(x) for x in row) for row in a)


def _irows(a: np.ndarray) -> tuple[tuple[int, ...], ...]:
    return tuple(tuple(int(x) for x in row) for row in a)


@dataclass(frozen=True)
class LayerReuse:
    """One layer's reuse summary and policy hit rates (a layer's share of the curves)."""

    summary: ReuseSummary
    distances: np.ndarray
    """Distinct token distances of reused accesses (sorted) ..."""
    distance_counts: np.ndarray
    """... and how many reuses had each (exact: the model-wide quantiles need them)."""
    stream: TokenStream
    belady: tuple[float, ...]
    """Belady-MIN hit rate at each policy size."""
    lfu: tuple[float, ...]


def reuse_summary(p: StreamPartial) -> ReuseSummary:
    """The :class:`ReuseSummary` of a whole layer stream's (merged) partial."""
    values = np.arange(p.num_experts, dtype=np.int64)
    return ReuseSummary(
        stack_hist=p.stack_hist,
        cold=p.cold,
        token_hist=p.token_hist(),
        token_quantiles=distance_quantiles(p.distances, p.distance_counts, QUANTILES),
        distinct_quantiles=distance_quantiles(values, p.stack_hist, QUANTILES),
    )


def policy_reuse(p: StreamPartial, stream: TokenStream, sizes: tuple[int, ...]) -> LayerReuse:
    """A layer's :class:`LayerReuse` from its merged partial and its whole stream."""
    n = stream.num_accesses
    opt = tuple(stream.belady_hits(c) / n if n else 0.0 for c in sizes)
    lfu = tuple(stream.lfu_hits(c) / n if n else 0.0 for c in sizes)
    return LayerReuse(reuse_summary(p), p.distances, p.distance_counts, stream, opt, lfu)


def combine_reuse(
    parts: list[LayerReuse],
    sizes: tuple[int, ...],
    top_k: int,
    num_experts: int,
    workers: int | None = None,
) -> tuple[ReuseStats, MRCStats]:
    """The model's reuse statistics and curves from every layer's :class:`LayerReuse`
    (exact: layers are independent caches). Belady sizes for the targets beyond the
    policy sizes are searched on the layers' streams here (threads)."""
    E = num_experts
    summaries = [p.summary for p in parts]
    streams = [p.stream for p in parts]
    belady = np.asarray([p.belady for p in parts], dtype=np.float64).reshape(len(parts), -1)
    lfu = np.asarray([p.lfu for p in parts], dtype=np.float64).reshape(len(parts), -1)
    acc = np.asarray([s.num_accesses for s in streams], dtype=np.float64)
    total = max(float(acc.sum()), 1.0)
    memo = {c: float((belady[:, i] * acc).sum() / total) for i, c in enumerate(sizes)}
    with ThreadPoolExecutor(max_workers=workers or default_workers()) as pool:

        def opt_rate(c: int) -> float:
            if c not in memo:
                memo[c] = sum(pool.map(lambda s: s.belady_hits(c), streams)) / total
            return memo[c]

        belady_size_for = {
            str(t): smallest_size_reaching(opt_rate, top_k, E, t, dict(memo)) for t in TARGETS
        }
    distances = np.concatenate([p.distances for p in parts]) if parts else np.zeros(0, np.int64)
    counts = np.concatenate([p.distance_counts for p in parts]) if parts else distances
    keys, inv = np.unique(distances, return_inverse=True)
    counts = np.bincount(inv, weights=counts, minlength=keys.size).astype(np.int64)
    stack_hists = np.asarray([s.stack_hist for s in summaries])
    hist_sum = stack_hists.sum(axis=0)
    model_lru = np.cumsum(hist_sum) / total
    reuse = ReuseStats(
        quantiles=QUANTILES,
        token_quantiles=tuple(s.token_quantiles for s in summaries),
        distinct_quantiles=tuple(s.distinct_quantiles for s in summaries),
        token_hist_edges=tuple(2**i for i in range(TOKEN_BINS)),
        token_hist=_irows(np.asarray([s.token_hist for s in summaries])),
        distinct_hist=_irows(stack_hists),
        cold=tuple(s.cold for s in summaries),
        model_token_quantiles=distance_quantiles(keys, counts, QUANTILES),
        model_distinct_quantiles=hist_quantiles(hist_sum),
    )
    lru = [lru_hit_curve(s.stack_hist, int(n)) for s, n in zip(summaries, acc, strict=True)]
    mrc = MRCStats(
        definition=MRC_DEFINITION,
        lru=_rows(np.asarray(lru)),
        model_lru=tuple(float(x) for x in model_lru),
        policy_sizes=sizes,
        lfu=_rows(lfu),
        belady=_rows(belady),
        model_lru_at=tuple(float(model_lru[c - 1]) for c in sizes),
        model_lfu=tuple(float(x) for x in (lfu.T @ acc) / total),
        model_belady=tuple(memo[c] for c in sizes),
        lru_size_for={str(t): smallest_size(model_lru, t) for t in TARGETS},
        belady_size_for=belady_size_for,
    )
    return reuse, mrc
