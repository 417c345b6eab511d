"""Skew (Lorenz curves, Gini) and reuse of one MoE layer: reuse distances and miss-ratio
curves for LRU (exact, every size), LFU and Belady-MIN (at a grid of sizes).

The access stream is ``moetrace analyze``'s (:mod:`moetrace.tuner.mining.streams`, token-set
accesses), built from that layer's rows only, sorted by DuckDB.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from moetrace.dashboard.data.common import layer_id, routing_for_layers
from moetrace.errors import AnalysisError
from moetrace.store.reader import Trace
from moetrace.tuner.mining.frequency import gini
from moetrace.tuner.mining.mrc import lru_hit_curve
from moetrace.tuner.mining.replacement import TokenStream
from moetrace.tuner.mining.reuse import TOKEN_BINS, stack_distances, summarize
from moetrace.tuner.mining.streams import layer_stream as mining_layer_stream

POLICY_POINTS = 12
"""Cache sizes at which LFU and Belady are simulated (LRU is exact at every size)."""


def lorenz(counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Lorenz curve of one layer: (share of experts, share of activations), from 0 to 1,
    experts sorted from least to most used."""
    x = np.sort(np.asarray(counts, dtype=np.float64))
    total = x.sum()
    n = x.size
    experts = np.arange(n + 1) / max(n, 1)
    acts = np.concatenate([[0.0], np.cumsum(x) / total]) if total > 0 else experts.copy()
    return experts, acts


def gini_per_layer(counts: np.ndarray) -> np.ndarray:
    return np.array([gini(row) for row in counts], dtype=np.float64)


def layer_stream(
    trace: Trace, layer_index: int, phase: str = "all"
) -> tuple[np.ndarray, np.ndarray]:
    """(experts int16, token ordinal int64) of one MoE layer's accesses, in replay order
    (built by :func:`moetrace.tuner.mining.streams.layer_stream`, as analyze does)."""
    st = mining_layer_stream(routing_for_layers(trace, (layer_index,), phase), 0)
    return st.experts, st.row


def policy_sizes(num_experts: int, top_k: int, points: int = POLICY_POINTS) -> tuple[int, ...]:
    """About ``points`` cache sizes spread over k..E (token-set simulations need >= k)."""
    lo = min(top_k, num_experts)
    grid = np.unique(
        np.round(np.linspace(lo, num_experts, min(points, num_experts - lo + 1))).astype(int)
    )
    return tuple(int(x) for x in grid)


@dataclass(frozen=True)
class LayerReuse:
    """Reuse and miss-ratio figures of one layer's access stream."""

    layer: int
    """Model layer id."""
    accesses: int
    tokens: int
    cold: int
    stack_hist: np.ndarray
    """Accesses with d = 0..E-1 distinct other experts since the same expert's last use."""
    token_hist: np.ndarray
    """Token distances in log2 bins: bin i counts distances in [2^i, 2^(i+1))."""
    lru: np.ndarray
    """Hit rate of LRU at sizes 1..E."""
    sizes: tuple[int, ...]
    lfu: np.ndarray
    belady: np.ndarray

    def __post_init__(self) -> None:
        if self.accesses < 0:
            raise AnalysisError(f"accesses must be >= 0, got {self.accesses}")
        if len(self.sizes) != len(self.lfu) or len(self.sizes) != len(self.belady):
            raise AnalysisError(
                f"{len(self.sizes)} policy sizes but {len(self.lfu)} LFU and "
                f"{len(self.belady)} Belady points"
            )


def layer_reuse(trace: Trace, layer_index: int, phase: str = "all") -> LayerReuse:
    E, k = trace.manifest.model.num_experts, trace.top_k
    experts, row = layer_stream(trace, layer_index, phase)
    n = int(experts.shape[0])
    tokens = int(row[-1] + 1) if n else 0
    if n == 0:
        zeros = np.zeros(E, np.int64)
        sizes = policy_sizes(E, k)
        return LayerReuse(
            layer=layer_id(trace, layer_index),
            accesses=0,
            tokens=0,
            cold=0,
            stack_hist=zeros,
            token_hist=np.zeros(TOKEN_BINS, np.int64),
            lru=np.zeros(E),
            sizes=sizes,
            lfu=np.zeros(len(sizes)),
            belady=np.zeros(len(sizes)),
        )
    sd, td = stack_distances(experts, row, E)
    summ = summarize(sd, td, E)
    sizes = policy_sizes(E, k)
    ts = TokenStream(experts, row, E)
    return LayerReuse(
        layer=layer_id(trace, layer_index),
        accesses=n,
        tokens=tokens,
        cold=summ.cold,
        stack_hist=summ.stack_hist,
        token_hist=summ.token_hist,
        lru=lru_hit_curve(summ.stack_hist, n),
        sizes=sizes,
        lfu=np.array([ts.lfu_hits(c) / n for c in sizes]),
        belady=np.array([ts.belady_hits(c) / n for c in sizes]),
    )
