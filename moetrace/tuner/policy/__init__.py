"""Cache structure, eviction policy registry and prefetcher registry.

Shared by the simulator and the runtime so their definitions cannot drift: this
subpackage imports only numpy/numba/scikit-learn and ``moetrace.store.plan``; never
DuckDB or trace-mining code.
"""

from moetrace.tuner.policy import similarity as _similarity  # noqa: F401  (registers)
from moetrace.tuner.policy.cache import ExpertCache, Partitions, partitions, slot_key
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
    "POLICIES",
    "PREFETCHERS",
    "Events",
    "EvictionSpec",
    "ExpertCache",
    "Partitions",
    "Prefetcher",
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
