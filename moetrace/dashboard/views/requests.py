"""Requests page: one request's activation matrix and token-by-token routing, and all
requests in a 2-D PCA projection of their activation matrices, coloured by tag or cluster."""

from __future__ import annotations

import pandas as pd
import streamlit as st

from moetrace.dashboard import cache, charts
from moetrace.dashboard.context import PageContext, layer_select, run_page
from moetrace.dashboard.data.requests import colour_tags
from moetrace.dashboard.tiles import text_tile
from moetrace.errors import MoetraceError


def _one_request(ctx: PageContext, table: list[dict[str, object]]) -> None:
    st.subheader("One request")
    ids = [str(r["request_id"]) for r in table]
    rid = st.selectbox("Request", ids, key="request_id")
    row = table[ids.index(rid)]
    cols = st.columns(3)
    cols[0].metric("Prompt tokens", f"{row['prompt_tokens']:,}")
    cols[1].metric("Generated tokens", f"{row['generated_tokens']:,}")
    tags = row["tags"] or {}
    text_tile(cols[2], "Tags", ", ".join(f"{k}={v}" for k, v in tags.items()) or "none")  # type: ignore[union-attr]
    mat = cache.request_matrix(ctx.trace_path, ctx.stamp, rid)
    st.altair_chart(
        charts.layer_expert_heatmap(
            mat.astype(float),
            ctx.overview.moe_layers,
            title=f"Activation matrix of request {rid} (all phases)",
            value_title="Tokens routed (count)",
            percent=False,
        ),
        width="stretch",
    )
    li = layer_select(ctx, "Layer for token-by-token routing", "request_layer")
    rows = cache.token_routing(ctx.trace_path, ctx.stamp, rid, li)
    if not rows:
        st.info("This request has no tokens at this layer.")
        return
    st.altair_chart(
        charts.token_routing_chart(
            rows,
            title=f"Token-by-token routing of {rid} at layer {ctx.layer_labels[li]}",
            num_experts=ctx.overview.num_experts,
        ),
        width="stretch",
    )
    from moetrace.dashboard.data.requests import MAX_TOKENS_SHOWN

    st.caption(f"First {MAX_TOKENS_SHOWN} tokens at most.")


def _projection(ctx: PageContext, table: list[dict[str, object]]) -> None:
    st.subheader("Requests in 2-D")
    try:
        proj = cache.projection(ctx.trace_path, ctx.stamp)
    except MoetraceError as exc:
        st.info(f"No projection: {exc}")
        return
    tags = {str(r["request_id"]): r["tags"] or {} for r in table}
    keys, skipped = colour_tags([tags[r] for r in proj.request_ids])  # type: ignore[misc]
    options = (["cluster"] if proj.clusters is not None else []) + [f"tag {k}" for k in keys]
    if not options:
        options = ["none"]
    colour = st.selectbox("Colour by", options, key="projection_colour")
    df = pd.DataFrame({"request_id": proj.request_ids, "x": proj.xy[:, 0], "y": proj.xy[:, 1]})
    if colour == "cluster" and proj.clusters is not None:
        df[colour] = [f"cluster {c}" for c in proj.clusters]
    elif colour.startswith("tag "):
        key = colour[4:]
        df[colour] = [tags[r].get(key, "(none)") for r in proj.request_ids]  # type: ignore[union-attr]
    else:
        df[colour] = "request"
    st.altair_chart(
        charts.projection_chart(
            df,
            title="Requests by their normalized activation matrices (PCA)",
            x_title=f"Principal component 1 ({100 * proj.explained[0]:.0f}% of variance)",
            y_title=f"Principal component 2 ({100 * proj.explained[1]:.0f}% of variance)",
            color=colour,
        ),
        width="stretch",
    )
    notes = []
    if proj.silhouette is not None:
        notes.append(
            f"KMeans: {len(set(proj.clusters.tolist()))} clusters, silhouette {proj.silhouette:.2f}"  # type: ignore[union-attr]
        )
    if proj.sampled_from > len(proj.request_ids):
        notes.append(f"a sample of {len(proj.request_ids):,} of {proj.sampled_from:,} requests")
    if skipped:
        notes.append("tags not offered for colour: " + ", ".join(
            f"{k} ({why})" for k, why in skipped.items()))  # fmt: skip
    if notes:
        st.caption("; ".join(notes))


def render(ctx: PageContext) -> None:
    st.title("Requests")
    table = cache.request_table(ctx.trace_path, ctx.stamp)
    _one_request(ctx, table)
    _projection(ctx, table)


if __name__ == "__main__":
    run_page(render)
