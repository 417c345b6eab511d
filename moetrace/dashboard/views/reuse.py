"""Skew and reuse page: per-layer Gini and Lorenz curves, reuse-distance histograms and
miss-ratio curves (hit rate vs cache size) for LRU, LFU, Belady and each loaded plan."""

from __future__ import annotations

import numpy as np
import streamlit as st

from moetrace.dashboard import cache, charts
from moetrace.dashboard.context import PageContext, layer_select, run_page
from moetrace.dashboard.data.plans import expected_hit_rate
from moetrace.dashboard.data.reuse import REUSE_SAMPLE_TOKENS


def _token_bin(i: int, bins: int) -> str:
    if i == bins - 1:
        return f">={2**i}"
    return "1" if i == 0 else f"{2**i}-{2 ** (i + 1) - 1}"


def _skew(ctx: PageContext) -> None:
    from moetrace.dashboard.data.reuse import gini_per_layer, lorenz

    counts = cache.expert_counts(ctx.trace_path, ctx.stamp, ctx.phase)
    if counts.total == 0:
        st.warning(f"No activations in phase {ctx.phase!r}.")
        st.stop()
    g = gini_per_layer(counts.counts)
    labels = ctx.layer_labels
    st.altair_chart(
        charts.bar_chart(
            labels,
            np.nan_to_num(g).tolist(),
            title=f"Gini coefficient of expert use per layer (phase {ctx.phase})",
            x_title="MoE layer (model layer id)",
            y_title="Gini (0 = uniform, 1 = one expert)",
        ),
        width="stretch",
    )
    ranked = [labels[i] for i in np.argsort(-np.nan_to_num(g), kind="stable")]
    default = list(dict.fromkeys([ranked[0], ranked[-1]]))
    chosen = st.multiselect(
        "Layers for the Lorenz curves", labels, default=default, key="lorenz_layers"
    )
    curves = {lab: lorenz(counts.counts[labels.index(lab)]) for lab in chosen}
    if curves:
        st.altair_chart(
            charts.lorenz_chart(curves, title="Lorenz curves: how concentrated expert use is"),
            width="stretch",
        )


def _plan_points(ctx: PageContext, layer_index: int) -> list[dict[str, object]]:
    points: list[dict[str, object]] = []
    if not ctx.inputs.plans:
        return points
    for lp in cache.plans(ctx.inputs.plans, ctx.plan_mtimes(), ctx.trace_path, ctx.stamp):
        if lp.plan is None or lp.mismatch:
            continue
        rate = expected_hit_rate(lp.plan)
        if rate is None:
            continue
        caps = lp.plan.layout.capacities
        points.append({"name": f"plan {lp.name}", "size": caps[layer_index], "hit_rate": rate})
    return points


def _reuse(ctx: PageContext) -> None:
    st.subheader("Reuse and miss-ratio curves of one layer")
    li = layer_select(ctx, "Layer", "reuse_layer")
    lr = cache.layer_reuse(ctx.trace_path, ctx.stamp, li, ctx.phase)
    E = ctx.overview.num_experts
    cols = st.columns(4)
    cols[0].metric("Expert accesses", f"{lr.accesses:,}")
    cols[1].metric("Tokens", f"{lr.tokens:,}")
    cols[2].metric("First uses (cold misses)", f"{lr.cold:,}")
    half = max(1, E // 4)
    cols[3].metric(f"LRU hit rate at {half}/{E} experts", f"{100 * lr.lru[half - 1]:.1f}%")
    if lr.sampled:
        st.caption(
            f"A sample: {lr.requests_used:,} of {lr.requests_total:,} requests (drawn at "
            f"random, whole requests, replayed in arrival order; about {REUSE_SAMPLE_TOKENS:,} "
            "tokens). Expert counts, skew and Lorenz curves above use every request."
        )
    if lr.accesses == 0:
        st.warning("This layer has no accesses in the chosen phase.")
        return
    curves = {
        "LRU": (list(range(1, E + 1)), lr.lru.tolist()),
        "LFU": (list(lr.sizes), lr.lfu.tolist()),
        "Belady (optimal)": (list(lr.sizes), lr.belady.tolist()),
    }
    points = _plan_points(ctx, li)
    st.altair_chart(
        charts.mrc_chart(
            curves,
            points,
            title=f"Hit rate vs cache size, layer L{lr.layer} (phase {ctx.phase})",
            num_experts=E,
        ),
        width="stretch",
    )
    if points:
        st.caption(
            "Diamonds: each plan's slots at this layer and its expected hit rate "
            "(all layers, validation split, from the plan file)."
        )
    left, right = st.columns(2)
    nz = np.flatnonzero(lr.token_hist)
    last = int(nz[-1]) + 1 if nz.size else 1
    with left:
        st.altair_chart(
            charts.histogram(
                [_token_bin(i, len(lr.token_hist)) for i in range(last)],
                lr.token_hist[:last],
                title="Reuse distance in tokens",
                x_title="Tokens since the expert's last use (log2 bins)",
            ),
            width="stretch",
        )
    with right:
        nz = np.flatnonzero(lr.stack_hist)
        last = int(nz[-1]) + 1 if nz.size else 1
        st.altair_chart(
            charts.histogram(
                [str(d) for d in range(last)],
                lr.stack_hist[:last],
                title="Reuse distance in distinct experts (LRU stack distance)",
                x_title="Distinct other experts used since the last use",
            ),
            width="stretch",
        )


def render(ctx: PageContext) -> None:
    st.title("Skew and reuse")
    st.caption(
        "Caches are independent per MoE layer; requests replayed in arrival order; a "
        "token's k experts are k accesses (as in moetrace analyze)."
    )
    _skew(ctx)
    _reuse(ctx)


if __name__ == "__main__":
    run_page(render)
