"""A plan's schedule on the Plans page: which scheduler, how it batches, and what the tuner
measured against first come, first served on every validation split."""

from __future__ import annotations

from typing import Any

import pandas as pd
import streamlit as st

from moetrace.dashboard import numbers as N
from moetrace.store.plan import Plan, ScheduleConfig


def _params(params: Any) -> str:
    return ", ".join(f"{k} {N.plain(v)}" for k, v in sorted(dict(params).items())) or "defaults"


def schedule_frame(rows: list[dict[str, Any]]) -> pd.DataFrame:
    """The tuner's schedule and FCFS rows of one split, formatted for reading."""
    return pd.DataFrame(
        {
            "hit rate": [N.pct(r.get("hit_rate")) for r in rows],
            "bytes moved": [N.nbytes(r.get("bytes_moved")) for r in rows],
            "mean latency": [N.seconds(r.get("mean_latency_s")) for r in rows],
            "p99 latency": [N.seconds(r.get("p99_latency_s")) for r in rows],
            "mean waiting": [N.plain(r.get("mean_waiting")) for r in rows],
            "most overtaken": [N.plain(r.get("max_overtaken")) for r in rows],
        },
        index=[str(r.get("name")) for r in rows],
    )


def render_schedule(plan: Plan) -> None:
    """The schedule section of one plan (nothing for a plan that runs FCFS one at a time
    and carries no measurement)."""
    sc = plan.schedule
    info = plan.expected.get("schedule")
    if sc == ScheduleConfig() and not isinstance(info, dict):
        return
    st.markdown(
        f"**Schedule:** {sc.scheduler} ({_params(sc.params)}), batches of up to "
        f"{sc.batch_size}, {sc.batching} batching"
    )
    if not isinstance(info, dict):
        return
    splits = [s for s in info.get("splits") or [] if isinstance(s, dict) and s.get("rows")]
    if splits:
        first = splits[0]["rows"]
        mine, fcfs = first[0], first[-1]
        cols = st.columns(3)
        cols[0].metric(f"Bytes moved vs FCFS ({splits[0]['name']})",
                       N.ratio(_over(mine.get("bytes_moved"), fcfs.get("bytes_moved"))))  # fmt: skip
        cols[1].metric("p99 latency vs FCFS",
                       N.ratio(_over(mine.get("p99_latency_s"), fcfs.get("p99_latency_s"))))  # fmt: skip
        cols[2].metric("Mean latency vs FCFS",
                       N.ratio(_over(mine.get("mean_latency_s"), fcfs.get("mean_latency_s"))))  # fmt: skip
    fb = info.get("fallback")
    if isinstance(fb, dict):
        st.warning(f"The search chose {fb.get('from')}, which lost on {fb.get('reason')}; "
                   "the plan runs first come, first served.")  # fmt: skip
    with st.expander("Schedule against FCFS on every split (modeled)"):
        settings = info.get("settings") or {}
        rate = settings.get("arrival_rate")
        st.caption(
            "Queue modeled with batches of up to "
            f"{N.plain(settings.get('batch_size'))}, {settings.get('batching', 'continuous')} "
            f"batching, arrivals: {'Poisson ' + N.per_s(rate) if rate else 'recorded or all waiting'}."
        )
        for s in splits:
            st.markdown(f"Split **{s['name']}**")
            st.dataframe(schedule_frame(s["rows"]))


def _over(a: Any, b: Any) -> float | None:
    try:
        return float(a) / float(b) if b else None
    except (TypeError, ValueError):
        return None
