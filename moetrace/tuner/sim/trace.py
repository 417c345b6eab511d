"""Trace-level entry points: load traces into events, parse budgets, simulate a trace."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from moetrace.errors import ConfigError
from moetrace.store.arrays import Routing
from moetrace.store.budget import parse_budget as budget_spec
from moetrace.store.hardware import HardwareProfile, load_hardware
from moetrace.store.plan import (
    CacheLayout,
    Plan,
    PrefetchConfig,
    RoutingShape,
    ScheduleConfig,
    load_plan,
)
from moetrace.store.schema import ModelInfo
from moetrace.store.traceset import load_routing_many, open_traces
from moetrace.tuner.policy.events import Events, build_events
from moetrace.tuner.sim.engine import make_plan, simulate
from moetrace.tuner.sim.layouts import pool_layout, uniform_layout
from moetrace.tuner.sim.metrics import SimResult

if TYPE_CHECKING:
    from moetrace.tuner.sched.queue import QueueResult


def parse_budget(text: str, num_layers: int, num_experts: int, bytes_per_expert: int | None) -> int:
    """Cache slots for a budget (``12.5%``, ``4GiB``, ``96``; see :mod:`moetrace.store.budget`)."""
    return budget_spec(text).cache_slots(num_layers, num_experts, bytes_per_expert)


@dataclass(frozen=True)
class LoadedTraces:
    """Routing of one or more traces of the same model, requests numbered across them."""

    routing: Routing
    model: ModelInfo
    paths: tuple[str, ...]

    @property
    def shape(self) -> RoutingShape:
        return RoutingShape.of(self.model)


def load_traces(paths: Sequence[str | os.PathLike[str]], *, order: str = "arrival") -> LoadedTraces:
    """Load and concatenate the routing of traces of one model (folders or globs, in the
    given order; see :mod:`moetrace.store.traceset`)."""
    traces = open_traces(paths)
    routing = load_routing_many(traces, order=order)
    return LoadedTraces(routing, traces[0].manifest.model, tuple(str(t.path) for t in traces))


def events_for(
    loaded: LoadedTraces,
    requests: np.ndarray | None = None,
    *,
    order: str = "arrival",
    granularity: str = "pass",
    phase: str | None = None,
) -> Events:
    """Events of a subset of request indices (None = all) and optionally one phase."""
    r = loaded.routing
    mask = np.ones(r.num_rows, dtype=bool)
    if requests is not None:
        mask &= np.isin(r.request, requests)
    if phase is not None:
        mask &= r.phase == (0 if phase == "prefill" else 1)
    if not mask.all():
        r = r.select(mask)
    return build_events(r, order=order, granularity=granularity)


@dataclass(frozen=True)
class SimulateRequest:
    """What ``moetrace simulate`` asks for."""

    plan: str | None = None
    policy: str | None = None
    params: tuple[tuple[str, float], ...] = ()
    prefetch: str = "none"
    fetch: int = 0
    lookahead: int = 1
    cache: int | None = None
    budget: str | None = None
    layout: str = "uniform"
    hardware: str | None = None
    order: str = "arrival"
    granularity: str = "pass"
    phase: str | None = None
    bytes_per_expert: int | None = None
    scheduler: str | None = None
    """Replay as a served queue (:mod:`moetrace.tuner.sched`) under this scheduler; with
    a plan, None keeps the plan's own schedule when ``batch_size`` is given."""
    scheduler_params: tuple[tuple[str, float], ...] = ()
    batch_size: int | None = None
    batching: str | None = None
    arrival_rate: float | None = None
    seed: int = 0

    @property
    def queued(self) -> bool:
        """Whether the queue model runs (a scheduler, batch or arrival rate asked for)."""
        return any(
            v is not None
            for v in (self.scheduler, self.batch_size, self.batching, self.arrival_rate)
        )

    def __post_init__(self) -> None:
        if (self.plan is None) == (self.policy is None):
            raise ConfigError("give exactly one of a plan file or a policy name")
        if self.plan is None and (self.cache is None) == (self.budget is None):
            raise ConfigError(
                "with a policy, give exactly one of --cache (slots per layer) or --budget"
            )
        if self.cache is not None and self.cache < 1:
            raise ConfigError(f"--cache must be >= 1 slot per layer, got {self.cache}")
        if self.layout not in ("uniform", "pool"):
            raise ConfigError(f"layout must be 'uniform' or 'pool', got {self.layout!r}")


def simulate_trace(trace: str | os.PathLike[str], req: SimulateRequest) -> tuple[Plan, SimResult]:
    """Replay a trace under a plan file, or under a named policy (tables fitted on the
    same trace: in-sample) with a cache size or budget."""
    plan, ev, hardware, bpe, _ = _setup(trace, req)
    return plan, simulate(ev, plan, hardware, bytes_per_expert=bpe)


def simulate_queue_trace(
    trace: str | os.PathLike[str], req: SimulateRequest
) -> tuple[Plan, QueueResult]:
    """Replay a trace as a served queue: its requests arrive (recorded times, or a Poisson
    process at ``req.arrival_rate``, or all at once) and run in batches under a scheduler
    (see :mod:`moetrace.tuner.sched.queue`)."""
    from moetrace.tuner.sched.arrivals import recorded_arrivals
    from moetrace.tuner.sched.queue import simulate_queue

    if req.order != "arrival" or req.phase is not None:
        raise ConfigError("the queue model replays whole requests in arrival order")
    plan, ev, hardware, bpe, loaded = _setup(trace, req)
    own = plan.schedule
    sched = ScheduleConfig(
        req.scheduler or own.scheduler,
        req.batch_size or own.batch_size,
        req.batching or own.batching,
        dict(req.scheduler_params) if req.scheduler else dict(own.params),
    )
    recorded = recorded_arrivals(loaded.paths, loaded.routing.request_ids)
    result = simulate_queue(
        ev, plan, hardware, schedule=sched, arrival_rate=req.arrival_rate,
        recorded_arrivals=recorded, seed=req.seed, bytes_per_expert=bpe,
    )  # fmt: skip
    return plan, result


def _setup(
    trace: str | os.PathLike[str], req: SimulateRequest
) -> tuple[Plan, Events, HardwareProfile, int | None, LoadedTraces]:
    hardware = load_hardware(req.hardware)
    loaded = load_traces([trace], order=req.order)
    ev = events_for(loaded, order=req.order, granularity=req.granularity, phase=req.phase)
    m = loaded.model
    bpe = req.bytes_per_expert or m.bytes_per_expert
    if req.plan is not None:
        plan = load_plan(req.plan)
        plan.check_compatible(m)
    else:
        L, E = ev.num_layers, ev.num_experts
        layout: CacheLayout
        if req.cache is not None:
            if req.cache > E:
                raise ConfigError(f"--cache {req.cache} exceeds the {E} experts per layer")
            layout = CacheLayout("per_layer", tuple([req.cache] * L))
            if req.layout == "pool":
                layout = pool_layout(req.cache * L, L, E)
        else:
            slots = parse_budget(str(req.budget), L, E, bpe)
            layout = (
                uniform_layout(slots, L, E) if req.layout == "uniform" else pool_layout(slots, L, E)
            )
        plan = make_plan(
            ev,
            loaded.shape,
            layout,
            str(req.policy),
            dict(req.params),
            PrefetchConfig(req.prefetch, lookahead=req.lookahead, fetch=req.fetch),
            bytes_per_expert=bpe,
        )
    return plan, ev, hardware, bpe, loaded
