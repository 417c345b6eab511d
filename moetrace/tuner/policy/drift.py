"""Drift detection: a shadow LRU directory per layer and the switch to a fallback policy.

The shadow directory holds expert ids only (no weights): per layer, the ``capacity`` most
recently used experts, where ``capacity`` is an even share of the plan's slots (plain LRU
as a user without a plan runs it, the tuner's baseline; whatever the plan's layout). Each event asks it whether plain LRU, run as the cache runs it (the event's
own experts protected), would have hit; on a per-layer layout its hits are exactly an LRU
replay's on that uniform layout. Over windows of
``window`` accesses the cache compares the plan's live hit rate with the shadow's and
keeps the lag (LRU's minus the plan's) as a mean over windows weighted with a half-life of
``halflife`` windows (starting from 0); when the mean lag exceeds ``margin`` the cache
switches, for good, to the plan's fallback policy (its pins released, its segments reset)
and records when and by how much. Prefetch hits count for the plan, so a plan whose
prefetcher carries it is not switched off for it.

Why a weighted mean and not one window: a window's lag varies by many points from
request to request (DeepSeek prompts at 6656 accesses: about 3 points typically, and
single long, repetitive prompts where LRU is 10-18 points ahead of a plan that is 3 points
ahead on average); a rule on single windows, or a sum of excesses, switched such plans off
for good. A stale plan trails every window (Llama-4 with yesterday's pins: about 8
points), so the mean crosses a 2-point margin within 4 windows; a plan whose pins are
re-elected online catches up before that.

State: key_f[KF_SH_LAST, KF_SH_IN]; layer_f[LF_SH_CAP, LF_SH_COUNT]; glob[G_WIN_*] the
current window, G_LAG the weighted lag, G_SWITCH_AT (access count at the switch, -1 before), G_SWITCH_PLAN/LRU the
two hit rates over the window that decided it, G_SHADOW_HITS in all.
"""

from __future__ import annotations

import numba
import numpy as np

from moetrace.tuner.policy.cachestate import (
    G_ACCESSES,
    G_ACTIVE,
    G_LAG,
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
    PR_HALFLIFE,
)


@numba.njit(cache=True, _nrt=False)  # no reference counting: see core.event
def shadow_event(
    key_f: np.ndarray,
    layer_f: np.ndarray,
    glob: np.ndarray,
    E: int,
    layer: int,
    experts: np.ndarray,
    t0: float,
    sub: float,
    plan_hits: int,
) -> None:
    """Record one event (``plan_hits`` of its accesses hit the plan's cache) in the shadow
    directory. The shadow is LRU as the cache runs it: the event's experts already in it
    are hits and protected from its misses, which evict the least recently used others
    (or, with every slot protected, are not kept). Takes only the arrays it touches."""
    n = experts.shape[0]
    glob[G_WIN_N] += n
    glob[G_WIN_HITS] += plan_hits
    for j in range(n):
        key = layer * E + experts[j]
        if key_f[key, KF_SH_IN] != 0.0:
            glob[G_WIN_SHADOW] += 1.0
            glob[G_SHADOW_HITS] += 1.0
            key_f[key, KF_SH_LAST] = t0 + j * sub
    cap = layer_f[layer, LF_SH_CAP]
    for j in range(n):
        key = layer * E + experts[j]
        if key_f[key, KF_SH_IN] != 0.0 or cap <= 0.0:
            continue
        if layer_f[layer, LF_SH_COUNT] >= cap:
            old = -1
            bl = t0
            for k in range(layer * E, (layer + 1) * E):
                if key_f[k, KF_SH_IN] != 0.0 and key_f[k, KF_SH_LAST] < bl:
                    bl = key_f[k, KF_SH_LAST]
                    old = k
            if old < 0:
                continue  # every resident expert is this event's: streamed
            key_f[old, KF_SH_IN] = 0.0
        else:
            layer_f[layer, LF_SH_COUNT] += 1.0
        key_f[key, KF_SH_IN] = 1.0
        key_f[key, KF_SH_LAST] = t0 + j * sub


@numba.njit(cache=True, _nrt=False)  # no reference counting: see core.event
def check(glob: np.ndarray, prm: np.ndarray) -> bool:
    """At the end of a window: whether to switch to the fallback (the plan is behind LRU)."""
    window = prm[PR_DRIFT_WINDOW]
    if window <= 0.0 or glob[G_WIN_N] < window:
        return False
    n = glob[G_WIN_N]
    plan, lru = glob[G_WIN_HITS] / n, glob[G_WIN_SHADOW] / n
    glob[G_WIN_N] = 0.0
    glob[G_WIN_HITS] = 0.0
    glob[G_WIN_SHADOW] = 0.0
    if glob[G_ACTIVE] != 0.0:
        return False
    a = 1.0 - 0.5 ** (1.0 / prm[PR_HALFLIFE])
    glob[G_LAG] = (1.0 - a) * glob[G_LAG] + a * (lru - plan)
    if glob[G_LAG] <= prm[PR_DRIFT_MARGIN]:
        return False
    glob[G_SWITCH_AT] = glob[G_ACCESSES]
    glob[G_SWITCH_PLAN] = plan
    glob[G_SWITCH_LRU] = lru
    return True
