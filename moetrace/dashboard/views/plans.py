"""Plans page: what each plan pins per layer (over the activation heatmap), its cache
layout, prefetcher and expected metrics; two plans or two traces side by side; runtime
statistics files."""

from __future__ import annotations

from typing import Any

import altair as alt
import pandas as pd
import streamlit as st

from moetrace.dashboard import cache, charts
from moetrace.dashboard.context import PageContext, run_page, trace_label
from moetrace.dashboard.data.common import stamp
from moetrace.dashboard.data.plans import (
    LoadedPlan,
    expected_rows,
    flatten,
    pinned_mask,
    plan_facts,
    stats_per_layer,
)
from moetrace.errors import MoetraceError


def _one_plan(ctx: PageContext, lp: LoadedPlan) -> None:
    plan = lp.plan
    st.subheader(f"Plan {lp.name}")
    st.caption(f"`{lp.path}`")
    if lp.mismatch:
        st.error(f"This plan is not for the selected trace's model: {lp.mismatch}")
        return
    facts = plan_facts(plan)
    cols = st.columns(4)
    cols[0].metric("Budget", f"{plan.budget.slots} slots")
    cols[1].metric("Pinned experts", plan.num_pinned)
    cols[2].metric("Eviction policy", plan.eviction.policy)
    rate = facts["expected hit rate"]
    cols[3].metric("Expected hit rate", "n/a" if rate is None else f"{100 * rate:.1f}%")
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
    left, right = st.columns(2)
    with left:
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
    with right:
        st.markdown("**Cache layout and prefetcher**")
        st.dataframe(
            pd.DataFrame({"value": [str(v) for v in facts.values()]}, index=list(facts)),
            width="stretch",
        )
    _expected(plan)


def _expected(plan: Any) -> None:
    """What the plan buys: its validation run next to the baselines', and other facts."""
    st.markdown("**Expected metrics** (simulated on the validation split, from the plan file)")
    rows = expected_rows(plan)
    other = flatten({k: v for k, v in dict(plan.expected).items() if k != "rows"})
    if rows:
        df = pd.DataFrame(rows).set_index("name")
        st.dataframe(df, width="stretch")
        if "hit_rate" in df:
            hit = df["hit_rate"].astype(float).fillna(0.0)
            st.altair_chart(
                charts.bar_chart(
                    list(hit.index),
                    list(100 * hit.values),
                    title="Hit rate: the plan vs the baselines (validation split)",
                    x_title="Run",
                    y_title="Hit rate (% of expert accesses)",
                    fmt=".1f",
                    horizontal=True,
                ),
                width="stretch",
            )
    if other:
        st.dataframe(
            pd.DataFrame({"metric": list(other), "value": [str(v) for v in other.values()]}),
            hide_index=True,
            width="stretch",
        )
    if not rows and not other:
        st.info("The plan records no expected metrics.")


def _comparable(plan: Any) -> dict[str, Any]:
    """Headline facts plus the expected facts other than the per-run rows."""
    extra = {k: v for k, v in dict(plan.expected).items() if k != "rows"}
    return {**plan_facts(plan), **{f"expected {k}": v for k, v in flatten(extra).items()}}


def _compare_plans(loaded: list[LoadedPlan]) -> None:
    st.subheader("Compare two plans")
    names = [lp.name for lp in loaded]
    cols = st.columns(2)
    a = cols[0].selectbox("Plan A", names, index=0, key="cmp_a")
    b = cols[1].selectbox("Plan B", names, index=min(1, len(names) - 1), key="cmp_b")
    pa_, pb_ = loaded[names.index(a)].plan, loaded[names.index(b)].plan
    rows, rows_b = _comparable(pa_), _comparable(pb_)
    keys = list(dict.fromkeys([*rows, *rows_b]))
    st.dataframe(
        pd.DataFrame(
            {
                f"A: {a}": [str(rows.get(k, "")) for k in keys],
                f"B: {b}": [str(rows_b.get(k, "")) for k in keys],
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


def _runtime_stats(ctx: PageContext) -> None:
    st.subheader("Runtime statistics")
    for ls in cache.runtime_stats(ctx.inputs.stats, ctx.stats_mtimes()):
        if ls.error:
            st.error(ls.error)
            continue
        st.markdown(f"**{ls.name}** — `{ls.path}`")
        data = dict(ls.data or {})
        scalars = flatten({k: v for k, v in data.items() if k != "per_layer"})
        st.dataframe(
            pd.DataFrame({"metric": list(scalars), "value": [str(v) for v in scalars.values()]}),
            hide_index=True,
            width="stretch",
        )
        rows = stats_per_layer(data)
        if rows:
            df = pd.DataFrame(rows)
            df["layer"] = [f"L{x}" for x in df["layer"]]
            chart = (
                alt.Chart(df)
                .mark_bar()
                .encode(
                    x=alt.X(
                        "layer:O", title="MoE layer (model layer id)", axis=alt.Axis(labelAngle=0)
                    ),
                    xOffset="phase:N",
                    y=alt.Y(
                        "hit_rate:Q",
                        title="Hit rate (fraction of accesses)",
                        scale=alt.Scale(domain=[0, 1]),
                    ),
                    color=alt.Color("phase:N", title="Phase"),
                    tooltip=[
                        "layer:O",
                        "phase:N",
                        alt.Tooltip("hit_rate:Q", format=".3f"),
                        "accesses:Q",
                    ],
                )
                .properties(
                    title=f"Measured hit rate per layer ({ls.name})",
                    height=340,
                    padding=charts.PADDING,
                )
            )
            st.altair_chart(chart, width="stretch")


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
        if good:
            names = [lp.name for lp in good]
            choice = st.selectbox("Plan", names, key="plan_choice")
            _one_plan(ctx, good[names.index(choice)])
            ok = [lp for lp in good if not lp.mismatch]
            if len(ok) >= 2:
                _compare_plans(ok)
    if len(ctx.inputs.traces) >= 2:
        _compare_traces(ctx)
    if ctx.inputs.stats:
        _runtime_stats(ctx)


if __name__ == "__main__":
    run_page(render)
