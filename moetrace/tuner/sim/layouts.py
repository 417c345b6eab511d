"""Cache layouts the tuner and simulator build: uniform, skew-proportional, pool."""

from __future__ import annotations

import numba
import numpy as np

from moetrace.errors import ConfigError
from moetrace.store.plan import CacheLayout
from moetrace.tuner.policy.events import Events, expert_frequency


def _check(slots: int, L: int, E: int) -> None:
    if slots < 1:
        raise ConfigError(f"cache budget must be >= 1 slot, got {slots}")
    if slots > L * E:
        raise ConfigError(f"cache budget of {slots} slots exceeds all {L * E} experts ({L} x {E})")


def uniform_layout(slots: int, num_layers: int, num_experts: int) -> CacheLayout:
    """``slots`` split evenly over layers (the remainder to the first layers)."""
    _check(slots, num_layers, num_experts)
    base, extra = divmod(slots, num_layers)
    caps = [min(num_experts, base + (1 if i < extra else 0)) for i in range(num_layers)]
    return CacheLayout("per_layer", tuple(caps))


def _apportion(weights: np.ndarray, slots: int, cap: int) -> list[int]:
    w = np.maximum(weights, 1e-9)
    alloc = np.zeros(len(w), dtype=np.int64)
    remaining = slots
    active = np.ones(len(w), dtype=bool)
    while remaining > 0 and active.any():
        share = w * active / (w * active).sum() * remaining
        add = np.minimum(np.floor(share).astype(np.int64), cap - alloc)
        if add.sum() == 0:
            order = np.argsort(-(share - np.floor(share)) * active)
            for i in order[:remaining]:
                if alloc[i] < cap:
                    alloc[i] += 1
            break
        alloc += add
        remaining = slots - int(alloc.sum())
        active = alloc < cap
    return [int(a) for a in alloc]


def skew_layout(slots: int, events: Events) -> CacheLayout:
    """Per-layer capacities proportional to each layer's effective number of experts
    (exp of the entropy of its expert-use distribution): flat layers get more slots."""
    L, E = events.num_layers, events.num_experts
    _check(slots, L, E)
    f = expert_frequency(events).sum(axis=0)
    p = f / np.maximum(f.sum(axis=1, keepdims=True), 1e-12)
    ent = -(p * np.log(np.where(p > 0, p, 1.0))).sum(axis=1)
    return CacheLayout("per_layer", tuple(_apportion(np.exp(ent), slots, E)))


def pool_layout(
    slots: int, num_layers: int, num_experts: int, min_fraction: float = 0.5
) -> CacheLayout:
    """One pool of ``slots`` shared by all layers; each layer keeps ``min_fraction`` of an
    even share as its guaranteed minimum."""
    _check(slots, num_layers, num_experts)
    if not 0.0 <= min_fraction <= 1.0:
        raise ConfigError(f"pool min_fraction must be in [0, 1], got {min_fraction}")
    share = min(num_experts, int(slots * min_fraction) // num_layers)
    return CacheLayout("pool", tuple([share] * num_layers), pool_slots=slots)


@numba.njit(cache=True)
def _lru_hits_by_size(ev_layer, ev_ptr, ev_exp, L, E):
    """Per layer, hits[l, c] = LRU hits of a cache of c slots (stack distances)."""
    stack = np.full((L, E), -1, np.int64)
    depth = np.zeros(L, np.int64)
    hist = np.zeros((L, E + 1), np.int64)
    for i in range(ev_layer.shape[0]):
        lay = ev_layer[i]
        for j in range(ev_ptr[i], ev_ptr[i + 1]):
            e = ev_exp[j]
            pos = -1
            for d in range(depth[lay]):
                if stack[lay, d] == e:
                    pos = d
                    break
            if pos < 0:
                pos = depth[lay]
                depth[lay] += 1
            else:
                hist[lay, pos + 1] += 1  # a hit for any cache of more than pos slots
            for d in range(pos, 0, -1):
                stack[lay, d] = stack[lay, d - 1]
            stack[lay, 0] = e
    return np.cumsum(hist, axis=1)


def mrc_layout(slots: int, events: Events) -> CacheLayout:
    """Per-layer capacities that maximize total LRU hits on ``events``: greedy on the
    per-layer hit-rate curves (from LRU stack distances), slot by slot."""
    L, E = events.num_layers, events.num_experts
    _check(slots, L, E)
    hits = _lru_hits_by_size(
        events.layer.astype(np.int64), events.ptr, events.experts.astype(np.int64), L, E
    ).astype(np.float64)
    caps = np.zeros(L, dtype=np.int64)
    sizes = np.arange(E + 1)
    for _ in range(slots):
        # best average gain per slot over any number of further slots, so a layer whose
        # curve is flat for its first slots (top-k > 1) is not starved
        base = hits[np.arange(L), caps][:, None]
        d = sizes[None, :] - caps[:, None]
        avg = np.where(d > 0, (hits - base) / np.maximum(d, 1), -1.0)
        caps[int(np.argmax(avg.max(axis=1)))] += 1
    return CacheLayout("per_layer", tuple(int(c) for c in caps))
