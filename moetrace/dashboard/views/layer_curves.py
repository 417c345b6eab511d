"""Every layer's hit rate vs cache size as small multiples (LRU, LFU, Belady and each
plan at its slots in that layer), and the slots each layer needs for 80% / 90% hits.
Rendered on the Skew and reuse page (not a page of its own)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import streamlit as st

from moetrace.dashboard import cache, plancharts
from moetrace.dashboard.context import PageContext
from moetrace.dashboard.data.layer_curves import LayerCurves
from moetrace.dashboard.data.plan_layers import PlanLayers
from moetrace.dashboard.data.plans import LoadedPlan, path_mtime
from moetrace.errors import MoetraceError


def sample_text(used: int, total: int) -> str:
    if used < total:
        return f"a seeded sample of {used:,} of {total:,} requests (whole requests)"
    return f"all {total:,} requests"


REPLAY_KEY = "replay_plans_per_layer"
CURVES_KEY = "all_layer_curves"


def _heavy_allowed(ctx: PageContext, key: str, cached: bool, label: str) -> bool:
    """Whether a replay that takes seconds on a large trace may run now: on traces up to
    ``VERDICT_AUTO_ROWS`` activation rows (the verdict's rule), when its result is in the
    disk cache, once the button this draws (``label``) was pressed in the session."""
    from moetrace.dashboard.data.overview import VERDICT_AUTO_ROWS

    if ctx.overview.activations <= VERDICT_AUTO_ROWS or st.session_state.get(key) or cached:
        return True
    if st.button(label, key=f"{key}_button"):
        st.session_state[key] = True
        return True
    return False


def replay_allowed(ctx: PageContext, plans: list[LoadedPlan], phase: str) -> bool:
    """Whether the plans' per-layer replays may run now (a replay of a plan with a
    prefetcher takes seconds on a large trace); see :func:`_heavy_allowed`."""
    from moetrace.dashboard import persisted

    if not plans:
        return True
    cached = all(persisted.plan_layers_cached(ctx.trace_path, lp.path, phase) for lp in plans)
    label = (
        f"Replay {len(plans)} plan(s) per layer on a sample (to draw them per layer; "
        "a few seconds each)"
    )
    return _heavy_allowed(ctx, REPLAY_KEY, cached, label)


def curves_allowed(ctx: PageContext) -> bool:
    """Whether every layer's curves may be computed now (one replay per layer: about a
    second on a 30M-activation trace, which would push the page's first open past 3 s)."""
    from moetrace.dashboard import persisted

    label = (
        f"Compute every layer's curves (replays a sample of the "
        f"{ctx.overview.activations:,} rows per layer)"
    )
    cached = persisted.layer_curves_cached(ctx.trace_path, ctx.phase)
    return _heavy_allowed(ctx, CURVES_KEY, cached, label)


def simulated_layers(ctx: PageContext, lp: LoadedPlan, phase: str) -> PlanLayers | None:
    """The plan's per-layer replay (:func:`cache.plan_layers`), or None with a note on the
    page when the simulator cannot run the plan (e.g. tables missing from the file).
    Call :func:`replay_allowed` first."""
    try:
        return cache.plan_layers(ctx.trace_path, ctx.stamp, lp.path, path_mtime(lp.path), phase)
    except MoetraceError as exc:
        st.caption(f"Plan {lp.name} cannot be replayed per layer, so it is not drawn: {exc}")
        return None


def _frame(
    lc: LayerCurves, plans: list[tuple[str, list[int], PlanLayers]], phase: str
) -> pd.DataFrame:
    E = lc.lru.shape[1]
    rows: list[dict[str, object]] = []
    for i, lid in enumerate(lc.layers):
        lab = f"L{lid}"
        if lc.accesses[i] == 0:
            continue
        series = {
            "LRU": (range(1, E + 1), lc.lru[i]),
            "LFU": (lc.sizes, lc.lfu[i]),
            "Belady (optimal)": (lc.sizes, lc.belady[i]),
        }
        for name, (sizes, rates) in series.items():
            rows += [
                {"layer": lab, "series": name, "kind": "curve", "size": int(s),
                 "hit": 100 * float(r), "text": f"{100 * float(r):.1f}%"}
                for s, r in zip(sizes, rates, strict=True)
            ]  # fmt: skip
        for j, t in enumerate(lc.targets):
            for name, slots in (("LRU", lc.lru_slots), ("Belady (optimal)", lc.belady_slots)):
                if slots[i, j]:
                    rows.append(
                        {"layer": lab, "series": name, "kind": "target", "size": int(slots[i, j]),
                         "hit": 100 * t, "text": f"{name} reaches {100 * t:.0f}% at "
                         f"{int(slots[i, j])} experts"}
                    )  # fmt: skip
        for pname, caps, pl in plans:
            rate = float(pl.plan[i, pl.column(phase)])
            if not np.isnan(rate):
                rows.append(
                    {"layer": lab, "series": f"plan {pname}", "kind": "plan", "size": caps[i],
                     "hit": 100 * rate, "text": f"{100 * rate:.1f}% (plan, simulated)"}
                )  # fmt: skip
    return pd.DataFrame(rows)


def _slots_frame(lc: LayerCurves) -> pd.DataFrame:
    rows = []
    for i, lid in enumerate(lc.layers):
        for j, t in enumerate(lc.targets):
            for name, slots in (("LRU", lc.lru_slots), ("Belady (optimal)", lc.belady_slots)):
                if slots[i, j]:
                    rows.append(
                        {"layer": f"L{lid}", "series": f"{name}, {100 * t:.0f}% hits",
                         "phase": "all", "value": int(slots[i, j]),
                         "text": f"{int(slots[i, j])} experts"}
                    )  # fmt: skip
    return pd.DataFrame(rows)


def all_layers(ctx: PageContext, plans: list[tuple[str, list[int], PlanLayers]]) -> None:
    st.subheader("Hit rate vs cache size of every layer")
    if not curves_allowed(ctx):
        return
    lc = cache.layer_curves(ctx.trace_path, ctx.stamp, ctx.phase)
    if not lc.accesses.any():
        st.warning(f"No accesses in phase {ctx.phase!r}.")
        return
    labels = ctx.layer_labels
    E = ctx.overview.num_experts
    st.altair_chart(
        plancharts.curves_small_multiples(
            _frame(lc, plans, ctx.phase),
            title=f"Hit rate vs cache size per layer (phase {ctx.phase}); crosses: "
            "smallest cache reaching 80% and 90%",
            num_experts=E,
            layers=labels,
        )
    )
    st.caption(
        f"Replayed on {sample_text(lc.requests_used, lc.requests_total)} in the chosen "
        "phase (every layer the same requests); LRU exact at every size, LFU and Belady at "
        f"{len(lc.sizes)} sizes. Diamonds: each plan at its slots in the layer, with its "
        "hit rate in that layer (simulated on the same sample, each token its own pass)."
    )
    slots = _slots_frame(lc)
    if len(slots):
        st.altair_chart(
            plancharts.layer_lines(
                slots,
                title="Experts per layer needed for 80% / 90% hits (LRU and Belady)",
                y_title="Cache size (experts per layer)",
                fmt="d",
                layers=labels,
                color_title="Policy, target",
                domain=[0, E],
            ),
            width="stretch",
        )
    missing = [f"{100 * t:.0f}%" for j, t in enumerate(lc.targets) if not lc.lru_slots[:, j].all()]
    if missing:
        st.caption(
            f"Layers without a point for {', '.join(missing)}: even all {E} experts do not "
            "reach it (first uses are misses)."
        )
