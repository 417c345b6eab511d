"""The versioned analysis report: frozen dataclasses with ``to_dict``/``from_dict``.

Arrays are nested tuples so the JSON is plain; per-layer arrays are indexed by MoE-layer
index (0..L-1, see ``AnalysisReport.moe_layers`` for the model's layer ids). Rates are
in [0, 1]; missing values (a quantile of no data) are ``null`` in JSON / NaN in Python.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from moetrace.errors import AnalysisError
from moetrace.store.files import write_text_atomic
from moetrace.tuner.mining.groups import Group, PairStat
from moetrace.tuner.mining.requests import PredictorScores
from moetrace.tuner.mining.serial import Serializable
from moetrace.tuner.mining.transitions import TransitionScore

REPORT_VERSION = 1
COUNT_REPORT_VERSION = 1
COUNT_REPORT_KIND = "counts"
NEEDS_ROUTING = (
    "reuse distances",
    "miss-ratio curves (LRU, LFU, Belady)",
    "co-activation groups",
    "layer transitions",
    "requests",
    "phases",
)
"""Sections of the analysis that need token-level routing (not in a count trace)."""
Matrix = tuple[tuple[float, ...], ...]
IntMatrix = tuple[tuple[int, ...], ...]


@dataclass(frozen=True)
class SkewStats(Serializable):
    """Expert frequency and skew per MoE layer."""

    accesses: tuple[int, ...]
    tokens: tuple[int, ...]
    frequency: IntMatrix
    """(L, E) activation counts."""
    gini: tuple[float, ...]
    entropy_bits: tuple[float, ...]
    hot_set: dict[str, tuple[int, ...]]
    """Per fraction ("0.5", "0.8", "0.9"): experts covering that share of the layer."""
    zipf_exponent: tuple[float, ...]
    model_gini: float
    model_entropy_bits: float
    model_zipf_exponent: float
    """Means over layers."""


@dataclass(frozen=True)
class ReuseStats(Serializable):
    """Reuse distances (per layer) in tokens and in distinct experts."""

    quantiles: tuple[float, ...]
    token_quantiles: Matrix
    distinct_quantiles: Matrix
    token_hist_edges: tuple[int, ...]
    """Lower edges of the log2 token-distance bins (last bin open-ended)."""
    token_hist: IntMatrix
    distinct_hist: IntMatrix
    """(L, E): accesses whose previous use was d = 0..E-1 distinct experts ago."""
    cold: tuple[int, ...]
    model_token_quantiles: tuple[float, ...]
    """From a seeded subsample of at most 100k reuses per layer."""
    model_distinct_quantiles: tuple[float, ...]


@dataclass(frozen=True)
class MRCStats(Serializable):
    """Hit-rate curves; cache sizes are per layer (every layer gets the same size)."""

    definition: str
    lru: Matrix
    """(L, E): LRU hit rate at sizes 1..E."""
    model_lru: tuple[float, ...]
    policy_sizes: tuple[int, ...]
    lfu: Matrix
    belady: Matrix
    """(L, S) at ``policy_sizes``."""
    model_lru_at: tuple[float, ...]
    model_lfu: tuple[float, ...]
    model_belady: tuple[float, ...]
    lru_size_for: dict[str, int | None]
    belady_size_for: dict[str, int | None]
    """Smallest per-layer size reaching the hit rate ("0.8", "0.9"); None: never."""


@dataclass(frozen=True)
class GroupStats(Serializable):
    """Within-layer co-activation."""

    top_pairs: tuple[PairStat, ...]
    groups: tuple[Group, ...]
    max_lift: tuple[float, ...]
    min_support: tuple[int, ...]


@dataclass(frozen=True)
class TransitionStats(Serializable):
    top_n: int
    test_fraction: float
    scores: tuple[TransitionScore, ...]
    model_recall: float
    model_baseline: float
    """Token-weighted means over layer pairs."""


@dataclass(frozen=True)
class RequestStats(Serializable):
    num_requests: int
    request_ids: tuple[str, ...]
    cluster_labels: tuple[int, ...]
    """Per request id (empty when not clustered)."""
    n_clusters: int | None
    silhouette: float | None
    predictors: PredictorScores | None


@dataclass(frozen=True)
class PhaseStats(Serializable):
    phases: tuple[str, ...]
    """Phases present in the analyzed rows."""
    tokens: dict[str, int]
    frequency_by_phase: dict[str, IntMatrix]
    js_divergence: tuple[float, ...] | None
    """Per layer prefill vs decode JS divergence (bits, 0 same .. 1 disjoint)."""
    model_js_divergence: float | None
    distinct_per_forward: dict[str, tuple[float, ...]]
    lru_by_phase: dict[str, Matrix]
    """Per phase (only when several are analyzed): (L, E) LRU hit rate of that phase alone."""


@dataclass(frozen=True)
class Verdict(Serializable):
    lines: tuple[str, ...]
    lru_size_80: int | None
    lru_size_90: int | None
    opt_size_80: int | None
    opt_size_90: int | None
    caching_pays: bool
    predictors_with_lift: tuple[str, ...]


@dataclass(frozen=True)
class AnalysisReport(Serializable):
    report_version: int
    trace: str
    model: str
    moe_layers: tuple[int, ...]
    num_experts: int
    top_k: int
    phase: str
    seed: int
    num_rows: int
    num_accesses: int
    num_requests: int
    verdict: Verdict
    skew: SkewStats
    reuse: ReuseStats
    mrc: MRCStats
    groups: GroupStats | None
    transitions: TransitionStats | None
    requests: RequestStats | None
    phases: PhaseStats
    timings: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.report_version != REPORT_VERSION:
            raise AnalysisError(
                f"analysis report version {self.report_version} is not supported "
                f"(this moetrace reads {REPORT_VERSION})"
            )

    def save(self, path: str | os.PathLike[str]) -> None:
        write_text_atomic(path, json.dumps(self.to_dict(), indent=1) + "\n")

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> AnalysisReport:
        data = _read_report(path)
        if data.get("kind") == COUNT_REPORT_KIND:
            raise AnalysisError(
                f"{path}: a count report (the analysis of a count trace: skew only), not a "
                "full analysis report; load it with CountReport.load"
            )
        return cls.from_dict(data)


def _read_report(path: str | os.PathLike[str]) -> dict[str, Any]:
    try:
        data: Any = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise AnalysisError(f"{path}: cannot read analysis report ({exc})") from None
    if not isinstance(data, dict) or "report_version" not in data:
        raise AnalysisError(f"{path}: not an analysis report (no report_version)")
    return data


@dataclass(frozen=True)
class CountReport(Serializable):
    """The analysis of a count trace: what per-expert counts allow (expert frequency and
    skew per MoE layer); the sections in ``needs_routing`` need token-level routing.

    ``skew.tokens`` are estimated as accesses / top_k (each token counts at k experts)."""

    report_version: int
    kind: str
    trace: str
    model: str
    source: str | None
    """Where the counts came from (the importer format, e.g. ``sglang-counts``)."""
    moe_layers: tuple[int, ...]
    num_experts: int
    top_k: int
    phase: str
    num_accesses: int
    skew: SkewStats
    lines: tuple[str, ...]
    """The verdict lines counts allow (skew only)."""
    needs_routing: tuple[str, ...] = NEEDS_ROUTING
    timings: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.report_version != COUNT_REPORT_VERSION:
            raise AnalysisError(
                f"count report version {self.report_version} is not supported "
                f"(this moetrace reads {COUNT_REPORT_VERSION})"
            )
        if self.kind != COUNT_REPORT_KIND:
            raise AnalysisError(
                f"count report kind must be {COUNT_REPORT_KIND!r}, got {self.kind!r}"
            )

    def save(self, path: str | os.PathLike[str]) -> None:
        write_text_atomic(path, json.dumps(self.to_dict(), indent=1) + "\n")

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> CountReport:
        data = _read_report(path)
        if data.get("kind") != COUNT_REPORT_KIND:
            raise AnalysisError(f"{path}: not a count report (kind {data.get('kind')!r})")
        return cls.from_dict(data)
