"""Layer x expert activation counts, by phase and by request tag (DuckDB GROUP BY)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from moetrace.dashboard.data.common import phase_arg, phase_where, query, reopen, unpivot_sql
from moetrace.errors import AnalysisError
from moetrace.store import schema as S
from moetrace.store.reader import Trace
from moetrace.store.sql import connect, run_query
from moetrace.tuner.analyze_counts import count_matrix
from moetrace.tuner.mining.frequency import frequency_matrices


@dataclass(frozen=True)
class ExpertCounts:
    """(L, E) activation counts and tokens per MoE layer for one selection of rows."""

    moe_layers: tuple[int, ...]
    counts: np.ndarray
    tokens: np.ndarray

    def __post_init__(self) -> None:
        L = len(self.moe_layers)
        if self.counts.ndim != 2 or self.counts.shape[0] != L:
            raise AnalysisError(f"counts must be ({L}, E), got shape {self.counts.shape}")
        if self.tokens.shape != (L,):
            raise AnalysisError(f"tokens must be ({L},), got shape {self.tokens.shape}")

    @property
    def share(self) -> np.ndarray:
        """Per layer, each expert's share of the layer's activations (rows sum to 1)."""
        total = self.counts.sum(axis=1, keepdims=True).astype(np.float64)
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(total > 0, self.counts / np.maximum(total, 1), 0.0)

    @property
    def total(self) -> int:
        return int(self.counts.sum())


def tag_values(trace: Trace) -> dict[str, tuple[str, ...]]:
    """Request tag key -> its distinct values (from the small requests table)."""
    rows = query(
        trace,
        """SELECT k, list(DISTINCT v ORDER BY v) AS vals FROM (
               SELECT unnest(map_keys(tags)) AS k, unnest(map_values(tags)) AS v
               FROM requests) GROUP BY k ORDER BY k""",
    ).to_pylist()
    return {str(r["k"]): tuple(str(v) for v in r["vals"]) for r in rows}


def _tagged_requests(trace: Trace, key: str, value: str) -> list[str]:
    table = trace.requests()
    ids = table.column("request_id").to_pylist()
    tags = table.column("tags").to_pylist()
    return [rid for rid, tag in zip(ids, tags, strict=True) if dict(tag or []).get(key) == value]


@dataclass(frozen=True)
class PhaseCounts:
    """Per phase, (L, E) activation counts and (L,) tokens: one pass serves every phase."""

    moe_layers: tuple[int, ...]
    counts: dict[str, np.ndarray]
    tokens: dict[str, np.ndarray]

    def select(self, phase: str = "all") -> ExpertCounts:
        ph = phase_arg(phase)
        if ph is None:
            return ExpertCounts(
                self.moe_layers, sum(self.counts.values()), sum(self.tokens.values())
            )
        return ExpertCounts(self.moe_layers, self.counts[ph], self.tokens[ph])


def phase_counts(trace: Trace) -> PhaseCounts:
    """Counts of every phase (:func:`moetrace.tuner.mining.frequency_matrices`) and tokens."""
    m = trace.manifest
    L = len(m.model.moe_layers)
    layer_index = {lid: i for i, lid in enumerate(m.model.moe_layers)}
    freqs = frequency_matrices(reopen(trace.path))
    tokens = {p: np.zeros(L, np.int64) for p in freqs}
    rows = query(
        trace,
        "SELECT phase::VARCHAR AS phase, layer, count(*) AS n FROM activations_raw GROUP BY ALL",
    ).to_pylist()
    for r in rows:
        tokens[r["phase"]][layer_index[int(r["layer"])]] = int(r["n"])
    return PhaseCounts(tuple(m.model.moe_layers), freqs, tokens)


def count_phase_counts(trace: Trace) -> PhaseCounts:
    """:class:`PhaseCounts` of a count trace (its counts parts; counts of unknown phase,
    such as SGLang's, only in phase ``'all'``). Tokens are estimated as counts / top_k."""
    m = trace.manifest
    total = count_matrix(trace)
    counts = {p: count_matrix(trace, p) for p in S.PHASES}
    counts["unknown"] = total - sum(counts.values())
    tokens = {p: c.sum(axis=1) // m.top_k for p, c in counts.items()}
    return PhaseCounts(tuple(m.model.moe_layers), counts, tokens)


def expert_counts(
    trace: Trace, phase: str = "all", tag: tuple[str, str] | None = None
) -> ExpertCounts:
    """Counts for one phase (``'all'`` = both) and optionally one request tag ``(key, value)``."""
    m = trace.manifest
    L, E = len(m.model.moe_layers), m.model.num_experts
    layer_index = {lid: i for i, lid in enumerate(m.model.moe_layers)}
    if tag is None:
        return phase_counts(trace).select(phase)
    ids = _tagged_requests(trace, *tag)
    if not ids:
        raise AnalysisError(f"no request of {trace.path} has tag {tag[0]}={tag[1]!r}")
    con = connect(trace)
    try:
        con.register("_tagged", pa.table({"request_id": ids}))
        where = f"request_id IN (SELECT request_id FROM _tagged){phase_where(phase)}"
        rows = run_query(
            con,
            f"SELECT layer, e, count(*) AS n FROM ({unpivot_sql(m.top_k, where)}) GROUP BY ALL",
        )
        tok_rows = run_query(
            con, f"SELECT layer, count(*) AS n FROM activations_raw WHERE {where} GROUP BY 1"
        ).to_pylist()
    finally:
        con.close()
    counts = np.zeros((L, E), np.int64)
    li = np.array([layer_index[x] for x in rows.column("layer").to_pylist()], np.int64)
    np.add.at(
        counts,
        (li, rows.column("e").to_numpy().astype(np.int64)),
        rows.column("n").to_numpy().astype(np.int64),
    )
    tokens = np.zeros(L, np.int64)
    for r in tok_rows:
        tokens[layer_index[int(r["layer"])]] = int(r["n"])
    return ExpertCounts(tuple(m.model.moe_layers), np.asarray(counts, np.int64), tokens)
