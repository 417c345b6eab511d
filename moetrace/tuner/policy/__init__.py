"""Cache structure, eviction policy registry and prefetcher registry.

Shared by the simulator and the runtime so their definitions cannot drift: this
subpackage imports only numpy/numba/scikit-learn and ``moetrace.store.plan``; never
DuckDB or trace-mining code.
"""

from moetrace.store.plan import Plan
from moetrace.tuner.policy import similarity as _similarity  # noqa: F401  (registers)
from moetrace.tuner.policy.cache import ExpertCache, Partitions, build_cache, partitions, slot_key
from moetrace.tuner.policy.events import Events, build_events, expert_frequency
from moetrace.tuner.policy.eviction import (
    REGISTRY as POLICIES,
)
from moetrace.tuner.policy.eviction import (
    EvictionSpec,
    eviction_spec,
    fit_eviction,
    get_policy,
)
from moetrace.tuner.policy.prefetch import (
    REGISTRY as PREFETCHERS,
)
from moetrace.tuner.policy.prefetch import (
    Prefetcher,
    fetch_per_event,
    get_prefetcher,
)

__all__ = [
    "check_plan_policies",
    "POLICIES",
    "PREFETCHERS",
    "Events",
    "EvictionSpec",
    "ExpertCache",
    "Partitions",
    "Prefetcher",
    "build_cache",
    "build_events",
    "eviction_spec",
    "expert_frequency",
    "fetch_per_event",
    "fit_eviction",
    "get_policy",
    "get_prefetcher",
    "partitions",
    "slot_key",
]


def check_plan_policies(plan: Plan) -> None:
    """Raise ConfigError/PlanError unless the plan's eviction policy (with its parameters,
    pins and tables) and its prefetcher compile for the plan's own routing shape."""
    L, E = len(plan.routing.moe_layers), plan.routing.num_experts
    eviction_spec(plan.eviction, L, E, plan.phase_overrides, plan.adaptation)
    get_prefetcher(plan.prefetch, L, E)
