"""Altair charts of plans against their baselines, per layer and per split, and of every
layer's hit-rate curve as small multiples. Same rules as :mod:`moetrace.dashboard.charts`:
a title and titled axes with units on every chart; inputs are small tables.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import altair as alt
import pandas as pd

from moetrace.dashboard.charts import CATEGORY_SCHEME, PADDING, _axis

PLAN_SCHEME = "set1"
"""Colours of plans (distinct from the policies' tableau10)."""
ZOOM_PAD = 0.08
"""Share of the shown range added on each side of a zoomed axis."""


def zoomed_domain(values: Sequence[float], *, floor: float | None = None) -> list[float]:
    """An axis domain around ``values`` (not from 0): the range plus a margin, rounded
    outwards to a tidy step, never below ``floor``."""
    v = [float(x) for x in values if x is not None and not math.isnan(float(x))]
    if not v:
        return [0.0, 1.0]
    lo, hi = min(v), max(v)
    span = max(hi - lo, abs(hi) * 0.02, 1e-9)
    step = 10 ** math.floor(math.log10(span)) / 2
    lo = math.floor((lo - ZOOM_PAD * span) / step) * step
    hi = math.ceil((hi + ZOOM_PAD * span) / step) * step
    if floor is not None:
        lo = max(lo, floor)
    return [round(lo, 10), round(hi, 10)]


def runs_chart(
    df: pd.DataFrame,
    *,
    title: str,
    value_title: str,
    fmt: str,
    runs: Sequence[str],
    zoom: bool = True,
) -> alt.Chart:
    """Dot plot of one metric per run (y) and plan (colour), one column per split.

    ``df``: plan, split, run, value, text (the value formatted), delta (vs LRU, text).
    The value axis is zoomed to the values shown (``zoom``), not started at 0, so a 3
    point gap between a plan and LRU is visible.
    """
    splits = list(dict.fromkeys(df["split"]))
    x = alt.X(
        "value:Q",
        title=value_title,
        scale=alt.Scale(domain=zoomed_domain(df["value"]), zero=False)
        if zoom
        else alt.Scale(zero=True),
        axis=alt.Axis(format=fmt, tickCount=5),
    )
    enc: dict[str, object] = {
        "x": x,
        "y": alt.Y(
            "run:N", title="Run (validation split)", sort=list(runs), axis=alt.Axis(labelLimit=320)
        ),  # fmt: skip
        "color": alt.Color("plan:N", title="Plan file", scale=alt.Scale(scheme=PLAN_SCHEME)),
        "shape": alt.Shape("plan:N", title="Plan file"),
        "tooltip": [
            alt.Tooltip("plan:N", title="plan file"),
            alt.Tooltip("split:N", title="split"),
            alt.Tooltip("run:N", title="run"),
            alt.Tooltip("text:N", title=value_title),
            alt.Tooltip("delta:N", title="vs LRU"),
        ],
    }
    if len(splits) > 1:
        enc["column"] = alt.Column("split:N", title="Validation split", sort=splits)
    chart = alt.Chart(df).mark_point(size=90, filled=True, opacity=0.85).encode(**enc)
    height = max(22 * len(runs) + 60, 160)
    return chart.properties(padding=PADDING, title=title, height=height)


def _layer_x(layers: Sequence[str]) -> alt.X:
    """The x encoding of a per-layer chart: model layer ids in model order."""
    return alt.X("layer:N", title="MoE layer (model layer id)", sort=list(layers),
                 axis=_axis(len(layers)))  # fmt: skip


def layer_bars(
    df: pd.DataFrame, *, title: str, y_title: str, fmt: str, layers: Sequence[str]
) -> alt.Chart:
    """Bars per layer (x) and plan (colour, side by side), one column per phase.

    ``df``: layer, plan, phase, value, text."""
    phases = list(dict.fromkeys(df["phase"]))
    enc: dict[str, object] = {
        "x": _layer_x(layers),
        "xOffset": alt.XOffset("plan:N"),
        "y": alt.Y("value:Q", title=y_title, axis=alt.Axis(format=fmt)),
        "color": alt.Color("plan:N", title="Plan file", scale=alt.Scale(scheme=PLAN_SCHEME)),
        "tooltip": ["plan:N", "phase:N", "layer:N", alt.Tooltip("text:N", title=y_title)],
    }  # fmt: skip
    if len(phases) > 1:
        enc["column"] = alt.Column("phase:N", title="Phase", sort=phases)
    return (
        alt.Chart(df).mark_bar().encode(**enc).properties(padding=PADDING, title=title, height=260)
    )


def layer_lines(
    df: pd.DataFrame,
    *,
    title: str,
    y_title: str,
    fmt: str,
    layers: Sequence[str],
    color_title: str,
    domain: list[float] | None = None,
) -> alt.Chart:
    """Lines per series (colour) over layers, one column per phase.

    ``df``: layer, series, phase, value, text."""
    phases = list(dict.fromkeys(df["phase"]))
    enc: dict[str, object] = {
        "x": _layer_x(layers),
        "y": alt.Y("value:Q", title=y_title, axis=alt.Axis(format=fmt),
                   scale=alt.Scale(domain=domain) if domain else alt.Scale(zero=True)),
        "color": alt.Color("series:N", title=color_title, scale=alt.Scale(scheme=CATEGORY_SCHEME)),
        "tooltip": ["series:N", "phase:N", "layer:N", alt.Tooltip("text:N", title=y_title)],
    }  # fmt: skip
    if len(phases) > 1:
        enc["column"] = alt.Column("phase:N", title="Phase", sort=phases)
    return (
        alt.Chart(df)
        .mark_line(point=True)
        .encode(**enc)
        .properties(padding=PADDING, title=title, height=260)
    )


def curves_small_multiples(
    df: pd.DataFrame,
    *,
    title: str,
    num_experts: int,
    layers: Sequence[str],
    columns: int = 6,
) -> alt.FacetChart:
    """Every layer's hit rate vs cache size (one panel per layer).

    ``df``: layer, series, kind, size, hit (%), text. ``kind``: "curve" (a policy's
    line), "plan" (a plan's hit rate at its slots in that layer), "target" (where LRU or
    Belady first reaches 80% / 90%)."""
    x = alt.X("size:Q", title="Cache size (experts per layer)",
              scale=alt.Scale(domain=[0, num_experts]), axis=alt.Axis(tickCount=4, format="d"))  # fmt: skip
    y = alt.Y("hit:Q", title="Hit rate (%)", scale=alt.Scale(domain=[0, 100]),
              axis=alt.Axis(tickCount=5))  # fmt: skip
    color = alt.Color("series:N", title="Policy / plan", scale=alt.Scale(scheme=CATEGORY_SCHEME))
    tooltip = ["layer:N", "series:N", alt.Tooltip("size:Q", title="experts"), "text:N"]
    base = alt.Chart().encode(x=x, y=y, color=color, tooltip=tooltip)
    lines = base.transform_filter(alt.datum.kind == "curve").mark_line(strokeWidth=1.5)
    plans = base.transform_filter(alt.datum.kind == "plan").mark_point(
        shape="diamond", size=70, filled=True
    )
    targets = base.transform_filter(alt.datum.kind == "target").mark_point(
        shape="cross", size=60, filled=True
    )
    return (
        alt.layer(lines, targets, plans, data=df)
        .properties(width=150, height=110)
        .facet(
            facet=alt.Facet("layer:N", title=None, sort=list(layers)),
            columns=columns,
            title=title,
            padding=PADDING,
        )
    )


def sizing_chart(
    df: pd.DataFrame,
    *,
    title: str,
    ram_order: Sequence[str],
    target: float | None = None,
) -> alt.LayerChart:
    """Modeled tokens/s (y) against device memory (x), one line per RAM size (colour),
    the Pareto-frontier points ringed, and a rule at ``target`` tokens/s.

    ``df``: device_gb, tokens_per_s, ram (legend entry), frontier (bool), and the tooltip
    texts device_text, ram_text, tps_text, device_hit, ram_hit, tier."""
    values = list(df["tokens_per_s"]) + ([target] if target is not None else [])
    y_title = "Tokens per second (modeled)"
    x = alt.X("device_gb:Q", title="Device memory for experts (GB, worst case)",
              scale=alt.Scale(zero=False), axis=alt.Axis(format=".3~g"))  # fmt: skip
    y = alt.Y("tokens_per_s:Q", title=y_title,
              scale=alt.Scale(domain=zoomed_domain(values, floor=0.0), zero=False),
              axis=alt.Axis(format=",.4~g"))  # fmt: skip
    color = alt.Color("ram:N", title="RAM GB", sort=list(ram_order),
                      scale=alt.Scale(scheme=CATEGORY_SCHEME), legend=alt.Legend(labelLimit=320))  # fmt: skip
    tooltip = [
        alt.Tooltip("ram_text:N", title="RAM"),
        alt.Tooltip("device_text:N", title="device"),
        alt.Tooltip("tps_text:N", title=y_title),
        alt.Tooltip("device_hit:N", title="device hit rate"),
        alt.Tooltip("ram_hit:N", title="RAM hit rate"),
        alt.Tooltip("tier:N", title="RAM tier"),
        alt.Tooltip("frontier:N", title="on the frontier"),
    ]
    base = alt.Chart(df).encode(x=x, y=y, color=color, tooltip=tooltip)
    lines = base.mark_line(point=alt.OverlayMarkDef(size=40, filled=True), strokeWidth=1.5)
    front = base.transform_filter(alt.datum.frontier).mark_point(
        shape="diamond", size=160, filled=False, strokeWidth=2
    )
    layers: list[alt.Chart] = [lines, front]
    if target is not None:
        rule = (
            alt.Chart(pd.DataFrame({"target": [float(target)], "text": [f"{target:,.4g}/s"]}))
            .mark_rule(strokeDash=[5, 4], color="#555")
            .encode(
                y=alt.Y("target:Q", title=y_title),
                tooltip=[alt.Tooltip("text:N", title="target tokens/s")],
            )  # fmt: skip
        )
        layers.append(rule)
    return alt.layer(*layers).properties(padding=PADDING, title=title, height=340)
