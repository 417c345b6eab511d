"""Groups page: co-activation matrix of a chosen layer with its strongest groups, and
cross-layer transitions (heatmap of P(next | current)) with their predictive power."""

from __future__ import annotations

import numpy as np
import pandas as pd
import streamlit as st

from moetrace.dashboard import cache, charts
from moetrace.dashboard.context import PageContext, layer_select, run_page

# Rows of the transition table from source experts picked by fewer tokens are greyed.
# (A comment, not a docstring: Streamlit's "magic" prints module-level strings of pages.)
MIN_TRANSITION_TOKENS = 20


def _coactivation(ctx: PageContext) -> None:
    st.subheader("Co-activation within a layer")
    if ctx.overview.top_k < 2:
        st.info(
            f"Top-{ctx.overview.top_k} routing: a token picks one expert per layer, so no "
            "two experts are ever activated together."
        )
        return
    li = layer_select(ctx, "Layer", "groups_layer")
    co = cache.coactivation(ctx.trace_path, ctx.stamp, li, ctx.phase)
    measure = st.radio(
        "Colour by",
        ("tokens picking both", "lift over independence"),
        horizontal=True,
        key="groups_measure",
    )
    lift = not measure.startswith("tokens")
    if not lift:
        values, title, fmt = co.pairs.astype(np.float64), "Tokens picking both (count)", ",.0f"
    else:
        values, title, fmt = np.nan_to_num(co.lift), "Lift (1 = independent)", ".2f"
    st.altair_chart(
        charts.square_heatmap(
            values,
            title=f"Co-activation of expert pairs, layer L{co.layer} (phase {ctx.phase})",
            x_title="Expert id",
            y_title="Expert id",
            value_title=title,
            fmt=fmt,
            support=co.pairs,
            support_title="Tokens picking both",
            min_support=co.min_support if lift else 0,
            log2_diverging=lift,
        ),
        width="stretch",
    )
    if lift:
        st.caption(
            f"Lift on a log2 scale around 1 (red: together more often than chance, blue: "
            f"less); pairs picked together fewer than {co.min_support} times (the strongest "
            "pairs' support threshold) are grey."
        )
    left, right = st.columns(2)
    with left:
        st.markdown(f"**Strongest pairs** (seen at least {co.min_support} times)")
        st.dataframe(
            pd.DataFrame(
                [
                    {"experts": f"{p.a} + {p.b}", "tokens": p.count, "lift": round(p.lift, 2)}
                    for p in co.top
                ]
            ),
            hide_index=True,
            width="stretch",
        )
    with right:
        st.markdown("**Groups** (greedy, lift >= 1.5)")
        if co.groups:
            st.dataframe(
                pd.DataFrame(
                    [
                        {
                            "experts": ", ".join(map(str, g.experts)),
                            "mean lift": round(g.mean_lift, 2),
                            "min pair tokens": g.min_pair_count,
                        }
                        for g in co.groups
                    ]
                ),
                hide_index=True,
                width="stretch",
            )
        else:
            st.info("No group: no pair is picked together clearly more often than by chance.")


def _transitions(ctx: PageContext) -> None:
    st.subheader("Transitions to the next MoE layer")
    L = len(ctx.overview.moe_layers)
    if L < 2:
        st.info("The model has one MoE layer: there are no layer-to-layer transitions.")
        return
    li = layer_select(ctx, "From layer", "transition_layer", upto=L - 1)
    tr = cache.transitions(ctx.trace_path, ctx.stamp, li, ctx.phase)
    k = ctx.overview.top_k
    cols = st.columns(3)
    cols[0].metric(
        f"Recall@{k} of the transition table",
        "n/a" if tr.recall is None else f"{100 * tr.recall:.1f}%",
        None if tr.recall is None else f"{100 * (tr.recall - tr.baseline):+.1f} pts vs baseline",
    )
    cols[1].metric(
        f"Recall@{k} of the {k} most used experts",
        "n/a" if tr.baseline is None else f"{100 * tr.baseline:.1f}%",
    )
    cols[2].metric("Held-out tokens scored", f"{tr.test_tokens:,}")
    row_tokens = tr.counts.sum(axis=1) // max(k, 1)  # tokens that picked each source expert
    support = np.repeat(row_tokens[:, None], tr.counts.shape[1], axis=1)
    st.altair_chart(
        charts.square_heatmap(
            100 * tr.conditional,
            title=f"P(expert at L{tr.dst} | expert at L{tr.src}), same token",
            x_title=f"Expert id at layer L{tr.dst}",
            y_title=f"Expert id at layer L{tr.src}",
            value_title="Probability (%)",
            fmt=".1f",
            support=support,
            support_title=f"Tokens with this expert at L{tr.src}",
            min_support=MIN_TRANSITION_TOKENS,
        ),
        width="stretch",
    )
    rare = int(((row_tokens > 0) & (row_tokens < MIN_TRANSITION_TOKENS)).sum())
    if rare:
        st.caption(
            f"{rare} source expert(s) picked by fewer than {MIN_TRANSITION_TOKENS} tokens are "
            "grey: their rows would show 100% from a single token."
        )
    st.caption(
        "Predictive power: the table is fitted on 80% of the requests; for held-out tokens the "
        f"next layer's {k} experts are predicted from the current ones (recall = share of the "
        "actual next experts predicted), against always predicting the most used experts."
    )


def _all_pairs(ctx: PageContext) -> None:
    from moetrace.dashboard.data.overview import VERDICT_AUTO_ROWS

    k = ctx.overview.top_k
    st.markdown("**Predictive power of every layer pair**")
    if ctx.overview.activations > VERDICT_AUTO_ROWS and not st.button(
        f"Score every layer pair (loads all {ctx.overview.activations:,} rows' experts)"
    ):
        return
    sc = cache.transition_scores(ctx.trace_path, ctx.stamp, ctx.phase)
    if not sc.src:
        st.info("No held-out tokens to score (too few requests or tokens in this phase).")
        return
    labels = [f"L{a}→L{b}" for a, b in zip(sc.src, sc.dst, strict=True)]
    st.altair_chart(
        charts.paired_bars(
            labels,
            {
                "transition table": [100 * x for x in sc.recall],
                f"{k} most used experts": [100 * x for x in sc.baseline],
            },
            title=f"Recall@{k} of the next layer's experts on held-out requests",
            x_title="Layer pair (from → to)",
            y_title=f"Recall@{k} (% of next-layer experts)",
        ),
        width="stretch",
    )


def render(ctx: PageContext) -> None:
    st.title("Groups")
    _coactivation(ctx)
    _transitions(ctx)
    if len(ctx.overview.moe_layers) >= 2:
        _all_pairs(ctx)


if __name__ == "__main__":
    run_page(render)
