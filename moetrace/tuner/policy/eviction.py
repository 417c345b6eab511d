"""Eviction policies: a registry of names mapped to a policy kind, its parameters and
fitted tables.

Mechanism (slot tables, residency, protection, pins, accounting) lives in :mod:`.core`,
which the simulator's kernel and the runtime both call; a policy says how to choose a
victim through its kind's hooks. Kinds:

* **linear** (:mod:`.linear`): one priority key per resident expert,

      key = w_last * last_use + w_insert * inserted + w_freq * frequency
            + w_gap * gap[phase, layer, expert] + w_next * next_use + w_count * count
            + w_trans * trans

  ties broken by ``last_use``; weights are per phase (prefill, decode), so phase overrides
  are weights. Frequencies decay by ``decay`` per replayed event (1.0 = perfect LFU);
  ``frequency`` is kept scaled by a growing increment (only its order matters), ``count``
  is the same decayed number of uses unscaled, so it can be traded against time (``lrfu``).
* **arc**, **wtinylfu**, **lecar** (:mod:`.arc`, :mod:`.tinylfu`, :mod:`.lecar`): adaptive
  policies with their own state (ghost lists, an admission filter and a self-sizing
  window, learned weights) that need no fitted table.

A plan's :class:`~moetrace.store.plan.Adaptation` adds the drift detector and the online
fallback policy it switches to (:mod:`.drift`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numba
import numpy as np

from moetrace.errors import ConfigError, PlanError
from moetrace.store.plan import Adaptation, EvictionConfig, PhaseOverride
from moetrace.tuner.policy import cachestate as C
from moetrace.tuner.policy.events import Events, expert_frequency
from moetrace.tuner.policy.params import check_params

W_LAST, W_INSERT, W_FREQ, W_GAP, W_NEXT, W_COUNT, W_TRANS = range(7)
NUM_WEIGHTS = 7
MAX_GAP = 1e6


@dataclass(frozen=True)
class EvictionSpec:
    """The numeric form of a policy that cache mechanisms read."""

    weights: np.ndarray  # float64 (2, NUM_WEIGHTS), per phase
    decay: float
    pinned: np.ndarray  # bool (L, E)
    gap: np.ndarray  # float64 (2, L, E)
    oracle: bool = False
    trans: np.ndarray = field(default_factory=lambda: np.zeros((1, 1, 1)))
    """float64 (L, E, E): P(layer's next pass needs b | its last pass used a); (1, 1, 1)
    when the policy has no ``trans`` weight."""
    kind: int = C.KIND_LINEAR
    params: np.ndarray = field(default_factory=lambda: default_params())
    """float64 (NUM_PR,): the kind's parameters by cachestate.PR_* index."""
    prior: np.ndarray = field(default_factory=lambda: np.zeros((1, 1)))
    """float64 (L, E): the tune traffic's uses per pass of each expert, when pins and gaps
    are re-elected online (``repin`` > 0; see :mod:`.priors`); (1, 1) otherwise."""
    fallback_kind: int = C.KIND_LINEAR
    fallback_weights: np.ndarray = field(default_factory=lambda: np.zeros((2, NUM_WEIGHTS)))
    """The drift fallback's kind and (for a linear one) weights; see Adaptation."""

    def __post_init__(self) -> None:
        if not 0.0 < self.decay <= 1.0:
            raise ConfigError(f"eviction decay must be in (0, 1], got {self.decay}")
        if self.weights.shape != (2, NUM_WEIGHTS):
            raise ConfigError(
                f"eviction weights must have shape (2, {NUM_WEIGHTS}), got {self.weights.shape}"
            )


PARAM_INDEX = {
    "decay": C.PR_DECAY,
    "window": C.PR_WINDOW,
    "protected": C.PR_PROTECTED,
    "sample": C.PR_SAMPLE,
    "step": C.PR_STEP,
    "climb": C.PR_CLIMB,
    "learning_rate": C.PR_LEARNING_RATE,
    "discount": C.PR_DISCOUNT,
    "seed": C.PR_SEED,
    "repin": C.PR_REPIN,
    "prior_decay": C.PR_PRIOR_DECAY,
}
"""Policy parameters the cache mechanism reads, by their slot in ``EvictionSpec.params``."""


def default_params() -> np.ndarray:
    prm = np.zeros(C.NUM_PR)
    prm[C.PR_DECAY] = 1.0
    prm[C.PR_WINDOW] = 0.01
    prm[C.PR_PROTECTED] = 0.8
    prm[C.PR_SAMPLE] = 10.0
    prm[C.PR_STEP] = 0.0625
    prm[C.PR_CLIMB] = 1.0
    prm[C.PR_LEARNING_RATE] = 0.45
    prm[C.PR_DISCOUNT] = 0.005
    prm[C.PR_DRIFT_MARGIN] = 0.02
    prm[C.PR_HALFLIFE] = 8.0
    prm[C.PR_PRIOR_DECAY] = 0.5
    return prm


REPIN = ("repin", "prior_decay")
"""Parameters of online re-election (:mod:`.priors`) that pinning and gap policies accept."""


def _prior(events: Events, params: Mapping[str, Any]) -> dict[str, Any]:
    """``{"prior": uses per pass}`` when the policy re-elects online, else nothing."""
    if not params.get("repin"):
        return {}
    freq = expert_frequency(events).sum(axis=0)
    passes = np.bincount(events.layer.astype(np.int64), minlength=events.num_layers)
    return {"prior": np.round(freq / np.maximum(passes, 1)[:, None], 6).tolist()}


Fitter = Callable[
    [Events, tuple[int, ...], Mapping[str, Any]],
    tuple[tuple[tuple[int, ...], ...], dict[str, Any]],
]
"""(tune events, per-layer capacities, params) -> (pinned experts per layer, tables)."""


@dataclass(frozen=True)
class PolicyDef:
    """A registered policy: its weights from params, defaults, and an optional fitter."""

    name: str
    doc: str
    weights: Callable[[Mapping[str, Any], int], list[float]]
    defaults: Mapping[str, Any]
    fit: Fitter | None = None
    oracle: bool = False
    accepts: tuple[str, ...] = ()
    """Parameters beyond ``defaults`` the policy (or its fitter) reads."""
    kind: int = C.KIND_LINEAR
    """The cache mechanism's policy kind (cachestate.KIND_*)."""

    @property
    def online(self) -> bool:
        """Runs with no fitted table and no future: a possible drift fallback."""
        return self.fit is None and not self.oracle

    def check_params(self, params: Mapping[str, Any]) -> dict[str, float]:
        """``params`` validated against what this policy reads (ConfigError otherwise)."""
        accepted = (*self.defaults, *self.accepts, "decay")
        return check_params(params, accepted, f"eviction policy {self.name!r}")


REGISTRY: dict[str, PolicyDef] = {}
Pins = tuple[tuple[int, ...], ...]


def register_policy(policy: PolicyDef) -> PolicyDef:
    REGISTRY[policy.name] = policy
    return policy


def get_policy(name: str) -> PolicyDef:
    try:
        return REGISTRY[name]
    except KeyError:
        raise ConfigError(
            f"unknown eviction policy {name!r}; known: {', '.join(sorted(REGISTRY))}"
        ) from None


def _w(**kw: float) -> list[float]:
    out = [0.0] * NUM_WEIGHTS
    for key, val in kw.items():
        out[
            {
                "last": W_LAST,
                "insert": W_INSERT,
                "freq": W_FREQ,
                "gap": W_GAP,
                "next": W_NEXT,
                "count": W_COUNT,
                "trans": W_TRANS,
            }[key]
        ] = val
    return out


def _hot(freq: np.ndarray, counts: list[int]) -> tuple[tuple[int, ...], ...]:
    """Per layer, the ``counts[l]`` experts most often needed (ties by id)."""
    rows = []
    for layer, n in enumerate(counts):
        order = np.lexsort((np.arange(freq.shape[1]), -freq[layer]))
        rows.append(tuple(int(e) for e in order[:n] if freq[layer, e] > 0))
    return tuple(rows)


def _fit_pins(
    events: Events, caps: tuple[int, ...], params: Mapping[str, Any]
) -> tuple[Pins, dict[str, Any]]:
    freq = expert_frequency(events).sum(axis=0)
    frac = float(params.get("pin_fraction", 1.0))
    counts = [int(np.floor(c * frac)) for c in caps]
    return _hot(freq, counts), _prior(events, params)


def _fit_gap(
    events: Events, caps: tuple[int, ...], params: Mapping[str, Any]
) -> tuple[Pins, dict[str, Any]]:
    freq = expert_frequency(events)
    overall = freq.sum(axis=0) / 2.0
    gap = np.empty_like(freq)
    for ph in range(2):
        f = freq[ph] if freq[ph].sum() > 0 else overall
        gap[ph] = np.minimum(1.0 / np.maximum(f, 1.0 / MAX_GAP), MAX_GAP)
    pins = _fit_pins(events, caps, params)[0] if params.get("pin_fraction") else ()
    return pins, {"gap": np.round(gap, 3).tolist(), **_prior(events, params)}


@numba.njit(cache=True)
def _count_transitions(layer, request, ptr, experts, L, E, horizon):  # type: ignore[no-untyped-def]
    """counts[l, a, b]: uses of b in the ``horizon`` passes of layer l that follow a pass
    using a (same request); seen[l, a]: passes using a that have a next one."""
    counts = np.zeros((L, E, E))
    seen = np.zeros((L, E))
    recent = np.full((L, horizon), -1, np.int64)  # the layer's last passes, newest first
    for i in range(layer.shape[0]):
        lay = layer[i]
        for h in range(horizon):
            p = recent[lay, h]
            if p < 0 or request[p] != request[i]:
                break
            for a in range(ptr[p], ptr[p + 1]):
                if h == 0:
                    seen[lay, experts[a]] += 1.0
                for b in range(ptr[i], ptr[i + 1]):
                    counts[lay, experts[a], experts[b]] += 1.0
        for h in range(horizon - 1, 0, -1):
            recent[lay, h] = recent[lay, h - 1]
        recent[lay, 0] = i
    return counts, seen


def _fit_trans(
    events: Events, caps: tuple[int, ...], params: Mapping[str, Any]
) -> tuple[Pins, dict[str, Any]]:
    """Per layer, the expected uses of b in the layer's next ``horizon`` passes of the
    request given this pass used a (``horizon`` 1: P(next pass needs b | a))."""
    L, E = events.num_layers, events.num_experts
    counts, seen = _count_transitions(
        events.layer.astype(np.int64),
        events.request.astype(np.int64),
        events.ptr,
        events.experts.astype(np.int64),
        L,
        E,
        max(1, int(params.get("horizon", 1))),
    )
    trans = counts / np.maximum(seen, 1.0)[:, :, None]
    return (), {"trans": np.round(trans, 4).tolist(), **_prior(events, params)}


register_policy(PolicyDef("lru", "least recently used", lambda p, L: _w(last=1.0), {}))
register_policy(PolicyDef("fifo", "first in, first out", lambda p, L: _w(insert=1.0), {}))
register_policy(
    PolicyDef(
        "lfu",
        "least frequently used (counts persist across evictions; decay per event)",
        lambda p, L: _w(freq=1.0),
        {"decay": 1.0},
    )
)
register_policy(
    PolicyDef(
        "lfu_decay",
        "LFU whose counts decay by `decay` per replayed event",
        lambda p, L: _w(freq=1.0),
        {"decay": 0.999},
    )
)
register_policy(
    PolicyDef(
        "lrfu",
        "recency plus decayed frequency: key = last_use + alpha * L * count (count = uses "
        "decayed by `decay` per event; one use is worth `alpha` passes of recency)",
        lambda p, L: _w(last=1.0, count=float(p.get("alpha", 3.0)) * L),
        {"alpha": 3.0, "decay": 0.999},
    )
)
register_policy(
    PolicyDef(
        "trans_lru",
        "recency plus the predicted next use: key = last_use + gamma * L * sum over the "
        "experts a of the layer's last pass of trans[layer, a, expert] (fitted next-pass "
        "transition table) + alpha * L * count (as in `lrfu`)",
        lambda p, L: _w(
            last=1.0,
            trans=float(p.get("gamma", 1.0)) * L,
            count=float(p.get("alpha", 0.0)) * L,
        ),
        {"gamma": 1.0, "alpha": 0.0, "decay": 1.0},
        fit=_fit_trans,
        accepts=("horizon", *REPIN),
    )
)
register_policy(
    PolicyDef(
        "static",
        "a pinned hot set fills each layer's cache; other experts are streamed",
        lambda p, L: _w(last=1.0),
        {"pin_fraction": 1.0},
        fit=_fit_pins,
        accepts=REPIN,
    )
)
register_policy(
    PolicyDef(
        "pinned_lru",
        "the `pin_fraction` hottest experts pinned, LRU for the rest",
        lambda p, L: _w(last=1.0),
        {"pin_fraction": 0.5},
        fit=_fit_pins,
        accepts=REPIN,
    )
)
register_policy(
    PolicyDef(
        "pinned_lfu",
        "the `pin_fraction` hottest experts pinned, LFU (with decay) for the rest",
        lambda p, L: _w(freq=1.0),
        {"pin_fraction": 0.5, "decay": 0.999},
        fit=_fit_pins,
        accepts=REPIN,
    )
)
register_policy(
    PolicyDef(
        "freq_lru",
        "phase-aware frequency-biased LRU: key = last_use - beta * L * gap[phase]",
        lambda p, L: _w(last=1.0, gap=-float(p.get("beta", 1.0)) * L),
        {"beta": 1.0},
        fit=_fit_gap,
        accepts=("pin_fraction", *REPIN),
    )
)
register_policy(
    PolicyDef(
        "arc",
        "ARC after Megiddo & Modha 2003: recency list T1 and frequency list T2 whose split "
        "adapts to misses on ghosts of recently evicted experts; no fitted table",
        lambda p, L: _w(last=1.0),
        {},
        kind=C.KIND_ARC,
    )
)
register_policy(
    PolicyDef(
        "wtinylfu",
        "W-TinyLFU after Caffeine: an LRU window (initial share `window`) before a segmented "
        "LRU main area (`protected` share), admission by recent use counts (halved every "
        "`sample` x slots accesses), window resized by hill climbing (`step`; `climb` 0 "
        "keeps it fixed); no fitted table",
        lambda p, L: _w(last=1.0),
        {"window": 0.01, "protected": 0.8, "sample": 10.0, "step": 0.0625, "climb": 1.0},
        kind=C.KIND_TINYLFU,
    )
)
register_policy(
    PolicyDef(
        "lecar",
        "LeCaR after Vietri et al. 2018: LRU and LFU mixed by weights learnt from regret "
        "(misses on each one's eviction history; `learning_rate`, `discount`, seeded "
        "draws); no fitted table",
        lambda p, L: _w(last=1.0),
        {"learning_rate": 0.45, "discount": 0.005, "decay": 1.0, "seed": 0.0},
        kind=C.KIND_LECAR,
    )
)
register_policy(
    PolicyDef(
        "belady",
        "Belady-MIN: evict the expert needed furthest in the future (oracle bound)",
        lambda p, L: _w(next=-1.0),
        {},
        oracle=True,
    )
)


def fit_eviction(
    name: str, events: Events, capacities: tuple[int, ...], params: Mapping[str, Any] | None = None
) -> EvictionConfig:
    """An eviction config for ``name``, its tables/pins fitted on ``events`` if it has any."""
    policy = get_policy(name)
    merged = {**policy.defaults, **policy.check_params(params or {})}
    if policy.fit is None:
        return EvictionConfig(policy=name, params=merged)
    pinned, tables = policy.fit(events, capacities, merged)
    return EvictionConfig(policy=name, params=merged, pinned=pinned, tables=tables)


def eviction_spec(
    config: EvictionConfig,
    num_layers: int,
    num_experts: int,
    overrides: Mapping[str, PhaseOverride] | None = None,
    adaptation: Adaptation | None = None,
) -> EvictionSpec:
    """Compile a config (per-phase parameter overrides, the drift adaptation) into an
    EvictionSpec."""
    policy = get_policy(config.policy)
    policy.check_params(config.params)
    for ov in (overrides or {}).values():
        if ov.eviction_params:
            policy.check_params(ov.eviction_params)
    weights = np.zeros((2, NUM_WEIGHTS), dtype=np.float64)
    for ph, phase in enumerate(("prefill", "decode")):
        params = {**policy.defaults, **config.params}
        ov = (overrides or {}).get(phase)
        if ov is not None and ov.eviction_params:
            params.update(ov.eviction_params)
        weights[ph] = policy.weights(params, num_layers)
    decay = float({**policy.defaults, **config.params}.get("decay", 1.0))
    pinned = np.zeros((num_layers, num_experts), dtype=bool)
    for layer, row in enumerate(config.pinned):
        if layer >= num_layers or any(not 0 <= e < num_experts for e in row):
            raise PlanError(f"eviction.pinned[{layer}] = {list(row)} does not fit the model")
        pinned[layer, list(row)] = True
    gap = np.zeros((2, num_layers, num_experts), dtype=np.float64)
    if weights[:, W_GAP].any():
        table = config.tables.get("gap")
        arr = np.asarray(table, dtype=np.float64) if table is not None else None
        if arr is None or arr.shape != gap.shape:
            raise PlanError(
                f"eviction.tables.gap must have shape {list(gap.shape)} for policy "
                f"{config.policy!r}, got {None if arr is None else list(arr.shape)}"
            )
        gap = arr
    trans = np.zeros((1, 1, 1), dtype=np.float64)
    if weights[:, W_TRANS].any():
        table = config.tables.get("trans")
        arr = np.asarray(table, dtype=np.float64) if table is not None else None
        want = (num_layers, num_experts, num_experts)
        if arr is None or arr.shape != want:
            raise PlanError(
                f"eviction.tables.trans must have shape {list(want)} for policy "
                f"{config.policy!r}, got {None if arr is None else list(arr.shape)}"
            )
        trans = arr
    prior = np.zeros((1, 1), dtype=np.float64)
    if float({**policy.defaults, **config.params}.get("repin", 0) or 0) > 0:
        table = config.tables.get("prior")
        arr = np.asarray(table, dtype=np.float64) if table is not None else None
        if arr is None or arr.shape != (num_layers, num_experts):
            raise PlanError(
                f"eviction.tables.prior must have shape {[num_layers, num_experts]} for "
                f"policy {config.policy!r} with repin, got "
                f"{None if arr is None else list(arr.shape)}"
            )
        prior = arr
    prm = default_params()
    for name, value in {**policy.defaults, **config.params}.items():
        if name in PARAM_INDEX:
            prm[PARAM_INDEX[name]] = float(value)
    prm[C.PR_DECAY] = decay
    fallback = get_policy((adaptation or Adaptation()).fallback)
    if not fallback.online:
        raise PlanError(
            f"adaptation.fallback {fallback.name!r} needs fitted tables or the future; "
            f"use an online policy ({', '.join(sorted(n for n, p in REGISTRY.items() if p.online))})"
        )
    fb_weights = np.asarray([fallback.weights(fallback.defaults, num_layers)] * 2, dtype=np.float64)
    if adaptation is not None and adaptation.window > 0:
        prm[C.PR_DRIFT_WINDOW] = float(adaptation.window)
        prm[C.PR_DRIFT_MARGIN] = float(adaptation.margin)
        prm[C.PR_HALFLIFE] = float(adaptation.halflife)
    return EvictionSpec(
        weights=weights,
        decay=decay,
        pinned=pinned,
        gap=gap,
        oracle=policy.oracle,
        trans=trans,
        prior=prior,
        kind=policy.kind,
        params=prm,
        fallback_kind=fallback.kind,
        fallback_weights=fb_weights,
    )
