"""Before any work: is the plan for this model, and does it fit the budget and device?"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from moetrace.errors import PlanError, RuntimeEngineError
from moetrace.runtime.experts import MoELayerRef
from moetrace.store.plan import Budget, CacheLayout, EvictionConfig, Plan, RoutingShape
from moetrace.store.schema import ModelInfo


@dataclass(frozen=True)
class Footprint:
    """Device bytes the runtime preallocates for a plan."""

    slots: int
    stream_slots: int
    bytes_per_expert: int

    @property
    def slot_bytes(self) -> int:
        return self.slots * self.bytes_per_expert

    @property
    def total_bytes(self) -> int:
        return (self.slots + self.stream_slots) * self.bytes_per_expert


def model_info(
    layers: Sequence[MoELayerRef], num_layers: int, fingerprint: str, name: str
) -> ModelInfo:
    ref = layers[0]
    return ModelInfo(
        name=name,
        num_layers=num_layers,
        moe_layers=tuple(r.layer_id for r in layers),
        num_experts=ref.num_experts,
        top_k=ref.top_k,
        config_fingerprint=fingerprint,
        bytes_per_expert=ref.bytes_per_expert,
    )


def default_plan(info: ModelInfo, slots: int, policy: str = "lru") -> Plan:
    """A plan with one pool of ``slots`` slots, ``policy`` eviction and no prefetch.

    When every expert fits, every expert is pinned: loaded at start, layer by layer, so
    each layer's experts sit in consecutive slots (as in the plain model's tensors)."""
    L, E = len(info.moe_layers), info.num_experts
    if slots < 1:
        raise RuntimeEngineError(f"budget gives {slots} expert slots; at least 1 is needed")
    pinned = tuple(tuple(range(E)) for _ in range(L)) if slots >= L * E else ()
    return Plan(
        routing=RoutingShape.of(info),
        budget=Budget(slots=slots, bytes_per_expert=info.bytes_per_expert),
        layout=CacheLayout("pool", (0,) * L, pool_slots=slots),
        eviction=EvictionConfig(policy, pinned=pinned),
    )


def all_resident_plan(info: ModelInfo) -> Plan:
    """Every expert has its slot (no offloading cost beyond warm-up)."""
    slots = len(info.moe_layers) * info.num_experts
    return default_plan(info, slots)


def available_memory(device: torch.device) -> int | None:
    """Bytes free on ``device`` now (None when the OS will not say)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        with open("/proc/meminfo", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):
        return None


def check_plan(
    plan: Plan,
    info: ModelInfo,
    device: torch.device,
    budget_bytes: int | None,
) -> Footprint:
    """Raise PlanError/RuntimeEngineError unless ``plan`` can run here; return its footprint.

    ``budget_bytes`` (expert bytes allowed on the device; None = the plan's budget) must
    hold the plan's slots plus ``top_k`` streaming slots.
    """
    plan.check_compatible(info)
    bpe = int(info.bytes_per_expert or 0)
    if plan.budget.bytes_per_expert is not None and plan.budget.bytes_per_expert != bpe:
        raise PlanError(
            f"plan assumes {plan.budget.bytes_per_expert} bytes per expert, the model has {bpe}"
        )
    fp = Footprint(plan.layout.total_slots, info.top_k, bpe)
    if budget_bytes is not None:
        if budget_bytes <= 0:
            raise RuntimeEngineError(f"budget must be > 0 bytes, got {budget_bytes}")
        allowed = budget_bytes // bpe - fp.stream_slots
        if allowed < 1:
            raise RuntimeEngineError(
                f"budget of {budget_bytes} bytes holds {budget_bytes // bpe} experts of "
                f"{bpe} bytes; at least top_k + 1 = {info.top_k + 1} are needed"
            )
        plan.check_budget(slots=allowed, bytes=budget_bytes)
    need = fp.total_bytes
    avail = available_memory(device)
    if avail is not None and need > avail:
        raise RuntimeEngineError(
            f"plan needs {need} bytes of expert slots on {device}, only {avail} are available"
        )
    if device.type == "cuda":
        total = torch.cuda.get_device_properties(device).total_memory
        if need > total:
            raise RuntimeEngineError(f"plan needs {need} bytes, {device} has {total} in all")
    return fp


@dataclass(frozen=True)
class RamFootprint:
    """Host RAM bytes the runtime preallocates for a plan's RAM tier: its slots plus a
    staging area of ``top_k`` experts for reads that get no RAM slot."""

    slots: int
    staging: int
    bytes_per_expert: int
    limit: int
    """The RAM tier's budget in bytes (its ``worst_case_bytes``, else the footprint)."""

    @property
    def total_bytes(self) -> int:
        return (self.slots + self.staging) * self.bytes_per_expert


def check_ram(plan: Plan, info: ModelInfo) -> RamFootprint:
    """Raise RuntimeEngineError unless ``plan``'s RAM tier fits its own budget and this
    machine's free memory; return its footprint (the plan has a RAM tier)."""
    ram = plan.ram
    if ram is None:
        raise RuntimeEngineError("the plan has no RAM tier")
    bpe = int(info.bytes_per_expert or 0)
    fp = RamFootprint(ram.slots, info.top_k, bpe, 0)
    need = fp.total_bytes
    if ram.bytes is not None and ram.bytes < ram.slots * bpe:
        raise RuntimeEngineError(
            f"RAM tier: ram.bytes {ram.bytes} cannot hold its {ram.slots} slots of {bpe} bytes "
            f"({ram.slots * bpe} bytes)"
        )
    limit = ram.worst_case_bytes if ram.worst_case_bytes is not None else need
    if limit < need:
        raise RuntimeEngineError(
            f"RAM tier needs {need} bytes ({ram.slots} slots + {info.top_k} staging of {bpe} "
            f"bytes), over its budget ram.worst_case_bytes of {limit} bytes"
        )
    avail = available_memory(torch.device("cpu"))
    if avail is not None and need > avail:
        raise RuntimeEngineError(
            f"RAM tier needs {need} bytes of host memory, only {avail} are available"
        )
    return RamFootprint(ram.slots, info.top_k, bpe, int(limit))
