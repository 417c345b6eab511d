"""The simulator's timeline recording: the same kernel, counters unchanged, and every
recorded outcome summing to the counters it was counted in."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from moetrace.errors import AnalysisError
from moetrace.store.hardware import HardwareProfile
from moetrace.store.plan import CacheLayout
from moetrace.tuner.policy import build_events
from moetrace.tuner.sim import kernel as K
from moetrace.tuner.sim.engine import simulate
from moetrace.tuner.sim.timeline import OUTCOMES, RecordedTimeline, Timeline
from tests.tuner.simhelpers import plan_for, random_tokens, routing

SLOW = HardwareProfile("slow", 0.001, 10.0, 1.0, 0.0)  # 1 ms per 1000-byte expert
FAST = HardwareProfile("fast", 1e6, 0.0, 100.0, 0.0)


def _events(seed: int = 0, n: int = 150, L: int = 3, E: int = 8, k: int = 2):
    rng = np.random.default_rng(seed)
    return build_events(routing(random_tokens(rng, n, L, E, k), E, prefill=4))


def _cases():
    ev = _events()
    lru_pf = plan_for(ev, "lru", 3, prefetch="transition", fetch=2)
    return {
        "lru+transition": (ev, lru_pf, SLOW),
        "one slot (streams)": (ev, plan_for(ev, "lru", 1), SLOW),
        "pool+transition": (
            ev,
            replace(lru_pf, layout=CacheLayout("pool", (1, 1, 1), pool_slots=7)),
            FAST,
        ),
        "belady+oracle": (ev, plan_for(ev, "belady", 3, prefetch="oracle", fetch=2), SLOW),
        "lfu+transition": (ev, plan_for(ev, "lfu", 2, prefetch="transition", fetch=3), SLOW),
    }


def _per_layer(ev, values: np.ndarray, per_access: bool) -> np.ndarray:
    """(L, 2) sums of per-event (or per-access) values by the event's layer and phase."""
    ev_of = np.repeat(np.arange(ev.num_events), np.diff(ev.ptr)) if per_access else None
    idx = ev_of if per_access else np.arange(ev.num_events)
    code = ev.layer[idx].astype(np.int64) * 2 + ev.phase[idx]
    return np.bincount(code, weights=values, minlength=ev.num_layers * 2).reshape(-1, 2)


@pytest.mark.parametrize("case", list(_cases()))
def test_recording_leaves_counters_unchanged_and_sums_to_them(case: str) -> None:
    ev, plan, hw = _cases()[case]
    plain = simulate(ev, plan, hw)
    rec = simulate(ev, plan, hw, record=True)
    assert plain.timeline is None
    np.testing.assert_array_equal(plain.stats, rec.stats)
    assert plain.total_seconds == rec.total_seconds
    tl = rec.timeline
    assert tl is not None and tl.num_events == ev.num_events
    assert tl.outcome.shape == ev.experts.shape
    c, s = tl.counts(), rec.stats
    assert c["accesses"] == s[K.S_ACCESS].sum()
    assert c["hits"] == s[K.S_HIT].sum()
    assert c["prefetch_served"] == s[K.S_PF_SERVED].sum()
    assert c["streamed"] == s[K.S_STREAM].sum()
    assert c["prefetch_wasted"] == s[K.S_PF_WASTED].sum()
    assert c["prefetch_issued"] == s[K.S_PF_ISSUED].sum()
    assert c["stall_s"] == pytest.approx(s[K.S_STALL].sum(), rel=1e-9, abs=1e-15)
    # per layer and phase too (wasted prefetches count at the evicting event, the
    # counters by the evicted expert's layer: only their totals compare)
    hit = np.isin(tl.outcome, (K.O_HIT, K.O_PF_HIT)).astype(float)
    np.testing.assert_array_equal(_per_layer(ev, hit, True), s[K.S_HIT])
    pf_hit = (tl.outcome == K.O_PF_HIT).astype(float)
    np.testing.assert_array_equal(_per_layer(ev, pf_hit, True), s[K.S_PF_SERVED])
    streamed = (tl.outcome == K.O_STREAM).astype(float)
    np.testing.assert_array_equal(_per_layer(ev, streamed, True), s[K.S_STREAM])
    np.testing.assert_allclose(_per_layer(ev, tl.stall_s, False), s[K.S_STALL], rtol=1e-9)


def test_cases_exercise_every_outcome() -> None:
    """The cases above see every outcome, wasted prefetches and stalls (else the sums
    would check little)."""
    seen = np.zeros(len(OUTCOMES), bool)
    wasted = stall = 0.0
    for ev, plan, hw in _cases().values():
        tl = simulate(ev, plan, hw, record=True).timeline
        assert tl is not None
        seen[np.unique(tl.outcome)] = True
        wasted += tl.wasted.sum()
        stall += tl.stall_s.sum()
    assert seen.all() and wasted > 0 and stall > 0


def test_select_and_json_round_trip() -> None:
    ev = _events(1)
    tl = simulate(ev, plan_for(ev, "lru", 2, prefetch="transition", fetch=2), SLOW, record=True)
    assert tl.timeline is not None
    part = tl.timeline.select(10, 40)
    assert part.num_events == 30 and part.ptr[0] == 0
    lo, hi = ev.ptr[10], ev.ptr[40]
    np.testing.assert_array_equal(part.outcome, tl.timeline.outcome[lo:hi])
    rec = RecordedTimeline(
        ev.layer[10:40].astype(np.int64),
        ev.phase[10:40].astype(np.int64),
        ev.experts[lo:hi].astype(np.int64),
        part,
        events_seen=ev.num_events,
        max_events=30,
    )
    data = rec.to_json()
    assert data["truncated"] and data["outcomes"] == list(OUTCOMES)
    back = RecordedTimeline.from_json(data)
    assert back.timeline.counts() == part.counts()
    np.testing.assert_array_equal(back.experts, rec.experts)
    with pytest.raises(AnalysisError, match="malformed"):
        RecordedTimeline.from_json({**data, "layer": data["layer"][:-1]})
    with pytest.raises(AnalysisError):
        RecordedTimeline.from_json({**data, "outcome": [7] * len(data["outcome"])})
    with pytest.raises(AnalysisError):
        Timeline(part.ptr, part.outcome[:-1], part.wasted, part.issued, part.stall_s)
