"""W-TinyLFU with a hill-climbing window, after the design of the Caffeine cache
(Einziger, Friedman & Manes, "TinyLFU", ACM ToS 2017; Caffeine's adaptive window).

A partition's slots are split into a small LRU **window** (segment 0) and a main SLRU of
**probation** (1) and **protected** (2) experts. New experts enter the window; the
window's least recently used expert, when the window is over its target size, competes
with probation's least recently used one, and the one used less often recently leaves the
cache (the window's loses ties). With no window, a new expert competes at the door and, if
it loses, is streamed (loaded, used, not cached). A hit in probation promotes to protected
(at most ``protected`` of the main area; the protected LRU is demoted back).

Frequencies are exact use counts per (layer, expert) (the key space is small, so the
count-min sketch TinyLFU uses to save memory is not needed), halved every ``sample`` x
slots accesses of the partition, as TinyLFU's reset ages its sketch. Every such sample the
hill climber compares the partition's hit rate with the last sample's and moves the window
target by ``step`` x slots in the same direction if it improved, else the other way; the
step shrinks by 2% per sample and restarts when the hit rate moves by more than 5 points.

State: slot_f[SF_SEG]; part_f[PF_P] window target (slots), PF_SEG0..2 segment sizes,
PF_AGE accesses since the last halving, PF_SAMPLE_N/HITS the current sample, PF_PREV_RATE
the last sample's hit rate (-1 before the first), PF_STEP and PF_DIR the climber's step;
key_f[KF_CNT] the counts; glob[G_DEST] the segment a missed expert enters.
"""

from __future__ import annotations

import numba
import numpy as np

from moetrace.tuner.policy.cachestate import (
    G_DEST,
    KF_CNT,
    PF_AGE,
    PF_CAP,
    PF_DIR,
    PF_P,
    PF_PREV_RATE,
    PF_SAMPLE_HITS,
    PF_SAMPLE_N,
    PF_SEG0,
    PF_SEG2,
    PF_STEP,
    PR_CLIMB,
    PR_PROTECTED,
    PR_SAMPLE,
    PR_STEP,
    SF_LAST,
    SF_SEG,
    Config,
    State,
    lru_in_segment,
    set_segment,
)

RESTART = 0.05
STEP_DECAY = 0.98


@numba.njit(cache=True, _nrt=False)  # no reference counting: see core.event
def count(
    key_f: np.ndarray,
    part_f: np.ndarray,
    part_of_layer: np.ndarray,
    prm: np.ndarray,
    E: int,
    p: int,
    key: int,
) -> None:
    """Count a use of ``key``; halve the partition's counts every sample (takes only the
    arrays it touches)."""
    key_f[key, KF_CNT] += 1.0
    part_f[p, PF_AGE] += 1.0
    if part_f[p, PF_AGE] >= prm[PR_SAMPLE] * part_f[p, PF_CAP]:
        part_f[p, PF_AGE] = 0.0
        for layer in range(part_of_layer.shape[0]):
            if part_of_layer[layer] == p:
                for k in range(layer * E, (layer + 1) * E):
                    key_f[k, KF_CNT] = float(int(key_f[k, KF_CNT]) // 2)


@numba.njit(cache=True, _nrt=False)  # no reference counting: see core.event
def climb(part_f: np.ndarray, prm: np.ndarray, p: int, hit: bool) -> None:
    """Sample the hit rate; at the end of a sample move the window target."""
    part_f[p, PF_SAMPLE_N] += 1.0
    if hit:
        part_f[p, PF_SAMPLE_HITS] += 1.0
    c = part_f[p, PF_CAP]
    if part_f[p, PF_SAMPLE_N] < prm[PR_SAMPLE] * c:
        return
    rate = part_f[p, PF_SAMPLE_HITS] / part_f[p, PF_SAMPLE_N]
    part_f[p, PF_SAMPLE_N] = 0.0
    part_f[p, PF_SAMPLE_HITS] = 0.0
    prev = part_f[p, PF_PREV_RATE]
    part_f[p, PF_PREV_RATE] = rate
    if prev < 0.0 or prm[PR_CLIMB] == 0.0:
        return
    delta = rate - prev
    if delta < 0.0:
        part_f[p, PF_DIR] = -part_f[p, PF_DIR]
    step = part_f[p, PF_STEP]
    part_f[p, PF_P] = min(max(part_f[p, PF_P] + part_f[p, PF_DIR] * step, 0.0), c - 1.0)
    if abs(delta) >= RESTART:
        part_f[p, PF_STEP] = prm[PR_STEP] * c
    else:
        part_f[p, PF_STEP] = step * STEP_DECAY


@numba.njit(cache=True, _nrt=False)  # no reference counting: see core.event
def _move_oldest(st: State, cfg: Config, p: int, seg: float, to: float, skip: int) -> None:
    """Move the least recently used slot of segment ``seg`` (not ``skip``) to segment
    ``to``: a move between segments, not an eviction, so protection does not apply."""
    x = -1
    bl = 1e300
    for y in range(cfg.part_lo[p], cfg.part_hi[p]):
        if y != skip and st.slot_f[y, SF_SEG] == seg and st.slot_f[y, SF_LAST] < bl:
            bl = st.slot_f[y, SF_LAST]
            x = y
    if x >= 0:
        set_segment(st, p, x, to)


@numba.njit(cache=True, _nrt=False)  # no reference counting: see core.event
def on_hit(st: State, cfg: Config, p: int, s: int) -> None:
    if st.slot_f[s, SF_SEG] != 1.0:
        return
    set_segment(st, p, s, 2.0)
    main = st.part_f[p, PF_CAP] - st.part_f[p, PF_P]
    if st.part_f[p, PF_SEG2] > cfg.prm[PR_PROTECTED] * main:
        _move_oldest(st, cfg, p, 2.0, 1.0, s)  # the protected LRU is demoted


@numba.njit(cache=True, _nrt=False)  # no reference counting: see core.event
def _main_victim(st: State, cfg: Config, p: int, layer: int, i: int) -> int:
    s = lru_in_segment(st, cfg, p, layer, i, 1.0)
    if s < 0:
        s = lru_in_segment(st, cfg, p, layer, i, 2.0)
    return s


@numba.njit(cache=True, _nrt=False)  # no reference counting: see core.event
def victim(st: State, cfg: Config, p: int, layer: int, i: int, key: int) -> int:
    """The slot to free for ``key`` (which then enters glob[G_DEST]'s segment), -1 if none
    can be freed, -2 if ``key`` loses at the door (streamed)."""
    target = int(st.part_f[p, PF_P])
    x = lru_in_segment(st, cfg, p, layer, i, 0.0)
    y = _main_victim(st, cfg, p, layer, i)
    if target == 0:  # no window: the new expert is the candidate, at the door
        v = y if y >= 0 else x
        if v < 0:
            return -1
        if st.key_f[key, KF_CNT] > st.key_f[st.slot_key[v], KF_CNT]:
            st.glob[G_DEST] = 1.0
            return v
        return -2
    st.glob[G_DEST] = 0.0
    if x < 0 or st.part_f[p, PF_SEG0] < target:  # the window grows: main gives a slot
        return y if y >= 0 else x
    if y >= 0 and st.key_f[st.slot_key[x], KF_CNT] > st.key_f[st.slot_key[y], KF_CNT]:
        set_segment(st, p, x, 1.0)  # the window's candidate is admitted to probation
        return y
    return x


@numba.njit(cache=True, _nrt=False)  # no reference counting: see core.event
def on_evict(st: State, cfg: Config, p: int, s: int, old: int) -> None:
    st.part_f[p, PF_SEG0 + int(st.slot_f[s, SF_SEG])] -= 1.0


@numba.njit(cache=True, _nrt=False)  # no reference counting: see core.event
def on_insert(st: State, cfg: Config, p: int, s: int, prefetched: bool) -> None:
    target = int(st.part_f[p, PF_P])
    seg = st.glob[G_DEST]
    if prefetched or seg < 0.0:  # a free slot or a prefetch: the window, if any
        seg = 0.0 if target > 0 else 1.0
    st.slot_f[s, SF_SEG] = seg
    st.part_f[p, PF_SEG0 + int(seg)] += 1.0
    st.glob[G_DEST] = -1.0
    if st.part_f[p, PF_SEG0] > max(target, 0):  # window overflow moves to probation
        _move_oldest(st, cfg, p, 0.0, 1.0, s)
