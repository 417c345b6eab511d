"""Timeline page: the cache, lane by lane (one per MoE layer) over forward passes, as the
simulator replays a plan on a range of requests: hits, prefetch hits, misses, streamed
experts and wasted prefetches, with the stall on top; zoom and pan like a profiler. A
runtime statistics file with a recorded timeline adds the runtime's lanes."""

from __future__ import annotations

from typing import Any

import altair as alt
import pandas as pd
import streamlit as st

from moetrace.dashboard import cache, charts
from moetrace.dashboard.context import PageContext, run_page
from moetrace.dashboard.data import timeline as T
from moetrace.dashboard.data.common import reopen
from moetrace.dashboard.data.plans import path_mtime
from moetrace.errors import MoetraceError

# named policies offered besides the loaded plans (Belady: the offline optimum); comments,
# not docstrings, at module level here: Streamlit's magic would print them on the page
POLICIES = ("lru", "lfu", "arc", "wtinylfu", "belady")
COLOURS = {
    "hit": "#59a14f",
    "prefetch hit": "#4e79a7",
    "miss": "#e15759",
    "streamed": "#9c2b2e",
    "wasted prefetch": "#f28e2b",
}


@st.cache_data(show_spinner="Replaying the requests through the simulator...", max_entries=32)
def _replay(
    path: str,
    stamp: tuple[float, ...],
    request_ids: tuple[str, ...],
    plan_path: str | None,
    plan_mtime: float,
    policy: str | None,
    slots: int,
    first: int,
    count: int,
    hardware: str,
    warm: bool,
) -> T.RangeReplay:
    choice = T.PlanChoice(plan_path=plan_path, policy=policy, slots=slots)
    return T.replay_range(
        reopen(path), request_ids, choice, T.RangeChoice(first, count, hardware, warm)
    )


def timeline_chart(df: pd.DataFrame, lanes: list[str], *, title: str) -> alt.LayerChart:
    """Lanes (y: one per MoE layer, a sub-row per outcome) over passes (x), a stall strip
    on top; drag to pan, scroll to zoom the pass axis."""
    zoom = alt.selection_interval(bind="scales", encodings=["x"])
    y_lanes = [T.STALL_LANE, *lanes]
    x = alt.X(
        "x:Q",
        title="Forward pass (replay order, from the range's first request)",
        axis=alt.Axis(tickMinStep=1, format="d"),
    )
    y = alt.Y(
        "lane:N", title="MoE layer (model layer id)", sort=y_lanes, scale=alt.Scale(domain=y_lanes)
    )
    tooltip = [
        alt.Tooltip("request:N", title="Request"),
        alt.Tooltip("tokens:N", title="Token positions"),
        alt.Tooltip("lane:N", title="Layer"),
        alt.Tooltip("category:N", title="Outcome"),
        alt.Tooltip("count:Q", title="Count"),
        alt.Tooltip("experts:N", title="Experts"),
        alt.Tooltip("stall_ms:Q", title="Stall (ms)", format=".3f"),
    ]
    base = alt.Chart(df)
    cells = (
        base.transform_filter(alt.datum.lane != T.STALL_LANE)
        .mark_rect()
        .encode(
            x=x,
            x2="x2:Q",
            y=y,
            yOffset=alt.YOffset("category:N", sort=list(T.CATEGORIES)),
            color=alt.Color(
                "category:N",
                title="Outcome",
                scale=alt.Scale(domain=list(COLOURS), range=list(COLOURS.values())),
                legend=alt.Legend(orient="top"),
            ),
            tooltip=tooltip,
        )
        .add_params(zoom)
    )
    stall = (
        base.transform_filter(alt.datum.lane == T.STALL_LANE)
        .mark_rect()
        .encode(
            x=x,
            x2="x2:Q",
            y=y,
            color=alt.Color(
                "stall_ms:Q",
                title="Stall (ms)",
                scale=alt.Scale(scheme="greys", zero=True),
                legend=alt.Legend(orient="top"),
            ),
            tooltip=[tooltip[0], tooltip[1], tooltip[-1]],
        )
    )
    return (
        alt.layer(cells, stall)
        .resolve_scale(color="independent")
        .properties(title=title, height=_height(len(lanes)), padding=charts.PADDING)
    )


def _height(num_lanes: int) -> int:
    """Pixels for the lanes, the stall strip and the legends above them (Streamlit fits
    the whole chart, legends included, in this height)."""
    per_lane = 72 if num_lanes <= 8 else 40
    return 150 + per_lane * (num_lanes + 1)


def _plan_choice(ctx: PageContext) -> tuple[str | None, str | None, int, str]:
    """(plan path, policy, slots per layer, label) from the plan chooser."""
    options: dict[str, tuple[str | None, str | None]] = {}
    if ctx.inputs.plans:
        for lp in cache.plans(ctx.inputs.plans, ctx.plan_mtimes(), ctx.trace_path, ctx.stamp):
            if lp.plan is not None and not lp.mismatch:
                options[f"plan {lp.name}"] = (lp.path, None)
    for name in POLICIES:
        options[f"{name.upper()} (named policy)"] = (None, name)
    cols = st.columns([3, 2, 2])
    label = cols[0].selectbox(
        "Plan", list(options), key="timeline_plan", help="A loaded plan, or a named policy"
    )
    plan_path, policy = options[label]
    E = ctx.overview.num_experts
    slots = 0
    if policy is not None:
        slots = int(
            cols[1].number_input(
                "Slots per layer", 1, E, max(1, E // 4), key="timeline_slots",
                help="Cache slots of each MoE layer for the named policy",
            )
        )  # fmt: skip
    from moetrace.store.hardware import DEFAULT_PROFILE, list_profiles

    profiles = list_profiles()
    hardware = cols[2].selectbox(
        "Hardware", profiles, index=profiles.index(DEFAULT_PROFILE), key="timeline_hardware",
        help="Link bandwidth, latency and compute time of the timing model (stalls)",
    )  # fmt: skip
    return plan_path, policy, slots, str(hardware)


def _range(ctx: PageContext, request_ids: tuple[str, ...], passes: list[int]) -> tuple[int, int]:
    n = len(request_ids)
    L = len(ctx.overview.moe_layers)
    cols = st.columns([2, 2, 3])
    first = int(
        cols[0].number_input(
            "First request", 0, n - 1, 0, key="timeline_first",
            help="Index in arrival order (0 = the first request)",
        )
    )  # fmt: skip
    default = T.default_count(passes[first:], L)
    count = int(
        cols[1].number_input(
            "Requests", 1, n - first, min(default, n - first), key="timeline_count",
            help=f"How many requests from the first; beyond {T.MAX_CELLS:,} pass x layer "
            "cells the passes are binned",
        )
    )  # fmt: skip
    shown = request_ids[first : first + count]
    cols[2].caption(
        f"Requests {first}..{first + count - 1} of {n}: `{shown[0]}`"
        + (f" .. `{shown[-1]}`" if count > 1 else "")
    )
    return first, count


def _metrics(rr: T.RangeReplay) -> None:
    c = rr.timeline.counts()
    rate = rr.hit_rate()
    cols = st.columns(4)
    cols[0].metric("Hit rate (range)", "n/a" if rate is None else f"{100 * rate:.1f}%")
    cols[1].metric("Prefetch hits", f"{int(c['prefetch_served']):,}")
    cols[2].metric("Wasted prefetches", f"{int(c['prefetch_wasted']):,}")
    cols[3].metric("Stall (ms)", f"{1e3 * c['stall_s']:.2f}")


def _runtime(ctx: PageContext, rr: T.RangeReplay, layers: list[int], lanes: list[str]) -> None:
    from moetrace.tuner.sim.timeline import RecordedTimeline

    for ls in cache.runtime_stats(ctx.inputs.stats, ctx.stats_mtimes()):
        data: dict[str, Any] = dict(ls.data or {})
        if ls.error or not isinstance(data.get("timeline"), dict):
            continue
        st.subheader(f"Runtime: {ls.name}")
        try:
            rec = RecordedTimeline.from_json(data["timeline"])
        except MoetraceError as exc:
            st.error(f"{ls.path}: {exc}")
            continue
        m = T.match_runtime(rr, rec, rr.event_offset)
        if m.lanes is None:
            st.info(
                f"No runtime lanes for this range: {m.note}. The runtime's events align with "
                "the trace's by replay order: start the range at the first request, or tick "
                "'Replay from the first request'."
            )
            continue
        sim_part = T.sim_lanes(rr, m.events)
        sim_rate, rt_rate = T.hit_rate(sim_part), T.hit_rate(m.lanes)
        fmt = lambda r: "n/a" if r is None else f"{100 * r:.1f}%"  # noqa: E731
        st.markdown(
            f"**Agreement:** hit rate simulator {fmt(sim_rate)} vs runtime {fmt(rt_rate)} over "
            f"the {m.events:,} events the runtime recorded in this range "
            f"(routing identical in {m.routing_agrees:,} of them)."
        )
        if m.routing_agrees < m.events:
            st.warning(
                "The runtime's experts differ from the trace's in some events: the statistics "
                "may come from another run than this trace's."
            )
        df = T.lane_rows(m.lanes, rr, layers, ctx.phase)
        st.altair_chart(
            timeline_chart(
                df, lanes, title=f"Cache timeline as the runtime recorded it ({ls.name})"
            ),
            width="stretch",
        )


def render(ctx: PageContext) -> None:
    st.title("Timeline")
    st.caption(
        "What the cache did, layer by layer over forward passes, as the simulator replays the "
        "plan on the chosen requests: each lane has a row per outcome. Wasted prefetches are "
        "drawn at the event that evicted them. The grey strip on top is the stall of each pass "
        "(summed over the shown layers). Drag to pan, scroll to zoom."
    )
    table = cache.request_table(ctx.trace_path, ctx.stamp)
    request_ids = tuple(str(r["request_id"]) for r in table)
    passes = [
        (1 if (r.get("prompt_tokens") or 0) else 0) + int(r.get("generated_tokens") or 0)
        for r in table
    ]
    plan_path, policy, slots, hardware = _plan_choice(ctx)
    first, count = _range(ctx, request_ids, passes)
    labels = ctx.layer_labels
    cols = st.columns([5, 2])
    chosen = cols[0].multiselect("Layers", labels, default=labels, key="timeline_layers")
    warm = cols[1].checkbox(
        "Replay from the first request", key="timeline_warm",
        help="Replay the earlier requests too, so the cache is warm when the range starts",
    )  # fmt: skip
    if not chosen:
        st.info("Choose at least one layer.")
        return
    layers = [labels.index(c) for c in chosen]
    try:
        rr = _replay(
            ctx.trace_path, ctx.stamp, request_ids, plan_path,
            path_mtime(plan_path) if plan_path else 0.0, policy, slots, first, count, hardware,
            warm,
        )  # fmt: skip
    except MoetraceError as exc:
        st.error(f"Cannot replay this plan: {exc}. Choose another plan or a named policy.")
        return
    _metrics(rr)
    size = T.bin_size(rr, len(layers))
    if size > 1:
        st.caption(f"{rr.num_passes:,} passes: each cell bins {size} passes.")
    df = T.lane_rows(T.sim_lanes(rr), rr, layers, ctx.phase)
    st.altair_chart(
        timeline_chart(
            df, chosen, title=f"Cache timeline: {rr.label}, {hardware} (phase {ctx.phase})"
        ),
        width="stretch",
    )
    if ctx.inputs.stats:
        _runtime(ctx, rr, layers, chosen)


if __name__ == "__main__":
    run_page(render)
