"""The dashboard's expensive aggregates, kept in the on-disk cache between sessions.

Each function computes one aggregate of the trace at ``path`` on a cache miss and stores
it as arrays (:mod:`moetrace.dashboard.diskcache`, keyed by the trace's parts and mtimes);
a later dashboard process, or a page opened again after Streamlit's in-memory cache was
dropped, reads it back in milliseconds. No Streamlit here: :mod:`moetrace.dashboard.cache`
wraps these in ``st.cache_data``, and the benchmark calls them directly.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np

from moetrace.dashboard import diskcache
from moetrace.dashboard.data import groups as G
from moetrace.dashboard.data import layer_curves as LC
from moetrace.dashboard.data import plan_layers as PL
from moetrace.dashboard.data import requests as Q
from moetrace.dashboard.data import reuse as R
from moetrace.dashboard.data.common import reopen
from moetrace.dashboard.data.summary import TraceSummary, trace_summary

PathLike = str | os.PathLike[str]


def summary(path: PathLike) -> TraceSummary:
    """Counts per phase and per (sampled) request, one pass (:mod:`..data.summary`)."""
    a = diskcache.get_or_compute(path, "summary", lambda: trace_summary(reopen(path)).to_arrays())
    return TraceSummary.from_arrays(a)


def request_matrix(path: PathLike, request_id: str) -> np.ndarray:
    """One request's (L, E) counts: from the summary, else (not sampled) one query."""
    mat = summary(path).request_matrix(request_id)
    return mat if mat is not None else Q.request_matrix(reopen(path), request_id)


def projection(path: PathLike) -> Q.Projection:
    """PCA + KMeans of the summary's per-request matrices (a sample beyond
    :data:`moetrace.dashboard.data.summary.MAX_REQUESTS`)."""

    def compute() -> dict[str, np.ndarray]:
        s = summary(path)
        p = Q.project_matrices(s.request_ids, s.request_counts, s.sampled_from)
        return {
            "request_ids": np.asarray(p.request_ids, dtype=np.str_),
            "xy": p.xy,
            "explained": np.asarray(p.explained, np.float64),
            "clusters": np.asarray([] if p.clusters is None else p.clusters, np.int64),
            "has_clusters": np.asarray(p.clusters is not None),
            "silhouette": np.asarray(np.nan if p.silhouette is None else p.silhouette),
            "sampled_from": np.asarray(p.sampled_from, np.int64),
        }

    a = diskcache.get_or_compute(path, "projection", compute)
    sil = float(a["silhouette"])
    return Q.Projection(
        request_ids=tuple(str(x) for x in a["request_ids"]),
        xy=a["xy"],
        explained=(float(a["explained"][0]), float(a["explained"][1])),
        clusters=a["clusters"] if bool(a["has_clusters"]) else None,
        silhouette=None if np.isnan(sil) else sil,
        sampled_from=int(a["sampled_from"]),
    )


def layer_reuse(path: PathLike, layer_index: int, phase: str) -> R.LayerReuse:
    """One layer's reuse figures (a request sample beyond ``REUSE_SAMPLE_TOKENS`` tokens)."""
    name = f"reuse-{layer_index}-{phase}-{R.REUSE_SAMPLE_TOKENS}"
    a = diskcache.get_or_compute(
        path,
        name,
        lambda: R.layer_reuse(reopen(path), layer_index, phase, R.REUSE_SAMPLE_TOKENS).to_arrays(),
    )
    return R.LayerReuse.from_arrays(a)


def layer_pair_counts(path: PathLike, layer_index: int, phase: str) -> np.ndarray:
    """(E, E) pair counts of one layer."""
    a = diskcache.get_or_compute(
        path,
        f"pairs-{layer_index}-{phase}",
        lambda: {"pairs": G.layer_pair_counts(reopen(path), layer_index, phase)},
    )
    return a["pairs"]


def transitions(path: PathLike, layer_index: int, phase: str) -> G.Transitions:
    """The transition table of MoE layers ``layer_index`` -> ``layer_index + 1``."""

    def compute() -> dict[str, np.ndarray]:
        t = G.transitions(reopen(path), layer_index, phase)
        return {
            "src": np.asarray(t.src),
            "dst": np.asarray(t.dst),
            "counts": t.counts,
            "recall": np.asarray(np.nan if t.recall is None else t.recall),
            "baseline": np.asarray(np.nan if t.baseline is None else t.baseline),
            "test_tokens": np.asarray(t.test_tokens),
        }

    a = diskcache.get_or_compute(path, f"transitions-{layer_index}-{phase}", compute)
    rec, base = float(a["recall"]), float(a["baseline"])
    return G.Transitions(
        src=int(a["src"]),
        dst=int(a["dst"]),
        counts=a["counts"],
        recall=None if np.isnan(rec) else rec,
        baseline=None if np.isnan(base) else base,
        test_tokens=int(a["test_tokens"]),
    )


def transition_scores(path: PathLike, phase: str) -> G.TransitionScores:
    """Recall of the transition table of every consecutive layer pair (loads all rows)."""

    def compute() -> dict[str, np.ndarray]:
        t = G.all_transition_scores(reopen(path), phase)
        return {
            "src": np.asarray(t.src, np.int64),
            "dst": np.asarray(t.dst, np.int64),
            "recall": np.asarray(t.recall, np.float64),
            "baseline": np.asarray(t.baseline, np.float64),
            "test_tokens": np.asarray(t.test_tokens, np.int64),
        }

    a = diskcache.get_or_compute(path, f"transition-scores-{phase}", compute)
    return G.TransitionScores(
        src=tuple(int(x) for x in a["src"]),
        dst=tuple(int(x) for x in a["dst"]),
        recall=tuple(float(x) for x in a["recall"]),
        baseline=tuple(float(x) for x in a["baseline"]),
        test_tokens=tuple(int(x) for x in a["test_tokens"]),
    )


def _layer_curves_name(phase: str) -> str:
    return f"layer-curves-{phase}-{LC.ALL_LAYERS_SAMPLE_TOKENS}-{LC.ALL_LAYERS_POINTS}"


def layer_curves_cached(path: PathLike, phase: str) -> bool:
    """Whether :func:`layer_curves` is in the disk cache (reading it costs nothing)."""
    return diskcache.entry_path(path, _layer_curves_name(phase)).is_file()


def layer_curves(path: PathLike, phase: str) -> LC.LayerCurves:
    """Every layer's LRU/LFU/Belady curves and slots for 80/90% hits (a request sample)."""
    a = diskcache.get_or_compute(
        path, _layer_curves_name(phase), lambda: LC.layer_curves(reopen(path), phase).to_arrays()
    )
    return LC.LayerCurves.from_arrays(a)


def _plan_layers_name(plan_path: PathLike, phase: str) -> str:
    digest = hashlib.sha256(Path(plan_path).read_bytes()).hexdigest()[:20]
    return f"plan-layers-{digest}-{phase}-{LC.ALL_LAYERS_SAMPLE_TOKENS}"


def plan_layers_cached(path: PathLike, plan_path: PathLike, phase: str) -> bool:
    """Whether :func:`plan_layers` is in the disk cache (reading it costs nothing)."""
    return diskcache.entry_path(path, _plan_layers_name(plan_path, phase)).is_file()


def plan_layers(path: PathLike, plan_path: PathLike, phase: str) -> PL.PlanLayers:
    """A plan's and same-slot LRU's hit rate per layer and phase on a request sample
    (keyed by the plan file's content)."""
    from moetrace.store.plan import load_plan

    a = diskcache.get_or_compute(
        path,
        _plan_layers_name(plan_path, phase),
        lambda: PL.plan_layers(reopen(path), load_plan(plan_path), phase).to_arrays(),
    )
    return PL.PlanLayers.from_arrays(a)
