"""The expert-slot cache mechanism, shared by the simulator's kernel and the runtime.

:func:`slot_key` is the one definition of an eviction priority (compiled with numba for
the simulator; called as plain Python by :class:`ExpertCache`). Slots are grouped into
partitions: one per layer (per-layer caches) or a single pool where each layer keeps a
guaranteed minimum share. Experts the current layer needs are protected from eviction;
when no slot can be freed the expert is *streamed* (loaded, used, not cached).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numba
import numpy as np

from moetrace.errors import ConfigError
from moetrace.store.plan import CacheLayout
from moetrace.tuner.policy.eviction import EvictionSpec

NO_NEXT_USE = 1e18


def slot_key(
    w: np.ndarray,
    last: float,
    inserted: float,
    freq: float,
    gap: float,
    next_use: float,
    inc: float,
    trans: float,
) -> float:
    """Priority of a resident expert under weights ``w``; the smallest is evicted.

    ``freq`` is the decayed use count scaled by the current increment ``inc`` (a growing
    number, so plain LFU never rescales); ``freq / inc`` is the decayed count itself, in
    uses, which can be mixed with time-valued terms (weight ``w[5]``). ``trans`` is the
    fitted chance that the layer's next pass needs the expert, given what the layer's last
    pass used (weight ``w[6]``)."""
    return (
        w[0] * last
        + w[1] * inserted
        + w[2] * freq
        + w[3] * gap
        + w[4] * next_use
        + w[5] * (freq / inc)
        + w[6] * trans
    )


slot_key_jit = numba.njit(cache=True, inline="always")(slot_key)


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
    slot_of: dict[tuple[int, int], int] = field(init=False, default_factory=dict)
    slots: list[tuple[int, int] | None] = field(init=False, default_factory=list)

    def __post_init__(self) -> None:
        if self.spec.oracle:
            raise ConfigError("an oracle eviction policy (belady) cannot run online")
        self.parts = partitions(self.layout)
        n = self.parts.num_slots
        self.slots = [None] * n
        self._last = np.zeros(n)
        self._ins = np.zeros(n)
        self._freq = np.zeros(self.spec.pinned.shape)
        self._inc = 1.0
        self._last_set: dict[int, tuple[int, ...]] = {}  # per layer: its last pass's experts
        self._inc_prev = 1.0  # the increment of the last access (prefetch ranks with it)
        self._t = 0.0
        self._count = np.zeros(len(self.layout.capacities), dtype=np.int64)
        for layer, row in enumerate(self.spec.pinned):
            for e in np.flatnonzero(row):
                slot = self._free_slot(layer)
                if slot is None:
                    raise ConfigError(f"layer {layer}: pinned experts exceed its slots")
                self._install(slot, layer, int(e))

    def _free_slot(self, layer: int) -> int | None:
        p = int(self.parts.part_of_layer[layer])
        for s in range(int(self.parts.lo[p]), int(self.parts.hi[p])):
            if self.slots[s] is None:
                return s
        return None

    def _install(self, slot: int, layer: int, expert: int) -> None:
        old = self.slots[slot]
        if old is not None:
            del self.slot_of[old]
            self._count[old[0]] -= 1
        self.slots[slot] = (layer, expert)
        self.slot_of[(layer, expert)] = slot
        self._count[layer] += 1
        self._ins[slot] = self._t
        self._last[slot] = self._t

    def _victim(
        self, layer: int, phase: int, protect: set[int], inc: float | None = None
    ) -> int | None:
        free = self._free_slot(layer)
        if free is not None:
            return free
        p = int(self.parts.part_of_layer[layer])
        w = self.spec.weights[phase]
        best: tuple[float, float] | None = None
        victim = None
        for s in range(int(self.parts.lo[p]), int(self.parts.hi[p])):
            ls, es = self.slots[s]  # type: ignore[misc]
            if s in protect or self.spec.pinned[ls, es]:
                continue
            if ls != layer and self._count[ls] <= self.parts.min_share[ls]:
                continue
            key = slot_key(
                w,
                self._last[s],
                self._ins[s],
                self._freq[ls, es],
                self.spec.gap[phase, ls, es],
                0.0,
                self._inc if inc is None else inc,
                self._trans_score(ls, es) if w[6] != 0.0 else 0.0,
            )
            if best is None or (key, self._last[s]) < best:
                best, victim = (key, self._last[s]), s
        return victim

    def _trans_score(self, layer: int, expert: int) -> float:
        score = 0.0
        for e in self._last_set.get(layer, ()):
            score += self.spec.trans[layer, e, expert]
        return score

    def resident(self, layer: int, expert: int) -> bool:
        return (layer, expert) in self.slot_of

    def access(
        self, layer: int, experts: list[int], phase: int = 1
    ) -> list[tuple[int, tuple[int, int] | None]]:
        """Mark ``experts`` of ``layer`` used; return ``(expert, evicted)`` for each load
        (``evicted`` is None for a free slot; an expert with no slot is streamed and
        listed with evicted ``(-1, -1)``)."""
        self._last_set[layer] = tuple(sorted(set(experts)))  # the kernel's event order
        protect = {self.slot_of[(layer, e)] for e in experts if (layer, e) in self.slot_of}
        loads: list[tuple[int, tuple[int, int] | None]] = []
        for j, e in enumerate(experts):
            self._t = self.time + j / (self.num_experts + 1)  # use order breaks ties
            self._freq[layer, e] += self._inc
            slot = self.slot_of.get((layer, e))
            if slot is None:
                slot = self._victim(layer, phase, protect)
                if slot is None:
                    loads.append((e, (-1, -1)))
                    continue
                loads.append((e, self.slots[slot]))
                self._install(slot, layer, e)
                protect.add(slot)
            self._last[slot] = self._t
        self.time += 1
        self._inc_prev = self._inc
        self._inc *= 1.0 / self.spec.decay  # the kernel's arithmetic, bit for bit
        if self._inc > 1e100:
            self._freq *= 1e-100
            self._inc *= 1e-100
            self._inc_prev *= 1e-100
        return loads

    def prefetch(
        self, layer: int, experts: list[int], phase: int, protect: set[int]
    ) -> list[tuple[int, int, tuple[int, int] | None]]:
        """Give predicted ``experts`` of ``layer`` slots, as the simulator's kernel does
        after an access: predicted experts already resident and each newly prefetched one
        are protected (with ``protect``, the slots the current layer uses) from the rest
        of the batch. Returns ``(expert, slot, evicted)`` per issued prefetch; an expert
        for which no slot can be freed is left out (dropped)."""
        stamp = float(max(self.time - 1, 0))  # the event that issues the prefetch
        guard = set(protect)
        guard.update(self.slot_of[(layer, e)] for e in experts if (layer, e) in self.slot_of)
        issued: list[tuple[int, int, tuple[int, int] | None]] = []
        for e in experts:
            if (layer, e) in self.slot_of:
                continue
            slot = self._victim(layer, phase, guard, self._inc_prev)
            if slot is None:
                continue
            evicted = self.slots[slot]
            self._install(slot, layer, e)
            self._ins[slot] = stamp
            self._last[slot] = stamp
            guard.add(slot)
            issued.append((e, slot, evicted))
        return issued
