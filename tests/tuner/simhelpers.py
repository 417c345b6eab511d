"""Small hand-made routings for the policy and simulator tests."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np

from moetrace.store.plan import CacheLayout, PrefetchConfig, RoutingShape
from moetrace.tuner.policy.events import Events, build_events
from moetrace.tuner.sim.engine import make_plan


def routing(
    tokens: list[list[list[int]]],
    num_experts: int,
    *,
    requests: list[int] | None = None,
    prefill: int = 0,
) -> SimpleNamespace:
    """``tokens[t][layer]`` = experts of token t at that layer; one decode pass per token
    (the first ``prefill`` tokens of each request form its prefill pass)."""
    L = len(tokens[0])
    k = max(len(e) for t in tokens for e in t)
    cols: dict[str, list[int]] = {
        c: [] for c in ("request", "step", "token", "phase", "forward", "layer")
    }
    exps = []
    reqs = requests or [0] * len(tokens)
    pos: dict[int, int] = {}
    for t, (per_layer, r) in enumerate(zip(tokens, reqs, strict=True)):
        i = pos.get(r, 0)
        pos[r] = i + 1
        step = 0 if i < prefill else i - prefill + 1
        for layer, e in enumerate(per_layer):
            cols["request"].append(r)
            cols["step"].append(step)
            cols["token"].append(i)
            cols["phase"].append(0 if step == 0 and prefill else 1)
            cols["forward"].append(t)
            cols["layer"].append(layer)
            exps.append(list(e) + [-1] * (k - len(e)))
    return _namespace(cols, exps, L, num_experts, k)


def events_of(seq: list[int], num_experts: int) -> Events:
    """One layer, one expert per token, one pass per token."""
    return build_events(routing([[[e]] for e in seq], num_experts))


def plan_for(
    events: Events,
    policy: str,
    capacity: int,
    prefetch: str = "none",
    fetch: int = 0,
    **params: float,
):
    L, E = events.num_layers, events.num_experts
    shape = RoutingShape("test", tuple(range(L)), E, events.top_k)
    layout = CacheLayout("per_layer", tuple([capacity] * L))
    return make_plan(
        events,
        shape,
        layout,
        policy,
        params,
        PrefetchConfig(prefetch, fetch=fetch),
        bytes_per_expert=1000,
    )


def random_tokens(
    rng: np.random.Generator, n: int, L: int, E: int, k: int
) -> list[list[list[int]]]:
    p = 1.0 / np.arange(1, E + 1)
    p /= p.sum()
    return [[list(rng.choice(E, size=k, replace=False, p=p)) for _ in range(L)] for _ in range(n)]


def online_hits(cache, events: Events) -> int:  # type: ignore[no-untyped-def]
    """Replay ``events`` through a runtime ExpertCache, event by event; its demand hits."""
    hits = 0
    for i in range(events.num_events):
        need = [int(e) for e in events.experts[events.ptr[i] : events.ptr[i + 1]]]
        hits += len(need) - len(cache.access(int(events.layer[i]), need, int(events.phase[i])))
    return hits


def one_layer_cache(policy: str, capacity: int, num_experts: int = 8, **params: float):  # type: ignore[no-untyped-def]
    """A runtime ExpertCache of one layer with ``capacity`` slots under ``policy``."""
    from moetrace.store.plan import EvictionConfig
    from moetrace.tuner.policy import ExpertCache, eviction_spec

    spec = eviction_spec(EvictionConfig(policy, params), 1, num_experts)
    return ExpertCache(CacheLayout("per_layer", (capacity,)), spec, num_experts)


def routing_from_requests(
    reqs: list[tuple[int, list[np.ndarray]]], L: int, E: int, k: int
) -> SimpleNamespace:
    """Requests in arrival order, each ``(prefill tokens, per-token (L, k) experts)``: a
    prefill pass of the first tokens, then one decode pass per token."""
    cols: dict[str, list[int]] = {
        c: [] for c in ("request", "step", "token", "phase", "forward", "layer")
    }
    exps: list[np.ndarray] = []
    fwd = 0
    for r, (prefill, rows) in enumerate(reqs):
        for i, per_layer in enumerate(rows):
            step = 0 if i < prefill else i - prefill + 1
            fwd += int(i == 0 or step > 0)
            for layer in range(L):
                cols["request"].append(r)
                cols["step"].append(step)
                cols["token"].append(i)
                cols["phase"].append(0 if step == 0 else 1)
                cols["forward"].append(fwd)
                cols["layer"].append(layer)
                exps.append(np.asarray(per_layer[layer]))
    return _namespace(cols, exps, L, E, k)


def _namespace(cols: dict[str, list[int]], exps: list, L: int, E: int, k: int) -> SimpleNamespace:
    """A routing's arrays, as ``build_events`` reads them."""
    return SimpleNamespace(
        request=np.asarray(cols["request"], np.int32),
        step=np.asarray(cols["step"], np.int32),
        token=np.asarray(cols["token"], np.int32),
        phase=np.asarray(cols["phase"], np.int8),
        forward=np.asarray(cols["forward"], np.int64),
        layer=np.asarray(cols["layer"], np.int16),
        experts=np.asarray(exps, np.int16),
        moe_layers=tuple(range(L)),
        num_experts=E,
        top_k=k,
        speculative=None,
    )
