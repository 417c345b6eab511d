"""LeCaR, after Vietri et al. (HotStorage 2018): a regret-minimising mix of LRU and LFU.

Each partition keeps a weight for LRU and one for LFU (1/2 each at first). On eviction the
two disagree or agree on a victim; if they disagree, the cache draws one by their weights
and remembers the victim in that policy's history. A later miss on an expert in LRU's
history means LRU chose badly: LFU's weight grows by ``exp(learning_rate * r)`` with the
regret ``r = discount ** age`` (age in events since the eviction; ``discount`` defaults to
0.005 ** (1 / slots), the paper's choice), and the other way round for LFU's history; the
weights are then normalised.

LFU ranks by the decayed use counts the mechanism keeps (``decay`` per event; 1 = plain
counts kept across evictions), ties by recency. Histories are windows over each policy's
eviction sequence of the partition's size (as ARC's ghosts in :mod:`.arc`). Draws come
from the cache's own seeded generator, so the simulator and the runtime draw alike.

State: part_f[PF_W] LRU's weight, PF_N1/N2 each history's evictions; key_f[KF_GHOST]
(1 = evicted by LRU, 2 = by LFU), KF_GSEQ, KF_GTIME; glob[G_CHOICE] the last draw.
"""

from __future__ import annotations

import math

import numba
import numpy as np

from moetrace.tuner.policy.cachestate import (
    G_CHOICE,
    KF_FREQ,
    KF_GHOST,
    KF_GSEQ,
    KF_GTIME,
    PF_CAP,
    PF_N1,
    PF_N2,
    PF_W,
    PR_DISCOUNT,
    PR_LEARNING_RATE,
    SF_LAST,
    Config,
    State,
    eligible,
    lru_in_segment,
    next_random,
)


@numba.njit(cache=True, _nrt=False)  # no reference counting: see core.event
def on_miss(st: State, cfg: Config, p: int, key: int, i: int) -> None:
    g = st.key_f[key, KF_GHOST]
    if g == 0.0:
        return
    st.key_f[key, KF_GHOST] = 0.0
    c = st.part_f[p, PF_CAP]
    n = st.part_f[p, PF_N1] if g == 1.0 else st.part_f[p, PF_N2]
    if n - st.key_f[key, KF_GSEQ] >= c:
        return  # fell out of the history
    d = cfg.prm[PR_DISCOUNT] ** (1.0 / max(c, 1.0))
    r = d ** (i - st.key_f[key, KF_GTIME])
    w_lru = st.part_f[p, PF_W]
    w_lfu = 1.0 - w_lru
    if g == 1.0:
        w_lfu *= math.exp(cfg.prm[PR_LEARNING_RATE] * r)
    else:
        w_lru *= math.exp(cfg.prm[PR_LEARNING_RATE] * r)
    st.part_f[p, PF_W] = w_lru / (w_lru + w_lfu)


@numba.njit(cache=True, _nrt=False)  # no reference counting: see core.event
def victim(st: State, cfg: Config, p: int, layer: int, i: int) -> int:
    a = lru_in_segment(st, cfg, p, layer, i, -1.0)
    if a < 0:
        return -1
    b = -1
    bf = np.inf
    bl = np.inf
    for s in range(cfg.part_lo[p], cfg.part_hi[p]):
        if not eligible(st, cfg, s, layer, i):
            continue
        f = st.key_f[st.slot_key[s], KF_FREQ]
        if f < bf or (f == bf and st.slot_f[s, SF_LAST] < bl):
            bf = f
            bl = st.slot_f[s, SF_LAST]
            b = s
    if a == b:
        st.glob[G_CHOICE] = 0.0
        return a
    if next_random(st) < st.part_f[p, PF_W]:
        st.glob[G_CHOICE] = 1.0
        return a
    st.glob[G_CHOICE] = 2.0
    return b


@numba.njit(cache=True, _nrt=False)  # no reference counting: see core.event
def on_evict(st: State, cfg: Config, p: int, s: int, old: int, i: int) -> None:
    g = st.glob[G_CHOICE]
    st.glob[G_CHOICE] = 0.0
    if g == 0.0:
        return
    col = PF_N1 if g == 1.0 else PF_N2
    st.part_f[p, col] += 1.0
    st.key_f[old, KF_GHOST] = g
    st.key_f[old, KF_GSEQ] = st.part_f[p, col]
    st.key_f[old, KF_GTIME] = float(i)
