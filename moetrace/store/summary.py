"""``summarize(trace)``: what a trace holds, from Parquet metadata and DuckDB aggregates.

No raw rows are loaded into Python: counts come from part footers and from aggregate
queries over the DuckDB views.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from typing import Any

from moetrace.store.importers.base import IMPORT_MARKER
from moetrace.store.reader import Trace, open_trace


@dataclass(frozen=True)
class TraceSummary:
    """The facts ``moetrace inspect`` shows."""

    path: str
    model_name: str
    architecture: str | None
    requests: int
    prefill_tokens: int
    decode_tokens: int
    activations: int
    num_layers: int
    moe_layers: tuple[int, ...]
    num_experts: int
    top_k: int
    shared_experts: int
    bytes_per_expert: int | None
    has_weights: bool
    speculative: bool
    parts: int
    size_bytes: int
    bytes_per_activation: float
    inferred: tuple[str, ...] = ()
    source: dict[str, Any] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)
    incomplete_import: bool = False
    """True while an import into the trace runs, or after one failed (rerun it)."""
    content: str = "routing"
    """``routing``, or ``counts`` for a count trace (per-expert counts only)."""
    counted: int = 0
    """A count trace's expert activations (sum of its counts); 0 for a routing trace."""
    count_sources: int = 0
    """A count trace's sources (e.g. imported dump files)."""

    def __post_init__(self) -> None:
        from moetrace.errors import AnalysisError

        for name in (
            "requests",
            "prefill_tokens",
            "decode_tokens",
            "activations",
            "parts",
            "counted",
            "count_sources",
        ):
            if getattr(self, name) < 0:
                raise AnalysisError(f"TraceSummary.{name} must be >= 0, got {getattr(self, name)}")
        object.__setattr__(self, "moe_layers", tuple(self.moe_layers))
        object.__setattr__(self, "inferred", tuple(self.inferred))

    @property
    def tokens(self) -> dict[str, int]:
        return {"prefill": self.prefill_tokens, "decode": self.decode_tokens}

    @property
    def num_moe_layers(self) -> int:
        return len(self.moe_layers)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["moe_layers"] = list(self.moe_layers)
        data["inferred"] = list(self.inferred)
        data["tokens"] = self.tokens
        data["num_moe_layers"] = self.num_moe_layers
        return data


def summarize(trace: Trace | str | os.PathLike[str]) -> TraceSummary:
    """Summarize a trace (an open :class:`Trace` or a trace directory)."""
    if not isinstance(trace, Trace):
        trace = open_trace(trace)
    m = trace.manifest
    tokens = {"prefill": 0, "decode": 0}
    has_weights = False
    if trace.parts:
        rows = trace.sql(
            "SELECT phase::VARCHAR AS phase, count(*) AS n FROM "
            "(SELECT DISTINCT request_id, phase, token FROM activations_raw) GROUP BY ALL"
        ).to_pylist()
        for row in rows:
            tokens[row["phase"]] = int(row["n"])
        has_weights = bool(
            trace.sql("SELECT EXISTS (SELECT 1 FROM activations_raw WHERE w0 IS NOT NULL)")
            .column(0)[0]
            .as_py()
        )
    counted = sources = 0
    if trace.is_count_trace:
        row = trace.sql(
            "SELECT coalesce(sum(count), 0)::BIGINT AS n, count(DISTINCT source) AS s FROM counts"
        ).to_pylist()[0]
        counted, sources = int(row["n"]), int(row["s"])
    act_bytes = sum(p.activations.stat().st_size for p in trace.parts)
    n_act = trace.num_activations
    source = asdict(m.source)
    return TraceSummary(
        path=str(trace.path),
        model_name=m.model.name,
        architecture=m.model.architecture,
        requests=trace.num_requests,
        prefill_tokens=tokens["prefill"],
        decode_tokens=tokens["decode"],
        activations=n_act,
        num_layers=m.model.num_layers,
        moe_layers=m.model.moe_layers,
        num_experts=m.model.num_experts,
        top_k=m.model.top_k,
        shared_experts=m.model.shared_experts,
        bytes_per_expert=m.model.bytes_per_expert,
        has_weights=has_weights,
        speculative=m.speculative,
        parts=len(trace.parts) + len(trace.count_parts),
        size_bytes=trace.size_bytes,
        bytes_per_activation=act_bytes / n_act if n_act else 0.0,
        inferred=m.model.inferred,
        source=source,
        tags=dict(m.tags),
        incomplete_import=(trace.path / IMPORT_MARKER).exists(),
        content=m.content,
        counted=counted,
        count_sources=sources,
    )
