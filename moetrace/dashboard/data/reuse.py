"""Skew (Lorenz curves, Gini) and reuse of one MoE layer: reuse distances and miss-ratio
curves for LRU (exact, every size), LFU and Belady-MIN (at a grid of sizes).

The access stream is ``moetrace analyze``'s (:mod:`moetrace.tuner.mining.streams`, token-set
accesses), built from that layer's rows only, sorted by DuckDB.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from moetrace.dashboard.data.common import layer_id, phase_arg, routing_for_layers
from moetrace.errors import AnalysisError
from moetrace.store.reader import Trace
from moetrace.tuner.mining.frequency import gini
from moetrace.tuner.mining.mrc import lru_hit_curve
from moetrace.tuner.mining.replacement import TokenStream
from moetrace.tuner.mining.reuse import TOKEN_BINS, ReuseSummary, stack_distances, summarize
from moetrace.tuner.mining.streams import layer_stream as mining_layer_stream

POLICY_POINTS = 12
"""Cache sizes at which LFU and Belady are simulated (LRU is exact at every size)."""
REUSE_SAMPLE_TOKENS = 131_072
"""Tokens of one layer replayed at most: beyond that, a seeded sample of whole requests
(replayed in arrival order) whose tokens add up to about this many."""


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


def sample_requests(
    trace: Trace, phase: str = "all", max_tokens: int | None = REUSE_SAMPLE_TOKENS, seed: int = 0
) -> tuple[list[str] | None, int, int]:
    """(request ids to replay or None for all, requests replayed, requests in the trace).

    Whole requests are drawn in a seeded random order until their tokens of ``phase``
    (prompt and/or generated tokens, from the requests table) reach ``max_tokens``.
    """
    req = trace.requests()
    ids = [str(x) for x in req.column("request_id").to_pylist()]
    prompt = np.asarray(req.column("prompt_tokens").to_numpy(zero_copy_only=False), np.int64)
    gen = np.asarray(req.column("generated_tokens").to_numpy(zero_copy_only=False), np.int64)
    ph = phase_arg(phase)
    tok = prompt + gen if ph is None else (prompt if ph == "prefill" else gen)
    if max_tokens is None or int(tok.sum()) <= max_tokens:
        return None, len(ids), len(ids)
    order = np.random.default_rng(seed).permutation(len(ids))
    cum = np.cumsum(tok[order])
    n = int(np.searchsorted(cum, max_tokens) + 1)
    return [ids[i] for i in np.sort(order[:n])], n, len(ids)


def layer_stream(
    trace: Trace, layer_index: int, phase: str = "all", requests: list[str] | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """(experts int16, token ordinal int64) of one MoE layer's accesses, in replay order
    (built by :func:`moetrace.tuner.mining.streams.layer_stream`, as analyze does)."""
    routing = routing_for_layers(trace, (layer_index,), phase, requests)
    st = mining_layer_stream(routing, 0)
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
    requests_used: int = 0
    """Requests replayed (all of them unless :attr:`sampled`)."""
    requests_total: int = 0

    @property
    def sampled(self) -> bool:
        return self.requests_used < self.requests_total

    def to_arrays(self) -> dict[str, np.ndarray]:
        out = {
            f: np.asarray(getattr(self, f))
            for f in ("layer", "accesses", "tokens", "cold", "stack_hist", "token_hist")
        }
        out.update(lru=self.lru, sizes=np.asarray(self.sizes, np.int64), lfu=self.lfu)
        out.update(belady=self.belady, requests_used=np.asarray(self.requests_used))
        out["requests_total"] = np.asarray(self.requests_total)
        return out

    @classmethod
    def from_arrays(cls, a: dict[str, np.ndarray]) -> LayerReuse:
        ints = ("layer", "accesses", "tokens", "cold", "requests_used", "requests_total")
        return cls(
            **{f: int(a[f]) for f in ints},
            stack_hist=a["stack_hist"],
            token_hist=a["token_hist"],
            lru=a["lru"],
            sizes=tuple(int(x) for x in a["sizes"]),
            lfu=a["lfu"],
            belady=a["belady"],
        )

    def __post_init__(self) -> None:
        if self.accesses < 0:
            raise AnalysisError(f"accesses must be >= 0, got {self.accesses}")
        if len(self.sizes) != len(self.lfu) or len(self.sizes) != len(self.belady):
            raise AnalysisError(
                f"{len(self.sizes)} policy sizes but {len(self.lfu)} LFU and "
                f"{len(self.belady)} Belady points"
            )


def layer_reuse(
    trace: Trace,
    layer_index: int,
    phase: str = "all",
    max_tokens: int | None = REUSE_SAMPLE_TOKENS,
    seed: int = 0,
) -> LayerReuse:
    """Reuse figures of one layer; traces with more than ``max_tokens`` tokens in ``phase``
    replay a seeded sample of whole requests (None: always every request)."""
    E, k = trace.manifest.model.num_experts, trace.top_k
    chosen, used, total = sample_requests(trace, phase, max_tokens, seed)
    experts, row = layer_stream(trace, layer_index, phase, chosen)
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
            requests_used=used,
            requests_total=total,
        )
    summ, lru, sizes, lfu, belady = stream_curves(experts, row, E, k)
    return LayerReuse(
        layer=layer_id(trace, layer_index),
        accesses=n,
        tokens=tokens,
        cold=summ.cold,
        stack_hist=summ.stack_hist,
        token_hist=summ.token_hist,
        lru=lru,
        sizes=sizes,
        lfu=lfu,
        belady=belady,
        requests_used=used,
        requests_total=total,
    )


def stream_curves(
    experts: np.ndarray, row: np.ndarray, num_experts: int, top_k: int, points: int = POLICY_POINTS
) -> tuple[ReuseSummary, np.ndarray, tuple[int, ...], np.ndarray, np.ndarray]:
    """(reuse summary, LRU at sizes 1..E, policy sizes, LFU and Belady at those sizes) of
    one non-empty layer stream."""
    n = int(experts.shape[0])
    sd, td = stack_distances(experts, row, num_experts)
    summ = summarize(sd, td, num_experts)
    sizes = policy_sizes(num_experts, top_k, points)
    ts = TokenStream(experts, row, num_experts)
    lfu = np.array([ts.lfu_hits(c) / n for c in sizes])
    belady = np.array([ts.belady_hits(c) / n for c in sizes])
    return summ, lru_hit_curve(summ.stack_hist, n), sizes, lfu, belady
