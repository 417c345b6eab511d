"""Adaptive policies (ARC, W-TinyLFU, LeCaR) and the drift detector in the one cache."""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import replace

import numpy as np
import pytest

from moetrace.store.hardware import load_hardware
from moetrace.store.plan import Adaptation, CacheLayout, EvictionConfig
from moetrace.tuner.policy import ExpertCache, build_events, eviction_spec
from moetrace.tuner.policy import cachestate as C
from moetrace.tuner.sim.engine import simulate
from moetrace.tuner.splits import shift_events
from tests.tuner.simhelpers import one_layer_cache, online_hits, plan_for, random_tokens, routing

HW = load_hardware("pcie4-x16")


def hit_rate(policy: str, seq: list[int], cap: int, E: int, **params: float) -> float:
    c = one_layer_cache(policy, cap, E, **params)
    hits = sum(1 for e in seq if not c.access(0, [e]))
    return hits / len(seq)


def arc_reference(seq: list[int], c: int) -> float:
    """ARC exactly as in Megiddo & Modha's pseudo-code (LRU ghost lists), one cache."""
    t1: OrderedDict[int, None] = OrderedDict()
    t2: OrderedDict[int, None] = OrderedDict()
    b1: OrderedDict[int, None] = OrderedDict()
    b2: OrderedDict[int, None] = OrderedDict()
    p = 0.0
    hits = 0

    def replace_(x: int) -> None:
        if t1 and (len(t1) > p or (x in b2 and len(t1) == p)):
            old, _ = t1.popitem(last=False)
            b1[old] = None
        else:
            old, _ = t2.popitem(last=False)
            b2[old] = None

    for x in seq:
        if x in t1 or x in t2:
            hits += 1
            t1.pop(x, None)
            t2.pop(x, None)
            t2[x] = None
        elif x in b1:
            p = min(c, p + max(len(b2) / len(b1), 1))
            replace_(x)
            del b1[x]
            t2[x] = None
        elif x in b2:
            p = max(0, p - max(len(b1) / len(b2), 1))
            replace_(x)
            del b2[x]
            t2[x] = None
        else:
            if len(t1) + len(b1) == c:
                if len(t1) < c:
                    b1.popitem(last=False)
                    replace_(x)
                else:
                    t1.popitem(last=False)
            elif len(t1) + len(b1) < c:
                total = len(t1) + len(t2) + len(b1) + len(b2)
                if total >= c:
                    if total == 2 * c:
                        b2.popitem(last=False)
                    replace_(x)
            t1[x] = None
    return hits / len(seq)


def lru_reference(seq: list[int], c: int) -> float:
    cache: OrderedDict[int, None] = OrderedDict()
    hits = 0
    for x in seq:
        if x in cache:
            hits += 1
            cache.move_to_end(x)
        else:
            if len(cache) == c:
                cache.popitem(last=False)
            cache[x] = None
    return hits / len(seq)


def mixed_workload(seed: int, n: int = 6000, E: int = 64) -> list[int]:
    """A skewed hot set with bursts of one-off scans and a moving working set."""
    rng = np.random.default_rng(seed)
    out: list[int] = []
    hot = rng.permutation(E)[:8]
    while len(out) < n:
        mode = rng.integers(3)
        if mode == 0:
            out += [int(rng.choice(hot)) for _ in range(100)]
        elif mode == 1:
            out += [int(e) for e in rng.integers(0, E, 40)]
        else:
            ws = rng.integers(0, E, 12)
            out += [int(rng.choice(ws)) for _ in range(100)]
    return out[:n]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_arc_agrees_with_the_papers_algorithm(seed: int) -> None:
    """Ours (ghost lists as eviction windows) vs the paper's exact ARC: within 1.5
    points; LRU is further away, so the tolerance tells ARC from its neighbour."""
    seq, c = mixed_workload(seed), 12
    ref = arc_reference(seq, c)
    ours = hit_rate("arc", seq, c, 64)
    assert abs(ours - ref) < 0.015, (ours, ref)
    assert hit_rate("lru", seq, c, 64) == pytest.approx(lru_reference(seq, c))


def test_arc_is_scan_resistant_and_lru_is_not() -> None:
    rng = np.random.default_rng(0)
    seq: list[int] = []
    for _ in range(40):
        seq += [int(e) for e in rng.integers(0, 6, 30)]  # hot set of 6, reused
        seq += list(range(10, 40))  # a one-off scan of 30 cold experts
    c = 10
    assert hit_rate("arc", seq, c, 40) > lru_reference(seq, c) + 0.05
    assert abs(hit_rate("arc", seq, c, 40) - arc_reference(seq, c)) < 0.015


def test_wtinylfu_keeps_the_hot_set_through_scans() -> None:
    seq: list[int] = []
    rng = np.random.default_rng(1)
    for i in range(60):
        seq += [int(e) for e in rng.integers(0, 8, 20)]
        seq += list(range(20 + 10 * (i % 8), 30 + 10 * (i % 8)))  # rarely repeated
    assert hit_rate("wtinylfu", seq, 10, 100) > lru_reference(seq, 10) + 0.1


def test_wtinylfu_hill_climbing_moves_the_window() -> None:
    """A working set that moves every 60 accesses favours recency: the climber grows the
    window from 1%; with ``climb`` 0 it stays where it started."""
    rng = np.random.default_rng(2)
    seq: list[int] = []
    for _ in range(300):
        ws = rng.integers(0, 200, 12)
        seq += [int(rng.choice(ws)) for _ in range(60)]
    for climb, moved in ((1.0, True), (0.0, False)):
        c = one_layer_cache("wtinylfu", 20, 200, climb=climb)
        for e in seq:
            c.access(0, [e])
        window = c.state.part_f[0, C.PF_P]
        assert bool(window > 0) == moved, window
    assert hit_rate("wtinylfu", seq, 20, 200) > hit_rate("wtinylfu", seq, 20, 200, climb=0.0)


def test_lecar_learns_which_policy_fits() -> None:
    """Frequency-friendly traffic pulls LRU's weight down, recency-friendly up."""
    rng = np.random.default_rng(3)
    freq: list[int] = []
    for _ in range(100):
        freq += [int(e) for e in rng.integers(0, 6, 20)] + [int(e) for e in rng.integers(6, 200, 8)]
    rec: list[int] = []
    for _ in range(150):
        ws = rng.integers(0, 200, 8)
        rec += [int(rng.choice(ws)) for _ in range(40)]
    weights = {}
    for name, seq in (("freq", freq), ("rec", rec)):
        c = one_layer_cache("lecar", 10, 200)
        for e in seq:
            c.access(0, [e])
        weights[name] = c.state.part_f[0, C.PF_W]
    assert weights["freq"] < 0.5 < weights["rec"], weights
    a, b = (hit_rate("lecar", freq, 10, 200, seed=s) for s in (0, 0))
    assert a == b  # seeded: the same draws every run


def test_registry_accepts_params_and_refuses_unknown() -> None:
    from moetrace.errors import ConfigError

    eviction_spec(EvictionConfig("wtinylfu", {"window": 0.2, "climb": 0.0}), 1, 8)
    with pytest.raises(ConfigError, match="wtinylfu"):
        eviction_spec(EvictionConfig("wtinylfu", {"beta": 1.0}), 1, 8)
    with pytest.raises(Exception, match="adaptation.fallback 'belady'"):
        eviction_spec(EvictionConfig("lru"), 1, 8, None, Adaptation("belady", 10))


# ---------------------------------------------------------------- drift


def drift_case():  # type: ignore[no-untyped-def]
    """Tune traffic whose hot experts are 0..5 and live traffic where 10..15 are."""
    rng = np.random.default_rng(4)
    tune = [
        [[int(rng.choice(6) if rng.random() < 0.9 else rng.integers(6, 16))]] for _ in range(800)
    ]
    live = [
        [[int(10 + rng.choice(6) if rng.random() < 0.9 else rng.integers(0, 10))]]
        for _ in range(4000)
    ]
    return build_events(routing(tune, 16)), build_events(routing(live, 16))


def test_drift_detector_switches_a_stale_plan_to_its_fallback() -> None:
    tune_ev, live_ev = drift_case()
    stale = plan_for(tune_ev, "pinned_lru", 8, pin_fraction=0.75)  # 6 pins on 0..5
    lru = simulate(live_ev, plan_for(tune_ev, "lru", 8), HW).summary()["hit_rate"]
    off = simulate(live_ev, stale, HW).summary()
    assert off["hit_rate"] < lru - 0.3 and "drift" not in off  # stale pins: no detector
    on = simulate(live_ev, replace(stale, adaptation=Adaptation("lru", 200, 0.02, 1e-9)), HW)
    on = on.summary()
    d = on["drift"]
    assert d["switched"] and d["switched_at_access"] == 200
    # with a half-life of 1 window the mean lag after one window is half that window's
    lag = d["lru_hit_rate"] - d["plan_hit_rate"]
    patient = replace(stale, adaptation=Adaptation("lru", 200, 0.55 * lag, 1.0))
    assert simulate(live_ev, patient, HW).summary()["drift"]["switched_at_access"] == 400
    assert d["lru_hit_rate"] - d["plan_hit_rate"] > 0.02
    assert on["hit_rate"] > lru - 0.05  # lost only the first window
    same = simulate(live_ev, replace(stale, adaptation=Adaptation("lru", 200, 0.99)), HW)
    assert not same.summary()["drift"]["switched"]  # margin too wide: never switches


def test_drift_detector_leaves_a_good_plan_alone() -> None:
    tune_ev, _ = drift_case()
    good = plan_for(tune_ev, "pinned_lru", 8, pin_fraction=0.75)
    res = simulate(tune_ev, replace(good, adaptation=Adaptation("arc", 100, 0.02)), HW)
    assert not res.summary()["drift"]["switched"]


def test_runtime_cache_switches_where_the_simulator_does() -> None:
    tune_ev, live_ev = drift_case()
    plan = replace(
        plan_for(tune_ev, "pinned_lru", 8, pin_fraction=0.75),
        adaptation=Adaptation("arc", 150, 0.02),
    )
    sim = simulate(live_ev, plan, HW).summary()
    c = ExpertCache(plan.layout, eviction_spec(plan.eviction, 1, 16, None, plan.adaptation), 16)
    assert online_hits(c, live_ev) == round(sim["accesses"] * sim["hit_rate"])
    assert c.drift() == sim["drift"]


# ---------------------------------------------------------------- shift split


def test_shift_events_moves_the_hot_experts_and_keeps_the_structure() -> None:
    rng = np.random.default_rng(5)
    tokens = random_tokens(rng, 200, 3, 12, 2)
    ev = build_events(routing(tokens, 12))
    sh = shift_events(ev, 1)
    assert sh.num_events == ev.num_events and np.array_equal(sh.ptr, ev.ptr)
    for i in range(ev.num_events):
        row = sh.experts[sh.ptr[i] : sh.ptr[i + 1]]
        assert list(row) == sorted(row)
    for layer in range(3):
        a = np.bincount(ev.experts[np.repeat(ev.layer, np.diff(ev.ptr)) == layer], minlength=12)
        b = np.bincount(sh.experts[np.repeat(sh.layer, np.diff(sh.ptr)) == layer], minlength=12)
        assert sorted(a) == sorted(b) and not np.array_equal(a, b)
    # the per-token experts are relabelled alike: every event's union still matches
    first = sh.token_experts[0, 0]
    assert set(first[first >= 0]) <= set(sh.experts[sh.ptr[0] : sh.ptr[1]])
    assert np.array_equal(shift_events(ev, 1).experts, sh.experts)


# ---------------------------------------------------------------- priors


def test_repin_moves_the_pins_to_the_live_hot_experts() -> None:
    """Pins fitted on 0..5 follow the traffic to 10..15 once live counts outweigh the
    fading prior; without ``repin`` they stay on yesterday's experts."""
    tune_ev, live_ev = drift_case()
    stale = plan_for(tune_ev, "pinned_lru", 8, pin_fraction=0.75)
    moving = plan_for(tune_ev, "pinned_lru", 8, pin_fraction=0.75, repin=50)
    assert "prior" in moving.eviction.tables and "prior" not in stale.eviction.tables
    pins = {}
    for name, plan in (("stale", stale), ("moving", moving)):
        c = ExpertCache(plan.layout, eviction_spec(plan.eviction, 1, 16), 16)
        for i in range(live_ev.num_events):
            c.access(0, [int(e) for e in live_ev.experts[live_ev.ptr[i] : live_ev.ptr[i + 1]]])
        pins[name] = set(np.flatnonzero(c.state.key_f[:16, C.KF_PIN]).tolist())
        assert c.state.layer_f[0, C.LF_ELECTIONS] == (
            live_ev.num_events // 50 if name == "moving" else 0
        )
    assert pins["stale"] == set(range(6)) and pins["moving"] == set(range(10, 16))
    lru = simulate(live_ev, plan_for(tune_ev, "lru", 8), HW).summary()["hit_rate"]
    assert simulate(live_ev, stale, HW).summary()["hit_rate"] < lru - 0.3
    assert simulate(live_ev, moving, HW).summary()["hit_rate"] > lru - 0.02


def test_repin_needs_its_prior_table() -> None:
    from moetrace.errors import PlanError

    tune_ev, _ = drift_case()
    plan = plan_for(tune_ev, "freq_lru", 8, beta=1.0, repin=50)
    eviction_spec(plan.eviction, 1, 16)
    tables = {k: v for k, v in plan.eviction.tables.items() if k != "prior"}
    with pytest.raises(PlanError, match=r"eviction.tables.prior must have shape \[1, 16\]"):
        eviction_spec(replace(plan.eviction, tables=tables), 1, 16)


@pytest.mark.parametrize("k", [1, 2, 4])
@pytest.mark.parametrize("caps", [(3, 3, 3), (2, 5, 1)])
def test_shadow_directory_hits_exactly_where_uniform_lru_does(
    k: int, caps: tuple[int, ...]
) -> None:
    """The detector compares with plain LRU as a user without a plan runs it (even
    per-layer shares, the event's experts protected from its own misses): its shadow hits
    equal a uniform LRU replay's, whatever the plan's layout, also when events need more
    experts than a layer has slots."""
    from moetrace.tuner.sim.layouts import uniform_layout

    rng = np.random.default_rng(k)
    ev = build_events(routing(random_tokens(rng, 300, 3, 10, k), 10))
    plan = replace(plan_for(ev, "lru", 3), layout=CacheLayout("per_layer", caps))
    uniform = replace(plan, layout=uniform_layout(sum(caps), 3, 10))
    lru = simulate(ev, uniform, HW).summary()
    watched = simulate(ev, replace(plan, adaptation=Adaptation("lru", 10**9, 0.5)), HW).summary()
    assert watched["drift"]["shadow_lru_hits"] == round(lru["hit_rate"] * lru["accesses"])


def markov_case():  # type: ignore[no-untyped-def]
    """One layer, one expert per pass: tune traffic where expert e is followed by e + 1
    (mod 12), live traffic where it is followed by e + 5, both with random jumps."""
    rng = np.random.default_rng(6)

    def walk(step: int, n: int) -> list[list[list[int]]]:
        e, out = 0, []
        for _ in range(n):
            e = (e + step) % 12 if rng.random() < 0.7 else int(rng.integers(12))
            out.append([[e]])
        return out

    return build_events(routing(walk(1, 1500), 12)), build_events(routing(walk(5, 3000), 12))


def test_repin_blends_the_transition_table_with_live_transitions() -> None:
    tune_ev, live_ev = markov_case()
    params = {"gamma": 5.0, "alpha": 0.0, "decay": 1.0}
    stale = plan_for(tune_ev, "trans_lru", 4, **params)
    live = plan_for(tune_ev, "trans_lru", 4, **params, repin=100)
    fresh = plan_for(live_ev, "trans_lru", 4, **params)  # fitted on the live traffic itself
    rate = {n: simulate(live_ev, p, HW).summary()["hit_rate"] for n, p in
            (("stale", stale), ("live", live), ("fresh", fresh))}  # fmt: skip
    # a table fitted on today's traffic is worth 3 points here; blending recovers most
    assert rate["fresh"] > rate["stale"] + 0.02, rate
    assert rate["live"] - rate["stale"] > 0.7 * (rate["fresh"] - rate["stale"]), rate
    c = ExpertCache(live.layout, eviction_spec(live.eviction, 1, 12), 12)
    assert c.state.trans_on.shape == (12, 12)  # live counts only where blending is on
    assert ExpertCache(
        stale.layout, eviction_spec(stale.eviction, 1, 12), 12
    ).state.trans_on.shape == (1, 1)
