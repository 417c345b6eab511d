"""``analyze``: mine a trace for skewed reuse, group activation and phase disparity.

One call reads a trace (recorded or imported) and returns an
:class:`~moetrace.tuner.mining.report.AnalysisReport`; docs/analyze.md explains every
figure and the cache definition (independent per-layer caches, requests replayed in
arrival order, a token's k experts needed together: token-set accesses).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from threadpoolctl import threadpool_limits

from moetrace.errors import AnalysisError
from moetrace.store import schema as S
from moetrace.store.arrays import Routing, load_routing
from moetrace.store.reader import Trace, open_trace
from moetrace.tuner.analyze_counts import analyze_counts
from moetrace.tuner.mining import frequency as F
from moetrace.tuner.mining import groups as G
from moetrace.tuner.mining import phases as P
from moetrace.tuner.mining import requests as RQ
from moetrace.tuner.mining import transitions as T
from moetrace.tuner.mining.curves import reuse_and_mrc
from moetrace.tuner.mining.mrc import lru_hit_curve
from moetrace.tuner.mining.report import (
    REPORT_VERSION,
    AnalysisReport,
    CountReport,
    GroupStats,
    PhaseStats,
    RequestStats,
    TransitionStats,
)
from moetrace.tuner.mining.reuse import stack_distances
from moetrace.tuner.mining.streams import (
    compact_requests,
    first_tokens,
    layer_rows,
    layer_stream,
    token_starts,
)
from moetrace.tuner.mining.verdict import MIN_LIFT, make_verdict

log = logging.getLogger(__name__)

PHASE_CHOICES = ("all", *S.PHASES)
DEFAULT_SIZE_FRACTIONS = (0.125, 0.25, 0.5)


@dataclass(frozen=True)
class AnalyzeConfig:
    """Options of :func:`analyze`; every random choice derives from ``seed``."""

    phase: str = "all"
    cache_sizes: tuple[int | str, ...] | None = None
    """Per-layer sizes for LFU/Belady/predictors: ints or percentages ("25%"); default
    12.5/25/50% of the experts."""
    seed: int = 0
    top_pairs: int = 10
    transition_test_fraction: float = 0.2
    request_test_fraction: float = 0.3
    prefix_tokens: int = 16
    max_clusters: int = 8
    min_lift: float = MIN_LIFT
    max_tokens: int | None = None
    """Analyze only the first this many tokens in replay order (None: all)."""
    max_request_cells: int = 50_000_000
    """Cap on requests x layers x experts for request matrices (subsample beyond)."""
    sections: tuple[str, ...] = field(default=("groups", "transitions", "requests", "phases"))
    """Optional sections to compute (skew, reuse and MRC always are)."""

    def __post_init__(self) -> None:
        if self.phase not in PHASE_CHOICES:
            raise AnalysisError(f"phase must be one of {PHASE_CHOICES}, got {self.phase!r}")
        for name in ("transition_test_fraction", "request_test_fraction"):
            v = getattr(self, name)
            if not 0.0 < v < 1.0:
                raise AnalysisError(f"{name} must be in (0, 1), got {v}")
        if self.max_tokens is not None and self.max_tokens < 1:
            raise AnalysisError(f"max_tokens must be >= 1 or None, got {self.max_tokens}")
        for name in ("top_pairs", "prefix_tokens", "max_clusters", "max_request_cells"):
            if getattr(self, name) < 1:
                raise AnalysisError(f"{name} must be >= 1, got {getattr(self, name)}")
        bad = set(self.sections) - {"groups", "transitions", "requests", "phases"}
        if bad:
            raise AnalysisError(f"unknown analysis sections {sorted(bad)}")
        if self.cache_sizes is not None:
            object.__setattr__(self, "cache_sizes", tuple(self.cache_sizes))


def resolve_cache_sizes(
    spec: Sequence[int | str] | None, num_experts: int, top_k: int = 1
) -> tuple[int, ...]:
    """Per-layer cache sizes from ints / "25%" strings (default 12.5/25/50% of E).

    Sizes must lie in [top_k, E] (a token's experts must fit at once); defaults are
    raised to top_k.
    """
    if spec is None:
        return tuple(sorted({max(top_k, round(f * num_experts)) for f in DEFAULT_SIZE_FRACTIONS}))
    sizes = set()
    for item in spec:
        text = str(item).strip()
        try:
            if text.endswith("%"):
                size = max(1, round(float(text[:-1]) / 100.0 * num_experts))
            else:
                size = int(text)
        except ValueError:
            raise AnalysisError(
                f"cache size {item!r} is neither an integer nor a percentage"
            ) from None
        if not top_k <= size <= num_experts:
            raise AnalysisError(
                f"cache size {item!r} must be in [top_k={top_k}, {num_experts}] experts"
            )
        sizes.add(size)
    if not sizes:
        raise AnalysisError("at least one cache size is needed")
    return tuple(sorted(sizes))


def _rows(a: np.ndarray) -> tuple[tuple[float, ...], ...]:
    return tuple(tuple(float(x) for x in row) for row in a)


def _irows(a: np.ndarray) -> tuple[tuple[int, ...], ...]:
    return tuple(tuple(int(x) for x in row) for row in a)


def _groups(
    routing: Routing,
    freq: np.ndarray,
    tokens: np.ndarray,
    cfg: AnalyzeConfig,
    top_k: int,
) -> GroupStats | None:
    if top_k < 2:
        return None
    # routing is in memory already: one numba pass beats re-reading the Parquet parts
    # (G.pair_counts is the DuckDB equivalent; tests check they agree)
    pairs = G.pair_counts_from_routing(routing.layer, routing.experts, *freq.shape)
    lifts = G.lift(pairs, freq, tokens)
    top, grps, max_lift, supports = [], [], [], []
    for layer in range(freq.shape[0]):
        support = max(5, int(0.001 * tokens[layer]))
        supports.append(support)
        tp = G.top_pairs(pairs, lifts, layer, cfg.top_pairs, support)
        top.extend(tp)
        max_lift.append(tp[0].lift if tp else float("nan"))
        grps.extend(G.greedy_groups(pairs, lifts, layer, max_size=top_k, min_support=support))
    return GroupStats(tuple(top), tuple(grps), tuple(max_lift), tuple(supports))


def _transitions(routing: Routing, cfg: AnalyzeConfig) -> TransitionStats | None:
    scores = T.score_transitions(
        routing, top_n=routing.top_k, test_fraction=cfg.transition_test_fraction, seed=cfg.seed
    )
    if not scores:
        return None
    n = np.array([s.test_tokens for s in scores], dtype=np.float64)
    return TransitionStats(
        top_n=routing.top_k,
        test_fraction=cfg.transition_test_fraction,
        scores=tuple(scores),
        model_recall=float((np.array([s.recall for s in scores]) * n).sum() / n.sum()),
        model_baseline=float((np.array([s.baseline for s in scores]) * n).sum() / n.sum()),
    )


def _prompt_docs(trace: Trace, request_ids: Sequence[str]) -> list[str | None] | None:
    table = trace.requests()
    ids = table.column("request_id").to_pylist()
    texts = table.column("prompt_text").to_pylist()
    tags = table.column("tags").to_pylist()
    docs: dict[str, str] = {}
    for rid, text, tag in zip(ids, texts, tags, strict=True):
        words = [text or ""] + [f"tag_{k}={v}" for k, v in (tag or [])]
        docs[rid] = " ".join(w for w in words if w)
    out = [docs.get(r) or None for r in request_ids]
    return out if any(out) else None


def _requests(
    trace: Trace, routing: Routing, sizes: tuple[int, ...], cfg: AnalyzeConfig
) -> RequestStats | None:
    R = len(routing.request_ids)
    if R < 2:
        return None
    cells = routing.num_layers * routing.num_experts
    if R * cells > cfg.max_request_cells:
        keep = max(2, cfg.max_request_cells // cells)
        rng = np.random.default_rng(cfg.seed)
        chosen = np.sort(rng.choice(R, keep, replace=False))
        log.info("request analysis: subsampling %d of %d requests", keep, R)
        routing = compact_requests(routing.select(np.isin(routing.request, chosen)))
    mats = RQ.normalize(RQ.activation_matrices(routing))
    clus = RQ.cluster_requests(mats, cfg.seed, cfg.max_clusters)
    preds = RQ.score_predictors(
        routing,
        sizes,
        seed=cfg.seed,
        test_fraction=cfg.request_test_fraction,
        prefix_tokens=cfg.prefix_tokens,
        prompts=_prompt_docs(trace, routing.request_ids),
        clustering_max=cfg.max_clusters,
    )
    return RequestStats(
        num_requests=len(routing.request_ids),
        request_ids=tuple(routing.request_ids),
        cluster_labels=tuple(int(x) for x in clus.labels) if clus else (),
        n_clusters=clus.n_clusters if clus else None,
        silhouette=clus.silhouette if clus else None,
        predictors=preds,
    )


def _phases(
    trace: Trace,
    routing: Routing,
    rows: list[np.ndarray],
    freqs: dict[str, np.ndarray],
    cfg: AnalyzeConfig,
    compute_extra: bool,
) -> PhaseStats:
    present = [p for p in S.PHASES if (routing.phase == S.PHASE_CODE[p]).any()]
    tokens = {}
    starts = token_starts(routing)
    for p in present:
        tokens[p] = int(np.count_nonzero(starts & (routing.phase == S.PHASE_CODE[p])))
    both = all(freqs[p].sum() > 0 for p in S.PHASES)
    js = P.js_per_layer(freqs["prefill"], freqs["decode"]) if both else None
    model_js = (
        P.js_divergence(freqs["prefill"].sum(axis=0), freqs["decode"].sum(axis=0)) if both else None
    )
    distinct: dict[str, tuple[float, ...]] = {}
    lru_by_phase: dict[str, tuple[tuple[float, ...], ...]] = {}
    if compute_extra:
        if cfg.max_tokens is None:
            per_pass = P.distinct_per_forward(trace)
        else:
            per_pass = P.distinct_per_forward_from_routing(routing)
        distinct = {p: v for p, v in per_pass.items() if p in present}
        if len(present) > 1:
            for p in present:
                curves = []
                for layer, r in enumerate(rows):
                    st = layer_stream(routing, layer, r[routing.phase[r] == S.PHASE_CODE[p]])
                    sd, _ = stack_distances(st.experts, st.row, routing.num_experts)
                    hist = np.bincount(sd[sd >= 0], minlength=routing.num_experts)
                    curves.append(lru_hit_curve(hist, st.num_accesses))
                lru_by_phase[p] = _rows(np.asarray(curves))
    return PhaseStats(
        phases=tuple(present),
        tokens=tokens,
        frequency_by_phase={p: _irows(freqs[p]) for p in S.PHASES if freqs[p].sum() > 0},
        js_divergence=js,
        model_js_divergence=model_js,
        distinct_per_forward=distinct,
        lru_by_phase=lru_by_phase,
    )


def analyze(
    trace: Trace | str | os.PathLike[str], config: AnalyzeConfig | None = None
) -> AnalysisReport | CountReport:
    """Analyze a trace (a :class:`Trace` or its directory); see the module docstring.

    A count trace (per-expert counts only) gets a :class:`CountReport` (skew only, see
    :mod:`moetrace.tuner.analyze_counts`); every other option of ``config`` needs routing.
    """
    cfg = config or AnalyzeConfig()
    if not isinstance(trace, Trace):
        trace = open_trace(trace)
    if trace.is_count_trace:
        return analyze_counts(trace, phase=cfg.phase)
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    m = trace.manifest
    E, k = m.model.num_experts, m.top_k
    if trace.num_activations == 0:
        raise AnalysisError(f"{trace.path}: trace has no activations to analyze")
    sizes = resolve_cache_sizes(cfg.cache_sizes, E, k)
    phase = None if cfg.phase == "all" else cfg.phase
    routing = load_routing(trace, phase=phase)
    if routing.num_rows == 0:
        counts = trace.sql(
            "SELECT phase::VARCHAR AS p, count(*) AS n FROM activations_raw GROUP BY 1"
        )
        have = dict(
            zip(counts.column("p").to_pylist(), counts.column("n").to_pylist(), strict=True)
        )
        raise AnalysisError(
            f"{trace.path}: no activations in phase {cfg.phase!r} (rows per phase: {have})"
        )
    if cfg.max_tokens is not None:
        routing = first_tokens(routing, cfg.max_tokens)
    routing = compact_requests(routing)  # requests with rows in the analyzed phase only
    timings["load"] = time.perf_counter() - t0

    def lap(name: str, start: float) -> float:
        now = time.perf_counter()
        timings[name] = now - start
        log.info("analyze: %s took %.2fs", name, now - start)
        return now

    t = time.perf_counter()
    if cfg.max_tokens is None:
        freqs = F.frequency_matrices(trace)
    else:
        freqs = {
            p: F.frequency_from_routing(
                routing.layer[sel], routing.experts[sel], routing.num_layers, E
            )
            for p in S.PHASES
            for sel in [routing.phase == S.PHASE_CODE[p]]
        }
    freq = sum(freqs.values()) if phase is None else freqs[phase]
    rows = layer_rows(routing)
    tokens = np.array([r.size for r in rows], dtype=np.int64)
    skew = F.skew_stats(freq, tokens)
    t = lap("skew", t)
    reuse, mrc = reuse_and_mrc(routing, rows, sizes, cfg.seed)
    t = lap("reuse_mrc", t)
    groups = _groups(routing, freq, tokens, cfg, k) if "groups" in cfg.sections else None
    t = lap("groups", t)
    transitions = _transitions(routing, cfg) if "transitions" in cfg.sections else None
    t = lap("transitions", t)
    with threadpool_limits(limits=1):  # small BLAS calls; threads only contend
        requests = _requests(trace, routing, sizes, cfg) if "requests" in cfg.sections else None
    t = lap("requests", t)
    phases = _phases(trace, routing, rows, freqs, cfg, "phases" in cfg.sections)
    t = lap("phases", t)
    verdict = make_verdict(E, skew, mrc, transitions, requests, phases, min_lift=cfg.min_lift)
    timings["total"] = time.perf_counter() - t0
    return AnalysisReport(
        report_version=REPORT_VERSION,
        trace=str(trace.path),
        model=m.model.name,
        moe_layers=tuple(m.model.moe_layers),
        num_experts=E,
        top_k=k,
        phase=cfg.phase,
        seed=cfg.seed,
        num_rows=routing.num_rows,
        num_accesses=int(sum(skew.accesses)),
        num_requests=len(routing.request_ids),
        verdict=verdict,
        skew=skew,
        reuse=reuse,
        mrc=mrc,
        groups=groups,
        transitions=transitions,
        requests=requests,
        phases=phases,
        timings=timings,
    )
