"""Altair chart builders: every chart has a title and axes labelled with their units.

Inputs are small arrays (layers x experts and the like); nothing here touches a trace.
"""

from __future__ import annotations

from collections.abc import Sequence

import altair as alt
import numpy as np
import pandas as pd

HEATMAP_SCHEME = "viridis"
CATEGORY_SCHEME = "tableau10"
PADDING = {"top": 14, "left": 5, "right": 5, "bottom": 5}
"""Room above the title (Streamlit otherwise lets the element above overlap it)."""


def _axis(n_labels: int) -> alt.Axis:
    """Upright labels when there are few, slanted (and thinned) when there are many."""
    return alt.Axis(labelAngle=0 if n_labels <= 16 else -45, labelOverlap=True)


def _layer_labels(moe_layers: Sequence[int]) -> list[str]:
    return [f"L{lid}" for lid in moe_layers]


CLIP_QUANTILE = 0.99
"""Sequential colour scales saturate at this quantile of the cells, so one outlier (an
expert taking 95% of a layer) does not wash every other cell into the lowest colour."""


def robust_max(values: np.ndarray, quantile: float = CLIP_QUANTILE) -> float:
    """The colour domain's top: the ``quantile`` of the finite non-zero cells, taken as
    the cell at or below it (so with under 100 cells the largest one alone never sets
    the scale; where the largest cell is no outlier this changes next to nothing)."""
    v = np.asarray(values, dtype=np.float64)
    v = v[np.isfinite(v) & (v > 0)]
    if v.size == 0:
        return 1.0
    return float(np.quantile(v, quantile, method="lower"))


def clipped_note(values: np.ndarray, top: float, unit: str = "") -> str | None:
    """'Colours saturate at ...' when some cells lie above the colour domain, else None."""
    v = np.asarray(values, dtype=np.float64)
    above = int((v > top * (1 + 1e-9)).sum())
    if not above:
        return None
    return (f"Colours saturate at {top:.3g}{unit} ({100 * CLIP_QUANTILE:.0f}th percentile of "
            f"the cells): {above} cell(s) above it, up to {np.nanmax(v):.3g}{unit}, show the top "
            "colour; hover for values.")  # fmt: skip


def layer_expert_heatmap(
    values: np.ndarray,
    moe_layers: Sequence[int],
    *,
    title: str,
    value_title: str,
    pinned: np.ndarray | None = None,
    percent: bool = True,
    diverging: bool = False,
    log_scale: bool = False,
    clip: bool = False,
) -> alt.Chart:
    """(L, E) values as a layer x expert heatmap; ``pinned`` (L, E) bool marks cells;
    ``diverging`` colours signed values red/blue around zero; ``log_scale`` uses a
    symmetric log colour scale so one dominant expert does not wash out the rest;
    ``clip`` saturates a linear scale at :func:`robust_max` (see :func:`clipped_note`)."""
    L, E = values.shape
    layers = _layer_labels(moe_layers)
    df = pd.DataFrame(
        {
            "layer": np.repeat(layers, E),
            "expert": np.tile(np.arange(E), L),
            "value": (values * (100.0 if percent else 1.0)).reshape(-1),
        }
    )
    fmt = ".2f" if percent else ",.0f"
    base = alt.Chart(df).encode(
        x=alt.X("expert:O", title="Expert id", axis=_axis(E)),
        y=alt.Y("layer:O", title="MoE layer (model layer id)", sort=layers),
    )
    chart = base.mark_rect().encode(
        color=alt.Color(
            "value:Q",
            title=value_title,
            scale=alt.Scale(scheme="redblue", domainMid=0, reverse=True)
            if diverging
            else alt.Scale(scheme=HEATMAP_SCHEME, type="symlog" if log_scale else "linear")
            if not clip or log_scale
            else alt.Scale(
                scheme=HEATMAP_SCHEME,
                domain=[0, robust_max(df["value"].to_numpy())],
                clamp=True,
            ),
        ),
        tooltip=[
            alt.Tooltip("layer:O", title="layer"),
            alt.Tooltip("expert:O", title="expert"),
            alt.Tooltip("value:Q", title=value_title, format=fmt),
        ],
    )
    if pinned is not None:
        pin = pd.DataFrame(
            [
                {"layer": layers[i], "expert": int(e), "mark": "pinned"}
                for i, e in zip(*np.nonzero(pinned), strict=True)
            ]
        )
        if len(pin):
            overlay = (
                alt.Chart(pin)
                .mark_point(
                    shape="square",
                    filled=False,
                    size=max(30, min(140, 9000 // max(E, 1))),
                    strokeWidth=2.5 if E <= 32 else 1.5,
                    color="red",
                )
                .encode(
                    x="expert:O",
                    y=alt.Y("layer:O", sort=layers),
                    shape=alt.Shape("mark:N", title="Plan", scale=alt.Scale(range=["square"])),
                )
            )
            chart = alt.layer(chart, overlay).resolve_scale(color="independent")
    return chart.properties(padding=PADDING, title=title, height=min(max(26 * L + 150, 330), 1000))


def square_heatmap(
    values: np.ndarray,
    *,
    title: str,
    x_title: str,
    y_title: str,
    value_title: str,
    fmt: str = ",.0f",
    support: np.ndarray | None = None,
    support_title: str = "Support (tokens)",
    min_support: int = 0,
    log2_diverging: bool = False,
) -> alt.Chart:
    """(E, E) matrix (rows = y, columns = x) as a heatmap.

    ``support`` (same shape) is shown in the tooltip; cells whose support is below
    ``min_support`` are drawn in light grey without a value ("too little support"), so a
    ratio of two small counts (a lift of 70 from 3 tokens, a 100% transition from one)
    does not rule the colour scale. ``log2_diverging`` colours ratios (lift) on a log2
    scale diverging at 1 (blue below, red above), its domain symmetric and clipped at the
    strongest supported cells. Otherwise the sequential scale saturates at
    :func:`robust_max` of the supported cells."""
    n_y, n_x = values.shape
    vals = np.asarray(values, dtype=np.float64).reshape(-1)
    sup = None if support is None else np.asarray(support).reshape(-1)
    ok = np.ones(vals.shape, bool) if sup is None else sup >= min_support
    df = pd.DataFrame(
        {
            "y": np.repeat(np.arange(n_y), n_x),
            "x": np.tile(np.arange(n_x), n_y),
            "value": np.where(ok, vals, np.nan),
        }
    )
    tooltip = [
        alt.Tooltip("y:O", title=y_title),
        alt.Tooltip("x:O", title=x_title),
        alt.Tooltip("value:Q", title=value_title, format=fmt),
    ]
    if sup is not None:
        df["support"] = sup
        tooltip.append(alt.Tooltip("support:Q", title=support_title, format=",.0f"))
    shown = df["value"].to_numpy()
    if log2_diverging:
        pos = shown[np.isfinite(shown) & (shown > 0)]
        df["log2"] = np.log2(np.where(np.isfinite(shown) & (shown > 0), shown, np.nan))
        span = float(np.nanquantile(np.abs(np.log2(pos)), CLIP_QUANTILE)) if pos.size else 1.0
        span = max(span, 1.0)
        color = alt.Color(
            "log2:Q",
            title=f"{value_title}, log2",
            scale=alt.Scale(scheme="redblue", reverse=True, domain=[-span, span], clamp=True),
        )
    else:
        color = alt.Color(
            "value:Q",
            title=value_title,
            scale=alt.Scale(scheme=HEATMAP_SCHEME, domain=[0, robust_max(shown)], clamp=True),
        )
    base = alt.Chart(df).encode(
        x=alt.X("x:O", title=x_title, axis=_axis(n_x)),
        y=alt.Y("y:O", title=y_title, axis=alt.Axis(labelOverlap=True)),
        tooltip=tooltip,
    )
    cells = base.transform_filter("isValid(datum.value)").mark_rect().encode(color=color)
    layers = [cells]
    if not ok.all():
        layers.insert(
            0,
            base.transform_filter("!isValid(datum.value)").mark_rect(color="#e5e7eb"),
        )
    return alt.layer(*layers).properties(
        padding=PADDING, title=title, height=min(max(20 * n_y + 150, 380), 900)
    )


def lorenz_chart(curves: dict[str, tuple[np.ndarray, np.ndarray]], *, title: str) -> alt.Chart:
    """Lorenz curves (share of experts -> share of activations), with the equality line."""
    rows = []
    for name, (x, y) in curves.items():
        rows += [
            {"series": name, "experts": 100 * a, "acts": 100 * b} for a, b in zip(x, y, strict=True)
        ]
    rows += [{"series": "uniform (equality)", "experts": v, "acts": v} for v in (0.0, 100.0)]
    df = pd.DataFrame(rows)
    return (
        alt.Chart(df)
        .mark_line(point=False)
        .encode(
            x=alt.X("experts:Q", title="Experts, least used first (% of experts)"),
            y=alt.Y("acts:Q", title="Cumulative activations (% of the layer's)"),
            color=alt.Color("series:N", title="Layer", scale=alt.Scale(scheme=CATEGORY_SCHEME)),
            strokeDash=alt.condition(
                alt.datum.series == "uniform (equality)", alt.value([4, 4]), alt.value([1, 0])
            ),
            tooltip=[
                "series:N",
                alt.Tooltip("experts:Q", format=".1f"),
                alt.Tooltip("acts:Q", format=".1f"),
            ],
        )
        .properties(padding=PADDING, title=title, height=380)
    )


def bar_chart(
    labels: Sequence[str],
    values: Sequence[float],
    *,
    title: str,
    x_title: str,
    y_title: str,
    fmt: str = ".3f",
    horizontal: bool = False,
) -> alt.Chart:
    """Bars of ``values`` per label; ``x_title`` names the labels, ``y_title`` the values
    (``horizontal`` puts the labels on the y axis, for long names)."""
    df = pd.DataFrame({"label": list(labels), "value": list(values)})
    tooltip = [
        alt.Tooltip("label:N", title=x_title),
        alt.Tooltip("value:Q", title=y_title, format=fmt),
    ]
    if horizontal:
        return (
            alt.Chart(df)
            .mark_bar()
            .encode(
                y=alt.Y("label:N", title=x_title, sort=None, axis=alt.Axis(labelLimit=360)),
                x=alt.X("value:Q", title=y_title),
                tooltip=tooltip,
            )
            .properties(padding=PADDING, title=title, height=max(26 * len(df) + 90, 200))
        )
    return (
        alt.Chart(df)
        .mark_bar()
        .encode(
            x=alt.X("label:O", title=x_title, sort=None, axis=_axis(len(df))),
            y=alt.Y("value:Q", title=y_title),
            tooltip=tooltip,
        )
        .properties(padding=PADDING, title=title, height=300)
    )


def paired_bars(
    labels: Sequence[str],
    series: dict[str, Sequence[float]],
    *,
    title: str,
    x_title: str,
    y_title: str,
    fmt: str = ".1f",
) -> alt.Chart:
    """Side-by-side bars of several series per label (e.g. a predictor vs its baseline)."""
    rows = [
        {"label": lab, "series": name, "value": float(v)}
        for name, values in series.items()
        for lab, v in zip(labels, values, strict=True)
    ]
    df = pd.DataFrame(rows)
    return (
        alt.Chart(df)
        .mark_bar()
        .encode(
            x=alt.X("label:N", title=x_title, sort=list(labels), axis=_axis(len(labels))),
            xOffset=alt.XOffset("series:N", sort=list(series)),
            y=alt.Y("value:Q", title=y_title),
            color=alt.Color(
                "series:N", title="", sort=list(series), scale=alt.Scale(scheme=CATEGORY_SCHEME)
            ),
            tooltip=["label:N", "series:N", alt.Tooltip("value:Q", title=y_title, format=fmt)],
        )
        .properties(padding=PADDING, title=title, height=320)
    )


def mrc_chart(
    curves: dict[str, tuple[Sequence[float], Sequence[float]]],
    points: Sequence[dict[str, object]] = (),
    *,
    title: str,
    num_experts: int,
) -> alt.Chart:
    """Hit rate vs cache size per policy; ``points`` (name, size, hit_rate) drawn as marks."""
    rows = []
    for name, (sizes, rates) in curves.items():
        rows += [
            {"policy": name, "size": float(s), "hit": 100 * float(r)}
            for s, r in zip(sizes, rates, strict=True)
        ]
    df = pd.DataFrame(rows)
    x = alt.X(
        "size:Q",
        title="Cache size (experts per layer)",
        scale=alt.Scale(domain=[0, num_experts]),
        axis=alt.Axis(tickMinStep=1, format="d"),
    )
    y = alt.Y("hit:Q", title="Hit rate (% of expert accesses)", scale=alt.Scale(domain=[0, 100]))
    lines = (
        alt.Chart(df)
        .mark_line(point=True)
        .encode(
            x=x,
            y=y,
            color=alt.Color("policy:N", title="Policy", scale=alt.Scale(scheme=CATEGORY_SCHEME)),
            tooltip=[
                "policy:N",
                alt.Tooltip("size:Q", title="experts"),
                alt.Tooltip("hit:Q", title="hit %", format=".1f"),
            ],
        )
    )
    chart: alt.Chart | alt.LayerChart = lines
    if points:
        pdf = pd.DataFrame(
            [
                {"plan": p["name"], "size": float(p["size"]), "hit": 100 * float(p["hit_rate"])}
                for p in points
            ]
        )
        # one legend entry per plan instead of text labels, which overprint when plans
        # have the same slots at a layer
        marks = (
            alt.Chart(pdf)
            .mark_point(shape="diamond", size=200, filled=True, opacity=0.9)
            .encode(
                x=x,
                y=y,
                color=alt.Color(
                    "plan:N", title="Plan (its slots here)", scale=alt.Scale(scheme="set1")
                ),  # fmt: skip
                tooltip=["plan:N", "size:Q", alt.Tooltip("hit:Q", title="hit %", format=".1f")],
            )
        )
        chart = alt.layer(lines, marks).resolve_scale(color="independent")
    return chart.properties(padding=PADDING, title=title, height=360)


def histogram(
    labels: Sequence[str],
    counts: np.ndarray,
    *,
    title: str,
    x_title: str,
) -> alt.Chart:
    """A histogram from precomputed bins, shown as % of all counts."""
    total = max(float(np.sum(counts)), 1.0)
    df = pd.DataFrame(
        {"bin": list(labels), "pct": 100.0 * np.asarray(counts, np.float64) / total, "n": counts}
    )
    return (
        alt.Chart(df)
        .mark_bar()
        .encode(
            x=alt.X("bin:O", title=x_title, sort=list(labels), axis=_axis(len(df))),
            y=alt.Y("pct:Q", title="Accesses (% of reuses)"),
            tooltip=[
                alt.Tooltip("bin:O", title=x_title),
                alt.Tooltip("pct:Q", format=".2f"),
                alt.Tooltip("n:Q", title="accesses", format=","),
            ],
        )
        .properties(padding=PADDING, title=title, height=300)
    )


def token_routing_chart(
    rows: list[dict[str, object]], *, title: str, num_experts: int
) -> alt.Chart:
    df = pd.DataFrame(rows)
    return (
        alt.Chart(df)
        .mark_point(size=70, filled=True, opacity=0.9)
        .encode(
            x=alt.X(
                "pos:Q",
                title="Token position in the request (prompt first, tokens)",
                axis=alt.Axis(tickMinStep=1, format="d"),
            ),
            y=alt.Y("expert:O", title="Expert id", sort=list(range(num_experts))),
            color=alt.Color(
                "rank:N", title="Router rank (0 = top)", scale=alt.Scale(scheme=CATEGORY_SCHEME)
            ),
            shape=alt.Shape("phase:N", title="Phase"),
            tooltip=[
                "pos:Q",
                "phase:N",
                "rank:O",
                "expert:O",
                alt.Tooltip("weight:Q", format=".3f"),
            ],
        )
        .properties(padding=PADDING, title=title, height=min(max(14 * num_experts + 150, 330), 900))
    )


def projection_chart(
    df: pd.DataFrame, *, title: str, x_title: str, y_title: str, color: str
) -> alt.Chart:
    return (
        alt.Chart(df)
        .mark_circle(size=90, opacity=0.8)
        .encode(
            x=alt.X("x:Q", title=x_title),
            y=alt.Y("y:Q", title=y_title),
            color=alt.Color(f"{color}:N", title=color, scale=alt.Scale(scheme=CATEGORY_SCHEME)),
            tooltip=["request_id:N", f"{color}:N"],
        )
        .properties(padding=PADDING, title=title, height=380)
    )
