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
S_RAM_ACCESS, S_RAM_HIT, S_BYTES_DISK, S_RAM_PF_ISSUED = range(12, 16)
NUM_STATS = 16
"""S_PF_SERVED counts by the demand's (layer, phase) (for recall); S_PF_USED the same
events by the prefetch's target layer and issuing phase (for precision vs S_PF_ISSUED).
The RAM tier's rows (plans with ``ram``): S_RAM_ACCESS the device's demand misses looked
up in RAM, S_RAM_HIT those found there, S_BYTES_DISK every byte read from disk (demand,
device prefetches and RAM prefetches), S_RAM_PF_ISSUED the RAM prefetches (disk -> RAM)."""

# per-access outcomes recorded by replay (see moetrace.tuner.sim.timeline)
O_MISS, O_HIT, O_PF_HIT, O_STREAM = range(4)

# the clock: device time, RAM -> device link free, events before, disk -> RAM link free
C_NOW, C_LINK, C_EVENTS, C_DISK = range(4)
CLOCK_SIZE = 4


@numba.njit(cache=True, _nrt=False)  # no reference counting: see policy.core.event
def _from_ram(rs, status, now, clock, ram_ready, ram_busy, dx, dlat):
    """When an expert the device loads is in RAM: a RAM hit, when its slot was filled; a
    RAM miss is read from disk (behind the disk link's queue, and after the copies still
    reading the RAM slot it overwrites) into RAM slot ``rs``, or a staging buffer (-1)."""
    if status == core.HIT:
        return ram_ready[rs]
    start = max(now, clock[C_DISK])
    if rs >= 0:
        start = max(start, ram_busy[rs])
    clock[C_DISK] = start + dx
    done = start + dx + dlat
    if rs >= 0:
        ram_ready[rs] = done
    return done


@numba.njit(cache=True, _nrt=False)  # no reference counting: see policy.core.event
def _copy(src_ready, rs, now, clock, ram_busy, xfer, lat):
    """A RAM -> device copy in the link's queue, once its source is in RAM; returns when
    the device slot is ready. The RAM slot is busy until the copy has read it."""
    start = max(now, clock[C_LINK], src_ready)
    clock[C_LINK] = start + xfer
    if rs >= 0 and start + xfer > ram_busy[rs]:
        ram_busy[rs] = start + xfer
    return start + xfer + lat


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
    has_ram,
    rst,
    rcfg,
    dbw,
    dlat,
    rpf_ptr,
    rpf_layer,
    rpf_exp,
    ram_ready,
    ram_busy,
    rout,
    rpf_out,
    miss,
    pq_layer,
    pq_exp,
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

    ``clock`` (float64, CLOCK_SIZE, see C_*): the device's time, the links' free times and
    the number of events replayed before, read at the start and written at the end, so
    that a replay can go on in several calls (the queue model replays step by step); zeros
    for one call.

    The RAM tier (``has_ram``; else its arguments are unused placeholders, see
    :func:`ram_scratch`): ``rst``/``rcfg`` its cache, which sees each event's device misses
    (one event of that cache, in use order) and the device's prefetches; ``dbw``/``dlat``
    the disk -> RAM link; ``rpf_*`` the RAM prefetches per event (CSR, disk -> RAM only; those the device holds
    are skipped);
    ``ram_ready``/``ram_busy`` per RAM slot, when its expert is in RAM and until when
    copies read it; ``rout`` (E, 6), ``rpf_out`` and ``pq_*`` (the longest prefetch batch)
    and ``miss`` (E,) scratch."""
    n_ev = ev_layer.shape[0]
    rec = rec_outcome.shape[0] > 0
    E = cfg.num_experts
    xfer = bpe / bw
    dx = bpe / dbw if has_ram else 0.0
    now = clock[C_NOW]
    base = np.int64(clock[C_EVENTS])
    for i in range(n_ev):
        lay = ev_layer[i]
        ph = ev_phase[i]
        lo, hi = ev_ptr[i], ev_ptr[i + 1]
        core.event(st, cfg, lay, ph, ev_exp[lo:hi], base + i, out)
        need = now
        n_miss = 0
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
                if slot_ready[s] > need:
                    need = slot_ready[s]
            else:
                miss[n_miss] = j
                n_miss += 1
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
            if rec:
                rec_outcome[lo + j] = outcome
        if has_ram and n_miss > 0:
            for m in range(n_miss):
                pq_exp[m] = ev_exp[lo + miss[m]]
            core.event(rst, rcfg, lay, ph, pq_exp[:n_miss], base + i, rout)
        for m in range(n_miss):
            j = miss[m]
            src, rs = now, -1
            if has_ram:
                rs = rout[m, 0]
                stats[S_RAM_ACCESS, lay, ph] += 1
                if rout[m, 2] == core.HIT:
                    stats[S_RAM_HIT, lay, ph] += 1
                else:
                    stats[S_BYTES_DISK, lay, ph] += bpe
                src = _from_ram(rs, rout[m, 2], now, clock, ram_ready, ram_busy, dx, dlat)
            rdy = _copy(src, rs, now, clock, ram_busy, xfer, lat)
            if out[j, 2] != core.STREAMED:
                slot_ready[out[j, 0]] = rdy
            if rdy > need:
                need = rdy
        stats[S_STALL, lay, ph] += need - now
        if rec:
            rec_stall[i] = need - now
        now = need
        a, b = pf_ptr[i], pf_ptr[i + 1]
        if b > a:
            core.prefetch(st, cfg, ph, pf_layer[a:b], pf_exp[a:b], base + i, pf_out)
        n_pq = 0
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
            pq_layer[n_pq] = tl
            pq_exp[n_pq] = pf_exp[a + q]
            miss[n_pq] = s
            n_pq += 1
            stats[S_PF_ISSUED, tl, ph] += 1
            if rec:
                rec_issued[i] += 1
            stats[S_BYTES_PF, tl, ph] += bpe
        if has_ram and n_pq > 0:  # the device's prefetches look up RAM (no recency)
            core.prefetch(rst, rcfg, ph, pq_layer[:n_pq], pq_exp[:n_pq], base + i, rpf_out)
        for q in range(n_pq):
            src, rs = now, -1
            if has_ram:
                rs = rpf_out[q, 0]
                status = core.LOADED
                if rs == -2:
                    rs = rst.where[pq_layer[q] * E + pq_exp[q]]
                    status = core.HIT
                else:
                    stats[S_BYTES_DISK, pq_layer[q], ph] += bpe
                src = _from_ram(rs, status, now, clock, ram_ready, ram_busy, dx, dlat)
            slot_ready[miss[q]] = _copy(src, rs, now, clock, ram_busy, xfer, lat)
        if has_ram:  # RAM prefetches of experts the device does not hold
            n_pq = 0
            for q in range(rpf_ptr[i], rpf_ptr[i + 1]):
                if st.where[rpf_layer[q] * E + rpf_exp[q]] < 0:
                    pq_layer[n_pq] = rpf_layer[q]
                    pq_exp[n_pq] = rpf_exp[q]
                    n_pq += 1
            if n_pq > 0:
                core.prefetch(rst, rcfg, ph, pq_layer[:n_pq], pq_exp[:n_pq], base + i, rpf_out)
            for q in range(n_pq):
                rs = rpf_out[q, 0]
                if rs < 0:
                    continue
                stats[S_RAM_PF_ISSUED, pq_layer[q], ph] += 1
                stats[S_BYTES_DISK, pq_layer[q], ph] += bpe
                _from_ram(rs, core.LOADED, now, clock, ram_ready, ram_busy, dx, dlat)
        c = c_base + c_tok * ev_tokens[i]
        stats[S_COMPUTE, lay, ph] += c
        now += c
    clock[C_NOW] = now
    clock[C_EVENTS] = base + n_ev
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
    """The scratch arrays :func:`replay` needs for the device cache."""
    return (
        np.zeros(max(num_slots, 1)),
        np.zeros((num_experts, 6), np.int64),
        np.zeros((max(num_prefetches, 1), 3), np.int64),
    )
