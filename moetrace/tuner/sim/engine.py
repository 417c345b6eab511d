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


class RamReplay:
    """The RAM tier's side of a replay (plans with ``ram``): its cache, built by the same
    code as the device's, its prefetcher, the disk link and the kernel's RAM arguments.
    Without a RAM tier, placeholders the kernel does not read (``has_ram`` false)."""

    def __init__(self, plan: Plan, hardware: HardwareProfile, num_layers: int, num_experts: int):
        L, E = num_layers, num_experts
        tier = plan.ram
        self.tier = tier
        if tier is None:  # a one-slot placeholder cache: the kernel needs typed arguments
            layout, spec = CacheLayout("pool", (0,) * L, pool_slots=1), eviction_spec(
                EvictionConfig("lru"), L, E)  # fmt: skip
            self.dbw, self.dlat = 1.0, 0.0
        else:
            spec = eviction_spec(tier.eviction, L, E, {}, tier.adaptation)
            if spec.oracle:
                raise ConfigError(
                    f"the RAM tier's policy {tier.eviction.policy!r} needs the future; "
                    "use an online policy"
                )
            layout = tier.layout
            self.dbw = hardware.disk_bytes_per_second
            self.dlat = (hardware.disk_latency_us or 0.0) * 1e-6
        self.st, self.cfg, missing = build_cache(layout, spec, E)
        if missing:
            raise ConfigError(f"{missing} experts pinned in RAM do not fit the RAM tier's slots")
        self.num_slots = partitions(layout).num_slots
        self.warm = int((self.st.slot_key[: self.num_slots] >= 0).sum()) if tier else 0
        self.prefetcher = get_prefetcher(tier.prefetch if tier else PrefetchConfig(), L, E)
        n = max(self.st.slot_key.shape[0], 1)
        self.ready, self.busy = np.zeros(n), np.zeros(n)
        self.out = np.zeros((E, 6), np.int64)
        self.scratch_size = 0
        self._grow(E)

    def _grow(self, size: int) -> None:
        if size > self.scratch_size:
            self.scratch_size = size
            self.pf_out = np.zeros((size, 3), np.int64)
            self.miss = np.zeros(size, np.int64)
            self.pq_layer = np.zeros(size, np.int64)
            self.pq_exp = np.zeros(size, np.int64)

    def prepare(self, events: Events, longest_device_prefetch: int) -> tuple[Any, ...]:
        """The kernel's RAM arguments for ``events``."""
        tier = self.tier
        if tier is None:
            ptr = np.zeros(events.num_events + 1, np.int64)
            pf_layer = pf_exp = np.zeros(0, np.int64)
        else:
            fetch = fetch_per_event(events, tier.prefetch, {}, self.prefetcher.fetch_all)
            ptr, pf_layer, pf_exp = self.prefetcher.candidates(events, fetch)
        self._grow(max(longest_device_prefetch, int(np.diff(ptr).max(initial=0))))
        return (
            tier is not None, self.st, self.cfg, float(self.dbw), float(self.dlat),
            ptr, pf_layer.astype(np.int64), pf_exp.astype(np.int64), self.ready, self.busy,
            self.out, self.pf_out, self.miss, self.pq_layer, self.pq_exp,
        )  # fmt: skip

    def report(self) -> dict[str, Any] | None:
        if self.tier is None:
            return None
        return {"slots": self.num_slots, "pinned": self.warm,
                "drift": drift_report(self.st, self.cfg)}  # fmt: skip


class Replay:
    """The simulator's state between kernel calls: the cache, the counters and the clock.
    :func:`simulate` replays a trace in one call; the queue model
    (:mod:`moetrace.tuner.sched.queue`) replays step by step as it decides the steps."""

    def __init__(
        self,
        plan: Plan,
        hardware: HardwareProfile,
        num_layers: int,
        num_experts: int,
        *,
        bytes_per_expert: int | None = None,
        future: Events | None = None,
    ):
        L, E = num_layers, num_experts
        if (plan.routing.num_layers, plan.routing.num_experts) != (L, E):
            raise PlanError(
                f"plan is for {plan.routing.num_layers} MoE layers x {plan.routing.num_experts} "
                f"experts, the trace has {L} x {E}"
            )
        self.assumed = False
        bpe = bytes_per_expert or plan.budget.bytes_per_expert
        if bpe is None:
            bpe, self.assumed = DEFAULT_BYTES_PER_EXPERT, True
            log.warning("bytes_per_expert unknown; assuming %d bytes per expert", bpe)
        if bpe <= 0:
            raise ConfigError(f"bytes_per_expert must be > 0, got {bpe}")
        self.plan, self.hardware, self.bpe, self.E = plan, hardware, int(bpe), E
        spec = eviction_spec(plan.eviction, L, E, plan.phase_overrides, plan.adaptation)
        parts = partitions(plan.layout)
        if parts.num_slots == 0 and plan.layout.kind == "pool":
            raise ConfigError("the cache has no slots")
        if spec.oracle and future is None:
            raise ConfigError(
                f"policy {plan.eviction.policy!r} needs the whole future; it cannot replay "
                "step by step"
            )
        self.prefetcher = get_prefetcher(plan.prefetch, L, E)
        occ = next_use_index(future) if spec.oracle and future is not None else None
        self.st, self.cfg, _ = build_cache(plan.layout, spec, E, occ)
        self.warm = float((self.st.slot_key[: parts.num_slots] >= 0).sum()) * bpe
        self.stats = np.zeros((K.NUM_STATS, L, 2))
        self.clock = np.zeros(K.CLOCK_SIZE)
        self.slot_ready, self.out, self.pf_out = K.scratch(self.st.slot_key.shape[0], E, 0)
        self.ram = RamReplay(plan, hardware, L, E)
        self.warm_ram = self.ram.warm * bpe

    @property
    def now(self) -> float:
        return float(self.clock[0])

    def wait_until(self, t: float) -> None:
        """The device idles until ``t`` (the link goes on loading what was queued)."""
        self.clock[0] = max(self.clock[0], t)

    def run(self, events: Events, record: tuple[np.ndarray, ...] | None = None) -> float:
        """Replay ``events`` after what was replayed before; the device's time after them."""
        plan, hw = self.plan, self.hardware
        fetch = fetch_per_event(events, plan.prefetch, plan.phase_overrides,
                                self.prefetcher.fetch_all)  # fmt: skip
        pf_ptr, pf_layer, pf_exp = self.prefetcher.candidates(events, fetch)
        longest = int(np.diff(pf_ptr).max(initial=0))
        if longest > self.pf_out.shape[0]:
            self.pf_out = np.zeros((longest, 3), np.int64)
        ram = self.ram.prepare(events, longest)
        return float(K.replay(
            events.layer.astype(np.int64), events.phase.astype(np.int64),
            events.tokens.astype(np.int64), events.ptr, events.experts.astype(np.int64),
            pf_ptr, pf_layer.astype(np.int64), pf_exp.astype(np.int64), self.st, self.cfg,
            float(self.bpe), hw.bytes_per_second, hw.transfer_latency_us * 1e-6,
            hw.layer_compute_base_us * 1e-6, hw.layer_compute_per_token_us * 1e-6, self.stats,
            self.slot_ready, self.out, self.pf_out, *(record or K.no_record()), self.clock,
            *ram,
        ))  # fmt: skip

    def result(
        self, tokens_by_phase: np.ndarray, label: str = "", timeline: Timeline | None = None
    ) -> SimResult:
        plan = self.plan
        return SimResult(
            label=label or f"{plan.eviction.policy}+{plan.prefetch.name}",
            stats=self.stats,
            tokens_by_phase=np.asarray(tokens_by_phase).copy(),
            total_seconds=self.now,
            warmup_bytes=self.warm,
            warmup_disk_bytes=self.warm_ram,
            ram=self.ram.report(),
            bytes_per_expert=self.bpe,
            bytes_per_expert_assumed=self.assumed,
            moe_layers=plan.routing.moe_layers,
            drift=drift_report(self.st, self.cfg),
            timeline=timeline,
        )


def simulate(
    events: Events,
    plan: Plan,
    hardware: HardwareProfile,
    *,
    bytes_per_expert: int | None = None,
    label: str = "",
    record: bool = False,
) -> SimResult:
    """Replay ``events`` under ``plan``: demand hits, prefetch accuracy, link time, stalls.
    ``record``: also keep what happened to every access and at every event
    (:attr:`SimResult.timeline`, the same kernel recording as it counts)."""
    r = Replay(plan, hardware, events.num_layers, events.num_experts,
               bytes_per_expert=bytes_per_expert, future=events)  # fmt: skip
    rec = K.record_arrays(events.num_events, events.num_accesses) if record else None
    r.run(events, rec)
    return r.result(events.tokens_by_phase, label, Timeline(events.ptr, *rec) if rec else None)
