"""Expert frequency (DuckDB GROUP BY over the Parquet parts) and skew statistics."""

from __future__ import annotations

import numpy as np

from moetrace.errors import AnalysisError
from moetrace.store import schema as S
from moetrace.store.reader import Trace
from moetrace.tuner.mining.report import SkewStats

HOT_FRACTIONS = (0.5, 0.8, 0.9)


def frequency_matrices(trace: Trace) -> dict[str, np.ndarray]:
    """Per phase, the (L, E) int64 count of activations of each expert at each MoE layer.

    Computed by DuckDB over ``activations_raw`` (the k rank columns unpivoted; dropped
    slots excluded); every phase of :data:`moetrace.store.schema.PHASES` is present.
    """
    m = trace.manifest
    num_layers, num_experts = len(m.model.moe_layers), m.model.num_experts
    unpivot = " UNION ALL ".join(
        f"SELECT phase, layer, e{i} AS e FROM activations_raw" for i in range(m.top_k)
    )
    rows = trace.sql(
        f"""SELECT a.phase::VARCHAR AS phase, l.layer_index, a.e, count(*) AS n
            FROM ({unpivot}) a JOIN moe_layers l ON a.layer = l.layer
            WHERE a.e >= 0 GROUP BY ALL"""
    )
    out = {p: np.zeros((num_layers, num_experts), np.int64) for p in S.PHASES}
    phase = rows.column("phase").to_pylist()
    li = rows.column("layer_index").to_numpy()
    ex = rows.column("e").to_numpy()
    n = rows.column("n").to_numpy()
    for p in S.PHASES:
        sel = np.array([x == p for x in phase], dtype=bool)
        np.add.at(out[p], (li[sel], ex[sel]), n[sel])
    return out


def frequency_from_routing(
    layer: np.ndarray, experts: np.ndarray, num_layers: int, num_experts: int
) -> np.ndarray:
    """(L, E) counts from routing arrays (layer index per row, (n, k) experts)."""
    k = experts.shape[1]
    flat = experts.reshape(-1).astype(np.int64)
    lay = np.repeat(layer.astype(np.int64), k)
    keep = flat >= 0
    idx = lay[keep] * num_experts + flat[keep]
    return np.bincount(idx, minlength=num_layers * num_experts).reshape(num_layers, num_experts)


def gini(counts: np.ndarray) -> float:
    """Gini coefficient of a count vector (0 = uniform, -> 1 = one expert takes all)."""
    x = np.sort(np.asarray(counts, dtype=np.float64))
    n, total = x.size, x.sum()
    if n == 0 or total == 0:
        return float("nan")
    return float((2.0 * np.sum(np.arange(1, n + 1) * x)) / (n * total) - (n + 1) / n)


def entropy_bits(counts: np.ndarray) -> float:
    """Shannon entropy in bits of a count vector's distribution."""
    x = np.asarray(counts, dtype=np.float64)
    total = x.sum()
    if total == 0:
        return float("nan")
    p = x[x > 0] / total
    return float(-(p * np.log2(p)).sum())


def hot_set_size(counts: np.ndarray, fraction: float) -> int:
    """Fewest experts whose activations cover ``fraction`` of all (0 when there are none)."""
    if not 0.0 < fraction <= 1.0:
        raise AnalysisError(f"hot-set fraction must be in (0, 1], got {fraction}")
    x = np.sort(np.asarray(counts, dtype=np.float64))[::-1]
    total = x.sum()
    if total == 0:
        return 0
    return int(np.searchsorted(np.cumsum(x), fraction * total - 1e-9 * total) + 1)


def zipf_exponent(counts: np.ndarray, min_count: int = 5) -> float:
    """Zipf exponent s of rank-frequency ``f(r) ~ r^-s`` by a log-log least-squares fit.

    Only ranks with at least ``min_count`` activations are fitted (the noisy tail would
    bias the slope); NaN with fewer than three such ranks.
    """
    x = np.sort(np.asarray(counts, dtype=np.float64))[::-1]
    ranks = np.arange(1, x.size + 1, dtype=np.float64)
    keep = x >= min_count
    if keep.sum() < 3:
        return float("nan")
    slope = np.polyfit(np.log(ranks[keep]), np.log(x[keep]), 1)[0]
    return float(-slope)


def _mean(values: list[float]) -> float:
    return float(np.nanmean(values)) if not np.all(np.isnan(values)) else float("nan")


def skew_stats(freq: np.ndarray, tokens: np.ndarray) -> SkewStats:
    """Skew of (L, E) activation counts ``freq``; ``tokens``: (L,) token rows per layer."""
    gini_ = [gini(f) for f in freq]
    ent = [entropy_bits(f) for f in freq]
    zipf = [zipf_exponent(f) for f in freq]
    return SkewStats(
        accesses=tuple(int(x) for x in freq.sum(axis=1)),
        tokens=tuple(int(x) for x in tokens),
        frequency=tuple(tuple(int(x) for x in row) for row in freq),
        gini=tuple(gini_),
        entropy_bits=tuple(ent),
        hot_set={str(h): tuple(hot_set_size(f, h) for f in freq) for h in HOT_FRACTIONS},
        zipf_exponent=tuple(zipf),
        model_gini=_mean(gini_),
        model_entropy_bits=_mean(ent),
        model_zipf_exponent=_mean(zipf),
    )
