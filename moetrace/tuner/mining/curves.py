"""Reuse distances and cache curves of every MoE layer (the costly part of analyze).

Layers are independent, so they run on a thread pool (the numba kernels release the GIL).
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from moetrace.store.arrays import Routing
from moetrace.tuner.mining.mrc import lru_hit_curve, smallest_size
from moetrace.tuner.mining.replacement import TokenStream, smallest_size_reaching
from moetrace.tuner.mining.report import MRCStats, ReuseStats
from moetrace.tuner.mining.reuse import (
    QUANTILES,
    TOKEN_BINS,
    ReuseSummary,
    hist_quantiles,
    stack_distances,
    summarize,
)
from moetrace.tuner.mining.streams import layer_stream

TARGETS = (0.8, 0.9)
MODEL_QUANTILE_SAMPLE = 100_000
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
    """One layer's reuse summary and policy hit rates (a layer task's share of the curves)."""

    summary: ReuseSummary
    sample: np.ndarray
    """Token distances of reused accesses (a seeded sample of at most
    :data:`MODEL_QUANTILE_SAMPLE`) for the model-wide quantiles."""
    stream: TokenStream
    belady: tuple[float, ...]
    """Belady-MIN hit rate at each policy size."""
    lfu: tuple[float, ...]


def layer_reuse(
    experts: np.ndarray,
    row: np.ndarray,
    num_experts: int,
    sizes: tuple[int, ...],
    seed: np.random.SeedSequence,
) -> LayerReuse:
    """Reuse distances and Belady/LFU hit rates of one layer's access stream."""
    sd, td = stack_distances(experts, row, num_experts)
    summ = summarize(sd, td, num_experts)
    reused = td[td > 0]
    if reused.size > MODEL_QUANTILE_SAMPLE:
        rng = np.random.default_rng(seed)
        reused = rng.choice(reused, MODEL_QUANTILE_SAMPLE, replace=False)
    n = int(experts.shape[0])
    ts = TokenStream(experts, row, num_experts)
    opt = tuple(ts.belady_hits(c) / n if n else 0.0 for c in sizes)
    lfu = tuple(ts.lfu_hits(c) / n if n else 0.0 for c in sizes)
    return LayerReuse(summ, reused, ts, opt, lfu)


def layer_seeds(seed: int, num_layers: int) -> list[np.random.SeedSequence]:
    """One seed per layer (the same whichever process computes the layer)."""
    return np.random.SeedSequence(seed).spawn(max(num_layers, 1))


def reuse_and_mrc(
    routing: Routing,
    rows: list[np.ndarray],
    sizes: tuple[int, ...],
    seed: int,
    workers: int | None = None,
) -> tuple[ReuseStats, MRCStats]:
    """Reuse statistics and LRU/LFU/Belady curves; ``rows[l]``: routing rows of layer l."""
    E = routing.num_experts
    seeds = layer_seeds(seed, len(rows))

    def one_layer(layer: int) -> LayerReuse:
        st = layer_stream(routing, layer, rows[layer])
        return layer_reuse(st.experts, st.row, E, sizes, seeds[layer])

    with ThreadPoolExecutor(max_workers=workers or default_workers()) as pool:
        parts = list(pool.map(one_layer, range(len(rows))))
    return combine_reuse(parts, sizes, routing.top_k, E, workers)


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
    samples = np.concatenate([p.sample for p in parts]) if parts else np.zeros(0)
    stack_hists = np.asarray([s.stack_hist for s in summaries])
    hist_sum = stack_hists.sum(axis=0)
    model_lru = np.cumsum(hist_sum) / total
    nan = tuple(float("nan") for _ in QUANTILES)
    reuse = ReuseStats(
        quantiles=QUANTILES,
        token_quantiles=tuple(s.token_quantiles for s in summaries),
        distinct_quantiles=tuple(s.distinct_quantiles for s in summaries),
        token_hist_edges=tuple(2**i for i in range(TOKEN_BINS)),
        token_hist=_irows(np.asarray([s.token_hist for s in summaries])),
        distinct_hist=_irows(stack_hists),
        cold=tuple(s.cold for s in summaries),
        model_token_quantiles=tuple(float(x) for x in np.quantile(samples, QUANTILES))
        if samples.size
        else nan,
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
