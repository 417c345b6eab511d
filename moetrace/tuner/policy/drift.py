"""Drift detection: a shadow LRU directory per layer and the switch to a fallback policy.

The shadow directory holds expert ids only (no weights): per layer, the ``capacity`` most
recently used experts, where ``capacity`` is the layer's slots under the plan (a pool's
even share). Each demand access asks it whether plain LRU would have hit. Over windows of
``window`` accesses the cache compares the plan's live hit rate with the shadow's; the
first window in which the plan is behind by more than ``margin`` switches the cache, for
good, to the plan's fallback policy (its pins released, its segments reset) and records
when and by how much. Prefetch hits count for the plan, so a plan whose prefetcher carries
it is not switched off for it.

State: key_f[KF_SH_LAST, KF_SH_IN]; layer_f[LF_SH_CAP, LF_SH_COUNT]; glob[G_WIN_*] the
current window, G_SWITCH_AT (access count at the switch, -1 before), G_SWITCH_PLAN/LRU the
two hit rates over the window that decided it, G_SHADOW_HITS in all.
"""

from __future__ import annotations

import numba

from moetrace.tuner.policy.cachestate import (
    G_ACCESSES,
    G_ACTIVE,
    G_SHADOW_HITS,
    G_SWITCH_AT,
    G_SWITCH_LRU,
    G_SWITCH_PLAN,
    G_WIN_HITS,
    G_WIN_N,
    G_WIN_SHADOW,
    KF_SH_IN,
    KF_SH_LAST,
    LF_SH_CAP,
    LF_SH_COUNT,
    PR_DRIFT_MARGIN,
    PR_DRIFT_WINDOW,
    Config,
    State,
)


@numba.njit(cache=True)
def shadow_access(st: State, cfg: Config, layer: int, key: int, t: float, hit: bool) -> None:
    """Record one demand access (``hit``: the plan's cache hit) in the shadow directory."""
    if cfg.prm[PR_DRIFT_WINDOW] <= 0.0:
        return
    st.glob[G_WIN_N] += 1.0
    if hit:
        st.glob[G_WIN_HITS] += 1.0
    if st.key_f[key, KF_SH_IN] != 0.0:
        st.glob[G_WIN_SHADOW] += 1.0
        st.glob[G_SHADOW_HITS] += 1.0
    elif st.layer_f[layer, LF_SH_CAP] > 0.0:
        if st.layer_f[layer, LF_SH_COUNT] >= st.layer_f[layer, LF_SH_CAP]:
            E = cfg.num_experts
            old = -1
            bl = 1e300
            for k in range(layer * E, (layer + 1) * E):
                if st.key_f[k, KF_SH_IN] != 0.0 and st.key_f[k, KF_SH_LAST] < bl:
                    bl = st.key_f[k, KF_SH_LAST]
                    old = k
            st.key_f[old, KF_SH_IN] = 0.0
        else:
            st.layer_f[layer, LF_SH_COUNT] += 1.0
        st.key_f[key, KF_SH_IN] = 1.0
    st.key_f[key, KF_SH_LAST] = t


@numba.njit(cache=True)
def check(st: State, cfg: Config) -> bool:
    """At the end of a window: whether to switch to the fallback (the plan is behind LRU)."""
    window = cfg.prm[PR_DRIFT_WINDOW]
    if window <= 0.0 or st.glob[G_WIN_N] < window:
        return False
    n = st.glob[G_WIN_N]
    plan, lru = st.glob[G_WIN_HITS] / n, st.glob[G_WIN_SHADOW] / n
    st.glob[G_WIN_N] = 0.0
    st.glob[G_WIN_HITS] = 0.0
    st.glob[G_WIN_SHADOW] = 0.0
    if st.glob[G_ACTIVE] != 0.0 or lru - plan <= cfg.prm[PR_DRIFT_MARGIN]:
        return False
    st.glob[G_SWITCH_AT] = st.glob[G_ACCESSES]
    st.glob[G_SWITCH_PLAN] = plan
    st.glob[G_SWITCH_LRU] = lru
    return True
