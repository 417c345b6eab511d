"""Overview page: what the trace holds (model, requests, tokens, layers, experts, top-k,
size) and the ``moetrace analyze`` verdict."""

from __future__ import annotations

import pandas as pd
import streamlit as st

from moetrace.dashboard import cache, charts
from moetrace.dashboard.context import PageContext, run_page, trace_label
from moetrace.dashboard.data.common import stamp
from moetrace.dashboard.data.overview import VERDICT_AUTO_ROWS, Overview
from moetrace.dashboard.tiles import text_tile
from moetrace.errors import MoetraceError


def _facts(ov: Overview) -> dict[str, object]:
    return {
        "model": ov.model,
        "architecture": ov.architecture or "unknown",
        "source": ov.source,
        "requests": ov.requests,
        "prefill tokens": ov.tokens.get("prefill", 0),
        "decode tokens": ov.tokens.get("decode", 0),
        "activation rows": ov.activations,
        "content": "per-expert counts only" if ov.counts_only else "token-level routing",
        "layers (all)": ov.num_layers,
        "MoE layers": f"{len(ov.moe_layers)}: {', '.join(map(str, ov.moe_layers))}",
        "routed experts per layer": ov.num_experts,
        "top-k": ov.top_k,
        "shared experts (not traced)": ov.shared_experts,
        "gate weights recorded": "yes" if ov.has_weights else "no",
        "request tags": ", ".join(ov.request_tag_keys) or "none",
        "size on disk (MiB)": round(ov.size_bytes / 2**20, 3),
        "parts": ov.parts,
    }


def render(ctx: PageContext) -> None:
    ov = ctx.overview
    st.title("Overview")
    text_tile(st, "Trace", str(ctx.trace_path))
    if ov.counts_only:
        st.info(
            f"Trace {ctx.trace_path} holds per-expert counts only ({ov.counted:,} expert "
            "activations, no token-level routing): the verdict and the Experts page use "
            "them; reuse, groups, requests and plans need routing."
        )
    elif ov.empty:
        st.error(f"Trace {ctx.trace_path} has no activations (0 requests with routing).")
    cols = st.columns(4)
    text_tile(cols[0], "Model", ov.model)
    cols[1].metric("Requests", f"{ov.requests:,}")
    cols[2].metric(
        "Tokens (prefill / decode)", f"{ov.tokens['prefill']:,} / {ov.tokens['decode']:,}"
    )
    cols[3].metric("Size on disk", f"{ov.size_bytes / 2**20:,.2f} MiB")
    cols = st.columns(4)
    cols[0].metric("MoE layers", f"{len(ov.moe_layers)} of {ov.num_layers}")
    cols[1].metric("Experts per layer", ov.num_experts)
    cols[2].metric("Top-k", ov.top_k)
    cols[3].metric("Activation rows", f"{ov.activations:,}")

    left, right = st.columns([3, 2])
    with left:
        st.subheader("Verdict")
        if ov.empty:
            st.info("No verdict: the trace is empty.")
        elif (
            ov.counts_only
            or ov.activations <= VERDICT_AUTO_ROWS
            or st.button(f"Compute the verdict (runs moetrace analyze on {ov.activations:,} rows)")
        ):
            v = cache.verdict(ctx.trace_path, ctx.stamp, ctx.phase)
            if v.unavailable:
                st.warning(f"Verdict not available: {v.unavailable}")
            else:
                box = st.success if v.caching_pays else st.warning
                box("\n".join(f"- {line}" for line in v.lines))
                st.caption(f"moetrace analyze, phase {ctx.phase}, {v.seconds:.1f} s")
    with right:
        tokens = ov.tokens
        st.altair_chart(
            charts.bar_chart(
                list(tokens),
                list(tokens.values()),
                title="Tokens by phase",
                x_title="Phase",
                y_title="Tokens (count)",
                fmt=",",
            ),
            width="stretch",
        )
    st.subheader("Trace facts")
    facts = {trace_label(ctx.trace_path): _facts(ov)}
    for other in ctx.inputs.traces:
        if other != ctx.trace_path:
            try:
                facts[trace_label(other)] = _facts(cache.overview(other, stamp(other)))
            except MoetraceError as exc:  # a broken second trace must not hide the first
                st.error(f"Cannot open trace {other}: {exc}")
    st.dataframe(pd.DataFrame(facts).astype(str), width="stretch")
    if ov.tags:
        st.caption("Manifest tags: " + ", ".join(f"{k}={v}" for k, v in ov.tags.items()))


if __name__ == "__main__":
    run_page(render, need_rows=False)
