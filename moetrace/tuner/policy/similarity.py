"""Prefetchers that match the request's activation matrix against tune-set requests.

``activation_matrix`` (MoE-Infinity style): the request's (layer x expert) activation
counts so far are compared (cosine) with the tune requests' matrices; the ``neighbors``
most similar ones, plus the request's own history, vote for the experts of layer lay+d.
``similar_request`` (Remoe / fMoE style): one nearest earlier request, matched on the
prompt (prefill) and kept for the request's decode steps.
"""

from __future__ import annotations

from typing import ClassVar

import numba
import numpy as np

from moetrace.errors import PlanError
from moetrace.store.plan import PrefetchConfig
from moetrace.tuner.policy.events import Events
from moetrace.tuner.policy.prefetch import Candidates, Prefetcher, register_prefetcher

REF_SCALE = 1000


@numba.njit(cache=True)
def _match_kernel(
    ev_layer,
    ev_request,
    ev_phase,
    ev_ptr,
    ev_exp,
    ev_cnt,
    refs,
    d,
    fetch,
    neighbors,
    freeze,
    own,
    L,
    E,
    out_ptr,
    out_layer,
    out_exp,
):
    n_ref = refs.shape[0]
    dots = np.zeros(n_ref)
    A = np.zeros(L * E)
    norm2 = 0.0
    cur = -1
    frozen = -1
    n_out = 0
    score = np.zeros(E)
    for i in range(ev_layer.shape[0]):
        out_ptr[i] = n_out
        r = ev_request[i]
        lay = ev_layer[i]
        if r != cur:
            cur = r
            dots[:] = 0.0
            A[:] = 0.0
            norm2 = 0.0
            frozen = -1
        for j in range(ev_ptr[i], ev_ptr[i + 1]):
            e = ev_exp[j]
            c = float(ev_cnt[j])
            for q in range(n_ref):
                dots[q] += c * refs[q, lay, e]
            a = A[lay * E + e]
            norm2 += 2.0 * a * c + c * c
            A[lay * E + e] = a + c
        tl = lay + d
        if tl >= L or fetch[i] <= 0 or norm2 <= 0.0:
            continue
        score[:] = 0.0
        if freeze and ev_phase[i] == 1 and frozen >= 0:
            for e in range(E):
                score[e] = refs[frozen, tl, e]
        else:
            order = np.argsort(-dots)
            k = min(neighbors, n_ref)
            if freeze and ev_phase[i] == 1:
                frozen = order[0]
            for t in range(k):
                q = order[t]
                wq = dots[q] / np.sqrt(norm2)
                if wq <= 0.0:
                    continue
                for e in range(E):
                    score[e] += wq * refs[q, tl, e]
        if own > 0.0:
            rown = 0.0
            for e in range(E):
                rown += A[tl * E + e]
            if rown > 0.0:
                for e in range(E):
                    score[e] += own * A[tl * E + e] / rown
        top = np.argsort(-score)
        for t in range(min(fetch[i], E)):
            e = top[t]
            if score[e] <= 0.0:
                break
            out_layer[n_out] = tl
            out_exp[n_out] = e
            n_out += 1
    out_ptr[ev_layer.shape[0]] = n_out
    return n_out


def request_matrices(events: Events, max_refs: int) -> np.ndarray:
    """(R, L, E) per-request activation counts, each L2-normalized, at most ``max_refs``
    requests (evenly spaced in arrival order)."""
    L, E = events.num_layers, events.num_experts
    reqs = np.unique(events.request)
    if len(reqs) > max_refs:
        reqs = reqs[np.linspace(0, len(reqs) - 1, max_refs).astype(np.int64)]
    pos = np.full(int(events.request.max()) + 1, -1, np.int64)
    pos[reqs] = np.arange(len(reqs))
    ev_of = np.repeat(np.arange(events.num_events), np.diff(events.ptr))
    r = pos[events.request[ev_of]]
    ok = r >= 0
    M = np.zeros((len(reqs), L * E))
    np.add.at(
        M,
        (r[ok], events.layer[ev_of][ok].astype(np.int64) * E + events.experts[ok]),
        events.counts[ok],
    )
    M /= np.maximum(np.linalg.norm(M, axis=1, keepdims=True), 1e-12)
    return M.reshape(len(reqs), L, E)


class _MatchPrefetch(Prefetcher):
    freeze: ClassVar[bool] = False
    default_neighbors: ClassVar[int] = 4
    params = ("max_refs", "neighbors", "own")

    def _fit(self, events: Events) -> PrefetchConfig:
        max_refs = int(self.config.params.get("max_refs", 64))
        M = request_matrices(events, max_refs)
        q = np.round(M / np.maximum(M.max(axis=(1, 2), keepdims=True), 1e-12) * REF_SCALE)
        return PrefetchConfig(
            name=self.name,
            lookahead=self.lookahead,
            fetch=self.config.fetch,
            params=dict(self.config.params),
            tables={"refs": q.astype(np.int64).tolist()},
        )

    def refs(self) -> np.ndarray:
        try:
            R = np.asarray(self.config.tables["refs"], dtype=np.float64)
        except (KeyError, ValueError) as exc:
            raise PlanError(
                f"prefetch.tables.refs of {self.name!r} missing or malformed ({exc})"
            ) from None
        if R.ndim != 3 or R.shape[1:] != (self.num_layers, self.num_experts):
            raise PlanError(
                f"prefetch.tables.refs of {self.name!r} has shape {list(R.shape)}, expected "
                f"(R, {self.num_layers}, {self.num_experts})"
            )
        return R / np.maximum(np.linalg.norm(R.reshape(len(R), -1), axis=1), 1e-12)[:, None, None]

    def candidates(self, events: Events, fetch: np.ndarray) -> Candidates:
        R = self.refs()
        n = events.num_events
        cap = int(np.minimum(fetch, events.num_experts).sum())
        out_ptr = np.zeros(n + 1, np.int64)
        out_layer = np.zeros(cap, np.int64)
        out_exp = np.zeros(cap, np.int64)
        n_out = _match_kernel(
            events.layer.astype(np.int64),
            events.request.astype(np.int64),
            events.phase.astype(np.int64),
            events.ptr,
            events.experts.astype(np.int64),
            events.counts.astype(np.int64),
            R,
            self.lookahead,
            fetch.astype(np.int64),
            int(self.config.params.get("neighbors", self.default_neighbors)),
            self.freeze,
            float(self.config.params.get("own", 1.0)),
            events.num_layers,
            events.num_experts,
            out_ptr,
            out_layer,
            out_exp,
        )
        return out_ptr, out_layer[:n_out], out_exp[:n_out]


@register_prefetcher
class ActivationMatrixPrefetch(_MatchPrefetch):
    name = "activation_matrix"
    online = False  # needs per-request state; the runtime keeps it with the same kernel


@register_prefetcher
class SimilarRequestPrefetch(_MatchPrefetch):
    name = "similar_request"
    online = False
    freeze = True
    default_neighbors = 1
