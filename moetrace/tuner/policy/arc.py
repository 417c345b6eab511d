"""ARC, after Megiddo & Modha (FAST 2003), per cache partition.

Resident experts are in T1 (seen once since they entered; segment 0) or T2 (seen again;
segment 1). Evicted experts leave a ghost in B1 or B2. A miss on a B1 ghost says T1 was
too small: the target size ``p`` of T1 grows; a miss on a B2 ghost shrinks it. Eviction
takes T1's least recently used expert while T1 is above ``p``, else T2's.

Ghost lists are kept as windows over each list's eviction sequence: a ghost is in B1 while
fewer than ``c`` (the partition's slots) experts have been evicted from T1 after it, which
makes ghost bookkeeping O(1) per eviction; it differs from the paper's LRU ghost lists only
in that ghosts hit and removed do not shorten the window. Slots protected by the current
layer, pinned experts and a pool's guaranteed shares are never evicted (the cache's
mechanism); if T1 (T2) has no evictable slot, the other list gives the victim.

State: slot_f[SF_SEG] (0 = T1, 1 = T2); part_f[PF_P] target size of T1, PF_SEG0/1 list
sizes, PF_N1/N2 evictions from T1/T2; key_f[KF_GHOST] (1 = B1, 2 = B2) and KF_GSEQ;
glob[G_DEST] the list a missed expert enters (1 = T2 after a ghost hit).
"""

from __future__ import annotations

import numba

from moetrace.tuner.policy.cachestate import (
    G_DEST,
    KF_GHOST,
    KF_GSEQ,
    PF_CAP,
    PF_N1,
    PF_N2,
    PF_P,
    PF_SEG0,
    SF_SEG,
    Config,
    State,
    lru_in_segment,
    set_segment,
)


@numba.njit(cache=True, _nrt=False)  # no reference counting: see core.event
def on_hit(st: State, cfg: Config, p: int, s: int) -> None:
    if st.slot_f[s, SF_SEG] == 0.0:
        set_segment(st, p, s, 1.0)


@numba.njit(cache=True, _nrt=False)  # no reference counting: see core.event
def on_miss(st: State, cfg: Config, p: int, key: int) -> None:
    c = st.part_f[p, PF_CAP]
    g = st.key_f[key, KF_GHOST]
    st.glob[G_DEST] = 0.0
    if g == 0.0:
        return
    n1, n2 = st.part_f[p, PF_N1], st.part_f[p, PF_N2]
    b1, b2 = min(n1, c), min(n2, c)
    if g == 1.0 and n1 - st.key_f[key, KF_GSEQ] < c:
        st.part_f[p, PF_P] = min(st.part_f[p, PF_P] + max(b2 / max(b1, 1.0), 1.0), c)
        st.glob[G_DEST] = 1.0
    elif g == 2.0 and n2 - st.key_f[key, KF_GSEQ] < c:
        st.part_f[p, PF_P] = max(st.part_f[p, PF_P] - max(b1 / max(b2, 1.0), 1.0), 0.0)
        st.glob[G_DEST] = 2.0
    st.key_f[key, KF_GHOST] = 0.0


@numba.njit(cache=True, _nrt=False)  # no reference counting: see core.event
def victim(st: State, cfg: Config, p: int, layer: int, i: int) -> int:
    t1 = st.part_f[p, PF_SEG0]
    target = st.part_f[p, PF_P]
    from_t1 = t1 >= 1.0 and (t1 > target or (st.glob[G_DEST] == 2.0 and t1 == target))
    first, second = (0.0, 1.0) if from_t1 else (1.0, 0.0)
    s = lru_in_segment(st, cfg, p, layer, i, first)
    if s < 0:
        s = lru_in_segment(st, cfg, p, layer, i, second)
    return s


@numba.njit(cache=True, _nrt=False)  # no reference counting: see core.event
def on_evict(st: State, cfg: Config, p: int, s: int, old: int) -> None:
    seg = st.slot_f[s, SF_SEG]
    st.part_f[p, PF_SEG0 + int(seg)] -= 1.0
    col = PF_N1 if seg == 0.0 else PF_N2
    st.part_f[p, col] += 1.0
    st.key_f[old, KF_GHOST] = 1.0 if seg == 0.0 else 2.0
    st.key_f[old, KF_GSEQ] = st.part_f[p, col]


@numba.njit(cache=True, _nrt=False)  # no reference counting: see core.event
def on_insert(st: State, cfg: Config, p: int, s: int, prefetched: bool) -> None:
    seg = 1.0 if (st.glob[G_DEST] != 0.0 and not prefetched) else 0.0
    st.slot_f[s, SF_SEG] = seg
    st.part_f[p, PF_SEG0 + int(seg)] += 1.0
    st.glob[G_DEST] = 0.0
