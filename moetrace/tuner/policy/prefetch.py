"""Prefetchers: a registry of predictors of the experts a later layer will need.

Each prefetcher has ``fit(events)`` (tables from the tune split, returned as a
PrefetchConfig so they go into the plan), ``candidates(events, fetch)`` (the simulator's
batch form: per event, (layer, expert) pairs to fetch while the event's layer computes)
and, where it can run online, ``predict(layer, experts, counts)``. Prefetchers here
predict from routing alone, never from cache state, so the batch and online forms agree.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import numpy as np

from moetrace.errors import ConfigError, PlanError
from moetrace.store.plan import PrefetchConfig
from moetrace.tuner.policy.events import Events, build_events
from moetrace.tuner.policy.params import check_params

Candidates = tuple[np.ndarray, np.ndarray, np.ndarray]
"""CSR over events: ``ptr`` (n+1,), target ``layer`` and ``expert`` per candidate."""

REGISTRY: dict[str, type[Prefetcher]] = {}


def register_prefetcher(cls: type[Prefetcher]) -> type[Prefetcher]:
    REGISTRY[cls.name] = cls
    return cls


def get_prefetcher(config: PrefetchConfig, num_layers: int, num_experts: int) -> Prefetcher:
    try:
        cls = REGISTRY[config.name]
    except KeyError:
        raise ConfigError(
            f"unknown prefetcher {config.name!r}; known: {', '.join(sorted(REGISTRY))}"
        ) from None
    return cls(config, num_layers, num_experts)


def empty_candidates(n_events: int) -> Candidates:
    return (
        np.zeros(n_events + 1, np.int64),
        np.zeros(0, np.int64),
        np.zeros(0, np.int64),
    )


def top_by_score(scores: np.ndarray, fetch: np.ndarray) -> list[np.ndarray]:
    """Per row, the ``fetch[row]`` highest-scoring columns with a positive score."""
    keep, cols = _top_mask(scores, fetch)
    return [cols[r][keep[r]] for r in range(scores.shape[0])]


def _top_mask(scores: np.ndarray, fetch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(mask, columns): ``columns`` (n, f) by descending score, ``mask`` the kept ones."""
    f = int(min(scores.shape[1], fetch.max(initial=0)))
    cols = np.argsort(-scores, axis=1, kind="stable")[:, :f]
    top = np.take_along_axis(scores, cols, axis=1)
    keep = (np.arange(f)[None, :] < fetch[:, None]) & (top > 0)
    return keep, cols


def _from_triplets(
    n_events: int, rows: np.ndarray, layers: np.ndarray, experts: np.ndarray
) -> Candidates:
    """CSR over events from (event row, target layer, expert) triplets."""
    order = np.argsort(rows, kind="stable")
    counts = np.bincount(rows, minlength=n_events)
    ptr = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    return ptr, layers[order].astype(np.int64), experts[order].astype(np.int64)


def _gather(ptr: np.ndarray, values: np.ndarray, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For each i in ``idx``, the values in ``values[ptr[i]:ptr[i+1]]``, flattened, with
    the position in ``idx`` each came from."""
    lens = (ptr[idx + 1] - ptr[idx]).astype(np.int64)
    owner = np.repeat(np.arange(len(idx)), lens)
    starts = np.repeat(ptr[idx] - np.concatenate([[0], np.cumsum(lens)[:-1]]), lens)
    return owner, values[np.arange(int(lens.sum())) + starts]


class Prefetcher:
    """Base class: a named predictor configured by a PrefetchConfig."""

    name: ClassVar[str] = ""
    online: ClassVar[bool] = True
    fetch_all: ClassVar[bool] = False
    params: ClassVar[tuple[str, ...]] = ()
    """Names of the parameters this prefetcher reads from ``config.params``."""

    def __init__(self, config: PrefetchConfig, num_layers: int, num_experts: int) -> None:
        check_params(config.params, self.params, f"prefetcher {self.name!r}")
        self.config = config
        self.num_layers = num_layers
        self.num_experts = num_experts

    @property
    def lookahead(self) -> int:
        return self.config.lookahead

    def fit(self, data: Any) -> PrefetchConfig:
        """Fit tables on the tune split (Events, or a Routing turned into pass events);
        returns the config with its tables, ready for a plan."""
        events = data if isinstance(data, Events) else build_events(data)
        return self._fit(events)

    def _fit(self, events: Events) -> PrefetchConfig:
        return self.config

    def candidates(self, events: Events, fetch: np.ndarray) -> Candidates:
        raise NotImplementedError

    def predict(
        self,
        layer: int,
        experts: np.ndarray,
        counts: np.ndarray | None = None,
        *,
        tokens: int | None = None,
        fetch: int | None = None,
    ) -> np.ndarray:
        """The experts to fetch for layer ``layer + lookahead`` from the ``experts`` layer
        ``layer`` uses now (``counts``: tokens per expert; ``tokens``: tokens in the pass;
        ``fetch``: how many, default the plan's), best first, as :meth:`candidates`
        would list them for the same event."""
        raise ConfigError(f"prefetcher {self.name!r} cannot predict online")

    def _targets(self, events: Events, cross_pass: bool = False) -> np.ndarray:
        """Per event, the target event index ``lookahead`` layers on in the same pass
        (or, with ``cross_pass``, in the next passes)."""
        L = events.num_layers
        tl = events.layer.astype(np.int64) + self.lookahead
        tp = events.pass_id.astype(np.int64)
        if cross_pass:
            tp = tp + tl // L
            tl = tl % L
        ok = (tl < L) & (tp < events.num_passes)
        out = np.full(events.num_events, -1, np.int64)
        out[ok] = events.pass_event[tp[ok], tl[ok]]
        return out


@register_prefetcher
class NoPrefetch(Prefetcher):
    name = "none"

    def candidates(self, events: Events, fetch: np.ndarray) -> Candidates:
        return empty_candidates(events.num_events)

    def predict(
        self,
        layer: int,
        experts: np.ndarray,
        counts: np.ndarray | None = None,
        *,
        tokens: int | None = None,
        fetch: int | None = None,
    ) -> np.ndarray:
        return np.zeros(0, np.int64)


@register_prefetcher
class OraclePrefetch(Prefetcher):
    """Perfect knowledge of the experts ``lookahead`` layers on (the bound)."""

    name = "oracle"
    online = False
    fetch_all = True

    def candidates(self, events: Events, fetch: np.ndarray) -> Candidates:
        tgt = self._targets(events, cross_pass=True)
        rows = np.flatnonzero((tgt >= 0) & (fetch > 0))
        owner, exp = _gather(events.ptr, events.experts, tgt[rows])
        layers = events.layer[tgt[rows]].astype(np.int64)
        return _from_triplets(events.num_events, rows[owner], layers[owner], exp)


@register_prefetcher
class SpeculativePrefetch(Prefetcher):
    """The recorded speculative next-layer gate (trace columns s0..; ProMoE-style): per
    event the experts its tokens' gate picks, most picked first (ties: lower id first),
    ``fetch`` of them (all with ``fetch`` 0), as the runtime fetches them."""

    name = "speculative"
    fetch_all = True

    def candidates(self, events: Events, fetch: np.ndarray) -> Candidates:
        if events.spec_ptr is None or events.spec_experts is None:
            raise ConfigError("prefetcher 'speculative' needs a trace with speculative columns")
        if self.lookahead != 1:
            raise ConfigError(f"prefetcher 'speculative' has lookahead 1, got {self.lookahead}")
        tl = events.layer.astype(np.int64) + 1
        rows = np.flatnonzero((tl < events.num_layers) & (fetch > 0))
        owner, exp = _gather(events.spec_ptr, events.spec_experts, rows)
        if events.spec_counts is not None:
            _, count = _gather(events.spec_ptr, events.spec_counts, rows)
            order = np.lexsort((-count.astype(np.int64), owner))  # stable: ids ascending
            owner, exp = owner[order], exp[order]
        rank = np.arange(len(owner)) - np.searchsorted(owner, owner, side="left")
        keep = rank < fetch[rows][owner]
        owner, exp = owner[keep], exp[keep]
        return _from_triplets(events.num_events, rows[owner], tl[rows][owner], exp)

    def predict(
        self,
        layer: int,
        experts: np.ndarray,
        counts: np.ndarray | None = None,
        *,
        tokens: int | None = None,
        fetch: int | None = None,
    ) -> np.ndarray:
        return np.asarray(experts, np.int64)  # the caller passes the speculative gate's picks


class LinearPrefetch(Prefetcher):
    """Scores for layer l+d = counts of experts at l @ W[l] + tokens * bias[l]; W is kept
    sparse in the plan (top ``keep`` successors per expert)."""

    params = ("keep",)

    def _fit_dense(self, events: Events) -> tuple[np.ndarray, np.ndarray]:
        raise NotImplementedError

    def _fit(self, events: Events) -> PrefetchConfig:
        W, b = self._fit_dense(events)
        keep = int(self.config.params.get("keep", 16))
        succ = np.argsort(-W, axis=2, kind="stable")[:, :, :keep]
        weight = np.take_along_axis(W, succ, axis=2)
        tables = {
            "succ": succ.tolist(),
            "weight": np.round(weight, 4).tolist(),
            "bias": np.round(b, 4).tolist(),
        }
        return PrefetchConfig(
            name=self.name,
            lookahead=self.lookahead,
            fetch=self.config.fetch,
            params=dict(self.config.params),
            tables=tables,
        )

    def dense(self) -> tuple[np.ndarray, np.ndarray]:
        L, E = self.num_layers, self.num_experts
        t = self.config.tables
        try:
            succ = np.asarray(t["succ"], dtype=np.int64)
            weight = np.asarray(t["weight"], dtype=np.float64)
            bias = np.asarray(t["bias"], dtype=np.float64)
        except (KeyError, ValueError) as exc:
            raise PlanError(
                f"prefetch.tables of {self.name!r} are missing or malformed ({exc})"
            ) from None
        if succ.shape[:2] != (L, E) or weight.shape != succ.shape or bias.shape != (L, E):
            raise PlanError(
                f"prefetch.tables of {self.name!r} have shapes succ {list(succ.shape)}, "
                f"bias {list(bias.shape)}; expected ({L}, {E}, m) and ({L}, {E})"
            )
        if succ.size and (succ.min() < 0 or succ.max() >= E):
            raise PlanError(f"prefetch.tables.succ of {self.name!r} has expert ids out of range")
        W = np.zeros((L, E, E))
        np.put_along_axis(W, succ, weight, axis=2)
        return W, bias

    def _dense_cached(self) -> tuple[np.ndarray, np.ndarray]:
        if not hasattr(self, "_W"):
            self._W, self._b = self.dense()
        return self._W, self._b

    def candidates(self, events: Events, fetch: np.ndarray) -> Candidates:
        W, b = self._dense_cached()
        E, d = events.num_experts, self.lookahead
        ev_of = np.repeat(np.arange(events.num_events), np.diff(events.ptr))
        out_rows, out_layers, out_exp = [], [], []
        for layer in range(events.num_layers - d):
            rows = np.flatnonzero((events.layer == layer) & (fetch > 0))
            if len(rows) == 0:
                continue
            local = np.full(events.num_events, -1, np.int64)
            local[rows] = np.arange(len(rows))
            pos = local[ev_of]
            sel = pos >= 0
            C = np.zeros((len(rows), E))
            C[pos[sel], events.experts[sel]] = events.counts[sel]
            S = C @ W[layer] + events.tokens[rows, None] * b[layer][None, :]
            keep, cols = _top_mask(S, fetch[rows])
            r_idx, c_idx = np.nonzero(keep)
            out_rows.append(rows[r_idx])
            out_layers.append(np.full(len(r_idx), layer + d, np.int64))
            out_exp.append(cols[r_idx, c_idx])
        if not out_rows:
            return empty_candidates(events.num_events)
        return _from_triplets(
            events.num_events,
            np.concatenate(out_rows),
            np.concatenate(out_layers),
            np.concatenate(out_exp),
        )

    def predict(
        self,
        layer: int,
        experts: np.ndarray,
        counts: np.ndarray | None = None,
        *,
        tokens: int | None = None,
        fetch: int | None = None,
    ) -> np.ndarray:
        if layer + self.lookahead >= self.num_layers:
            return np.zeros(0, np.int64)
        W, b = self._dense_cached()
        c = np.ones(len(experts)) if counts is None else np.asarray(counts, np.float64)
        n_tok = float(c.max(initial=1.0) if tokens is None else tokens)
        s = c @ W[layer][np.asarray(experts, np.int64)] + n_tok * b[layer]
        f = self.config.fetch if fetch is None else fetch
        return top_by_score(s[None, :], np.asarray([f]))[0].astype(np.int64)


def _token_pairs(
    events: Events, d: int, layer: int, limit: int, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Multi-hot (tokens, E) of experts at ``layer`` and at ``layer + d`` (subsampled)."""
    te = events.token_experts
    ok = (te[:, layer, 0] >= 0) & (te[:, layer + d, 0] >= 0)
    idx = np.flatnonzero(ok)
    if len(idx) > limit:
        idx = np.sort(np.random.default_rng(seed).choice(idx, limit, replace=False))
    E = events.num_experts
    X = np.zeros((len(idx), E), np.float32)
    Y = np.zeros((len(idx), E), np.float32)
    for j in range(te.shape[2]):
        a, b = te[idx, layer, j], te[idx, layer + d, j]
        X[np.flatnonzero(a >= 0), a[a >= 0]] = 1.0
        Y[np.flatnonzero(b >= 0), b[b >= 0]] = 1.0
    return X, Y


@register_prefetcher
class TransitionPrefetch(LinearPrefetch):
    """Cross-layer transition table: P(expert e' at l+d | expert e at l), from tokens."""

    name = "transition"

    def _fit_dense(self, events: Events) -> tuple[np.ndarray, np.ndarray]:
        L, E, d = self.num_layers, self.num_experts, self.lookahead
        W = np.zeros((L, E, E))
        for layer in range(L - d):
            X, Y = _token_pairs(events, d, layer, 200_000, 0)
            cnt = X.T @ Y
            W[layer] = cnt / np.maximum(X.sum(axis=0)[:, None], 1.0)
        return W, np.zeros((L, E))


@register_prefetcher
class LearnedPrefetch(LinearPrefetch):
    """A layer-level learned predictor (DuoServe-MoE style): per layer a ridge regression
    (scikit-learn) from the multi-hot experts at l to those at l+d, trained offline."""

    name = "learned"
    params = ("keep", "alpha")

    def _fit_dense(self, events: Events) -> tuple[np.ndarray, np.ndarray]:
        from sklearn.linear_model import Ridge

        L, E, d = self.num_layers, self.num_experts, self.lookahead
        alpha = float(self.config.params.get("alpha", 1.0))
        W = np.zeros((L, E, E))
        b = np.zeros((L, E))
        for layer in range(L - d):
            X, Y = _token_pairs(events, d, layer, 30_000, layer)
            if len(X) < 2:
                continue
            model = Ridge(alpha=alpha).fit(X, Y)
            W[layer] = np.asarray(model.coef_).T
            b[layer] = model.intercept_
        return W, b


def fetch_per_event(
    events: Events,
    config: PrefetchConfig,
    overrides: Mapping[str, Any] | None,
    fetch_all: bool = False,
) -> np.ndarray:
    """How many experts to fetch per event: the plan's ``fetch`` or a phase override.
    0 means none, or for predictors with ``fetch_all`` (oracle, speculative) all they yield."""
    per_phase = []
    for phase in ("prefill", "decode"):
        ov = (overrides or {}).get(phase)
        f = config.fetch if ov is None or ov.prefetch_fetch is None else ov.prefetch_fetch
        per_phase.append(events.num_experts if f == 0 and fetch_all else f)
    return np.asarray(per_phase, np.int64)[events.phase.astype(np.int64)]
