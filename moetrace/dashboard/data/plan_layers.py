"""A plan's hit rate at every MoE layer and phase, next to LRU with the same slots.

A plan file's ``expected`` rows are all-layer figures. Per layer, the plan (its layout,
pins, eviction and prefetch tables as written) and LRU with the plan's layout are replayed
by the simulator (:func:`moetrace.tuner.sim.engine.simulate`) on the same seeded sample of
whole requests as the all-layer curves
(:data:`moetrace.dashboard.data.layer_curves.ALL_LAYERS_SAMPLE_TOKENS`), each token its
own pass (``granularity="token"``: the token-set accesses of the hit-rate curves).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np

from moetrace.dashboard.data.common import routing_for_layers
from moetrace.dashboard.data.layer_curves import ALL_LAYERS_SAMPLE_TOKENS
from moetrace.dashboard.data.reuse import sample_requests
from moetrace.errors import ConfigError
from moetrace.store.reader import Trace

log = logging.getLogger(__name__)

PHASE_COLUMNS = ("all", "prefill", "decode")
"""Columns of the (L, 3) arrays of :class:`PlanLayers` (as ``SimResult.layer_hit_rates``)."""


@dataclass(frozen=True)
class PlanLayers:
    """Per layer (rows) and phase (:data:`PHASE_COLUMNS`): hit rates, NaN without accesses."""

    layers: tuple[int, ...]
    plan: np.ndarray
    lru: np.ndarray
    """LRU with the plan's slots per layer (same layout, no pins, no prefetch)."""
    accesses: np.ndarray
    requests_used: int
    requests_total: int

    @property
    def sampled(self) -> bool:
        return self.requests_used < self.requests_total

    def column(self, phase: str) -> int:
        return PHASE_COLUMNS.index(phase)

    def to_arrays(self) -> dict[str, np.ndarray]:
        return {
            "layers": np.asarray(self.layers, np.int64),
            "plan": self.plan,
            "lru": self.lru,
            "accesses": self.accesses,
            "requests_used": np.asarray(self.requests_used),
            "requests_total": np.asarray(self.requests_total),
        }

    @classmethod
    def from_arrays(cls, a: dict[str, np.ndarray]) -> PlanLayers:
        return cls(
            layers=tuple(int(x) for x in a["layers"]),
            plan=a["plan"],
            lru=a["lru"],
            accesses=a["accesses"],
            requests_used=int(a["requests_used"]),
            requests_total=int(a["requests_total"]),
        )


def _hardware(plan: Any) -> Any:
    from moetrace.store.hardware import load_hardware

    name = dict(plan.expected).get("hardware")
    try:
        return load_hardware(name if isinstance(name, str) else None)
    except ConfigError as exc:  # a profile file that is not here: the default's timing
        log.info("hardware %r of the plan not available (%s); using the default", name, exc)
        return load_hardware(None)


def plan_layers(
    trace: Trace,
    plan: Any,
    phase: str = "all",
    max_tokens: int | None = ALL_LAYERS_SAMPLE_TOKENS,
    seed: int = 0,
) -> PlanLayers:
    """The plan and same-layout LRU replayed on a sample of ``phase``'s tokens."""
    from moetrace.tuner.policy.events import build_events
    from moetrace.tuner.sim.engine import make_plan, simulate

    model = trace.manifest.model
    L = len(model.moe_layers)
    chosen, used, total = sample_requests(trace, phase, max_tokens, seed)
    routing = routing_for_layers(trace, tuple(range(L)), phase, chosen)
    layers = tuple(int(x) for x in model.moe_layers)
    if routing.num_rows == 0:
        nan = np.full((L, 3), np.nan)
        return PlanLayers(layers, nan, nan.copy(), np.zeros((L, 3)), used, total)
    events = build_events(routing, granularity="token")
    hw = _hardware(plan)
    bpe = plan.budget.bytes_per_expert or model.bytes_per_expert
    lru = make_plan(events, plan.routing, plan.layout, "lru", bytes_per_expert=bpe)
    plan_rate, acc = simulate(events, plan, hw, bytes_per_expert=bpe).layer_hit_rates()
    lru_rate, _ = simulate(events, lru, hw, bytes_per_expert=bpe).layer_hit_rates()
    return PlanLayers(layers, plan_rate, lru_rate, acc, used, total)
