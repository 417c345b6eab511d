"""The expert-slot cache as the runtime holds it, and the state both users build.

Slots are grouped into partitions: one per layer (per-layer caches) or a single pool
where each layer keeps a guaranteed minimum share. :func:`build_cache` turns a layout and
a compiled policy into the arrays of :mod:`.cachestate`; the simulator's kernel and
:class:`ExpertCache` (the runtime's residency decisions) then call the same functions of
:mod:`.core` on them: one implementation of the cache.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from moetrace.errors import ConfigError
from moetrace.store.plan import CacheLayout
from moetrace.tuner.policy import cachestate as C
from moetrace.tuner.policy import core
from moetrace.tuner.policy.eviction import EvictionSpec
from moetrace.tuner.policy.linear import slot_key, slot_key_jit

__all__ = ["ExpertCache", "Partitions", "build_cache", "partitions", "slot_key", "slot_key_jit"]


@dataclass(frozen=True)
class Partitions:
    """Slot ranges: ``part_of_layer[l]`` names the partition holding layer l's experts."""

    part_of_layer: np.ndarray  # int64 (L,)
    lo: np.ndarray  # int64 (P,)
    hi: np.ndarray  # int64 (P,)
    min_share: np.ndarray  # int64 (L,)

    @property
    def num_slots(self) -> int:
        return int(self.hi.max()) if len(self.hi) else 0


def partitions(layout: CacheLayout) -> Partitions:
    caps = np.asarray(layout.capacities, dtype=np.int64)
    L = len(caps)
    if layout.kind == "per_layer":
        hi = np.cumsum(caps)
        return Partitions(np.arange(L, dtype=np.int64), hi - caps, hi, caps.copy())
    if layout.kind == "pool":
        return Partitions(
            np.zeros(L, dtype=np.int64),
            np.zeros(1, dtype=np.int64),
            np.asarray([layout.pool_slots], dtype=np.int64),
            caps.copy(),
        )
    raise ConfigError(f"unknown cache layout kind {layout.kind!r}")


def shadow_capacities(layout: CacheLayout, num_experts: int) -> np.ndarray:
    """Per layer, the slots of the drift detector's shadow LRU: the plan's slots split
    evenly over the layers (the remainder to the first ones), whatever the plan's layout.
    The detector asks whether the plan does worse than plain LRU would, and plain LRU is
    what a user without a plan runs: uniform per-layer caches (as the tuner's baseline)."""
    L = len(layout.capacities)
    base, extra = divmod(int(layout.total_slots), max(L, 1))
    return np.asarray(
        [min(num_experts, base + (1 if i < extra else 0)) for i in range(L)], dtype=np.float64
    )


def build_cache(
    layout: CacheLayout,
    spec: EvictionSpec,
    num_experts: int,
    occ: tuple[np.ndarray, np.ndarray] | None = None,
) -> tuple[C.State, C.Config, int]:
    """The state and config of an empty cache with its pinned experts installed, and how
    many pinned experts found no slot. ``occ`` is the next-use index (Belady only)."""
    parts = partitions(layout)
    L = len(layout.capacities)
    E = num_experts
    if spec.pinned.shape != (L, E):
        raise ConfigError(f"pinned table has shape {spec.pinned.shape}, the cache is {L} x {E}")
    prm = spec.params.copy()
    prm[C.PR_USE_NEXT] = 1.0 if spec.oracle else 0.0
    occ_ptr, occ_ev = occ if occ is not None else (np.zeros(L * E + 1, np.int64), np.zeros(1))
    cfg = C.Config(
        kinds=np.asarray([spec.kind, spec.fallback_kind], dtype=np.int64),
        part_of_layer=parts.part_of_layer,
        part_lo=parts.lo,
        part_hi=parts.hi,
        min_share=parts.min_share,
        weights=np.stack([spec.weights, spec.fallback_weights]).astype(np.float64),
        gap=np.ascontiguousarray(spec.gap.reshape(2, L * E), dtype=np.float64),
        trans=np.ascontiguousarray(spec.trans.reshape(-1, spec.trans.shape[-1]), dtype=np.float64),
        prm=prm,
        occ_ptr=occ_ptr.astype(np.int64),
        occ_ev=occ_ev.astype(np.float64),
        prior=np.ascontiguousarray(spec.prior.reshape(-1), dtype=np.float64)
        if spec.prior.size == L * E
        else np.zeros(L * E),
        num_experts=E,
    )
    trans_online = bool(spec.weights[:, 6].any() and prm[C.PR_REPIN] > 0)
    st = C.new_state(L, E, parts.num_slots, len(parts.lo), trans_online)
    st.cursor[:] = cfg.occ_ptr[:-1]
    missing = core.setup(st, cfg, spec.pinned.reshape(-1).copy(), shadow_capacities(layout, E))
    return st, cfg, int(missing)


def drift_report(st: C.State, cfg: C.Config) -> dict[str, float | int | bool | None]:
    """What the drift detector saw: whether and when (demand accesses) it switched, the
    two hit rates of the deciding window, and LRU's shadow hits in all."""
    g = st.glob
    switched = g[C.G_ACTIVE] != 0.0
    return {
        "enabled": bool(cfg.prm[C.PR_DRIFT_WINDOW] > 0),
        "window": int(cfg.prm[C.PR_DRIFT_WINDOW]),
        "switched": bool(switched),
        "switched_at_access": int(g[C.G_SWITCH_AT]) if switched else None,
        "plan_hit_rate": float(g[C.G_SWITCH_PLAN]) if switched else None,
        "lru_hit_rate": float(g[C.G_SWITCH_LRU]) if switched else None,
        "accesses": int(g[C.G_ACCESSES]),
        "shadow_lru_hits": int(g[C.G_SHADOW_HITS]),
    }


@dataclass
class ExpertCache:
    """Online cache state for the runtime: which experts are resident in which slot.

    ``access`` returns the experts to load (and the ones they evict); the caller moves
    the weights. Belady needs the future and is simulator-only.
    """

    layout: CacheLayout
    spec: EvictionSpec
    num_experts: int
    time: int = 0
    parts: Partitions = field(init=False)

    def __post_init__(self) -> None:
        if self.spec.oracle:
            raise ConfigError("an oracle eviction policy (belady) cannot run online")
        self.parts = partitions(self.layout)
        self._out = np.zeros((max(self.num_experts, 1), 6), np.int64)
        self.state, self.config, missing = build_cache(self.layout, self.spec, self.num_experts)
        if missing:
            raise ConfigError(f"{missing} pinned experts do not fit their layers' slots")

    @property
    def slot_of(self) -> dict[tuple[int, int], int]:
        """(layer, expert) -> slot, for every resident expert."""
        E = self.num_experts
        return {
            (int(k) // E, int(k) % E): s
            for s, k in enumerate(self.state.slot_key.tolist())
            if k >= 0 and s < self.parts.num_slots
        }

    def slot(self, layer: int, expert: int) -> int | None:
        s = int(self.state.where[layer * self.num_experts + expert])
        return None if s < 0 else s

    def resident(self, layer: int, expert: int) -> bool:
        return bool(self.state.where[layer * self.num_experts + expert] >= 0)

    @property
    def num_resident(self) -> int:
        return int((self.state.slot_key[: self.parts.num_slots] >= 0).sum())

    def event(
        self, layer: int, experts: np.ndarray, phase: int = 1, at: int | None = None
    ) -> np.ndarray:
        """One event: ``layer`` needs ``experts`` (int64, in use order). Returns the
        cache's rows for them (see :func:`moetrace.tuner.policy.core.event`: slot, evicted
        key, HIT / LOADED / STREAMED, ...); valid until the next call. ``at``: the event's
        index when it is not this cache's own count of events (a RAM tier sees only some
        events of the device cache, and is stamped with the device's index, as in the
        simulator)."""
        n = len(experts)
        if self._out.shape[0] < n:
            self._out = np.zeros((n, 6), np.int64)
        i = self.time if at is None else int(at)
        core.event(self.state, self.config, layer, phase, experts, i, self._out)
        self.time = i + 1
        return self._out[:n]

    def access(
        self, layer: int, experts: list[int], phase: int = 1
    ) -> list[tuple[int, tuple[int, int] | None]]:
        """Mark ``experts`` of ``layer`` used; return ``(expert, evicted)`` for each load
        (``evicted`` is None for a free slot; an expert with no slot is streamed and
        listed with evicted ``(-1, -1)``)."""
        E = self.num_experts
        out = self.event(layer, np.asarray(experts, np.int64), phase)
        loads: list[tuple[int, tuple[int, int] | None]] = []
        for j, e in enumerate(experts):
            old, status = int(out[j, 1]), int(out[j, 2])
            if status == core.STREAMED:
                loads.append((e, (-1, -1)))
            elif status == core.LOADED:
                loads.append((e, None if old < 0 else (old // E, old % E)))
        return loads

    def prefetch(
        self, layer: int, experts: list[int], phase: int, at: int | None = None
    ) -> list[tuple[int, int, tuple[int, int] | None]]:
        """Give predicted ``experts`` of ``layer`` slots after the last access, as the
        simulator's kernel does: the slots that access uses, predicted experts already
        resident and each newly prefetched one are protected from the rest of the batch.
        Returns ``(expert, slot, evicted)`` per issued prefetch; an expert for which no slot
        can be freed is left out (dropped); ``at`` as in :meth:`event`."""
        if not experts:
            return []
        E = self.num_experts
        out = np.zeros((len(experts), 3), np.int64)
        layers = np.full(len(experts), layer, np.int64)
        i = max(self.time - 1, 0) if at is None else int(at)  # the event that issues it
        core.prefetch(self.state, self.config, phase, layers, np.asarray(experts, np.int64), i, out)
        issued: list[tuple[int, int, tuple[int, int] | None]] = []
        for q, e in enumerate(experts):
            s, old = int(out[q, 0]), int(out[q, 1])
            if s >= 0:
                issued.append((e, s, None if old < 0 else (old // E, old % E)))
        return issued

    def drift(self) -> dict[str, float | int | bool | None]:
        return drift_report(self.state, self.config)

    @property
    def switched(self) -> bool:
        """Whether the drift detector has switched the cache to its fallback."""
        return bool(self.state.glob[C.G_ACTIVE] != 0.0)
