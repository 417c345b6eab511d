"""The numba replay kernel: the simulator's timing model and accounting around the cache.

Residency, eviction and prefetch installs are the cache's own functions
(:mod:`moetrace.tuner.policy.core`), the same ones the runtime calls; this kernel adds the
link queue (bandwidth, latency), compute time and the per-layer, per-phase counters.
Prefetch decisions arrive precomputed as a CSR list of (layer, expert) per event (every
shipped prefetcher predicts from the trace, never from cache state).
"""

from __future__ import annotations

import numba
import numpy as np

from moetrace.tuner.policy import core

# rows of the stats array (NUM_STATS, L, 2 phases)
S_ACCESS, S_HIT, S_STREAM, S_PF_ISSUED, S_PF_SERVED, S_PF_WASTED, S_PF_DROPPED = range(7)
S_STALL, S_BYTES_DEMAND, S_BYTES_PF, S_COMPUTE, S_PF_USED = range(7, 12)
NUM_STATS = 12
"""S_PF_SERVED counts by the demand's (layer, phase) (for recall); S_PF_USED the same
events by the prefetch's target layer and issuing phase (for precision vs S_PF_ISSUED)."""

# per-access outcomes recorded by replay (see moetrace.tuner.sim.timeline)
O_MISS, O_HIT, O_PF_HIT, O_STREAM = range(4)


@numba.njit(cache=True, _nrt=False)  # no reference counting: see policy.core.event
def replay(
    ev_layer,
    ev_phase,
    ev_tokens,
    ev_ptr,
    ev_exp,
    pf_ptr,
    pf_layer,
    pf_exp,
    st,
    cfg,
    bpe,
    bw,
    lat,
    c_base,
    c_tok,
    stats,
    slot_ready,
    out,
    pf_out,
    rec_outcome,
    rec_wasted,
    rec_issued,
    rec_stall,
    clock,
):
    """Replay events through the cache ``st``/``cfg``; fill ``stats`` (NUM_STATS, L, 2).
    Returns the total seconds. Scratch arrays come from the caller (nothing here
    allocates): ``slot_ready`` (slots,) zeros, ``out`` (E, 6) and ``pf_out`` (at least the
    longest prefetch batch, 3) int64, see :func:`scratch`.

    Recording (all four arrays non-empty; zero-length ones, see :func:`no_record`, record
    nothing): ``rec_outcome`` (accesses,) int8 gets each access's ``O_*``;
    per event, ``rec_wasted`` (int64) the unused prefetches evicted there (by its demand
    loads or by the prefetches it issued), ``rec_issued`` (int64) the prefetches it issued
    and ``rec_stall`` (float64) its stall seconds.

    ``clock`` (float64, 3): the device's time, the link's free time and the number of
    events replayed before, read at the start and written at the end, so that a replay can
    go on in several calls (the queue model replays step by step); zeros for one call."""
    n_ev = ev_layer.shape[0]
    rec = rec_outcome.shape[0] > 0
    E = cfg.num_experts
    xfer = bpe / bw
    now = clock[0]
    link_free = clock[1]
    base = np.int64(clock[2])
    for i in range(n_ev):
        lay = ev_layer[i]
        ph = ev_phase[i]
        lo, hi = ev_ptr[i], ev_ptr[i + 1]
        core.event(st, cfg, lay, ph, ev_exp[lo:hi], base + i, out)
        need = now
        for j in range(hi - lo):
            s, old, status = out[j, 0], out[j, 1], out[j, 2]
            stats[S_ACCESS, lay, ph] += 1
            if status == core.HIT:
                stats[S_HIT, lay, ph] += 1
                outcome = O_HIT
                if out[j, 3] == 1:
                    stats[S_PF_SERVED, lay, ph] += 1
                    stats[S_PF_USED, lay, out[j, 4]] += 1
                    outcome = O_PF_HIT
                rdy = slot_ready[s]
            else:
                start = max(now, link_free)
                link_free = start + xfer
                rdy = start + xfer + lat
                stats[S_BYTES_DEMAND, lay, ph] += bpe
                if status == core.STREAMED:
                    stats[S_STREAM, lay, ph] += 1
                    outcome = O_STREAM
                else:
                    outcome = O_MISS
                    if out[j, 5] == 1:
                        stats[S_PF_WASTED, old // E, ph] += 1
                        if rec:
                            rec_wasted[i] += 1
                    slot_ready[s] = rdy
            if rec:
                rec_outcome[lo + j] = outcome
            if rdy > need:
                need = rdy
        stats[S_STALL, lay, ph] += need - now
        if rec:
            rec_stall[i] = need - now
        now = need
        a, b = pf_ptr[i], pf_ptr[i + 1]
        if b > a:
            core.prefetch(st, cfg, ph, pf_layer[a:b], pf_exp[a:b], base + i, pf_out)
        for q in range(b - a):
            tl = pf_layer[a + q]
            s = pf_out[q, 0]
            if s == -2:
                continue
            if s < 0:
                stats[S_PF_DROPPED, tl, ph] += 1
                continue
            if pf_out[q, 2] == 1:
                stats[S_PF_WASTED, pf_out[q, 1] // E, ph] += 1
                if rec:
                    rec_wasted[i] += 1
            start = max(now, link_free)
            link_free = start + xfer
            slot_ready[s] = start + xfer + lat
            stats[S_PF_ISSUED, tl, ph] += 1
            if rec:
                rec_issued[i] += 1
            stats[S_BYTES_PF, tl, ph] += bpe
        c = c_base + c_tok * ev_tokens[i]
        stats[S_COMPUTE, lay, ph] += c
        now += c
    clock[0] = now
    clock[1] = link_free
    clock[2] = base + n_ev
    return now


def no_record() -> tuple[np.ndarray, ...]:
    """Zero-length recording arrays: :func:`replay` records nothing."""
    return (np.zeros(0, np.int8), np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0))


def record_arrays(num_events: int, num_accesses: int) -> tuple[np.ndarray, ...]:
    """Recording arrays for :func:`replay`: outcome per access, wasted, issued, stall per
    event (zeroed)."""
    return (
        np.zeros(num_accesses, np.int8),
        np.zeros(num_events, np.int64),
        np.zeros(num_events, np.int64),
        np.zeros(num_events),
    )


def scratch(num_slots: int, num_experts: int, num_prefetches: int) -> tuple[np.ndarray, ...]:
    """The scratch arrays :func:`replay` needs."""
    return (
        np.zeros(max(num_slots, 1)),
        np.zeros((num_experts, 6), np.int64),
        np.zeros((max(num_prefetches, 1), 3), np.int64),
    )
