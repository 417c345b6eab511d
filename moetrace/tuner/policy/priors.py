"""Fitted tables as priors: pins re-elected and the gap table re-scaled from live counts.

A plan's pins and gap table describe the traffic it was tuned on. With ``repin`` > 0 the
cache counts every expert's uses online and, every ``repin`` passes of a layer, holds an
election for that layer: each expert scores

    score = w * prior[layer, expert] + online[layer, expert]

where ``prior`` is the tune traffic's uses per pass (a table in the plan), ``online`` the
live uses (halved after every election, so old evidence fades) and ``w`` the prior's
weight in passes, ``repin`` at first and multiplied by ``prior_decay`` at every election:
the prior fades as live evidence accumulates. The layer's pins (as many as the plan pinned)
go to the best scores. The same blend re-scales the gap table: an expert's gap is
multiplied by prior frequency / blended frequency, so ``freq_lru`` ranks by what the
traffic does now. After a drift switch (:mod:`.drift`) no pins are elected.

The transition table of ``trans_lru`` is blended the same way, pass by pass: the cache
counts the live next-pass transitions of each layer (from its last pass's experts to this
pass's) and scores with ``(w * trans[a, b] + online[a, b]) / (w + seen[a])``: the fitted
probability as ``w`` pseudo-observations of expert ``a``, the live ones halved at every
election. Live counts do not know where requests end, so they include the transitions
from one request's last pass to the next request's first (the fitted table does not).

State: key_f[KF_ONLINE, KF_GAPR, KF_LAST_IN, KF_TSEEN]; layer_f[LF_PASSES, LF_NPIN,
LF_ELECTIONS, LF_EFF] (the passes the halved online counts stand for); trans_on.
"""

from __future__ import annotations

import numba
import numpy as np

from moetrace.tuner.policy.cachestate import (
    G_ACTIVE,
    KF_GAPR,
    KF_LAST_IN,
    KF_ONLINE,
    KF_PIN,
    KF_TSCORE,
    KF_TSEEN,
    LF_EFF,
    LF_ELECTIONS,
    LF_NPIN,
    LF_PASSES,
    PR_PRIOR_DECAY,
    PR_REPIN,
    Config,
    State,
)

MAX_GAP = 1e6


@numba.njit(cache=True, _nrt=False)  # no reference counting: see core.event
def elect(st: State, cfg: Config, layer: int) -> None:
    """Re-elect ``layer``'s pins and re-scale its gaps (see the module doc)."""
    E = cfg.num_experts
    repin = cfg.prm[PR_REPIN]
    w = repin * cfg.prm[PR_PRIOR_DECAY] ** st.layer_f[layer, LF_ELECTIONS]
    eff = st.layer_f[layer, LF_EFF] * 0.5 + repin
    st.layer_f[layer, LF_EFF] = eff
    st.layer_f[layer, LF_ELECTIONS] += 1.0
    lo = layer * E
    if st.trans_on.shape[0] == st.key_f.shape[0]:  # live transitions: halve them too
        for k in range(lo, lo + E):
            st.key_f[k, KF_TSEEN] *= 0.5
            for b in range(E):
                st.trans_on[k, b] *= 0.5
    n = int(st.layer_f[layer, LF_NPIN])
    if n > 0 and st.glob[G_ACTIVE] == 0.0:  # pins: the n best scores, ties to the lower id
        for e in range(E):
            st.key_f[lo + e, KF_PIN] = 0.0
        for _ in range(n):
            best, bs = -1, -1.0
            for e in range(E):
                k = lo + e
                sc = w * cfg.prior[k] + st.key_f[k, KF_ONLINE]
                if st.key_f[k, KF_PIN] == 0.0 and sc > bs:
                    best, bs = k, sc
            st.key_f[best, KF_PIN] = 1.0
    for e in range(E):
        k = lo + e
        prior = cfg.prior[k]
        online = st.key_f[k, KF_ONLINE]
        blend = (w * prior + online) / (w + eff)
        g_prior = min(1.0 / max(prior, 1.0 / MAX_GAP), MAX_GAP)
        g_now = min(1.0 / max(blend, 1.0 / MAX_GAP), MAX_GAP)
        st.key_f[k, KF_GAPR] = g_now / g_prior
        st.key_f[k, KF_ONLINE] = online * 0.5


@numba.njit(cache=True, _nrt=False)  # no reference counting: see core.event
def count_pass(st: State, cfg: Config, layer: int) -> None:
    """A pass of ``layer`` ended: hold an election every ``repin`` passes."""
    st.layer_f[layer, LF_PASSES] += 1.0
    if st.layer_f[layer, LF_PASSES] % cfg.prm[PR_REPIN] == 0.0:
        elect(st, cfg, layer)


@numba.njit(cache=True, _nrt=False)  # no reference counting: see core.event
def trans_scores(st: State, cfg: Config, layer: int, experts: np.ndarray) -> None:
    """Learn the transitions from ``layer``'s last pass to this one (``experts``), then
    score every expert of the layer by the blended chance that its next pass needs it."""
    E = cfg.num_experts
    lo = layer * E
    w = cfg.prm[PR_REPIN] * cfg.prm[PR_PRIOR_DECAY] ** st.layer_f[layer, LF_ELECTIONS]
    for a in range(lo, lo + E):
        if st.key_f[a, KF_LAST_IN] != 0.0:
            st.key_f[a, KF_TSEEN] += 1.0
            for q in range(experts.shape[0]):
                st.trans_on[a, experts[q]] += 1.0
            st.key_f[a, KF_LAST_IN] = 0.0
    for q in range(experts.shape[0]):
        st.key_f[lo + experts[q], KF_LAST_IN] = 1.0
    for x in range(E):
        sc = 0.0
        for q in range(experts.shape[0]):
            a = lo + experts[q]
            den = w + st.key_f[a, KF_TSEEN]
            if den > 0.0:
                sc += (w * cfg.trans[a, x] + st.trans_on[a, x]) / den
        st.key_f[lo + x, KF_TSCORE] = sc
