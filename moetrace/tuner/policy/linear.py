"""Linear-key policies: every resident expert gets one priority, the smallest is evicted.

    key = w_last * last_use + w_insert * inserted + w_freq * frequency
          + w_gap * gap[phase, layer, expert] + w_next * next_use + w_count * count
          + w_trans * trans

with ties broken by ``last_use``. LRU, FIFO, LFU, LRFU, the fitted-table policies and
Belady (``next_use``, simulator only) are all weights of this one key (see
:mod:`.eviction`). The state it reads: each slot's last use and insertion time, each key's
decayed frequency and transition score (:mod:`.cachestate`).
"""

from __future__ import annotations

import numba
import numpy as np

from moetrace.tuner.policy.cachestate import (
    KF_FREQ,
    KF_GAPR,
    KF_TSCORE,
    NO_NEXT_USE,
    PR_USE_NEXT,
    SF_INS,
    SF_LAST,
    Config,
    State,
    eligible,
)


def slot_key(
    w: np.ndarray,
    last: float,
    inserted: float,
    freq: float,
    gap: float,
    next_use: float,
    inc: float,
    trans: float,
) -> float:
    """Priority of a resident expert under weights ``w``; the smallest is evicted.

    ``freq`` is the decayed use count scaled by the current increment ``inc`` (a growing
    number, so plain LFU never rescales); ``freq / inc`` is the decayed count itself, in
    uses, which can be mixed with time-valued terms (weight ``w[5]``). ``trans`` is the
    fitted chance that the layer's next pass needs the expert, given what the layer's last
    pass used (weight ``w[6]``)."""
    return (
        w[0] * last
        + w[1] * inserted
        + w[2] * freq
        + w[3] * gap
        + w[4] * next_use
        + w[5] * (freq / inc)
        + w[6] * trans
    )


slot_key_jit = numba.njit(cache=True, _nrt=False)(slot_key)


@numba.njit(cache=True, _nrt=False)  # no reference counting: see core.event
def victim(
    st: State, cfg: Config, p: int, layer: int, i: int, ph: int, w: np.ndarray, inc: float
) -> int:
    """The evictable slot of partition ``p`` with the smallest key, or -1."""
    use_next = cfg.prm[PR_USE_NEXT] != 0.0
    best = -1
    bk = np.inf
    bl = np.inf
    for s in range(cfg.part_lo[p], cfg.part_hi[p]):
        if not eligible(st, cfg, s, layer, i):
            continue
        key = st.slot_key[s]
        nxt = 0.0
        if use_next:
            c = st.cursor[key]
            nxt = cfg.occ_ev[c] if c < cfg.occ_ptr[key + 1] else NO_NEXT_USE
        tr = st.key_f[key, KF_TSCORE] if w[6] != 0.0 else 0.0
        gp = cfg.gap[ph, key] * st.key_f[key, KF_GAPR] if w[3] != 0.0 else 0.0
        last = st.slot_f[s, SF_LAST]
        k1 = slot_key_jit(w, last, st.slot_f[s, SF_INS], st.key_f[key, KF_FREQ], gp, nxt, inc, tr)
        if k1 < bk or (k1 == bk and last < bl):
            bk = k1
            bl = last
            best = s
    return best
