"""What every page shares: the app's inputs, the sidebar (trace and phase choice) and
turning a :class:`MoetraceError` into a clear ``st.error`` instead of a traceback."""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import streamlit as st

from moetrace.dashboard import cache
from moetrace.dashboard.data.common import PHASE_CHOICES, stamp
from moetrace.dashboard.data.overview import Overview
from moetrace.dashboard.data.plans import path_mtime
from moetrace.dashboard.inputs import DashboardInputs, current_inputs
from moetrace.errors import MoetraceError


@dataclass(frozen=True)
class PageContext:
    """The selected trace (path, cache stamp, overview) and options of this run."""

    inputs: DashboardInputs
    trace_path: str
    stamp: tuple[float, ...]
    overview: Overview
    phase: str

    @property
    def layer_labels(self) -> list[str]:
        return [f"L{lid}" for lid in self.overview.moe_layers]

    def plan_mtimes(self) -> tuple[float, ...]:
        return tuple(path_mtime(p) for p in self.inputs.plans)

    def stats_mtimes(self) -> tuple[float, ...]:
        return tuple(path_mtime(p) for p in self.inputs.stats)


def trace_label(path: str) -> str:
    p = Path(path)
    return f"{p.name} ({p.parent})"


def _inputs() -> DashboardInputs:
    return current_inputs(sys.argv[1:])


def sidebar() -> None:
    """The trace and phase choosers, rendered by the app's entry script before the page,
    so the choice holds across pages (session keys ``trace`` and ``phase``)."""
    try:
        inputs = _inputs()
    except MoetraceError:
        return  # page_context reports it on the page
    with st.sidebar:
        st.selectbox(
            "Trace",
            list(inputs.traces),
            format_func=trace_label,
            key="trace",
            help="Traces given on the command line",
        )
        st.radio(
            "Phase",
            PHASE_CHOICES,
            horizontal=True,
            key="phase",
            help="Which tokens the figures count: prompt (prefill), generated (decode) or both",
        )


def page_context(*, need_rows: bool = True, counts_ok: bool = False) -> PageContext:
    """The selected trace and phase; stops the page with st.error on bad input, and with
    st.info on a count trace (per-expert counts only) unless the page can show counts."""
    try:
        inputs = _inputs()
    except MoetraceError as exc:
        st.error(f"Cannot start the dashboard: {exc}")
        st.stop()
    path = st.session_state.get("trace")
    if path not in inputs.traces:
        path = inputs.traces[0]
    phase = st.session_state.get("phase", "all")
    st_stamp = stamp(path)
    try:
        cache.trace(path, st_stamp)
        ov = cache.overview(path, st_stamp)
    except MoetraceError as exc:
        st.error(f"Cannot open trace {path}: {exc}")
        st.stop()
    if need_rows and ov.counts_only and not counts_ok:
        origin = cache.trace(path, st_stamp).manifest.source.origin
        st.info(
            f"Trace {path} holds per-expert counts only"
            + (f" (imported from {origin})" if origin else "")
            + ": this page needs token-level routing (reuse, groups, requests, plans). "
            "The Overview and Experts pages show the counts."
        )
        st.stop()
    if need_rows and ov.empty:
        st.error(f"Trace {path} has no activations: nothing to show on this page.")
        st.stop()
    return PageContext(inputs, path, st_stamp, ov, phase)


def run_page(
    render: Callable[[PageContext], None], *, need_rows: bool = True, counts_ok: bool = False
) -> None:
    """Build the context and render a page; a MoetraceError becomes an st.error, a
    missing tuner function a "not available" warning. ``counts_ok``: the page can show a
    count trace (per-expert counts only)."""
    ctx = page_context(need_rows=need_rows, counts_ok=counts_ok)
    try:
        render(ctx)
    except MoetraceError as exc:
        st.error(str(exc))
    except ImportError as exc:  # a tuner piece this page uses is missing or changed
        st.warning(f"Not available in this installation: {exc}")


def layer_select(ctx: PageContext, label: str, key: str, *, upto: int | None = None) -> int:
    """A layer chooser returning the MoE-layer index (labels show model layer ids)."""
    labels = ctx.layer_labels[:upto] if upto is not None else ctx.layer_labels
    choice = st.selectbox(label, labels, key=key, help="MoE layers, named by model layer id")
    return labels.index(choice)
