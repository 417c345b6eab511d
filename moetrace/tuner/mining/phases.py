"""Phase disparity (as in DuoServe-MoE): prefill vs decode routing per layer."""

from __future__ import annotations

import numpy as np

from moetrace.store import schema as S
from moetrace.store.arrays import Routing
from moetrace.store.reader import Trace


def js_divergence(p_counts: np.ndarray, q_counts: np.ndarray) -> float:
    """Jensen-Shannon divergence (bits, in [0, 1]) of two count vectors; NaN if one is empty."""
    p = np.asarray(p_counts, dtype=np.float64)
    q = np.asarray(q_counts, dtype=np.float64)
    if p.sum() == 0 or q.sum() == 0:
        return float("nan")
    p, q = p / p.sum(), q / q.sum()
    m = 0.5 * (p + q)

    def kl(a: np.ndarray) -> float:
        nz = a > 0
        return float((a[nz] * np.log2(a[nz] / m[nz])).sum())

    return max(0.0, 0.5 * kl(p) + 0.5 * kl(q))


def js_per_layer(freq_a: np.ndarray, freq_b: np.ndarray) -> tuple[float, ...]:
    """Per-layer JS divergence of two (L, E) frequency matrices."""
    return tuple(js_divergence(a, b) for a, b in zip(freq_a, freq_b, strict=True))


def distinct_per_forward(trace: Trace) -> dict[str, tuple[float, ...]]:
    """Per phase present, per MoE layer index: mean distinct experts used by one forward pass.

    A forward pass is one value of the ``forward`` column (one batched model call; for a
    prefill it covers all the prompt's tokens). Computed by DuckDB.
    """
    m = trace.manifest
    num_layers = len(m.model.moe_layers)
    unpivot = " UNION ALL ".join(
        f"SELECT phase, forward, layer, e{i} AS e FROM activations_raw" for i in range(m.top_k)
    )
    rows = trace.sql(
        f"""WITH d AS (
              SELECT a.phase::VARCHAR AS phase, a.forward, l.layer_index AS li,
                     count(DISTINCT a.e) AS n
              FROM ({unpivot}) a JOIN moe_layers l ON a.layer = l.layer
              WHERE a.e >= 0 GROUP BY ALL)
            SELECT phase, li, avg(n) AS mean_n FROM d GROUP BY ALL"""
    )
    out: dict[str, list[float]] = {}
    for phase, li, mean_n in zip(
        rows.column("phase").to_pylist(),
        rows.column("li").to_pylist(),
        rows.column("mean_n").to_pylist(),
        strict=True,
    ):
        out.setdefault(phase, [float("nan")] * num_layers)[li] = float(mean_n)
    return {p: tuple(out[p]) for p in S.PHASES if p in out}


def distinct_per_forward_from_routing(routing: Routing) -> dict[str, tuple[float, ...]]:
    """Same as :func:`distinct_per_forward` from routing arrays (numpy; for subsets)."""
    out: dict[str, tuple[float, ...]] = {}
    E = routing.num_experts
    for p in S.PHASES:
        means = []
        in_phase = routing.phase == S.PHASE_CODE[p]
        if not in_phase.any():
            continue
        for layer in range(routing.num_layers):
            rows = np.flatnonzero(in_phase & (routing.layer == layer))
            means.append(distinct_per_pass(routing.forward[rows], routing.experts[rows], E))
        out[p] = tuple(means)
    return out


def distinct_per_pass(forward: np.ndarray, experts: np.ndarray, num_experts: int) -> float:
    """Mean distinct experts per forward pass of one layer's rows (NaN without rows)."""
    fwd = np.repeat(forward, experts.shape[1])
    flat = experts.reshape(-1).astype(np.int64)
    keep = flat >= 0
    pairs = np.unique(fwd[keep] * num_experts + flat[keep])
    passes = np.unique(pairs // num_experts).size
    return pairs.size / passes if passes else float("nan")
