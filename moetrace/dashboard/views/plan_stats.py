"""Runtime statistics files (``moetrace run --stats-json``) on the Plans page: a metrics
row and charts of hit rate, stall and bytes per layer and phase; every field as a table
behind an expander. Rendered by the Plans page (not a page of its own)."""

from __future__ import annotations

import pandas as pd
import streamlit as st

from moetrace.dashboard import cache, plancharts
from moetrace.dashboard import numbers as N
from moetrace.dashboard.context import PageContext
from moetrace.dashboard.data.plans import flatten, stats_metrics, stats_per_layer

PER_LAYER = (
    # column, chart title, axis title, axis format, scale, formatter
    ("hit_rate", "Measured hit rate per layer", "Hit rate (% of expert accesses)", ".0f",
     100.0, N.pct),
    ("stall_ms", "Stall per layer", "Stall (ms, summed over the run)", ",.3~f", 1.0, N.ms),
    ("bytes", "Bytes moved per layer", "Bytes moved (MiB)", ",.1f", 2.0**-20, N.nbytes),
)  # fmt: skip


def _metrics(data: dict) -> None:
    m = stats_metrics(data)
    cols = st.columns(4)
    cols[0].metric("Hit rate", N.pct(m["hit_rate"]))
    cols[1].metric("Stall per token", N.ms(m["stall_per_token_ms"]))
    cols[2].metric("Bytes moved", N.nbytes(m["bytes"]))
    if m["tokens_per_s"] is not None:
        cols[3].metric("Tokens per second", N.per_s(m["tokens_per_s"]))
    else:
        cols[3].metric("Tokens", N.plain(m["tokens"]), help="The file records no wall time")


def runtime_stats(ctx: PageContext) -> None:
    st.subheader("Runtime statistics")
    labels = ctx.layer_labels
    for ls in cache.runtime_stats(ctx.inputs.stats, ctx.stats_mtimes()):
        if ls.error:
            st.error(ls.error)
            continue
        data = dict(ls.data or {})
        st.markdown(f"**{ls.name}** — `{ls.path}`")
        _metrics(data)
        rows = stats_per_layer(data)
        if rows:
            df = pd.DataFrame(rows)
            df["layer"] = [f"L{x}" for x in df["layer"]]
            order = [lab for lab in labels if lab in set(df["layer"])] or list(
                dict.fromkeys(df["layer"])
            )
            cols = st.columns(len(PER_LAYER))
            for col, (key, title, axis, fmt, scale, formatter) in zip(cols, PER_LAYER, strict=True):
                part = pd.DataFrame(
                    {"layer": df["layer"], "series": df["phase"], "phase": "",
                     "value": scale * df[key], "text": [formatter(v) for v in df[key]]}
                )  # fmt: skip
                col.altair_chart(
                    plancharts.layer_lines(
                        part,
                        title=f"{title} ({ls.name})",
                        y_title=axis,
                        fmt=fmt,
                        layers=order,
                        color_title="Phase",
                        domain=plancharts.zoomed_domain(part["value"], floor=0.0)
                        if key == "hit_rate"
                        else None,
                    ),
                    width="stretch",
                )
        with st.expander(f"Every field of {ls.name}"):
            scalars = flatten({k: v for k, v in data.items() if k != "per_layer"})
            st.dataframe(
                pd.DataFrame({"value": [N.plain(v) for v in scalars.values()]}, index=list(scalars))
            )
