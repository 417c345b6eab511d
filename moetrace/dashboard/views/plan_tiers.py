"""A plan's host-RAM tier and sizing frontier on the Plans page: the tier (slots, memory,
policy, experts pinned in RAM, prefetcher, drift window), the RAM placement the tuner
wrote against RAM as LRU over disk on every validation split, every candidate it scored,
and the modeled tokens/s of each device and RAM size with the smallest sizes reaching a
target."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import pandas as pd
import streamlit as st

from moetrace.dashboard import numbers as N
from moetrace.dashboard import plancharts
from moetrace.dashboard.data import sizing as S
from moetrace.store.plan import Plan

RAM_LRU = "RAM as LRU over disk"


def placement_info(plan: Plan) -> dict[str, Any] | None:
    """The plan's ``expected.placement`` (``moetrace tune --ram-budget``), if any."""
    info = dict(plan.expected).get("placement")
    return dict(info) if isinstance(info, Mapping) else None


def _row(value: Any) -> dict[str, Any]:
    return dict(value) if isinstance(value, Mapping) else {}


def _over(a: Any, b: Any) -> float | None:
    try:
        return float(a) / float(b) if b else None
    except (TypeError, ValueError):
        return None


def placement_frame(splits: list[dict[str, Any]], written: str | None) -> pd.DataFrame:
    """Per split, the placement's row and RAM as LRU's, formatted (split, then run)."""
    out = []
    for sp in splits:
        mine, lru = _row(sp.get("placement")), _row(sp.get("lru"))
        name = str(mine.get("name", "placement"))
        label = f"{name} (written)" if name == written else f"{name} (chosen, not written)"
        for run, r in ((label, mine), (RAM_LRU, lru)):
            out.append({
                "split": str(sp.get("name")),
                "RAM tier": run,
                "tokens/s": S.rate(r.get("tokens_per_s")),
                "stall per token": N.ms(r.get("stall_per_token_ms")),
                "RAM hit rate": N.pct(r.get("ram_hit_rate")),
                "disk reads": N.nbytes(r.get("disk_bytes")),
                "experts pinned in RAM": N.plain(r.get("pinned_in_ram")),
                "stall vs RAM as LRU": N.ratio(sp.get("stall_vs_lru")) if r is mine else "",
            })  # fmt: skip
    return pd.DataFrame(out)


def candidates_frame(rows: list[dict[str, Any]], chosen: str | None) -> pd.DataFrame:
    """Every RAM placement the tuner scored on its search splits, formatted."""
    return pd.DataFrame(
        {
            "tokens/s": [S.rate(r.get("tokens_per_s")) for r in rows],
            "stall per token": [N.ms(r.get("stall_per_token_ms")) for r in rows],
            "RAM hit rate": [N.pct(r.get("ram_hit_rate")) for r in rows],
            "disk reads": [N.nbytes(r.get("disk_bytes")) for r in rows],
            "experts pinned in RAM": [N.plain(r.get("pinned_in_ram")) for r in rows],
            "stall vs best (worst split)": [N.ratio(r.get("regret")) for r in rows],
        },
        index=[str(r.get("name")) + (" (chosen)" if r.get("name") == chosen else "") for r in rows],
    )


def render_ram_tier(plan: Plan) -> None:
    """The RAM tier of a plan and its placement against RAM as LRU (nothing for a plan
    with every expert in host RAM)."""
    ram = plan.ram
    if ram is None:
        return
    bpe = plan.budget.bytes_per_expert
    every = plan.routing.num_layers * plan.routing.num_experts
    size = N.nbytes(ram.bytes or (bpe * ram.slots if bpe else None))
    store = f" ({N.nbytes(bpe * every)})" if bpe else ""
    layout = (f"one pool of {ram.layout.pool_slots} slots" if ram.layout.kind == "pool"
              else "per-layer caches")  # fmt: skip
    st.markdown(
        f"**RAM tier:** {ram.slots} slots ({size}, {layout}) between the device slots and a "
        f"disk store of every expert ({every} experts{store})"
    )
    cols = st.columns(6)
    cols[0].metric("RAM slots", f"{ram.slots} slots")
    cols[1].metric("RAM worst case", N.nbytes(ram.worst_case_bytes))
    cols[2].metric("Pinned in RAM", sum(len(r) for r in ram.eviction.pinned))
    cols[3].metric("RAM policy", ram.eviction.policy)
    cols[4].metric("RAM prefetcher", ram.prefetch.name)
    window = ram.adaptation.window
    cols[5].metric("RAM drift window (accesses)", N.plain(window) if window else "off")
    render_placement(plan)


def render_placement(plan: Plan) -> None:
    """What ``moetrace tune --ram-budget`` measured: the written placement against RAM as
    LRU over disk on every split, the fallback if the choice lost, every candidate."""
    info = placement_info(plan)
    if info is None:
        return
    st.markdown("#### RAM placement")
    written, chosen = info.get("written"), info.get("chosen")
    searched = ", ".join(str(s) for s in info.get("searched_on") or []) or N.MISSING
    st.caption(
        f"Placement written: **{written}** (chosen on splits {searched} by minimax regret of "
        f"the stall per token; {N.plain(info.get('slots'))} RAM slots, hardware "
        f"{info.get('hardware')}). Modeled: the device runs the plan, RAM holds the "
        "placement, every other expert is read from disk."
    )
    splits = [s for s in info.get("splits") or [] if isinstance(s, Mapping)]
    if splits:
        first = splits[0]
        mine, lru = _row(first.get("placement")), _row(first.get("lru"))
        cols = st.columns(3)
        cols[0].metric(f"Tokens/s vs RAM as LRU ({first.get('name')})",
                       N.ratio(_over(mine.get("tokens_per_s"), lru.get("tokens_per_s"))))  # fmt: skip
        cols[1].metric("Stall per token vs RAM as LRU", N.ratio(first.get("stall_vs_lru")))
        cols[2].metric("Disk reads vs RAM as LRU",
                       N.ratio(_over(mine.get("disk_bytes"), lru.get("disk_bytes"))))  # fmt: skip
    fb = info.get("fallback")
    if isinstance(fb, Mapping):
        st.warning(
            f"The search chose {fb.get('from')}, which lost to RAM as LRU on {fb.get('reason')}; "
            f"the plan's RAM tier runs {fb.get('to')}."
        )
    if splits:
        st.dataframe(placement_frame(splits, str(written)), hide_index=True, width="stretch")
    cands = [dict(r) for r in info.get("candidates") or [] if isinstance(r, Mapping)]
    if cands:
        with st.expander("Every RAM placement the tuner scored (search splits, modeled)"):
            st.dataframe(candidates_frame(cands, str(chosen)), width="stretch")
            st.caption(
                "Figures on the first search split; stall vs best: the candidate's stall per "
                "token over the best candidate's, on the split where it trails most."
            )


def render_sizing(plan: Plan, key: str) -> None:
    """The sizing frontier of ``expected.sizing`` (``moetrace tune --sweep``): tokens/s
    against device memory per RAM size, and the smallest sizes reaching a target."""
    info = S.sizing_info(plan)
    if info is None:
        return
    st.markdown("#### Sizing frontier")
    model = info.get("model") if isinstance(info.get("model"), Mapping) else {}
    hw = info.get("hardware") if isinstance(info.get("hardware"), Mapping) else {}
    points = S.valid_points(info.get("points"))
    front = S.frontier_keys(info)
    chart_slot = st.container()
    target = st.number_input(
        "target tok/s",
        min_value=0.0,
        value=round(S.default_target(info), 2),
        step=max(round(S.default_target(info) / 20, 2), 0.01),
        format="%.2f",
        key=f"sizing_target_{key}",
        help="The smallest device and RAM sizes of the grid that reach this many modeled "
        "tokens per second.",
    )
    df = S.sizing_frame(info)
    with chart_slot:
        st.altair_chart(
            plancharts.sizing_chart(
                df,
                title="Modeled tokens/s against device memory, one line per RAM size "
                "(diamonds: Pareto frontier)",
                ram_order=S.ram_order(info),
                target=float(target),
            ),
            width="stretch",
        )
        st.caption(
            f"{model.get('name', 'model')} on hardware {hw.get('name', N.MISSING)}, "
            f"{N.plain(info.get('tokens'))} tokens replayed ({info.get('granularity')}); "
            f"{sum(S.point_key(p) in front for p in points)} of {len(points)} sizes on the Pareto "
            "frontier (no other size is as fast with no more device and RAM memory). Memory is "
            "each tier's worst case, in GB of 10^9 bytes. The device runs LRU; RAM below every "
            "expert runs LRU or the pinned placement, whichever is faster. Dashed: the target."
        )
    rows, why = S.smallest_sizes(points, float(target))
    if rows is None:
        st.warning(f"Cannot recompute the smallest sizes: {why}.")
        stored = info.get("smallest")
        same = S.number(info.get("target_tps")) == float(target)
        if same and isinstance(stored, list):
            rows = S.valid_points(stored)
            st.caption(
                f"The file's answer for its target of {N.plain(info.get('target_tps'))} tok/s:"
            )
        else:
            return
    if not rows:
        st.info(f"No device and RAM size of the grid reaches {target:,.4g} tok/s.")
        return
    st.markdown(
        f"Smallest sizes reaching **{target:,.4g} tok/s** (per device size, the least RAM):"
    )
    st.dataframe(S.smallest_frame(rows, info), hide_index=True, width="stretch")
