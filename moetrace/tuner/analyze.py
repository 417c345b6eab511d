"""``analyze``: mine a trace for skewed reuse, group activation and phase disparity.

One call reads a trace (recorded or imported) and returns an
:class:`~moetrace.tuner.mining.report.AnalysisReport`; docs/analyze.md explains every
figure and the cache definition (independent per-layer caches, requests replayed in
arrival order, a token's k experts needed together: token-set accesses).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from threadpoolctl import threadpool_limits

from moetrace.errors import AnalysisError
from moetrace.store import schema as S
from moetrace.store.arrays import require_routing
from moetrace.store.reader import Trace
from moetrace.store.traceset import load_routing_many, open_traces
from moetrace.tuner.analyze_counts import analyze_counts
from moetrace.tuner.mining import frequency as F
from moetrace.tuner.mining import groups as G
from moetrace.tuner.mining import phases as P
from moetrace.tuner.mining import requests as RQ
from moetrace.tuner.mining import transitions as T
from moetrace.tuner.mining.curves import combine_reuse
from moetrace.tuner.mining.layers import (
    SHARD_ROWS,
    LayerPart,
    LayerTask,
    RoutingSource,
    ShardPart,
    Source,
    TraceSource,
    merge_layers,
    pair_task,
    routing_source,
    shard_part,
    trace_source,
    warm_up,
)
from moetrace.tuner.mining.report import (
    REPORT_VERSION,
    AnalysisReport,
    CountReport,
    GroupStats,
    PhaseStats,
    RequestStats,
    TransitionStats,
)
from moetrace.tuner.mining.streams import compact_requests, first_tokens, token_starts
from moetrace.tuner.mining.verdict import MIN_LIFT, make_verdict
from moetrace.tuner.parallel import Fanout, default_workers, shared

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
    max_requests: int = 5_000
    """Cap on the requests clustered and scored by the request predictors (a seeded
    subsample beyond; the other sections use every request)."""
    sections: tuple[str, ...] = field(default=("groups", "transitions", "requests", "phases"))
    """Optional sections to compute (skew, reuse and MRC always are)."""
    workers: int | None = None
    """Processes for the per-layer tasks (None: the CPUs of this machine). The report is
    the same for any number."""
    ray: str | None = None
    """Run the per-layer tasks on this Ray cluster instead (see
    :class:`~moetrace.tuner.parallel.Fanout`)."""
    shard_rows: int = SHARD_ROWS
    """Rows (all layers) per shard of requests: one task per (layer, shard). The report
    is the same for any value (shards merge exactly); smaller shards mean more, smaller
    tasks."""

    def __post_init__(self) -> None:
        if self.phase not in PHASE_CHOICES:
            raise AnalysisError(f"phase must be one of {PHASE_CHOICES}, got {self.phase!r}")
        for name in ("transition_test_fraction", "request_test_fraction"):
            v = getattr(self, name)
            if not 0.0 < v < 1.0:
                raise AnalysisError(f"{name} must be in (0, 1), got {v}")
        if self.max_tokens is not None and self.max_tokens < 1:
            raise AnalysisError(f"max_tokens must be >= 1 or None, got {self.max_tokens}")
        if self.workers is not None and self.workers < 1:
            raise AnalysisError(f"workers must be >= 1, got {self.workers}")
        for name in ("top_pairs", "prefix_tokens", "max_clusters", "max_request_cells",
                     "max_requests", "shard_rows"):  # fmt: skip
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
    pairs: np.ndarray | None, freq: np.ndarray, tokens: np.ndarray, cfg: AnalyzeConfig, k: int
) -> GroupStats | None:
    if pairs is None:
        return None
    lifts = G.lift(pairs, freq, tokens)
    top, grps, max_lift, supports = [], [], [], []
    for layer in range(freq.shape[0]):
        support = max(5, int(0.001 * tokens[layer]))
        supports.append(support)
        tp = G.top_pairs(pairs, lifts, layer, cfg.top_pairs, support)
        top.extend(tp)
        max_lift.append(tp[0].lift if tp else float("nan"))
        grps.extend(G.greedy_groups(pairs, lifts, layer, max_size=k, min_support=support))
    return GroupStats(tuple(top), tuple(grps), tuple(max_lift), tuple(supports))


def _transitions(
    scores: list[T.TransitionScore], top_n: int, cfg: AnalyzeConfig
) -> TransitionStats | None:
    if not scores:
        return None
    n = np.array([s.test_tokens for s in scores], dtype=np.float64)
    return TransitionStats(
        top_n=top_n,
        test_fraction=cfg.transition_test_fraction,
        scores=tuple(scores),
        model_recall=float((np.array([s.recall for s in scores]) * n).sum() / n.sum()),
        model_baseline=float((np.array([s.baseline for s in scores]) * n).sum() / n.sum()),
    )


def _prompt_docs(traces: Sequence[Trace], request_ids: Sequence[str]) -> list[str | None] | None:
    docs: dict[str, str] = {}
    for i, trace in enumerate(traces):
        table = trace.requests()
        ids = table.column("request_id").to_pylist()
        texts = table.column("prompt_text").to_pylist()
        tags = table.column("tags").to_pylist()
        for rid, text, tag in zip(ids, texts, tags, strict=True):
            words = [text or ""] + [f"tag_{k}={v}" for k, v in (tag or [])]
            docs[rid if len(traces) == 1 else f"{i}:{rid}"] = " ".join(w for w in words if w)
    out = [docs.get(r) or None for r in request_ids]
    return out if any(out) else None


def _requests(
    traces: Sequence[Trace], source: Source, ids: Sequence[str], E: int, L: int, cfg: AnalyzeConfig
) -> RequestStats | None:
    R = len(ids)
    if R < 2:
        return None
    keep = min(R, max(2, cfg.max_request_cells // (L * E)), max(2, cfg.max_requests))
    chosen = None
    if keep < R:
        rng = np.random.default_rng(cfg.seed)
        chosen = np.sort(rng.choice(R, keep, replace=False))
        log.info("request analysis: subsampling %d of %d requests", keep, R)
    if isinstance(source, RoutingSource):
        routing = source.routing
        if chosen is not None:
            routing = compact_requests(routing.select(np.isin(routing.request, chosen)))
    else:
        wanted = set(ids) if chosen is None else {ids[i] for i in chosen}
        kept = [
            tuple(raw for raw, r in zip(per_raw, per, strict=True) if r in wanted)
            for per_raw, per in zip(source.requests, _prefixed(source), strict=True)
        ]
        routing = dataclasses.replace(source, requests=tuple(kept)).layers(range(L))
        routing = compact_requests(routing)
    mats = RQ.normalize(RQ.activation_matrices(routing))
    clus = RQ.cluster_requests(mats, cfg.seed, cfg.max_clusters)
    preds = RQ.score_predictors(
        routing,
        resolve_cache_sizes(cfg.cache_sizes, E, routing.top_k),
        seed=cfg.seed,
        test_fraction=cfg.request_test_fraction,
        prefix_tokens=cfg.prefix_tokens,
        prompts=_prompt_docs(traces, routing.request_ids),
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


def _prefixed(source: TraceSource) -> list[tuple[str, ...]]:
    """Each trace's kept request ids as they appear in the merged routing."""
    if len(source.paths) == 1:
        return list(source.requests)
    return [tuple(f"{i}:{r}" for r in per) for i, per in enumerate(source.requests)]


def _phases(
    tokens: dict[str, int], parts: Sequence[LayerPart], freqs: dict[str, np.ndarray]
) -> PhaseStats:
    present = [p for p in S.PHASES if any(p in part.phases_present for part in parts)]
    both = all(freqs[p].sum() > 0 for p in S.PHASES)
    js = P.js_per_layer(freqs["prefill"], freqs["decode"]) if both else None
    model_js = (
        P.js_divergence(freqs["prefill"].sum(axis=0), freqs["decode"].sum(axis=0)) if both else None
    )
    distinct = {
        p: tuple(part.distinct_per_forward.get(p, float("nan")) for part in parts) for p in present
    }
    lru_by_phase: dict[str, tuple[tuple[float, ...], ...]] = {}
    if len(present) > 1 and all(part.phase_lru for part in parts):
        for p in present:
            lru_by_phase[p] = _rows(np.asarray([part.phase_lru[p] for part in parts]))
    return PhaseStats(
        phases=tuple(present),
        tokens={p: tokens.get(p, 0) for p in present},
        frequency_by_phase={p: _irows(freqs[p]) for p in S.PHASES if freqs[p].sum() > 0},
        js_divergence=js,
        model_js_divergence=model_js,
        distinct_per_forward=distinct,
        lru_by_phase=lru_by_phase,
    )


def _rows_by_phase(traces: Sequence[Trace]) -> dict[str, int]:
    have: dict[str, int] = {}
    for t in traces:
        counts = t.sql("SELECT phase::VARCHAR AS p, count(*) AS n FROM activations_raw GROUP BY 1")
        for p, n in zip(
            counts.column("p").to_pylist(), counts.column("n").to_pylist(), strict=True
        ):
            have[p] = have.get(p, 0) + n
    return have


def _requests_and_tokens(trace: Trace, phase: str | None) -> tuple[tuple[str, ...], dict[str, int]]:
    """In one scan: the trace's request ids with rows (in ``phase``), in arrival order,
    and its tokens per phase."""
    where = f"WHERE phase = '{phase}'" if phase else ""
    table = trace.sql(
        "SELECT request_id, phase::VARCHAR AS p, count(DISTINCT (step, token)) AS n "
        f"FROM activations_raw {where} GROUP BY ALL"
    )
    present = set(table.column("request_id").to_pylist())
    tokens: dict[str, int] = {}
    for p, n in zip(table.column("p").to_pylist(), table.column("n").to_pylist(), strict=True):
        tokens[p] = tokens.get(p, 0) + n
    ids = trace.requests().column("request_id").to_pylist()
    return tuple(r for r in ids if r in present), tokens


def _shard_task(handle: Any, layer: int, shard: int, task: LayerTask) -> ShardPart:
    return shard_part(shared(handle), layer, shard, task)


def _pair_task(handle: Any, layer: int, task: LayerTask) -> T.TransitionScore | None:
    return pair_task(shared(handle), layer, task)


TraceArg = Trace | str | os.PathLike[str]


def analyze(
    trace: TraceArg | Sequence[TraceArg], config: AnalyzeConfig | None = None
) -> AnalysisReport | CountReport:
    """Analyze a trace, or several traces of one model as one workload (folders, globs or
    :class:`Trace` objects, requests replayed trace after trace); see the module
    docstring.

    A count trace (per-expert counts only) gets a :class:`CountReport` (skew only, see
    :mod:`moetrace.tuner.analyze_counts`); every other option of ``config`` needs routing.
    The work runs as one task per MoE layer (:mod:`moetrace.tuner.mining.layers`) on
    ``config.workers`` processes or ``config.ray``; the report is the same on each.
    """
    cfg = config or AnalyzeConfig()
    given = [trace] if isinstance(trace, Trace | str | os.PathLike) else list(trace)
    traces = open_traces(given)
    if len(traces) == 1 and traces[0].is_count_trace:
        return analyze_counts(traces[0], phase=cfg.phase)
    for t in traces:  # several traces are one routing workload: a count trace has none
        require_routing(t)
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    m = traces[0].manifest
    E, k, L = m.model.num_experts, m.top_k, len(m.model.moe_layers)
    where = ", ".join(str(t.path) for t in traces)
    if sum(t.num_activations for t in traces) == 0:
        raise AnalysisError(f"{where}: trace has no activations to analyze")
    sizes = resolve_cache_sizes(cfg.cache_sizes, E, k)
    phase = None if cfg.phase == "all" else cfg.phase
    source: Source
    if cfg.max_tokens is not None:
        routing = load_routing_many(traces, phase=phase)
        routing = compact_requests(first_tokens(routing, cfg.max_tokens))
        ids = list(routing.request_ids)
        starts = token_starts(routing)
        tokens_in = {
            p: int(np.count_nonzero(starts & (routing.phase == S.PHASE_CODE[p]))) for p in S.PHASES
        }
        source = routing_source(routing, cfg.shard_rows)
    else:
        scanned = [_requests_and_tokens(t, phase) for t in traces]
        source = trace_source(traces, phase, [kept for kept, _ in scanned], cfg.shard_rows)
        ids = [r for per in _prefixed(source) for r in per]
        tokens_in = {p: sum(tok.get(p, 0) for _, tok in scanned) for p in S.PHASES}
    if not ids:
        raise AnalysisError(
            f"{where}: no activations in phase {cfg.phase!r} (rows per phase: "
            f"{_rows_by_phase(traces)})"
        )
    timings["load"] = time.perf_counter() - t0

    def lap(name: str, start: float) -> float:
        now = time.perf_counter()
        timings[name] = now - start
        log.info("analyze: %s took %.2fs", name, now - start)
        return now

    t = time.perf_counter()
    task = LayerTask(
        sizes=sizes,
        groups="groups" in cfg.sections,
        phase_curves="phases" in cfg.sections,
        transition_test_fraction=cfg.transition_test_fraction,
        seed=cfg.seed,
    )
    workers = cfg.workers or default_workers()
    shards = range(len(source.shards))
    if workers > 1 and cfg.ray is None:
        warm_up(task)  # compile in this process: forked workers inherit the machine code
    with Fanout(workers, cfg.ray) as fan:
        handle = fan.share("analyze-source", source)
        args = [(handle, lay, sh, task) for lay in range(L) for sh in shards]
        shard_parts: list[ShardPart] = fan.map(_shard_task, args)
        t = lap("shards", t)
        scores: list[T.TransitionScore] = []
        if "transitions" in cfg.sections and L > 1:
            pair_args = [(handle, lay, task) for lay in range(1, L)]
            scores = [s for s in fan.map(_pair_task, pair_args) if s is not None]
        t = lap("transitions", t)
    parts = merge_layers(shard_parts, L, sizes, workers)
    del shard_parts
    t = lap("merge", t)
    freqs = {p: np.stack([part.freq[p] for part in parts]) for p in S.PHASES}
    if phase is not None and cfg.max_tokens is None:  # the other phase too, for the contrast
        freqs = {p: sum(F.frequency_matrices(tr)[p] for tr in traces) for p in S.PHASES}
    freq = sum(freqs.values()) if phase is None else freqs[phase]
    tokens = np.array([part.rows for part in parts], dtype=np.int64)
    skew = F.skew_stats(freq, tokens)
    reuse, mrc = combine_reuse([part.reuse for part in parts], sizes, k, E, cfg.workers)
    t = lap("reuse_mrc", t)
    pairs = None
    if task.groups and k >= 2:
        pairs = np.stack([part.pairs for part in parts])  # type: ignore[misc]
    groups = _groups(pairs, freq, tokens, cfg, k)
    transitions = _transitions(scores, k, cfg)
    t = lap("groups", t)
    with threadpool_limits(limits=1):  # small BLAS calls; threads only contend
        requests = _requests(traces, source, ids, E, L, cfg) if "requests" in cfg.sections else None
    t = lap("requests", t)
    phases = _phases(tokens_in, parts, freqs)
    if "phases" not in cfg.sections:
        phases = dataclasses.replace(phases, distinct_per_forward={}, lru_by_phase={})
    verdict = make_verdict(E, skew, mrc, transitions, requests, phases, min_lift=cfg.min_lift)
    timings["total"] = time.perf_counter() - t0
    return AnalysisReport(
        report_version=REPORT_VERSION,
        trace=where,
        model=m.model.name,
        moe_layers=tuple(m.model.moe_layers),
        num_experts=E,
        top_k=k,
        phase=cfg.phase,
        seed=cfg.seed,
        num_rows=int(tokens.sum()),
        num_accesses=int(sum(skew.accesses)),
        num_requests=len(ids),
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
