"""``analyze`` of a count trace: expert frequency and skew per MoE layer, nothing more.

A count trace (per-expert activation counts, e.g. imported from SGLang's ``stat``
dumps) has no token order, no requests and usually no phases, so of ``moetrace analyze``
only the skew section can be computed; :data:`~moetrace.tuner.mining.report.NEEDS_ROUTING`
lists the rest. The statistics are the same functions as for a routing trace
(:func:`moetrace.tuner.mining.frequency.skew_stats`), so a routing trace and the count
trace of its counts give the same skew.
"""

from __future__ import annotations

import time

import numpy as np
import pyarrow.compute as pc

from moetrace.errors import AnalysisError
from moetrace.store.reader import Trace
from moetrace.tuner.mining import frequency as F
from moetrace.tuner.mining.report import (
    COUNT_REPORT_KIND,
    COUNT_REPORT_VERSION,
    NEEDS_ROUTING,
    CountReport,
)
from moetrace.tuner.mining.verdict import skew_line


def count_matrix(trace: Trace, phase: str | None = None) -> np.ndarray:
    """(L, E) int64 counts of ``trace`` per MoE-layer index and expert (``phase``: only
    counts of that phase; None: all, including counts whose phase is unknown)."""
    m = trace.manifest
    index = {lid: i for i, lid in enumerate(m.model.moe_layers)}
    table = trace.counts()
    freq = np.zeros((len(index), m.model.num_experts), np.int64)
    if phase is not None:
        table = table.filter(pc.equal(table.column("phase"), phase))  # null phase: dropped
    li = np.array([index[x] for x in table.column("layer").to_pylist()], np.int64)
    ex = table.column("expert").to_numpy().astype(np.int64)
    np.add.at(freq, (li, ex), table.column("count").to_numpy().astype(np.int64))
    return freq


def analyze_counts(trace: Trace, *, phase: str = "all") -> CountReport:
    """Skew of a count trace's counts (``phase``: ``all`` or a phase the counts carry)."""
    t0 = time.perf_counter()
    m = trace.manifest
    k, E = m.top_k, m.model.num_experts
    origin = m.source.origin or "a count source"
    freq = count_matrix(trace, None if phase == "all" else phase)
    if not freq.any():
        if phase != "all" and count_matrix(trace).any():
            raise AnalysisError(
                f"{trace.path}: no counts of phase {phase!r} (the counts from {origin} do not "
                "say the phase); analyze with phase 'all'"
            )
        raise AnalysisError(f"{trace.path}: the count trace has no counts to analyze")
    skew = F.skew_stats(freq, freq.sum(axis=1) // k)
    lines = (
        skew_line(skew, E),
        f"Per-expert counts only (from {origin}): {', '.join(NEEDS_ROUTING)} need "
        "token-level routing, so whether caching or prefetching pays cannot be told here.",
    )
    return CountReport(
        report_version=COUNT_REPORT_VERSION,
        kind=COUNT_REPORT_KIND,
        trace=str(trace.path),
        model=m.model.name,
        source=m.source.origin,
        moe_layers=tuple(m.model.moe_layers),
        num_experts=E,
        top_k=k,
        phase=phase,
        num_accesses=int(freq.sum()),
        skew=skew,
        lines=lines,
        timings={"total": time.perf_counter() - t0},
    )
