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

State: key_f[KF_ONLINE, KF_GAPR]; layer_f[LF_PASSES, LF_NPIN, LF_ELECTIONS, LF_EFF] (the
passes the halved online counts stand for).
"""

from __future__ import annotations

import numba
import numpy as np

from moetrace.tuner.policy.cachestate import (
    G_ACTIVE,
    KF_GAPR,
    KF_ONLINE,
    KF_PIN,
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


@numba.njit(cache=True)
def elect(st: State, cfg: Config, layer: int) -> None:
    """Re-elect ``layer``'s pins and re-scale its gaps (see the module doc)."""
    E = cfg.num_experts
    repin = cfg.prm[PR_REPIN]
    w = repin * cfg.prm[PR_PRIOR_DECAY] ** st.layer_f[layer, LF_ELECTIONS]
    eff = st.layer_f[layer, LF_EFF] * 0.5 + repin
    st.layer_f[layer, LF_EFF] = eff
    st.layer_f[layer, LF_ELECTIONS] += 1.0
    lo = layer * E
    score = np.empty(E)
    for e in range(E):
        k = lo + e
        prior = cfg.prior[k]
        online = st.key_f[k, KF_ONLINE]
        score[e] = w * prior + online
        blend = (w * prior + online) / (w + eff)
        g_prior = min(1.0 / max(prior, 1.0 / MAX_GAP), MAX_GAP)
        g_now = min(1.0 / max(blend, 1.0 / MAX_GAP), MAX_GAP)
        st.key_f[k, KF_GAPR] = g_now / g_prior
        st.key_f[k, KF_ONLINE] = online * 0.5
    n = int(st.layer_f[layer, LF_NPIN])
    if n == 0 or st.glob[G_ACTIVE] != 0.0:
        return
    order = np.argsort(-score, kind="mergesort")  # ties: the lower expert id
    for e in range(E):
        st.key_f[lo + e, KF_PIN] = 0.0
    for r in range(n):
        st.key_f[lo + order[r], KF_PIN] = 1.0


@numba.njit(cache=True, inline="always")
def count_pass(st: State, cfg: Config, layer: int) -> None:
    """A pass of ``layer`` ended: hold an election every ``repin`` passes."""
    st.layer_f[layer, LF_PASSES] += 1.0
    if st.layer_f[layer, LF_PASSES] % cfg.prm[PR_REPIN] == 0.0:
        elect(st, cfg, layer)
