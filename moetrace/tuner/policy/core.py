"""The one expert-slot cache: residency, protection, pins, eviction, prefetch installs.

The simulator's replay kernel calls these functions event by event and adds its timing
model; the runtime's :class:`~moetrace.tuner.policy.cache.ExpertCache` calls the same
functions and moves real weights. A policy is a *kind* with hooks (on hit, on miss,
choose a victim, on evict, on insert) over its own columns of the state: linear priority
keys (:mod:`.linear`), ARC (:mod:`.arc`), W-TinyLFU (:mod:`.tinylfu`) and LeCaR
(:mod:`.lecar`). numba compiles one kernel for all of them, so the dispatch on the kind is
a branch here; names map to kinds in the eviction registry (:mod:`.eviction`).

Per demand access: count the use, then a hit updates recency and calls ``on_hit``; a miss
calls ``on_miss``, asks the kind for a victim among the evictable slots (a free slot
first; -1: none can be freed, -2: refused at admission), evicts it (``on_evict``) and
installs the expert (``on_insert``); an expert with no slot is streamed. The drift
detector (:mod:`.drift`) watches every demand access and, when the plan falls behind LRU,
switches the cache to the fallback kind for good.
"""

from __future__ import annotations

import numba
import numpy as np

from moetrace.tuner.policy import arc, drift, lecar, linear, priors, tinylfu
from moetrace.tuner.policy.cachestate import (
    G_ACCESSES,
    G_ACTIVE,
    G_DEST,
    G_INC,
    G_INC_PREV,
    KF_FREQ,
    KF_GAPR,
    KF_GHOST,
    KF_ONLINE,
    KF_PIN,
    KF_TSCORE,
    KIND_ARC,
    KIND_LECAR,
    KIND_LINEAR,
    KIND_TINYLFU,
    LF_NPIN,
    LF_SH_CAP,
    PF_AGE,
    PF_CAP,
    PF_DIR,
    PF_FILL,
    PF_N1,
    PF_N2,
    PF_P,
    PF_PREV_RATE,
    PF_SAMPLE_HITS,
    PF_SAMPLE_N,
    PF_SEG0,
    PF_SEG1,
    PF_SEG2,
    PF_STEP,
    PF_W,
    PR_CLIMB,
    PR_DECAY,
    PR_DRIFT_WINDOW,
    PR_REPIN,
    PR_SEED,
    PR_STEP,
    PR_USE_NEXT,
    PR_WINDOW,
    SF_INS,
    SF_LAST,
    SF_PF,
    SF_PF_PHASE,
    SF_SEG,
    Config,
    State,
)

STREAMED, LOADED, HIT = -1, 0, 1


@numba.njit(cache=True, _nrt=False)  # no reference counting: see core.event
def active_kind(st: State, cfg: Config) -> int:
    return cfg.kinds[int(st.glob[G_ACTIVE])]


@numba.njit(cache=True, _nrt=False)  # no reference counting: see core.event
def init_policy(st: State, cfg: Config, kind: int) -> None:
    """Fresh per-partition policy state for ``kind``; resident experts start in its first
    segment (T1 for ARC, probation for W-TinyLFU's main area)."""
    st.key_f[:, KF_GHOST] = 0.0
    for p in range(st.part_f.shape[0]):
        c = st.part_f[p, PF_CAP]
        st.part_f[p, PF_P] = 0.0
        if kind == KIND_TINYLFU:
            st.part_f[p, PF_P] = float(int(cfg.prm[PR_WINDOW] * c + 0.5))
        st.part_f[p, PF_N1] = 0.0
        st.part_f[p, PF_N2] = 0.0
        st.part_f[p, PF_W] = 0.5
        st.part_f[p, PF_AGE] = 0.0
        st.part_f[p, PF_SAMPLE_N] = 0.0
        st.part_f[p, PF_SAMPLE_HITS] = 0.0
        st.part_f[p, PF_PREV_RATE] = -1.0
        st.part_f[p, PF_STEP] = cfg.prm[PR_STEP] * c
        st.part_f[p, PF_DIR] = 1.0
        first = 1.0 if kind == KIND_TINYLFU else 0.0
        st.part_f[p, PF_SEG0] = 0.0
        st.part_f[p, PF_SEG1] = 0.0
        st.part_f[p, PF_SEG2] = 0.0
        for s in range(cfg.part_lo[p], cfg.part_hi[p]):
            st.slot_f[s, SF_SEG] = first
            if st.slot_key[s] >= 0:
                st.part_f[p, PF_SEG0 + int(first)] += 1.0


@numba.njit(cache=True)
def setup(st: State, cfg: Config, pinned: np.ndarray, shadow_cap: np.ndarray) -> int:
    """Fill a new state: partitions, policy state, shadow capacities, and the pinned
    experts installed in key order. Returns how many pinned experts found no slot."""
    E = cfg.num_experts
    for p in range(st.part_f.shape[0]):
        st.part_f[p, PF_FILL] = cfg.part_lo[p]
        st.part_f[p, PF_CAP] = cfg.part_hi[p] - cfg.part_lo[p]
    st.layer_f[:, LF_SH_CAP] = shadow_cap
    st.key_f[:, KF_GAPR] = 1.0
    st.rng[0] = np.uint64(0x9E3779B97F4A7C15) ^ np.uint64(int(cfg.prm[PR_SEED]) + 1)
    missing = 0
    for key in range(pinned.shape[0]):
        if not pinned[key]:
            continue
        st.key_f[key, KF_PIN] = 1.0
        st.layer_f[key // E, LF_NPIN] += 1.0
        p = cfg.part_of_layer[key // E]
        if st.part_f[p, PF_FILL] >= cfg.part_hi[p]:
            missing += 1
            continue
        s = int(st.part_f[p, PF_FILL])
        st.part_f[p, PF_FILL] += 1.0
        st.slot_key[s] = key
        st.where[key] = s
        st.layer_count[key // E] += 1
        st.slot_f[s, SF_LAST] = -1.0
    init_policy(st, cfg, cfg.kinds[0])
    return missing


@numba.njit(cache=True, _nrt=False)  # no reference counting: see core.event
def _victim(
    st: State, cfg: Config, p: int, layer: int, i: int, ph: int, key: int, inc: float
) -> int:
    if st.part_f[p, PF_FILL] < cfg.part_hi[p]:
        s = int(st.part_f[p, PF_FILL])
        st.part_f[p, PF_FILL] += 1.0
        return s
    kind = active_kind(st, cfg)
    if kind == KIND_LINEAR:
        return linear.victim(st, cfg, p, layer, i, ph, cfg.weights[int(st.glob[G_ACTIVE]), ph], inc)
    if kind == KIND_ARC:
        return arc.victim(st, cfg, p, layer, i)
    if kind == KIND_TINYLFU:
        return tinylfu.victim(st, cfg, p, layer, i, key)
    return lecar.victim(st, cfg, p, layer, i)


@numba.njit(cache=True, _nrt=False)  # no reference counting: see core.event
def _install(
    st: State, cfg: Config, p: int, s: int, key: int, t: float, prefetched: bool, i: int
) -> tuple[int, bool]:
    """Put ``key`` in slot ``s``; returns the key evicted (-1: a free slot) and whether
    it was an unused prefetch."""
    E = cfg.num_experts
    kind = active_kind(st, cfg)
    old = st.slot_key[s]
    wasted = False
    if old >= 0:
        st.where[old] = -1
        st.layer_count[old // E] -= 1
        wasted = st.slot_f[s, SF_PF] == 1.0
        if kind == KIND_ARC:
            arc.on_evict(st, cfg, p, s, old)
        elif kind == KIND_TINYLFU:
            tinylfu.on_evict(st, cfg, p, s, old)
        elif kind == KIND_LECAR:
            lecar.on_evict(st, cfg, p, s, old, i)
    st.slot_key[s] = key
    st.where[key] = s
    st.layer_count[key // E] += 1
    st.slot_f[s, SF_INS] = t
    st.slot_f[s, SF_LAST] = t
    st.slot_f[s, SF_PF] = 0.0
    st.slot_stamp[s] = i
    st.key_f[key, KF_GHOST] = 0.0
    if kind == KIND_ARC:
        arc.on_insert(st, cfg, p, s, prefetched)
    elif kind == KIND_TINYLFU:
        tinylfu.on_insert(st, cfg, p, s, prefetched)
    return old, wasted


@numba.njit(cache=True, _nrt=False)  # no reference counting: see core.event
def event(
    st: State, cfg: Config, layer: int, ph: int, experts: np.ndarray, i: int, out: np.ndarray
) -> None:
    """Event ``i``: one pass of ``layer`` needing ``experts`` (in use order), then
    the end of the event (frequencies age, the drift detector may switch). Row j of ``out`` (int64, at least len(experts) x 6) tells what
    happened to expert j: slot (-1 if streamed), evicted key (-1 if none), HIT / LOADED /
    STREAMED, 1 if a prefetch served it, that prefetch's issuing phase, 1 if the evicted
    expert was an unused prefetch. Use order breaks recency ties (time i + j / (E + 1)).

    One call per event, and compiled without numba's reference counting (as every
    function it calls): with it, numba increments and decrements the count of every
    array of the state (23 of them, atomically) around each call it cannot flatten, which
    cost more than the cache's own work. Nothing here allocates."""
    E = cfg.num_experts
    # begin: transition scores for the layer; resident needed experts are protected
    a = int(st.glob[G_ACTIVE])
    if active_kind(st, cfg) == KIND_LINEAR and (
        cfg.weights[a, 0, 6] != 0.0 or cfg.weights[a, 1, 6] != 0.0
    ):
        if st.trans_on.shape[0] == st.key_f.shape[0]:
            priors.trans_scores(st, cfg, layer, experts)
        else:
            for x in range(E):
                sc = 0.0
                for q in range(experts.shape[0]):
                    sc += cfg.trans[layer * E + experts[q], x]
                st.key_f[layer * E + x, KF_TSCORE] = sc
    for q in range(experts.shape[0]):
        s = st.where[layer * E + experts[q]]
        if s >= 0:
            st.slot_stamp[s] = i
    p = cfg.part_of_layer[layer]
    kind = active_kind(st, cfg)
    use_next = cfg.prm[PR_USE_NEXT] != 0.0
    sub = 1.0 / (E + 1)
    plan_hits = 0
    for j in range(experts.shape[0]):
        key = layer * E + experts[j]
        t = i + j * sub
        st.glob[G_ACCESSES] += 1.0
        if use_next:
            st.cursor[key] += 1
        st.key_f[key, KF_FREQ] += st.glob[G_INC]
        st.key_f[key, KF_ONLINE] += 1.0
        if kind == KIND_TINYLFU:
            tinylfu.count(st.key_f, st.part_f, cfg.part_of_layer, cfg.prm, E, p, key)
        s = st.where[key]
        old = -1
        served = 0
        pf_phase = 0
        wasted = False
        if s >= 0:
            status = HIT
            served = int(st.slot_f[s, SF_PF] == 1.0)
            pf_phase = int(st.slot_f[s, SF_PF_PHASE])
            st.slot_f[s, SF_PF] = 0.0
            st.slot_f[s, SF_LAST] = t
            if kind == KIND_ARC:
                arc.on_hit(st, cfg, p, s)
            elif kind == KIND_TINYLFU:
                tinylfu.on_hit(st, cfg, p, s)
        else:
            if kind == KIND_ARC:
                arc.on_miss(st, cfg, p, key)
            elif kind == KIND_TINYLFU:
                st.glob[G_DEST] = -1.0  # a free slot, unless the victim choice says otherwise
            elif kind == KIND_LECAR:
                lecar.on_miss(st, cfg, p, key, i)
            s = _victim(st, cfg, p, layer, i, ph, key, st.glob[G_INC])
            if s < 0:
                status = STREAMED
                s = -1
            else:
                status = LOADED
                old, wasted = _install(st, cfg, p, s, key, t, False, i)
        if kind == KIND_TINYLFU and cfg.prm[PR_CLIMB] != 0.0:
            tinylfu.climb(st.part_f, cfg.prm, p, status == HIT)
        if status == HIT:
            plan_hits += 1
        out[j, 0] = s
        out[j, 1] = old
        out[j, 2] = status
        out[j, 3] = served
        out[j, 4] = pf_phase
        out[j, 5] = int(wasted)
    if cfg.prm[PR_DRIFT_WINDOW] > 0.0:
        drift.shadow_event(st.key_f, st.layer_f, st.glob, E, layer, experts, i, sub, plan_hits)
    # end: age frequencies; elect pins; let the drift detector switch the policy
    if cfg.prm[PR_REPIN] > 0.0:
        priors.count_pass(st, cfg, layer)
    st.glob[G_INC_PREV] = st.glob[G_INC]
    st.glob[G_INC] *= 1.0 / cfg.prm[PR_DECAY]
    if st.glob[G_INC] > 1e100:
        for k in range(st.key_f.shape[0]):
            st.key_f[k, KF_FREQ] *= 1e-100
        st.glob[G_INC] *= 1e-100
        st.glob[G_INC_PREV] *= 1e-100
    if drift.check(st.glob, cfg.prm):
        switch(st, cfg)


@numba.njit(cache=True, _nrt=False)  # no reference counting: see core.event
def switch(st: State, cfg: Config) -> None:
    """Switch the cache, for good, to the fallback policy: pins released, fresh state."""
    st.glob[G_ACTIVE] = 1.0
    st.key_f[:, KF_PIN] = 0.0
    init_policy(st, cfg, cfg.kinds[1])


@numba.njit(cache=True, _nrt=False)  # no reference counting: see core.event
def prefetch(
    st: State,
    cfg: Config,
    ph: int,
    layers: np.ndarray,
    experts: np.ndarray,
    i: int,
    out: np.ndarray,
) -> None:
    """Install predicted experts (``layers[q]``, ``experts[q]``) after event ``i`` (after
    :func:`event`, so with the frequency increment event ``i`` used). Predicted experts already resident and each newly installed one are
    protected from the rest of the batch, as are the slots event ``i`` used. Row q of
    ``out`` (int64, at least len x 3): slot (-2 already resident, -1 no slot could be freed:
    dropped), evicted key (-1 if none), 1 if that was an unused prefetch."""
    E = cfg.num_experts
    for q in range(experts.shape[0]):
        s = st.where[layers[q] * E + experts[q]]
        if s >= 0:
            st.slot_stamp[s] = i
    for q in range(experts.shape[0]):
        layer = layers[q]
        key = layer * E + experts[q]
        out[q, 1] = -1
        out[q, 2] = 0
        if st.where[key] >= 0:
            out[q, 0] = -2
            continue
        p = cfg.part_of_layer[layer]
        s = _victim(st, cfg, p, layer, i, ph, key, st.glob[G_INC_PREV])
        out[q, 0] = s if s >= 0 else -1
        if s < 0:
            continue
        old, wasted = _install(st, cfg, p, s, key, float(i), True, i)
        st.slot_f[s, SF_PF] = 1.0
        st.slot_f[s, SF_PF_PHASE] = float(ph)
        out[q, 1] = old
        out[q, 2] = int(wasted)
