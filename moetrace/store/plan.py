"""Plan format v4: the single schema of offloading plan files (docs/plan-format.md).

A plan is a JSON file the tuner writes and the runtime reads: which model it is for, the
expert-slot budget and its layout, pinned experts, the eviction policy and prefetcher with
their parameters and tables, per-phase overrides, the worst-case memory it needs, where it
came from, the metrics expected on the validation splits and (since v2) how the cache
adapts when the traffic drifts, (since v3) how waiting requests are ordered and batched,
and (since v4) a host-RAM tier between the device slots and the disk store. v1-v3 files
still load (no drift detection before v2; first come, first served before v3; before v4
every expert is in host RAM). Every dataclass validates on construction; :func:`load_plan` turns any malformed file into a :class:`PlanError` that
names the file and the field.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from moetrace.errors import PlanError
from moetrace.store.files import write_text_atomic
from moetrace.store.schema import PHASES, Manifest, ModelInfo

PLAN_FORMAT = "moetrace-plan"
PLAN_VERSION = 4
READABLE_VERSIONS = (1, 2, 3, 4)
LAYOUT_KINDS = ("per_layer", "pool")
BATCHING = ("continuous", "static")
"""``continuous``: a request joins the running batch as soon as a place is free (vLLM,
SGLang); ``static``: a batch runs until all its requests finish (``generate`` on a batch)."""


def _require(cond: bool, message: str) -> None:
    if not cond:
        raise PlanError(message)


def _json_value(value: Any, where: str) -> Any:
    """Check that a parameter/table value is plain JSON (numbers, strings, lists, dicts)."""
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        _require(math.isfinite(value), f"{where} must be finite, got {value}")
        return value
    if isinstance(value, (list, tuple)):
        return [_json_value(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, Mapping):
        return {str(k): _json_value(v, f"{where}.{k}") for k, v in value.items()}
    raise PlanError(f"{where} must be a JSON value, got {type(value).__name__}")


@dataclass(frozen=True)
class RoutingShape:
    """The model a plan is for: fingerprint and routing shape (from the trace manifest)."""

    fingerprint: str
    moe_layers: tuple[int, ...]
    num_experts: int
    top_k: int

    def __post_init__(self) -> None:
        object.__setattr__(self, "moe_layers", tuple(int(x) for x in self.moe_layers))
        _require(bool(self.fingerprint), "routing.fingerprint must not be empty")
        _require(len(self.moe_layers) >= 1, "routing.moe_layers must list at least one layer")
        _require(self.num_experts >= 1, f"routing.num_experts must be >= 1, got {self.num_experts}")
        _require(
            1 <= self.top_k <= self.num_experts,
            f"routing.top_k must be in [1, {self.num_experts}], got {self.top_k}",
        )

    @property
    def num_layers(self) -> int:
        return len(self.moe_layers)

    @classmethod
    def of(cls, model: ModelInfo) -> RoutingShape:
        return cls(model.fingerprint, model.moe_layers, model.num_experts, model.top_k)


@dataclass(frozen=True)
class Budget:
    """The device memory given to expert slots."""

    slots: int
    bytes: int | None = None
    bytes_per_expert: int | None = None

    def __post_init__(self) -> None:
        _require(self.slots >= 1, f"budget.slots must be >= 1, got {self.slots}")
        _require(
            self.bytes is None or self.bytes > 0, f"budget.bytes must be > 0, got {self.bytes}"
        )
        _require(
            self.bytes_per_expert is None or self.bytes_per_expert > 0,
            f"budget.bytes_per_expert must be > 0, got {self.bytes_per_expert}",
        )


@dataclass(frozen=True)
class CacheLayout:
    """Per-layer caches (``capacities[l]`` slots each) or one pool of ``pool_slots`` slots
    shared by all layers, where ``capacities[l]`` is layer l's guaranteed minimum share."""

    kind: str
    capacities: tuple[int, ...]
    pool_slots: int | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "capacities", tuple(int(c) for c in self.capacities))
        _require(
            self.kind in LAYOUT_KINDS,
            f"layout.kind must be one of {LAYOUT_KINDS}, got {self.kind!r}",
        )
        _require(len(self.capacities) >= 1, "layout.capacities must not be empty")
        bad = [c for c in self.capacities if c < 0]
        _require(not bad, f"layout.capacities must be >= 0, got {bad[:3]}")
        if self.kind == "pool":
            _require(
                self.pool_slots is not None and self.pool_slots >= 1,
                f"layout.pool_slots must be >= 1 for a pool, got {self.pool_slots}",
            )
            _require(
                sum(self.capacities) <= self.pool_slots,  # type: ignore[operator]
                f"layout: minimum shares sum to {sum(self.capacities)} > pool_slots {self.pool_slots}",
            )
        else:
            _require(self.pool_slots is None, "layout.pool_slots is only for kind 'pool'")

    @property
    def total_slots(self) -> int:
        return int(self.pool_slots) if self.kind == "pool" else sum(self.capacities)  # type: ignore[arg-type]


@dataclass(frozen=True)
class EvictionConfig:
    """An eviction policy by registry name, its parameters, pinned experts per layer and
    tables (e.g. ``gap``: per phase, layer and expert, the mean reuse gap in passes)."""

    policy: str
    params: Mapping[str, Any] = field(default_factory=dict)
    pinned: tuple[tuple[int, ...], ...] = ()
    tables: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        _require(bool(self.policy), "eviction.policy must not be empty")
        object.__setattr__(self, "params", _json_value(dict(self.params), "eviction.params"))
        object.__setattr__(self, "tables", _json_value(dict(self.tables), "eviction.tables"))
        object.__setattr__(self, "pinned", tuple(tuple(int(e) for e in row) for row in self.pinned))
        for i, row in enumerate(self.pinned):
            _require(
                len(set(row)) == len(row),
                f"eviction.pinned[{i}] lists an expert twice: {list(row)}",
            )


@dataclass(frozen=True)
class PrefetchConfig:
    """A prefetcher by registry name: lookahead depth (layers), experts fetched per
    predicted layer, parameters and fitted tables."""

    name: str = "none"
    lookahead: int = 1
    fetch: int = 0
    params: Mapping[str, Any] = field(default_factory=dict)
    tables: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        _require(bool(self.name), "prefetch.name must not be empty")
        _require(self.lookahead >= 1, f"prefetch.lookahead must be >= 1, got {self.lookahead}")
        _require(self.fetch >= 0, f"prefetch.fetch must be >= 0, got {self.fetch}")
        object.__setattr__(self, "params", _json_value(dict(self.params), "prefetch.params"))
        object.__setattr__(self, "tables", _json_value(dict(self.tables), "prefetch.tables"))


@dataclass(frozen=True)
class PhaseOverride:
    """Eviction parameters and/or prefetcher used instead of the plan's in one phase.

    Tables and pinned experts are shared with the plan's; an override changes parameters."""

    eviction_params: Mapping[str, Any] | None = None
    prefetch_fetch: int | None = None

    def __post_init__(self) -> None:
        if self.eviction_params is not None:
            object.__setattr__(
                self,
                "eviction_params",
                _json_value(dict(self.eviction_params), "phase_overrides.eviction_params"),
            )
        _require(
            self.prefetch_fetch is None or self.prefetch_fetch >= 0,
            f"phase_overrides.prefetch_fetch must be >= 0, got {self.prefetch_fetch}",
        )


@dataclass(frozen=True)
class Adaptation:
    """What the cache does when the traffic drifts (format v2).

    Over windows of ``window`` demand accesses the cache compares its hit rate with a
    shadow LRU directory's; when the plan trails LRU by more than ``margin`` as a mean
    over windows weighted with a half-life of ``halflife`` windows, the cache switches,
    for good, to the online policy ``fallback`` (pins released). ``window`` 0 turns
    detection off (what every v1 plan does)."""

    fallback: str = "lru"
    window: int = 0
    margin: float = 0.02
    halflife: float = 8.0

    def __post_init__(self) -> None:
        _require(bool(self.fallback), "adaptation.fallback must not be empty")
        _require(
            isinstance(self.window, int) and self.window >= 0,
            f"adaptation.window must be an integer >= 0, got {self.window!r}",
        )
        _require(
            math.isfinite(self.margin) and 0.0 <= self.margin < 1.0,
            f"adaptation.margin must be in [0, 1), got {self.margin}",
        )
        _require(
            math.isfinite(self.halflife) and self.halflife > 0.0,
            f"adaptation.halflife must be > 0 (windows), got {self.halflife}",
        )


@dataclass(frozen=True)
class ScheduleConfig:
    """How waiting requests are ordered and batched (format v3): a scheduler by registry
    name (:mod:`moetrace.tuner.sched.schedulers`) and its parameters, at most
    ``batch_size`` requests running together, ``continuous`` or ``static`` batching.
    The default (every plan before v3) is first come, first served, one at a time."""

    scheduler: str = "fcfs"
    batch_size: int = 1
    batching: str = "continuous"
    params: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        _require(bool(self.scheduler), "schedule.scheduler must not be empty")
        _require(
            isinstance(self.batch_size, int) and self.batch_size >= 1,
            f"schedule.batch_size must be an integer >= 1, got {self.batch_size!r}",
        )
        _require(
            self.batching in BATCHING,
            f"schedule.batching must be one of {BATCHING}, got {self.batching!r}",
        )
        object.__setattr__(self, "params", _json_value(dict(self.params), "schedule.params"))


@dataclass(frozen=True)
class RamTier:
    """Host RAM between the device slots and a disk store of every expert (format v4).

    ``slots`` experts fit in RAM (``bytes`` when the expert size is known). The RAM cache
    sees the device's misses and prefetches: a device miss that hits RAM pays the RAM ->
    device link only, one that misses RAM pays the disk -> RAM link too. Its ``layout`` and
    ``eviction`` work as the device cache's (``eviction.pinned``: the experts kept in RAM
    for good, the placement); ``prefetch`` predicts experts to read from disk into RAM
    only; ``adaptation`` is its own drift detector. ``worst_case_bytes``: the RAM slots
    plus a staging area of ``top_k`` experts for reads that get no RAM slot."""

    slots: int
    layout: CacheLayout
    eviction: EvictionConfig = field(default_factory=lambda: EvictionConfig("lru"))
    prefetch: PrefetchConfig = field(default_factory=PrefetchConfig)
    adaptation: Adaptation = field(default_factory=Adaptation)
    bytes: int | None = None
    worst_case_bytes: int | None = None

    def __post_init__(self) -> None:
        _require(
            isinstance(self.slots, int) and self.slots >= 0,
            f"ram.slots must be an integer >= 0, got {self.slots!r}",
        )
        _require(
            self.layout.total_slots <= self.slots,
            f"ram.layout needs {self.layout.total_slots} slots > ram.slots {self.slots}",
        )
        _require(self.bytes is None or self.bytes >= 0, f"ram.bytes must be >= 0, got {self.bytes}")
        _require(
            self.worst_case_bytes is None or self.worst_case_bytes >= 0,
            f"ram.worst_case_bytes must be >= 0, got {self.worst_case_bytes}",
        )
        pinned = sum(len(r) for r in self.eviction.pinned)
        _require(pinned <= self.slots, f"ram pins {pinned} experts > ram.slots {self.slots}")

    def check_shape(self, routing: RoutingShape) -> None:
        """Raise PlanError unless the tier fits the model's MoE layers and experts."""
        check_cache_shape(self.layout, self.eviction, routing, "ram.")


def check_cache_shape(
    layout: CacheLayout,
    eviction: EvictionConfig,
    routing: RoutingShape,
    prefix: str,
    *,
    layer_pins: bool = False,
) -> None:
    """Raise PlanError unless a cache's layout and pins fit the model: one capacity per MoE
    layer, none over the experts, one pinned row per layer of valid expert ids and, with
    ``layer_pins``, within a per-layer layout's capacities. ``prefix`` names the tier."""
    L, E = routing.num_layers, routing.num_experts
    caps = layout.capacities
    _require(
        len(caps) == L,
        f"{prefix}layout.capacities has {len(caps)} entries, the model has {L} MoE layers",
    )
    too_big = [(i, c) for i, c in enumerate(caps) if c > E]
    if too_big:
        i, c = too_big[0]
        raise PlanError(f"{prefix}layout.capacities[{i}] = {c} > num_experts {E}")
    pinned = eviction.pinned
    if not pinned:
        return
    _require(
        len(pinned) == L,
        f"{prefix}eviction.pinned has {len(pinned)} rows, the model has {L} MoE layers",
    )
    for i, row in enumerate(pinned):
        out = [e for e in row if not 0 <= e < E]
        _require(not out, f"{prefix}eviction.pinned[{i}]: expert ids {out[:3]} out of range")
        if layer_pins and layout.kind == "per_layer":
            _require(
                len(row) <= caps[i],
                f"{prefix}eviction.pinned[{i}] pins {len(row)} experts > layer capacity {caps[i]}",
            )


def ram_tier_from_json(data: Any) -> RamTier:
    """A plan file's ``ram`` section (PlanError naming the field when malformed)."""
    obj = _obj(data, "ram")
    subs = {"layout": CacheLayout, "eviction": EvictionConfig, "prefetch": PrefetchConfig,
            "adaptation": Adaptation}  # fmt: skip
    fields = {f.name: f for f in dataclasses.fields(RamTier)}
    extra = sorted(set(obj) - set(fields))
    _require(not extra, f"unknown field ram.{extra[0]}" if extra else "")
    for name in ("slots", "layout"):
        _require(name in obj, f"missing field ram.{name}")
    for key in ("slots", "bytes", "worst_case_bytes"):
        if key in obj:
            _check_type(obj[key], fields[key].type, f"ram.{key}")
    try:
        parts = {
            k: _build(c, obj, k, optional=k != "layout", prefix="ram.") for k, c in subs.items()
        }
    except PlanError as exc:  # a section's own check names its field without the tier
        msg = str(exc)
        raise PlanError(msg if "ram." in msg else f"ram.{msg}") from None
    return RamTier(**{k: v for k, v in obj.items() if k not in subs}, **parts)


@dataclass(frozen=True)
class Provenance:
    """Where a plan came from: traces, the request split, seed and tool version."""

    traces: tuple[str, ...] = ()
    seed: int = 0
    validation_fraction: float = 0.5
    tune_requests: tuple[str, ...] = ()
    validation_requests: tuple[str, ...] = ()
    tool_version: str = ""
    created: float = field(default_factory=time.time)

    def __post_init__(self) -> None:
        object.__setattr__(self, "traces", tuple(str(t) for t in self.traces))
        object.__setattr__(self, "tune_requests", tuple(str(t) for t in self.tune_requests))
        object.__setattr__(
            self, "validation_requests", tuple(str(t) for t in self.validation_requests)
        )
        _require(
            0.0 <= self.validation_fraction < 1.0,
            f"provenance.validation_fraction must be in [0, 1), got {self.validation_fraction}",
        )
        overlap = set(self.tune_requests) & set(self.validation_requests)
        _require(
            not overlap,
            f"provenance: requests {sorted(overlap)[:3]} are in both tune and validation sets",
        )


@dataclass(frozen=True)
class Plan:
    """An offloading plan (format v4; v1 files load with adaptation off, v1-v2 with first
    come, first served scheduling, v1-v3 with every expert in host RAM)."""

    routing: RoutingShape
    budget: Budget
    layout: CacheLayout
    eviction: EvictionConfig
    prefetch: PrefetchConfig = field(default_factory=PrefetchConfig)
    phase_overrides: Mapping[str, PhaseOverride] = field(default_factory=dict)
    worst_case_bytes: int | None = None
    provenance: Provenance = field(default_factory=Provenance)
    expected: Mapping[str, Any] = field(default_factory=dict)
    """Metrics measured on the validation split: the plan's and the baselines'."""
    adaptation: Adaptation = field(default_factory=Adaptation)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    ram: RamTier | None = None
    """The host-RAM tier over a disk store (v4); None: every expert is in host RAM."""
    format_version: int = PLAN_VERSION

    def __post_init__(self) -> None:
        _require(
            self.format_version == PLAN_VERSION,
            f"plan format version {self.format_version} is not the current one ({PLAN_VERSION}); "
            "older files are read with load_plan / Plan.from_json",
        )
        object.__setattr__(self, "phase_overrides", dict(self.phase_overrides))
        object.__setattr__(self, "expected", _json_value(dict(self.expected), "expected"))
        bad = [p for p in self.phase_overrides if p not in PHASES]
        _require(not bad, f"phase_overrides: unknown phase {bad[0]!r}" if bad else "")
        check_cache_shape(self.layout, self.eviction, self.routing, "", layer_pins=True)
        _require(
            self.layout.total_slots <= self.budget.slots,
            f"layout needs {self.layout.total_slots} slots > budget.slots {self.budget.slots}",
        )
        _require(
            self.num_pinned <= self.budget.slots,
            f"plan pins {self.num_pinned} experts > budget of {self.budget.slots} slots",
        )
        _require(
            self.worst_case_bytes is None or self.worst_case_bytes >= 0,
            f"worst_case_bytes must be >= 0, got {self.worst_case_bytes}",
        )
        if self.ram is not None:
            self.ram.check_shape(self.routing)

    @property
    def num_pinned(self) -> int:
        return sum(len(r) for r in self.eviction.pinned)

    # ------------------------------------------------------------ checks
    def check_compatible(self, model: Manifest | ModelInfo) -> None:
        """Raise PlanError unless the plan is for this model (fingerprint and routing)."""
        info = model.model if isinstance(model, Manifest) else model
        mine = self.routing
        if info.fingerprint != mine.fingerprint:
            raise PlanError(
                f"plan is for model fingerprint {mine.fingerprint}, not {info.fingerprint} "
                f"({info.name})"
            )
        theirs = (tuple(info.moe_layers), info.num_experts, info.top_k)
        if theirs != (mine.moe_layers, mine.num_experts, mine.top_k):
            raise PlanError(
                f"plan routing (moe_layers={list(mine.moe_layers)}, experts={mine.num_experts}, "
                f"top_k={mine.top_k}) does not match model {info.name} "
                f"(moe_layers={list(info.moe_layers)}, experts={info.num_experts}, top_k={info.top_k})"
            )

    def check_budget(self, *, slots: int | None = None, bytes: int | None = None) -> None:
        """Raise PlanError when a runtime budget is below what the plan pins or needs."""
        if slots is not None:
            if slots < self.num_pinned:
                raise PlanError(
                    f"budget of {slots} slots is below the {self.num_pinned} the plan pins"
                )
            if slots < self.layout.total_slots:
                raise PlanError(
                    f"budget of {slots} slots is below the plan's layout of {self.layout.total_slots}"
                )
        if (
            bytes is not None
            and self.worst_case_bytes is not None
            and bytes < self.worst_case_bytes
        ):
            raise PlanError(
                f"budget of {bytes} bytes is below the plan's worst case of {self.worst_case_bytes} bytes"
            )

    # ------------------------------------------------------------ JSON
    def to_json(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["phase_overrides"] = {
            k: dataclasses.asdict(v) for k, v in self.phase_overrides.items()
        }
        return {"format": PLAN_FORMAT, **_lists(data)}

    def dumps(self) -> str:
        return json.dumps(self.to_json(), indent=1, sort_keys=True) + "\n"

    @classmethod
    def from_json(cls, data: Any, where: str = "plan") -> Plan:
        try:
            _require(isinstance(data, dict), "expected a JSON object")
            _require(
                data.get("format") == PLAN_FORMAT,
                f"not a moetrace plan (format={data.get('format')!r})",
            )
            _require(
                data.get("format_version") in READABLE_VERSIONS,
                f"plan format version {data.get('format_version')!r} is not supported "
                f"(this moetrace reads {', '.join(map(str, READABLE_VERSIONS))})",
            )
            _require(
                data["format_version"] >= 2 or "adaptation" not in data,
                "field 'adaptation' needs format_version 2",
            )
            _require(
                data["format_version"] >= 3 or "schedule" not in data,
                "field 'schedule' needs format_version 3",
            )
            _require(
                data["format_version"] >= 4 or data.get("ram") is None,
                "field 'ram' needs format_version 4",
            )
            known = {f.name for f in dataclasses.fields(cls)} | {"format"}
            extra = sorted(set(data) - known)
            _require(not extra, f"unknown field {extra[0]!r}" if extra else "")
            overrides = _obj(data.get("phase_overrides", {}), "phase_overrides")
            return cls(
                routing=_build(RoutingShape, data, "routing"),
                budget=_build(Budget, data, "budget"),
                layout=_build(CacheLayout, data, "layout"),
                eviction=_build(EvictionConfig, data, "eviction"),
                prefetch=_build(PrefetchConfig, data, "prefetch", optional=True),
                phase_overrides={
                    k: _build(PhaseOverride, overrides, k, prefix="phase_overrides.")
                    for k in overrides
                },
                worst_case_bytes=data.get("worst_case_bytes"),
                provenance=_build(Provenance, data, "provenance", optional=True),
                expected=_obj(data.get("expected", {}), "expected"),
                adaptation=_build(Adaptation, data, "adaptation", optional=True)
                if data["format_version"] >= 2
                else Adaptation(),
                schedule=_build(ScheduleConfig, data, "schedule", optional=True),
                ram=None if data.get("ram") is None else ram_tier_from_json(data["ram"]),
            )
        except PlanError as exc:
            raise PlanError(f"{where}: {exc}") from None
        except (TypeError, ValueError) as exc:
            raise PlanError(f"{where}: invalid value ({exc})") from None


def _lists(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _lists(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_lists(v) for v in value]
    return value


def _obj(value: Any, name: str) -> dict[str, Any]:
    _require(
        isinstance(value, dict), f"field {name!r} must be an object, got {type(value).__name__}"
    )
    return value


def _build(
    cls: type, data: Mapping[str, Any], name: str, *, optional: bool = False, prefix: str = ""
) -> Any:
    full = prefix + name
    if name not in data:
        _require(optional, f"missing field {full!r}")
        return cls()
    obj = _obj(data[name], full)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    extra = sorted(set(obj) - set(fields))
    _require(not extra, f"unknown field {full}.{extra[0]}" if extra else "")
    missing = [
        n
        for n, f in fields.items()
        if n not in obj
        and f.default is dataclasses.MISSING
        and f.default_factory is dataclasses.MISSING  # type: ignore[misc]
    ]
    _require(not missing, f"missing field {full}.{missing[0]}" if missing else "")
    for key, val in obj.items():
        _check_type(val, fields[key].type, f"{full}.{key}")
    return cls(**obj)


def _check_type(value: Any, annotation: Any, where: str) -> None:
    ann = str(annotation)
    is_int = ann.startswith("int") or ann.startswith("tuple[int")
    if ann.startswith("int") and not (value is None and "None" in ann):
        _require(
            isinstance(value, int) and not isinstance(value, bool),
            f"field {where} must be an integer, got {value!r}",
        )
    elif ann.startswith("float"):
        _require(
            isinstance(value, (int, float)) and not isinstance(value, bool),
            f"field {where} must be a number, got {value!r}",
        )
    elif ann == "str":
        _require(isinstance(value, str), f"field {where} must be a string, got {value!r}")
    elif ann.startswith("tuple["):
        _require(isinstance(value, list), f"field {where} must be a list, got {value!r}")
        if is_int and "..." in ann and "tuple[int" in ann:
            bad = [v for v in value if not isinstance(v, int) or isinstance(v, bool)]
            _require(not bad, f"field {where} must list integers, got {bad[0]!r}" if bad else "")
        if ann.startswith("tuple[tuple[int"):
            for i, row in enumerate(value):
                _require(isinstance(row, list), f"field {where}[{i}] must be a list, got {row!r}")
                bad = [v for v in row if not isinstance(v, int) or isinstance(v, bool)]
                _require(
                    not bad, f"field {where}[{i}] must list integers, got {bad[0]!r}" if bad else ""
                )


def load_plan(path: str | os.PathLike[str]) -> Plan:
    """Read and validate a plan file; any problem is a PlanError naming the file."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as exc:
        raise PlanError(f"{p}: cannot read plan ({exc.strerror})") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise PlanError(f"{p}: not valid JSON (line {exc.lineno}: {exc.msg})") from None
    return Plan.from_json(data, where=str(p))


def save_plan(plan: Plan, path: str | os.PathLike[str]) -> Path:
    """Write a plan atomically (folders created, temporary file, fsync, rename)."""
    return write_text_atomic(path, plan.dumps())


def pinned_rows(
    num_layers: int, rows: Sequence[Sequence[int]] | None
) -> tuple[tuple[int, ...], ...]:
    """Pinned experts as a per-layer tuple of tuples (empty rows when none)."""
    if not rows:
        return tuple(() for _ in range(num_layers))
    return tuple(tuple(int(e) for e in r) for r in rows)
