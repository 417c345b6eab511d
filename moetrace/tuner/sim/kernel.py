"""The numba replay kernel: slot table, residency, link queue and accounting.

Policy enters only through :func:`moetrace.tuner.policy.cache.slot_key_jit` and the
weights/tables of an EvictionSpec; prefetch decisions arrive precomputed as a CSR list of
(layer, expert) per event (every shipped prefetcher predicts from the trace, never from
cache state).
"""

from __future__ import annotations

import numba
import numpy as np

from moetrace.tuner.policy.cache import NO_NEXT_USE, slot_key_jit

# rows of the stats array (NUM_STATS, L, 2 phases)
S_ACCESS, S_HIT, S_STREAM, S_PF_ISSUED, S_PF_SERVED, S_PF_WASTED, S_PF_DROPPED = range(7)
S_STALL, S_BYTES_DEMAND, S_BYTES_PF, S_COMPUTE, S_PF_USED = range(7, 12)
NUM_STATS = 12
"""S_PF_SERVED counts by the demand's (layer, phase) (for recall); S_PF_USED the same
events by the prefetch's target layer and issuing phase (for precision vs S_PF_ISSUED)."""


@numba.njit(cache=True)
def _victim(
    p,
    layer,
    i,
    ph,
    E,
    part_lo,
    part_hi,
    fill,
    slot_le,
    slot_stamp,
    slot_last,
    slot_ins,
    pinned,
    layer_count,
    min_share,
    w,
    freq,
    gap,
    cursor,
    occ_ptr,
    occ_ev,
    use_next,
    inc,
    tscore,
):
    if fill[p] < part_hi[p]:
        s = fill[p]
        fill[p] += 1
        return s
    best = -1
    bk = np.inf
    bl = np.inf
    for s in range(part_lo[p], part_hi[p]):
        if slot_stamp[s] == i:
            continue
        key = slot_le[s]
        if pinned[key]:
            continue
        ls = key // E
        if ls != layer and layer_count[ls] <= min_share[ls]:
            continue
        nxt = 0.0
        if use_next:
            c = cursor[key]
            nxt = occ_ev[c] if c < occ_ptr[key + 1] else NO_NEXT_USE
        tr = tscore[key] if w[6] != 0.0 else 0.0
        k1 = slot_key_jit(w, slot_last[s], slot_ins[s], freq[key], gap[ph, key], nxt, inc, tr)
        if k1 < bk or (k1 == bk and slot_last[s] < bl):
            bk = k1
            bl = slot_last[s]
            best = s
    return best


@numba.njit(cache=True)
def replay(
    ev_layer,
    ev_phase,
    ev_tokens,
    ev_ptr,
    ev_exp,
    pf_ptr,
    pf_layer,
    pf_exp,
    part_of_layer,
    part_lo,
    part_hi,
    min_share,
    weights,
    decay,
    pinned,
    gap,
    trans,
    occ_ptr,
    occ_ev,
    use_next,
    L,
    E,
    bpe,
    bw,
    lat,
    c_base,
    c_tok,
    stats,
):
    """Replay events; fill ``stats`` (NUM_STATS, L, 2). Returns (total seconds,
    warm-up bytes of pinned experts)."""
    n_ev = ev_layer.shape[0]
    n_slots = part_hi.max()
    where = np.full(L * E, -1, np.int64)
    slot_le = np.full(n_slots, -1, np.int64)
    slot_last = np.zeros(n_slots)
    slot_ins = np.zeros(n_slots)
    slot_ready = np.zeros(n_slots)
    slot_pf = np.zeros(n_slots, np.int8)
    slot_pf_phase = np.zeros(n_slots, np.int64)
    slot_stamp = np.full(n_slots, -1, np.int64)
    fill = part_lo.copy()
    layer_count = np.zeros(L, np.int64)
    freq = np.zeros(L * E)
    cursor = occ_ptr[:-1].copy()
    # per (layer, expert): the transition score from the layer's last event's experts
    tscore = np.zeros(L * E)
    use_trans = weights[0, 6] != 0.0 or weights[1, 6] != 0.0
    inc = 1.0
    g = 1.0 / decay
    xfer = bpe / bw
    sub = 1.0 / (E + 1)
    warm = 0.0
    for key in range(L * E):
        if pinned[key]:
            p = part_of_layer[key // E]
            if fill[p] < part_hi[p]:
                s = fill[p]
                fill[p] += 1
                slot_le[s] = key
                where[key] = s
                layer_count[key // E] += 1
                slot_last[s] = -1.0
                warm += bpe
    now = 0.0
    link_free = 0.0
    for i in range(n_ev):
        lay = ev_layer[i]
        ph = ev_phase[i]
        w = weights[ph]
        if use_trans:
            for x in range(E):
                sc = 0.0
                for q in range(ev_ptr[i], ev_ptr[i + 1]):
                    sc += trans[lay * E + ev_exp[q], x]
                tscore[lay * E + x] = sc
        for j in range(ev_ptr[i], ev_ptr[i + 1]):
            s = where[lay * E + ev_exp[j]]
            if s >= 0:
                slot_stamp[s] = i
        need = now
        for j in range(ev_ptr[i], ev_ptr[i + 1]):
            key = lay * E + ev_exp[j]
            t = i + (j - ev_ptr[i]) * sub  # order of use within the event breaks ties
            stats[S_ACCESS, lay, ph] += 1
            if use_next:
                cursor[key] += 1
            freq[key] += inc
            s = where[key]
            if s >= 0:
                stats[S_HIT, lay, ph] += 1
                if slot_pf[s] == 1:
                    stats[S_PF_SERVED, lay, ph] += 1
                    stats[S_PF_USED, lay, slot_pf_phase[s]] += 1
                    slot_pf[s] = 0
                rdy = slot_ready[s]
                slot_last[s] = t
            else:
                start = max(now, link_free)
                link_free = start + xfer
                rdy = start + xfer + lat
                stats[S_BYTES_DEMAND, lay, ph] += bpe
                s = _victim(
                    part_of_layer[lay],
                    lay,
                    i,
                    ph,
                    E,
                    part_lo,
                    part_hi,
                    fill,
                    slot_le,
                    slot_stamp,
                    slot_last,
                    slot_ins,
                    pinned,
                    layer_count,
                    min_share,
                    w,
                    freq,
                    gap,
                    cursor,
                    occ_ptr,
                    occ_ev,
                    use_next,
                    inc,
                    tscore,
                )
                if s < 0:
                    stats[S_STREAM, lay, ph] += 1
                else:
                    old = slot_le[s]
                    if old >= 0:
                        where[old] = -1
                        layer_count[old // E] -= 1
                        if slot_pf[s] == 1:
                            stats[S_PF_WASTED, old // E, ph] += 1
                    slot_le[s] = key
                    where[key] = s
                    layer_count[lay] += 1
                    slot_ins[s] = t
                    slot_last[s] = t
                    slot_ready[s] = rdy
                    slot_pf[s] = 0
                    slot_stamp[s] = i
            if rdy > need:
                need = rdy
        stats[S_STALL, lay, ph] += need - now
        now = need
        for q in range(pf_ptr[i], pf_ptr[i + 1]):
            s = where[pf_layer[q] * E + pf_exp[q]]
            if s >= 0:
                slot_stamp[s] = i  # a predicted expert already resident is not evicted for another
        for q in range(pf_ptr[i], pf_ptr[i + 1]):
            tl = pf_layer[q]
            key = tl * E + pf_exp[q]
            if where[key] >= 0:
                continue
            s = _victim(
                part_of_layer[tl],
                tl,
                i,
                ph,
                E,
                part_lo,
                part_hi,
                fill,
                slot_le,
                slot_stamp,
                slot_last,
                slot_ins,
                pinned,
                layer_count,
                min_share,
                weights[ph],
                freq,
                gap,
                cursor,
                occ_ptr,
                occ_ev,
                use_next,
                inc,
                tscore,
            )
            if s < 0:
                stats[S_PF_DROPPED, tl, ph] += 1
                continue
            old = slot_le[s]
            if old >= 0:
                where[old] = -1
                layer_count[old // E] -= 1
                if slot_pf[s] == 1:
                    stats[S_PF_WASTED, old // E, ph] += 1
            start = max(now, link_free)
            link_free = start + xfer
            slot_le[s] = key
            where[key] = s
            layer_count[tl] += 1
            slot_ins[s] = i
            slot_last[s] = i
            slot_ready[s] = start + xfer + lat
            slot_pf[s] = 1
            slot_pf_phase[s] = ph
            slot_stamp[s] = i
            stats[S_PF_ISSUED, tl, ph] += 1
            stats[S_BYTES_PF, tl, ph] += bpe
        c = c_base + c_tok * ev_tokens[i]
        stats[S_COMPUTE, lay, ph] += c
        now += c
        inc *= g
        if inc > 1e100:
            for key in range(L * E):
                freq[key] *= 1e-100
            inc *= 1e-100
    return now, warm
