"""Experts page: layer x expert heatmap of activation share, by phase and request tag."""

from __future__ import annotations

import numpy as np
import pandas as pd
import streamlit as st

from moetrace.dashboard import cache, charts
from moetrace.dashboard.context import PageContext, run_page

ALL = "all requests"


def render(ctx: PageContext) -> None:
    st.title("Experts")
    st.caption(
        "Share of each MoE layer's expert activations that went to each expert "
        f"(every row sums to 100%; uniform routing would give {100 / ctx.overview.num_experts:.2f}%)."
    )
    tags = cache.tag_values(ctx.trace_path, ctx.stamp)
    options = [ALL] + [f"{k}={v}" for k, vals in tags.items() for v in vals]
    choice = st.selectbox(
        "Request tag", options, key="experts_tag", help="Only requests carrying this tag"
    )
    scale = st.radio(
        "Colour scale",
        ("clipped", "linear", "log"),
        horizontal=True,
        key="experts_scale",
        help="Clipped (default) saturates at the 99th percentile of the cells and log keeps "
        "the other experts visible when one expert takes most of a layer; linear spans "
        "0 to the largest cell",
    )
    tag = None if choice == ALL else tuple(choice.split("=", 1))
    counts = cache.expert_counts(ctx.trace_path, ctx.stamp, ctx.phase, tag)  # type: ignore[arg-type]
    who = "all requests" if tag is None else f"requests with {choice}"
    st.metric("Expert activations shown", f"{counts.total:,}")
    if counts.total == 0:
        st.warning(f"No activations in phase {ctx.phase!r} for {who}.")
        return
    st.altair_chart(
        charts.layer_expert_heatmap(
            counts.share,
            counts.moe_layers,
            title=f"Activation share per layer: phase {ctx.phase}, {who}",
            value_title="Share of layer's activations (%)",
            log_scale=scale == "log",
            clip=scale == "clipped",
        ),
        width="stretch",
    )
    if scale == "clipped":
        note = charts.clipped_note(100 * counts.share, charts.robust_max(100 * counts.share), "%")
        if note:
            st.caption(note)
    st.subheader("Hottest experts per layer")
    share = counts.share
    top = min(5, share.shape[1])
    order = np.argsort(-share, axis=1, kind="stable")[:, :top]
    st.dataframe(
        pd.DataFrame(
            {
                "layer": ctx.layer_labels,
                **{
                    f"#{j + 1} expert (share %)": [
                        f"{order[i, j]} ({100 * share[i, order[i, j]]:.1f}%)"
                        for i in range(share.shape[0])
                    ]
                    for j in range(top)
                },
                "top-5 share (%)": np.round(
                    100 * np.take_along_axis(share, order, axis=1).sum(axis=1), 1
                ),
            }
        ),
        hide_index=True,
        width="stretch",
    )


if __name__ == "__main__":
    run_page(render, counts_ok=True)
