"""Eviction policies: registry, and each policy's eviction order on hand-made sequences."""

from __future__ import annotations

import numpy as np
import pytest

from moetrace.errors import ConfigError, PlanError
from moetrace.store.hardware import load_hardware
from moetrace.store.plan import CacheLayout, EvictionConfig
from moetrace.tuner.policy import POLICIES, PREFETCHERS, ExpertCache, eviction_spec, fit_eviction
from moetrace.tuner.sim.engine import simulate
from tests.tuner.simhelpers import events_of, online_hits, plan_for
from tests.tuner.simhelpers import one_layer_cache as cache

HW = load_hardware("pcie4-x16")


def evictions(c: ExpertCache, seq: list[int]) -> list[int | None]:
    """Per access: None on a hit, else the evicted expert (-1 for a free slot)."""
    out: list[int | None] = []
    for e in seq:
        loads = c.access(0, [e])
        out.append(None if not loads else (-1 if loads[0][1] is None else loads[0][1][1]))
    return out


def kernel_hits(seq: list[int], policy: str, capacity: int, **params: float) -> int:
    ev = events_of(seq, 8)
    res = simulate(ev, plan_for(ev, policy, capacity, **params), HW)
    return int(res.summary()["accesses"] * res.summary()["hit_rate"])


def test_registry_names_and_unknown() -> None:
    for name in ("lru", "lfu", "fifo", "static", "pinned_lru", "freq_lru", "belady"):
        assert name in POLICIES
    for name in (
        "none",
        "transition",
        "activation_matrix",
        "similar_request",
        "learned",
        "speculative",
        "oracle",
    ):
        assert name in PREFETCHERS
    with pytest.raises(ConfigError, match="unknown eviction policy 'nope'"):
        eviction_spec(EvictionConfig("nope"), 1, 4)


def test_lru_order() -> None:
    seq = [0, 1, 0, 2, 0, 1]
    assert evictions(cache("lru", 2), seq) == [-1, -1, None, 1, None, 2]
    assert kernel_hits(seq, "lru", 2) == 2


def test_fifo_order() -> None:
    seq = [0, 1, 0, 2, 0, 1]
    assert evictions(cache("fifo", 2), seq) == [-1, -1, None, 0, 1, 2]
    assert kernel_hits(seq, "fifo", 2) == 1


def test_lfu_order_differs_from_lru() -> None:
    seq = [0, 0, 0, 1, 2, 1, 2, 0]
    assert evictions(cache("lfu", 2), seq) == [-1, None, None, -1, 1, 2, 1, None]
    assert kernel_hits(seq, "lfu", 2) == 3
    assert evictions(cache("lru", 2), seq) == [-1, None, None, -1, 0, None, None, 1]
    assert kernel_hits(seq, "lru", 2) == 4


def test_lfu_decay_forgets_old_counts() -> None:
    # with strong decay, old popularity of 0 fades and it behaves like LRU
    seq = [0, 0, 0, 1, 2, 1, 2, 0]
    assert evictions(cache("lfu", 2, decay=0.1), seq)[4] == 0


def test_belady_evicts_furthest_next_use() -> None:
    # cap 2: at 2 evict the one needed furthest (1 is needed after 0)
    seq = [0, 1, 2, 0, 1]
    assert kernel_hits(seq, "belady", 2) == 1  # 0 hit; 1 missed
    assert kernel_hits(seq, "lru", 2) == 0
    with pytest.raises(ConfigError, match="oracle"):
        cache("belady", 2)


def test_pinned_and_static() -> None:
    ev = events_of([0, 0, 0, 1, 2, 3, 0, 1], 8)
    plan = plan_for(ev, "pinned_lru", 2, pin_fraction=0.5)
    assert plan.eviction.pinned == ((0,),)
    spec = eviction_spec(plan.eviction, 1, 8)
    c = ExpertCache(plan.layout, spec, 8)
    assert c.resident(0, 0)
    # 0 is pinned, so every other expert shares the one free slot
    assert evictions(c, [1, 2, 3, 0, 1]) == [-1, 1, 2, None, 3]
    static = plan_for(ev, "static", 2)
    assert static.eviction.pinned == ((0, 1),)
    res = simulate(ev, static, HW).summary()
    assert res["streamed"] == 2  # 2 and 3 have no slot: streamed, never cached
    assert res["hit_rate"] == pytest.approx(6 / 8)  # 0 and 1 pinned: hits from the start


def test_freq_lru_interpolates_lru_and_frequency() -> None:
    fit = events_of([0] * 10 + [1, 2, 3], 8)
    c0 = fit_eviction("freq_lru", fit, (2,), {"beta": 0.0})
    spec0 = eviction_spec(c0, 1, 8)
    assert np.allclose(spec0.weights[:, 0], 1.0)
    c = ExpertCache(
        CacheLayout("per_layer", (2,)),
        eviction_spec(fit_eviction("freq_lru", fit, (2,), {"beta": 8.0}), 1, 8),
        8,
    )
    # 0 is frequent in the tune data, so it survives although least recently used
    assert evictions(c, [0, 1, 2]) == [-1, -1, 1]
    lru = cache("lru", 2)
    assert evictions(lru, [0, 1, 2]) == [-1, -1, 0]


def test_gap_table_shape_checked() -> None:
    bad = EvictionConfig("freq_lru", {"beta": 1.0}, tables={"gap": [[1.0]]})
    with pytest.raises(PlanError, match="tables.gap must have shape"):
        eviction_spec(bad, 2, 4)


def test_pool_min_share_is_respected() -> None:
    layout = CacheLayout("pool", (1, 1), pool_slots=3)
    c = ExpertCache(layout, eviction_spec(EvictionConfig("lru"), 2, 4), 4)
    c.access(0, [0])
    c.access(1, [0])
    c.access(1, [1])  # pool full: 3 slots
    loads = c.access(1, [2])  # layer 0 holds only its minimum share: layer 1 evicts its own
    assert loads == [(2, (1, 0))]


def test_lrfu_trades_recency_against_decayed_count() -> None:
    # expert 0 used 3 times long ago, 1 and 2 once recently: lrfu keeps the frequent one
    # when a use is worth more passes than the recency difference, else acts as LRU
    seq = [0, 0, 0, 1, 2, 3]
    assert evictions(cache("lrfu", 3, alpha=5.0, decay=1.0), seq)[-1] == 1
    assert evictions(cache("lrfu", 3, alpha=0.1, decay=1.0), seq)[-1] == 0
    # with fast decay the old uses are forgotten: LRU again
    assert evictions(cache("lrfu", 3, alpha=5.0, decay=0.2), seq)[-1] == 0


def test_trans_lru_keeps_the_predicted_successor() -> None:
    # within each request, 0 is always followed by 1; a pass of 0 makes 1 the last to go
    from moetrace.tuner.policy import build_events
    from tests.tuner.simhelpers import routing

    fit = build_events(routing([[[0]], [[1]], [[2]], [[0]], [[1]], [[3]]], 4))
    config = fit_eviction("trans_lru", fit, (2,), {"gamma": 5.0})
    trans = np.asarray(config.tables["trans"])
    assert trans.shape == (1, 4, 4)
    assert trans[0, 0, 1] == 1.0 and trans[0, 1, 2] == 0.5 and trans[0, 1, 3] == 0.5
    c = ExpertCache(CacheLayout("per_layer", (2,)), eviction_spec(config, 1, 4), 4)
    c.access(0, [1])
    c.access(0, [2])
    c.access(0, [0])  # LRU would evict 1; the table says 1 comes next: 2 goes
    assert c.resident(0, 1) and not c.resident(0, 2)
    lru = ExpertCache(CacheLayout("per_layer", (2,)), eviction_spec(EvictionConfig("lru"), 1, 4), 4)
    for e in (1, 2, 0):
        lru.access(0, [e])
    assert lru.resident(0, 2) and not lru.resident(0, 1)


def test_trans_table_shape_checked() -> None:
    bad = EvictionConfig("trans_lru", {"gamma": 1.0}, tables={"trans": [[[0.5]]]})
    with pytest.raises(PlanError, match="tables.trans must have shape"):
        eviction_spec(bad, 2, 4)


@pytest.mark.parametrize(
    "policy",
    [
        "lru",
        "fifo",
        "lfu",
        "pinned_lru",
        "freq_lru",
        "lrfu",
        "lrfu_fast",
        "trans_lru",
        "arc",
        "wtinylfu",
        "lecar",
    ],  # fmt: skip
)
@pytest.mark.parametrize("pool", [False, True])
def test_online_cache_matches_simulator(policy: str, pool: bool) -> None:
    """The runtime's ExpertCache and the simulator's kernel make the same decisions."""
    from moetrace.tuner.policy import build_events
    from tests.tuner.simhelpers import random_tokens, routing

    rng = np.random.default_rng(11)
    tokens = random_tokens(rng, 150, 3, 10, 2)
    ev = build_events(routing(tokens, 10))
    if policy == "lrfu_fast":  # the count term mixed with recency, with a strong decay
        plan = plan_for(ev, "lrfu", 3, alpha=0.7, decay=0.95)
    elif policy == "trans_lru":  # transition, count and recency terms all in play
        plan = plan_for(ev, "trans_lru", 3, gamma=0.5, alpha=0.3, decay=0.95)
    else:
        plan = plan_for(ev, policy, 3)
    if pool:
        from dataclasses import replace

        plan = replace(plan, layout=CacheLayout("pool", (1, 1, 1), pool_slots=9))
    sim = simulate(ev, plan, HW).summary()
    hits = online_hits(ExpertCache(plan.layout, eviction_spec(plan.eviction, 3, 10), 10), ev)
    assert hits == round(sim["accesses"] * sim["hit_rate"])
    if policy in ("lrfu_fast", "trans_lru", "arc", "wtinylfu", "lecar"):  # not LRU in disguise
        lru = simulate(ev, replace_policy(plan, "lru"), HW).summary()
        assert hits != round(lru["accesses"] * lru["hit_rate"])


def replace_policy(plan, name: str):  # type: ignore[no-untyped-def]
    from dataclasses import replace

    return replace(plan, eviction=EvictionConfig(name))
