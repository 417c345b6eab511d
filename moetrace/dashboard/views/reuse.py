"""Skew and reuse page: per-layer Gini and Lorenz curves, reuse-distance histograms and
miss-ratio curves (hit rate vs cache size) for LRU, LFU, Belady and each loaded plan."""

from __future__ import annotations

import numpy as np
import streamlit as st

from moetrace.dashboard import cache, charts
from moetrace.dashboard.context import PageContext, layer_select, run_page
from moetrace.dashboard.data.plan_layers import PlanLayers
from moetrace.dashboard.data.reuse import REUSE_SAMPLE_TOKENS
from moetrace.dashboard.views.layer_curves import (
    all_layers,
    replay_allowed,
    sample_text,
    simulated_layers,
)


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


def _plan_layers(ctx: PageContext) -> list[tuple[str, list[int], PlanLayers]]:
    """(name, slots per layer, per-layer hit rates in the chosen phase) of each plan for
    this trace's model."""
    out: list[tuple[str, list[int], PlanLayers]] = []
    if not ctx.inputs.plans:
        return out
    loaded = cache.plans(ctx.inputs.plans, ctx.plan_mtimes(), ctx.trace_path, ctx.stamp)
    good = [lp for lp in loaded if lp.plan is not None and not lp.mismatch]
    if not replay_allowed(ctx, good, ctx.phase):
        return out
    for lp in good:
        pl = simulated_layers(ctx, lp, ctx.phase)
        if pl is not None:
            out.append((lp.name, list(lp.plan.layout.capacities), pl))
    return out


def _plan_points(
    plans: list[tuple[str, list[int], PlanLayers]], layer_index: int, phase: str
) -> list[dict[str, object]]:
    """Each plan at its slots in this layer and its hit rate AT this layer and phase
    (no point where the layer has no accesses)."""
    points: list[dict[str, object]] = []
    for name, caps, pl in plans:
        rate = float(pl.plan[layer_index, pl.column(phase)])
        if not np.isnan(rate):
            points.append({"name": f"plan {name}", "size": caps[layer_index], "hit_rate": rate})
    return points


def _reuse(ctx: PageContext, plans: list[tuple[str, list[int], PlanLayers]]) -> None:
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
    points = _plan_points(plans, li, ctx.phase)
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
            f"Diamonds: each plan at its slots in L{lr.layer}, with its hit rate in this "
            f"layer and phase, simulated (the plan's pins, eviction and prefetch) on "
            f"{sample_text(plans[0][2].requests_used, plans[0][2].requests_total)}, "
            "each token its own pass."
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
    plans = _plan_layers(ctx)
    _reuse(ctx, plans)
    all_layers(ctx, plans)


if __name__ == "__main__":
    run_page(render)
