"""Overview facts of a trace (DuckDB aggregates, no raw rows) and the analyze verdict."""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from moetrace.dashboard.data.common import query
from moetrace.errors import AnalysisError, MoetraceError
from moetrace.store import schema as S
from moetrace.store.reader import Trace

VERDICT_AUTO_ROWS = 3_000_000
"""Up to this many activation rows the verdict is computed when the page opens."""


@dataclass(frozen=True)
class Overview:
    path: str
    model: str
    architecture: str | None
    source: str
    requests: int
    activations: int
    tokens: dict[str, int]
    num_layers: int
    moe_layers: tuple[int, ...]
    num_experts: int
    top_k: int
    shared_experts: int
    size_bytes: int
    parts: int
    has_weights: bool
    tags: dict[str, str] = field(default_factory=dict)
    request_tag_keys: tuple[str, ...] = ()
    counted: int = 0
    """A count trace's expert activations (sum of its counts); 0 for a routing trace."""
    counts_only: bool = False
    """The trace holds per-expert counts only (no token-level routing)."""

    def __post_init__(self) -> None:
        if self.requests < 0 or self.activations < 0:
            raise AnalysisError(
                f"overview counts must be >= 0, got requests={self.requests}, "
                f"activations={self.activations}"
            )

    @property
    def empty(self) -> bool:
        return self.activations == 0 and self.counted == 0


def overview(trace: Trace) -> Overview:
    m = trace.manifest
    first = m.model.moe_layers[0]
    tokens = {p: 0 for p in S.PHASES}
    has_weights = False
    if trace.num_activations:
        rows = query(
            trace,
            f"""SELECT phase::VARCHAR AS phase, count(*) AS n,
                       count(w0) AS weighted
                FROM activations_raw WHERE layer = {first} GROUP BY 1""",
        ).to_pylist()
        for r in rows:
            tokens[r["phase"]] = int(r["n"])
            has_weights = has_weights or bool(r["weighted"])
    keys = query(
        trace, "SELECT DISTINCT unnest(map_keys(tags)) AS k FROM requests ORDER BY 1"
    ).column("k")
    origin = m.source.origin or ""
    counted = 0
    if trace.is_count_trace:
        counted = int(
            query(trace, "SELECT coalesce(sum(count), 0) FROM counts").column(0)[0].as_py()
        )
    return Overview(
        path=str(trace.path),
        model=m.model.name,
        architecture=m.model.architecture,
        source=f"{m.source.kind}{': ' + origin if origin else ''}",
        requests=trace.num_requests,
        activations=trace.num_activations,
        tokens=tokens,
        num_layers=m.model.num_layers,
        moe_layers=tuple(m.model.moe_layers),
        num_experts=m.model.num_experts,
        top_k=m.top_k,
        shared_experts=m.model.shared_experts,
        size_bytes=trace.size_bytes,
        parts=len(trace.parts),
        has_weights=has_weights,
        tags=dict(m.tags),
        request_tag_keys=tuple(str(k) for k in keys.to_pylist()),
        counted=counted,
        counts_only=trace.is_count_trace,
    )


@dataclass(frozen=True)
class VerdictView:
    """The analyze verdict, or why it is not available."""

    lines: tuple[str, ...] = ()
    caching_pays: bool | None = None
    unavailable: str | None = None
    seconds: float = 0.0


def verdict(trace: Trace, phase: str = "all") -> VerdictView:
    """Run ``moetrace analyze`` (core sections only) and return its verdict."""
    try:
        from moetrace.tuner.analyze import AnalyzeConfig, analyze
    except ImportError as exc:
        return VerdictView(unavailable=f"moetrace analyze is not available ({exc})")
    try:
        # in this process: a page's server starts no worker processes
        report = analyze(trace, AnalyzeConfig(phase=phase, sections=(), workers=1))
    except MoetraceError as exc:
        return VerdictView(unavailable=str(exc))
    from moetrace.tuner.mining.report import CountReport

    if isinstance(report, CountReport):  # a count trace: skew only
        return VerdictView(lines=report.lines, seconds=report.timings.get("total", 0.0))
    return VerdictView(
        lines=tuple(report.verdict.lines),
        caching_pays=report.verdict.caching_pays,
        seconds=float(report.timings.get("total", 0.0)),
    )


def manifest_json(trace: Trace) -> str:
    return json.dumps(trace.manifest.to_json(), indent=1, sort_keys=True)
