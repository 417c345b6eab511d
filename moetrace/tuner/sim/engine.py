"""Replay a trace's events under a plan and a hardware profile (the simulator's API)."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import numpy as np

from moetrace.errors import ConfigError, PlanError
from moetrace.store.hardware import HardwareProfile
from moetrace.store.plan import (
    Budget,
    CacheLayout,
    EvictionConfig,
    Plan,
    PrefetchConfig,
    RoutingShape,
)
from moetrace.tuner.policy.cache import build_cache, drift_report, partitions
from moetrace.tuner.policy.events import Events
from moetrace.tuner.policy.eviction import eviction_spec, fit_eviction
from moetrace.tuner.policy.prefetch import fetch_per_event, get_prefetcher
from moetrace.tuner.sim import kernel as K
from moetrace.tuner.sim.metrics import SimResult
from moetrace.tuner.sim.timeline import Timeline

log = logging.getLogger(__name__)

DEFAULT_BYTES_PER_EXPERT = 16 * 2**20
"""Used when neither the trace manifest nor the caller gives ``bytes_per_expert``."""


def next_use_index(events: Events) -> tuple[np.ndarray, np.ndarray]:
    """CSR over (layer * E + expert): the sorted event indices where each is needed."""
    L, E = events.num_layers, events.num_experts
    ev_of = np.repeat(np.arange(events.num_events, dtype=np.int64), np.diff(events.ptr))
    codes = events.layer[ev_of].astype(np.int64) * E + events.experts
    small = np.int16 if L * E < 2**15 else np.int32  # int16 sorts by radix: O(n)
    order = np.argsort(codes.astype(small), kind="stable")
    occ_ptr = np.searchsorted(codes[order], np.arange(L * E + 1)).astype(np.int64)
    return occ_ptr, ev_of[order]


def worst_case_bytes(layout: CacheLayout, top_k: int, bytes_per_expert: int | None) -> int | None:
    """Slots plus a staging area of top_k experts for streamed loads."""
    if bytes_per_expert is None:
        return None
    return (layout.total_slots + top_k) * bytes_per_expert


def make_plan(
    events: Events,
    shape: RoutingShape,
    layout: CacheLayout,
    policy: str,
    params: Mapping[str, Any] | None = None,
    prefetch: PrefetchConfig | None = None,
    *,
    bytes_per_expert: int | None = None,
    fit_events: Events | None = None,
    **plan_kw: Any,
) -> Plan:
    """A plan for ``policy`` and ``prefetch`` with tables fitted on ``fit_events``
    (default ``events``)."""
    fit_on = fit_events if fit_events is not None else events
    caps = layout.capacities
    if layout.kind == "pool":  # pins are sized on an even share of the pool
        share = min(shape.num_experts, int(layout.total_slots) // shape.num_layers)
        caps = tuple(max(c, share) for c in caps)
    eviction: EvictionConfig = fit_eviction(policy, fit_on, caps, params)
    pf = prefetch or PrefetchConfig()
    pf = get_prefetcher(pf, shape.num_layers, shape.num_experts).fit(fit_on)
    slots = layout.total_slots
    return Plan(
        routing=shape,
        budget=Budget(
            slots=slots,
            bytes=None if bytes_per_expert is None else slots * bytes_per_expert,
            bytes_per_expert=bytes_per_expert,
        ),
        layout=layout,
        eviction=eviction,
        prefetch=pf,
        worst_case_bytes=worst_case_bytes(layout, shape.top_k, bytes_per_expert),
        **plan_kw,
    )


def simulate(
    events: Events,
    plan: Plan,
    hardware: HardwareProfile,
    *,
    bytes_per_expert: int | None = None,
    label: str = "",
    record: bool = False,
    release: np.ndarray | None = None,
) -> SimResult:
    """Replay ``events`` under ``plan``: demand hits, prefetch accuracy, link time, stalls.
    ``record``: also keep what happened to every access and at every event
    (:attr:`SimResult.timeline`, the same kernel recording as it counts).
    ``release``: per event, the earliest second it may start (the queue model's
    arrivals, :mod:`moetrace.tuner.sched`); the device idles until then."""
    L, E = events.num_layers, events.num_experts
    if (plan.routing.num_layers, plan.routing.num_experts) != (L, E):
        raise PlanError(
            f"plan is for {plan.routing.num_layers} MoE layers x {plan.routing.num_experts} "
            f"experts, the trace has {L} x {E}"
        )
    assumed = False
    bpe = bytes_per_expert or plan.budget.bytes_per_expert
    if bpe is None:
        bpe, assumed = DEFAULT_BYTES_PER_EXPERT, True
        log.warning("bytes_per_expert unknown; assuming %d bytes per expert", bpe)
    if bpe <= 0:
        raise ConfigError(f"bytes_per_expert must be > 0, got {bpe}")
    spec = eviction_spec(plan.eviction, L, E, plan.phase_overrides, plan.adaptation)
    parts = partitions(plan.layout)
    if parts.num_slots == 0 and plan.layout.kind == "pool":
        raise ConfigError("the cache has no slots")
    prefetcher = get_prefetcher(plan.prefetch, L, E)
    fetch = fetch_per_event(events, plan.prefetch, plan.phase_overrides, prefetcher.fetch_all)
    pf_ptr, pf_layer, pf_exp = prefetcher.candidates(events, fetch)
    st, cfg, _ = build_cache(plan.layout, spec, E, next_use_index(events) if spec.oracle else None)
    warm = float((st.slot_key[: parts.num_slots] >= 0).sum()) * bpe
    stats = np.zeros((K.NUM_STATS, L, 2))
    rec = K.record_arrays(events.num_events, events.num_accesses) if record else K.no_record()
    total = K.replay(
        events.layer.astype(np.int64), events.phase.astype(np.int64),
        events.tokens.astype(np.int64), events.ptr, events.experts.astype(np.int64),
        pf_ptr, pf_layer.astype(np.int64), pf_exp.astype(np.int64), st, cfg,
        float(bpe), hardware.bytes_per_second, hardware.transfer_latency_us * 1e-6,
        hardware.layer_compute_base_us * 1e-6, hardware.layer_compute_per_token_us * 1e-6, stats,
        *K.scratch(st.slot_key.shape[0], E, pf_exp.shape[0]), *rec,
        np.zeros(0) if release is None else np.ascontiguousarray(release, np.float64),
    )  # fmt: skip
    return SimResult(
        label=label or f"{plan.eviction.policy}+{plan.prefetch.name}",
        stats=stats,
        tokens_by_phase=events.tokens_by_phase.copy(),
        total_seconds=float(total),
        warmup_bytes=float(warm),
        bytes_per_expert=int(bpe),
        bytes_per_expert_assumed=assumed,
        moe_layers=plan.routing.moe_layers,
        drift=drift_report(st, cfg),
        timeline=Timeline(events.ptr, *rec) if record else None,
    )
