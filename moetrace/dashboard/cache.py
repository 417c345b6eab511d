"""Streamlit caches over the data layer, keyed on trace path + mtime stamp (and options).

The expensive aggregates come from :mod:`moetrace.dashboard.persisted`, which keeps them
in the on-disk cache (:mod:`moetrace.dashboard.diskcache`) between dashboard sessions.
Data modules are imported inside each function: a page whose mining functions are
missing or broken shows "not available" (see :func:`context.run_page`) while the other
pages keep working. Cached values are small (layers x experts matrices, curves, tables):
raw activation rows never leave DuckDB/numpy and never reach the browser.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import streamlit as st

from moetrace.dashboard.data.common import reopen
from moetrace.store.reader import Trace, open_trace

if TYPE_CHECKING:
    from moetrace.dashboard.data import experts as X
    from moetrace.dashboard.data import groups as G
    from moetrace.dashboard.data import layer_curves as LC
    from moetrace.dashboard.data import overview as O
    from moetrace.dashboard.data import plan_layers as PL
    from moetrace.dashboard.data import plans as P
    from moetrace.dashboard.data import requests as Q
    from moetrace.dashboard.data import reuse as R
    from moetrace.dashboard.data.summary import TraceSummary

Stamp = tuple[float, ...]


@st.cache_resource(show_spinner="Opening the trace...", max_entries=16)
def trace(path: str, stamp: Stamp) -> Trace:
    """The validated trace (checks every part's schema once per stamp)."""
    return open_trace(path)


@st.cache_data(show_spinner="Summarizing the trace...", max_entries=32)
def overview(path: str, stamp: Stamp) -> O.Overview:
    from moetrace.dashboard.data import overview as O

    return O.overview(reopen(path))


@st.cache_data(show_spinner="Running moetrace analyze for the verdict...", max_entries=16)
def verdict(path: str, stamp: Stamp, phase: str) -> O.VerdictView:
    from moetrace.dashboard.data import overview as O

    return O.verdict(reopen(path), phase)


@st.cache_data(show_spinner=False, max_entries=32)
def tag_values(path: str, stamp: Stamp) -> dict[str, tuple[str, ...]]:
    from moetrace.dashboard.data import experts as X

    return X.tag_values(reopen(path))


@st.cache_data(show_spinner="Counting expert activations...", max_entries=64)
def expert_counts(
    path: str, stamp: Stamp, phase: str, tag: tuple[str, str] | None = None
) -> X.ExpertCounts:
    from moetrace.dashboard.data import experts as X

    if tag is None:  # derived from the all-phase pass, cached once per trace
        return phase_counts(path, stamp).select(phase)
    return X.expert_counts(reopen(path), phase, tag)


@st.cache_data(show_spinner="Summarizing the trace's routing (one pass)...", max_entries=16)
def summary(path: str, stamp: Stamp) -> TraceSummary:
    """Counts per phase and per request, from the on-disk cache when it has them."""
    from moetrace.dashboard import persisted

    return persisted.summary(path)


@st.cache_data(show_spinner="Counting expert activations...", max_entries=16)
def phase_counts(path: str, stamp: Stamp) -> X.PhaseCounts:
    if trace(path, stamp).is_count_trace:  # per-expert counts only: read them
        from moetrace.dashboard.data import experts as X

        return X.count_phase_counts(reopen(path))
    return summary(path, stamp).phase_counts()


@st.cache_data(show_spinner="Replaying the layer's accesses (LRU, LFU, Belady)...", max_entries=64)
def layer_reuse(path: str, stamp: Stamp, layer_index: int, phase: str) -> R.LayerReuse:
    from moetrace.dashboard import persisted

    return persisted.layer_reuse(path, layer_index, phase)


@st.cache_data(show_spinner="Counting co-activated pairs...", max_entries=64)
def coactivation(path: str, stamp: Stamp, layer_index: int, phase: str) -> G.CoActivation:
    from moetrace.dashboard import persisted
    from moetrace.dashboard.data import groups as G

    counts = expert_counts(path, stamp, phase)
    pairs = persisted.layer_pair_counts(path, layer_index, phase)
    return G.coactivation(reopen(path), layer_index, phase, counts, pairs)


@st.cache_data(show_spinner="Fitting the layer transition table...", max_entries=64)
def transitions(path: str, stamp: Stamp, layer_index: int, phase: str) -> G.Transitions:
    from moetrace.dashboard import persisted

    return persisted.transitions(path, layer_index, phase)


@st.cache_data(show_spinner="Scoring the transition table of every layer pair...", max_entries=8)
def transition_scores(path: str, stamp: Stamp, phase: str) -> G.TransitionScores:
    from moetrace.dashboard import persisted

    return persisted.transition_scores(path, phase)


@st.cache_data(show_spinner=False, max_entries=16)
def request_table(path: str, stamp: Stamp) -> list[dict[str, object]]:
    from moetrace.dashboard.data import requests as Q

    return Q.request_table(reopen(path))


@st.cache_data(show_spinner=False, max_entries=128)
def request_matrix(path: str, stamp: Stamp, request_id: str) -> np.ndarray:
    from moetrace.dashboard import persisted

    return persisted.request_matrix(path, request_id)


@st.cache_data(show_spinner=False, max_entries=128)
def token_routing(
    path: str, stamp: Stamp, request_id: str, layer_index: int
) -> list[dict[str, object]]:
    from moetrace.dashboard.data import requests as Q

    return Q.token_routing(reopen(path), request_id, layer_index)


@st.cache_data(show_spinner="Projecting requests (PCA) and clustering them...", max_entries=16)
def projection(path: str, stamp: Stamp) -> Q.Projection:
    from moetrace.dashboard import persisted

    return persisted.projection(path)


@st.cache_data(show_spinner=False, max_entries=16)
def plans(
    paths: tuple[str, ...], mtimes: tuple[float, ...], trace_path: str, stamp: Stamp
) -> tuple[P.LoadedPlan, ...]:
    from moetrace.dashboard.data import plans as P

    return P.load_plans(paths, trace(trace_path, stamp).manifest)


@st.cache_data(show_spinner=False, max_entries=16)
def runtime_stats(paths: tuple[str, ...], mtimes: tuple[float, ...]) -> tuple[P.LoadedStats, ...]:
    from moetrace.dashboard.data import plans as P

    return P.load_stats(paths)


@st.cache_data(
    show_spinner="Replaying every layer (LRU, LFU, Belady) on a sample...", max_entries=16
)
def layer_curves(path: str, stamp: Stamp, phase: str) -> LC.LayerCurves:
    from moetrace.dashboard import persisted

    return persisted.layer_curves(path, phase)


@st.cache_data(show_spinner="Replaying the plan per layer on a sample...", max_entries=32)
def plan_layers(
    path: str, stamp: Stamp, plan_path: str, plan_mtime: float, phase: str
) -> PL.PlanLayers:
    from moetrace.dashboard import persisted

    return persisted.plan_layers(path, plan_path, phase)
