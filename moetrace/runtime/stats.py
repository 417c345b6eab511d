"""Runtime statistics per MoE layer and phase, in the simulator's vocabulary."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from moetrace.runtime.memory import ExpertMemory
from moetrace.store.schema import PHASES
from moetrace.tuner.sim.kernel import O_HIT, O_MISS, O_PF_HIT, O_STREAM
from moetrace.tuner.sim.timeline import RecordedTimeline, Timeline

COUNTERS = (
    "accesses",
    "hits",
    "misses",
    "streamed",
    "prefetch_issued",
    "prefetch_used",
    "prefetch_wasted",
    "prefetch_dropped",
    "bytes_demand",
    "bytes_prefetch",
    "stall_s",
    "compute_s",
)
RAM_COUNTERS = ("ram_accesses", "ram_hits", "disk_bytes", "ram_prefetch_issued")
"""The RAM tier's counters, in the simulator's vocabulary (``S_RAM_ACCESS``, ``S_RAM_HIT``,
``S_BYTES_DISK``, ``S_RAM_PF_ISSUED``): the device's demand misses looked up in RAM, those
found there, every byte read from disk (demand, device prefetches through RAM, RAM
prefetches), and the RAM prefetches (disk -> RAM) issued."""


@dataclass
class TimelineRecorder:
    """The outcomes of the first ``max_events`` events (experts calls that reached the
    cache), in the simulator's timeline format (:mod:`moetrace.tuner.sim.timeline`):
    per access miss / hit / prefetch hit / streamed; per event the unused prefetches
    evicted and the prefetches issued while it was the latest event, and its stall."""

    max_events: int
    layer_ids: tuple[int, ...] = ()
    events_seen: int = 0
    _layer: list[int] = field(default_factory=list)
    _phase: list[int] = field(default_factory=list)
    _ptr: list[int] = field(default_factory=lambda: [0])
    _experts: list[int] = field(default_factory=list)
    _outcome: list[int] = field(default_factory=list)
    _wasted: list[int] = field(default_factory=list)
    _issued: list[int] = field(default_factory=list)
    _stall: list[float] = field(default_factory=list)

    @property
    def recording(self) -> bool:
        """Whether the latest event is recorded (the cap not reached when it began)."""
        return 0 < self.events_seen <= self.max_events

    def begin(self, layer: int, phase: int, experts: list[int], outcomes: list[int]) -> None:
        """A new event: its layer index, phase, experts and their outcome codes."""
        self.events_seen += 1
        if not self.recording:
            return
        self._layer.append(layer)
        self._phase.append(phase)
        self._experts += experts
        self._outcome += outcomes
        self._ptr.append(len(self._experts))
        self._wasted.append(0)
        self._issued.append(0)
        self._stall.append(0.0)

    def wasted(self) -> None:
        if self.recording:
            self._wasted[-1] += 1

    def issued(self) -> None:
        if self.recording:
            self._issued[-1] += 1

    def stall(self, seconds: float) -> None:
        if self.recording:
            self._stall[-1] += seconds

    def recorded(self) -> RecordedTimeline:
        tl = Timeline(
            ptr=np.asarray(self._ptr, np.int64),
            outcome=np.asarray(self._outcome, np.int8),
            wasted=np.asarray(self._wasted, np.int64),
            issued=np.asarray(self._issued, np.int64),
            stall_s=np.asarray(self._stall, np.float64),
        )
        return RecordedTimeline(
            layer=np.asarray(self._layer, np.int64),
            phase=np.asarray(self._phase, np.int64),
            experts=np.asarray(self._experts, np.int64),
            timeline=tl,
            events_seen=self.events_seen,
            max_events=self.max_events,
            moe_layers=self.layer_ids,
        )


def outcome_codes(hit: np.ndarray, streamed: np.ndarray, prefetched: np.ndarray) -> list[int]:
    """Outcome codes (kernel.O_*) of an event's accesses from bool masks: resident,
    streamed, and (resident by) an unused prefetch."""
    codes = np.where(
        hit, np.where(prefetched, O_PF_HIT, O_HIT), np.where(streamed, O_STREAM, O_MISS)
    )
    return codes.astype(np.int64).tolist()


class Counters:
    """Named ``(L, 2)`` counters per MoE layer index and phase (``counters``)."""

    counters: dict[str, np.ndarray]

    def add(self, name: str, layer: int, phase: int, value: float = 1.0) -> None:
        self.counters[name][layer, phase] += value

    def total(self, name: str, phase: int | None = None) -> float:
        arr = self.counters[name]
        return float(arr.sum() if phase is None else arr[:, phase].sum())


@dataclass
class RamStats(Counters):
    """The RAM tier's counters ``(L, 2)`` per MoE layer index and phase, the own seconds
    of its disk reads and of its RAM -> device copies, and its memory ledger."""

    num_layers: int
    memory: ExpertMemory | None = field(default=None, repr=False)
    counters: dict[str, np.ndarray] = field(init=False)
    read_seconds: list[float] = field(default_factory=list)
    """Each disk read's own time on the disk thread (no queueing)."""
    copy_seconds: list[float] = field(default_factory=list)
    """Each RAM -> device copy's own time on the copy thread (no queueing)."""
    warmup_disk_bytes: int = 0
    """Bytes read at start (the experts pinned in RAM or on the device), not counted."""
    other_disk_bytes: int = 0
    """Bytes read for experts that only padding or finished rows chose (no access, so
    not in the counters, as in the simulator)."""

    def __post_init__(self) -> None:
        self.counters = {n: np.zeros((self.num_layers, 2)) for n in RAM_COUNTERS}

    def summary(self, phase: int | None = None) -> dict[str, Any]:
        acc = self.total("ram_accesses", phase)
        mem = self.memory
        return {
            "accesses": acc,
            "hits": self.total("ram_hits", phase),
            "hit_rate": self.total("ram_hits", phase) / acc if acc else 0.0,
            "disk_bytes": self.total("disk_bytes", phase),
            "prefetch_issued": self.total("ram_prefetch_issued", phase),
            "reads": len(self.read_seconds),
            "read_s": float(sum(self.read_seconds)),
            "copies": len(self.copy_seconds),
            "copy_s": float(sum(self.copy_seconds)),
            "warmup_disk_bytes": self.warmup_disk_bytes,
            "other_disk_bytes": self.other_disk_bytes,
            "memory": None
            if mem is None
            else {"current": int(mem.current), "peak": int(mem.peak), "limit": mem.limit},
        }


@dataclass
class RuntimeStats(Counters):
    """Counters ``(L, 2)`` per layer index and phase (0 prefill, 1 decode).

    ``misses`` counts accesses that were not resident (``streamed`` ones included);
    ``prefetch_used`` counts prefetched experts that were accessed before eviction.
    """

    layer_ids: tuple[int, ...]
    counters: dict[str, np.ndarray] = field(init=False)
    tokens: np.ndarray = field(init=False)
    memory: ExpertMemory | None = field(default=None, repr=False)
    """The engine's expert memory ledger (bytes measured at allocation)."""
    accesses_log: list[tuple[int, int, tuple[int, ...], tuple[bool, ...]]] | None = None
    drift_probe: Callable[[], dict[str, Any]] | None = field(default=None, repr=False)
    """Reads the plan's drift detector (set by the engine when the plan has one)."""
    timeline: TimelineRecorder | None = None
    """Per-event outcomes of the first events, when the engine records them."""
    ram: RamStats | None = None
    """The RAM tier's statistics (plans with a RAM tier over a disk store)."""

    def __post_init__(self) -> None:
        L = len(self.layer_ids)
        self.counters = {name: np.zeros((L, 2), dtype=np.float64) for name in COUNTERS}
        self.tokens = np.zeros(2, dtype=np.int64)

    @property
    def peak_expert_bytes(self) -> int:
        """The most bytes of expert buffers held at once (measured), 0 without a ledger."""
        return 0 if self.memory is None else int(self.memory.peak)

    @property
    def drift(self) -> dict[str, Any] | None:
        """The plan's drift detector, read now: whether and when (demand accesses) it
        switched the cache to its fallback, and the hit rates (plan vs shadow LRU) of the
        deciding window; None without a detector."""
        return None if self.drift_probe is None else self.drift_probe()

    def summary(self, phase: int | None = None) -> dict[str, Any]:
        """Totals and rates (one phase, or both); with a RAM tier, its section ``ram``:
        accesses, hits, hit_rate, disk_bytes, prefetch_issued, the disk reads' and the
        copies' own seconds (read_s, copy_s) and its memory ledger (current, peak, limit
        bytes)."""
        out: dict[str, Any] = {name: self.total(name, phase) for name in COUNTERS}
        acc = out["accesses"]
        out["hit_rate"] = out["hits"] / acc if acc else 0.0
        issued = out["prefetch_issued"]
        out["prefetch_precision"] = out["prefetch_used"] / issued if issued else 0.0
        out["prefetch_recall"] = (
            out["prefetch_used"] / (out["prefetch_used"] + out["misses"])
            if out["prefetch_used"] + out["misses"]
            else 0.0
        )
        if self.ram is not None:
            out["ram"] = self.ram.summary(phase)
        return out

    def to_json(self) -> dict[str, Any]:
        per_layer = []
        for i, layer_id in enumerate(self.layer_ids):
            row: dict[str, Any] = {"layer": layer_id}
            for p, phase in enumerate(PHASES):
                row[phase] = {name: float(self.counters[name][i, p]) for name in COUNTERS}
                if self.ram is not None:
                    row[phase] |= {n: float(self.ram.counters[n][i, p]) for n in RAM_COUNTERS}
            per_layer.append(row)
        out = {
            "total": self.summary(),
            "by_phase": {phase: self.summary(p) for p, phase in enumerate(PHASES)},
            "tokens": {phase: int(self.tokens[p]) for p, phase in enumerate(PHASES)},
            "expert_memory": None
            if self.memory is None
            else {
                "peak_bytes": int(self.memory.peak),
                "limit_bytes": self.memory.limit,
                "buffers": dict(self.memory.buffers),
                "device": str(self.memory.device),
            },
            "drift": self.drift,
            "per_layer": per_layer,
        }
        if self.timeline is not None:
            out["timeline"] = self.timeline.recorded().to_json()
        return out

    def dumps(self) -> str:
        return json.dumps(self.to_json(), indent=1, sort_keys=True) + "\n"
