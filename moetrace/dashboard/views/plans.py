"""Plans page: is each plan better than LRU, by how much, and where? Every plan against
every baseline on hit rate, stall per token and tokens/s (each validation split side by
side), plan minus LRU per layer and phase, pin coverage per layer; then one plan's pins
and layout, two plans or two traces side by side, and runtime statistics files."""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
import streamlit as st

from moetrace.dashboard import cache, charts, plancharts
from moetrace.dashboard import numbers as N
from moetrace.dashboard.context import PageContext, run_page, trace_label
from moetrace.dashboard.data.common import stamp
from moetrace.dashboard.data.plan_layers import PlanLayers
from moetrace.dashboard.data.plans import (
    LRU_ROW,
    PLAN_ROW,
    LoadedPlan,
    SplitRuns,
    expected_splits,
    flatten,
    pin_coverage,
    pinned_mask,
    plan_facts,
)
from moetrace.dashboard.views.layer_curves import replay_allowed, sample_text, simulated_layers
from moetrace.dashboard.views.plan_schedule import render_schedule
from moetrace.dashboard.views.plan_stats import runtime_stats
from moetrace.dashboard.views.plan_tiers import render_ram_tier, render_sizing
from moetrace.errors import MoetraceError

THIS_PLAN = "plan (this file)"
METRICS = (
    # key, chart title, axis title, axis format, scale to shown unit, formatter, zoom
    ("hit_rate", "Hit rate", "Hit rate (% of expert accesses)", ".1f", 100.0, N.pct, True),
    ("stall_per_token_ms", "Stall per token", "Stall per token (ms)", ".3~f", 1.0, N.ms, True),
    ("tokens_per_s", "Tokens per second", "Tokens per second (simulated)", ",.0f", 1.0,
     N.per_s, True),
)  # fmt: skip


def _run_name(row: dict[str, Any]) -> str:
    return THIS_PLAN if row["name"] == PLAN_ROW else str(row["name"])


def _delta(key: str, row: dict[str, Any], lru: dict[str, Any] | None) -> str:
    v, base = row.get(key), (lru or {}).get(key)
    if not isinstance(v, (int, float)) or not isinstance(base, (int, float)):
        return N.MISSING
    if key == "hit_rate":
        return N.points(v - base)
    return N.ratio(v / base) if base else N.MISSING


def _runs_frame(plans: list[tuple[str, list[SplitRuns]]], key: str, scale: float, fmt: Any):
    rows = []
    for name, splits in plans:
        for sp in splits:
            lru = sp.row(LRU_ROW)
            for r in sp.rows:
                v = r.get(key)
                if isinstance(v, (int, float)) and not isinstance(v, bool):
                    rows.append(
                        {"plan": name, "split": sp.name, "run": _run_name(r),
                         "value": scale * float(v), "text": fmt(v),
                         "delta": _delta(key, r, lru)}
                    )  # fmt: skip
    return pd.DataFrame(rows)


def _headline(name: str, sp: SplitRuns) -> None:
    """One metrics row: the plan's figures on the first split, with the change vs LRU."""
    own, lru = sp.plan_row, sp.row(LRU_ROW)
    cols = st.columns(4)
    cols[0].markdown(f"**{name}**  \nsplit `{sp.name}`")
    for col, (key, label, *_rest) in zip(cols[1:], METRICS, strict=True):
        fmt = _rest[-2]
        value = None if own is None else own.get(key)
        delta = None if own is None else _delta(key, own, lru)
        col.metric(
            label,
            fmt(value),
            None if delta in (None, N.MISSING) else f"{delta} vs LRU",
            delta_color="inverse" if key == "stall_per_token_ms" else "normal",
        )


def _at_a_glance(ctx: PageContext, good: list[LoadedPlan]) -> None:
    st.subheader("Plans against the baselines")
    plans = [(lp.name, expected_splits(lp.plan)) for lp in good]
    for name, splits in plans:
        if not splits:
            st.info(f"{name}: the plan file records no expected metrics.")
            continue
        for note in dict.fromkeys(sp.note for sp in splits if sp.note):
            st.warning(f"{name}: {note}")
        _headline(name, splits[0])
    plans = [(n, s) for n, s in plans if s]
    if not plans:
        return
    runs = list(
        dict.fromkeys(_run_name(r) for _, splits in plans for sp in splits for r in sp.rows)
    )
    for key, label, axis, fmt, scale, formatter, zoom in METRICS:
        df = _runs_frame(plans, key, scale, formatter)
        if df.empty:
            continue
        shown = [r for r in runs if r in set(df["run"])]
        st.altair_chart(
            plancharts.runs_chart(
                df,
                title=f"{label}: each plan vs the baselines, per validation split",
                value_title=axis,
                fmt=fmt,
                runs=shown,
                zoom=zoom,
            ),
            width="stretch",
        )
    st.caption(
        "From each plan file's `expected` section (moetrace tune's validation runs: the "
        "plan and the baselines replayed on held-out requests; one column per split). "
        "Axes are zoomed to the values shown; hover a point for its change vs LRU."
    )
    _per_layer(ctx, good)


def _delta_rows(name: str, pl: PlanLayers, labels: list[str]) -> list[dict[str, Any]]:
    rows = []
    for ph in ("prefill", "decode"):
        c = pl.column(ph)
        for i, lab in enumerate(labels):
            p, b = float(pl.plan[i, c]), float(pl.lru[i, c])
            if not (np.isnan(p) or np.isnan(b)):
                rows.append(
                    {"layer": lab, "plan": name, "phase": ph, "value": 100 * (p - b),
                     "text": f"{N.points(p - b)} (plan {N.pct(p)}, LRU {N.pct(b)})"}
                )  # fmt: skip
    return rows


def _pin_rows(ctx: PageContext, lp: LoadedPlan) -> list[dict[str, Any]]:
    rows = []
    for ph in ("prefill", "decode"):
        cov = pin_coverage(lp.plan, cache.expert_counts(ctx.trace_path, ctx.stamp, ph).counts)
        rows += [
            {"layer": lab, "series": lp.name, "phase": ph, "value": 100 * float(v),
             "text": N.pct(v)}
            for lab, v in zip(ctx.layer_labels, cov, strict=True) if not np.isnan(v)
        ]  # fmt: skip
    return rows


def _per_layer(ctx: PageContext, good: list[LoadedPlan]) -> None:
    labels = ctx.layer_labels
    rows: list[dict[str, Any]] = []
    pins: list[dict[str, Any]] = []
    sample = ""
    replay = replay_allowed(ctx, good, "all")
    for lp in good:
        pl = simulated_layers(ctx, lp, "all") if replay else None
        if pl is not None:
            rows += _delta_rows(lp.name, pl, labels)
            sample = sample_text(pl.requests_used, pl.requests_total)
        if lp.plan.num_pinned:
            pins += _pin_rows(ctx, lp)
    if rows:
        st.altair_chart(
            plancharts.layer_bars(
                pd.DataFrame(rows),
                title="Per layer: plan hit rate minus LRU's with the same slots (above 0: "
                "the plan wins)",
                y_title="Plan - LRU hit rate (% points)",
                fmt="+.1f",
                layers=labels,
            ),
            width="stretch",
        )
        st.caption(
            f"Simulated on {sample} of this trace (each token its own pass; "
            "may include requests the plan was tuned on)."
        )
    if pins:
        st.altair_chart(
            plancharts.layer_lines(
                pd.DataFrame(pins),
                title="Pin coverage: share of each layer's activations served by pinned experts",
                y_title="Activations on pinned experts (% of the layer's)",
                fmt=".0f",
                layers=labels,
                color_title="Plan file",
            ),
            width="stretch",
        )


def _one_plan(ctx: PageContext, lp: LoadedPlan) -> None:
    plan = lp.plan
    st.subheader(f"Plan {lp.name}")
    st.caption(f"`{lp.path}`")
    if lp.mismatch:
        st.error(f"This plan is not for the selected trace's model: {lp.mismatch}")
        return
    facts = plan_facts(plan)
    cols = st.columns(5)
    cols[0].metric("Budget", f"{plan.budget.slots} slots")
    cols[1].metric("Pinned experts", plan.num_pinned)
    cols[2].metric("Eviction policy", plan.eviction.policy)
    cols[3].metric("Prefetcher", plan.prefetch.name)
    cols[4].metric("Expected hit rate", facts["expected hit rate"])
    counts = cache.expert_counts(ctx.trace_path, ctx.stamp, ctx.phase)
    st.altair_chart(
        charts.layer_expert_heatmap(
            counts.share,
            counts.moe_layers,
            title=f"Pinned experts of {lp.name} (red squares) over the activation share (phase {ctx.phase})",
            value_title="Share of layer's activations (%)",
            pinned=pinned_mask(plan) if plan.num_pinned else None,
        ),
        width="stretch",
    )
    title = (
        "Guaranteed slots per layer (shared pool)"
        if plan.layout.kind == "pool"
        else "Cache slots per layer"
    )
    st.altair_chart(
        charts.bar_chart(
            ctx.layer_labels,
            list(plan.layout.capacities),
            title=title,
            x_title="MoE layer (model layer id)",
            y_title="Expert slots (count)",
            fmt=",",
        ),
        width="stretch",
    )
    render_schedule(plan)
    render_ram_tier(plan)
    render_sizing(plan, lp.name)
    with st.expander("Cache layout, prefetcher and expected metrics (table)"):
        st.dataframe(pd.DataFrame({"value": list(facts.values())}, index=list(facts)))
        other = flatten(
            {
                k: v
                for k, v in dict(plan.expected).items()
                if k not in ("rows", "splits", "schedule", "placement", "sizing")
            }  # fmt: skip
        )
        if other:
            st.dataframe(
                pd.DataFrame({"value": [N.plain(v) for v in other.values()]}, index=list(other))
            )


def _compare_plans(loaded: list[LoadedPlan]) -> None:
    st.subheader("Compare two plans")
    names = [lp.name for lp in loaded]
    cols = st.columns(2)
    a = cols[0].selectbox("Plan A", names, index=0, key="cmp_a")
    b = cols[1].selectbox("Plan B", names, index=min(1, len(names) - 1), key="cmp_b")
    rows, rows_b = (plan_facts(loaded[names.index(x)].plan) for x in (a, b))
    keys = list(dict.fromkeys([*rows, *rows_b]))
    st.dataframe(
        pd.DataFrame(
            {
                f"A: {a}": [rows.get(k, N.MISSING) for k in keys],
                f"B: {b}": [rows_b.get(k, N.MISSING) for k in keys],
            },
            index=keys,
        ),
        width="stretch",
    )


def _compare_traces(ctx: PageContext) -> None:
    st.subheader("Compare two traces")
    traces = list(ctx.inputs.traces)
    cols = st.columns(2)
    a = cols[0].selectbox("Trace A", traces, index=0, format_func=trace_label, key="cmp_trace_a")
    b = cols[1].selectbox("Trace B", traces, index=1, format_func=trace_label, key="cmp_trace_b")
    try:
        ca = cache.expert_counts(a, stamp(a), ctx.phase)
        cb = cache.expert_counts(b, stamp(b), ctx.phase)
    except MoetraceError as exc:
        st.error(str(exc))
        return
    if ca.counts.shape != cb.counts.shape or ca.moe_layers != cb.moe_layers:
        st.warning(
            f"The traces have different routing shapes ({ca.counts.shape} vs {cb.counts.shape}); "
            "their expert shares cannot be compared cell by cell."
        )
        return
    st.altair_chart(
        charts.layer_expert_heatmap(
            ca.share - cb.share,
            ca.moe_layers,
            title=f"Activation share difference, A minus B (phase {ctx.phase})",
            value_title="Share A - share B (% points)",
            diverging=True,
        ),
        width="stretch",
    )


def render(ctx: PageContext) -> None:
    st.title("Plans")
    if not ctx.inputs.plans:
        st.info(
            "No plans loaded. Start the dashboard with `--plan PLAN.json` to see what a plan pins."
        )
    else:
        loaded = cache.plans(ctx.inputs.plans, ctx.plan_mtimes(), ctx.trace_path, ctx.stamp)
        for lp in loaded:
            if lp.error:
                st.error(f"Cannot load plan: {lp.error}")
        good = [lp for lp in loaded if lp.plan is not None]
        ok = [lp for lp in good if not lp.mismatch]
        if ok:
            _at_a_glance(ctx, ok)
        if good:
            names = [lp.name for lp in good]
            choice = st.selectbox("Plan", names, key="plan_choice")
            _one_plan(ctx, good[names.index(choice)])
            if len(ok) >= 2:
                _compare_plans(ok)
    if len(ctx.inputs.traces) >= 2:
        _compare_traces(ctx)
    if ctx.inputs.stats:
        runtime_stats(ctx)


if __name__ == "__main__":
    run_page(render)
