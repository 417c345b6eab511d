"""Trace format v1: the manifest dataclasses and the Parquet schemas.

This module is the single definition of the on-disk trace format; docs/trace-format.md
describes it for people. A trace is a directory::

    manifest.json
    requests/part-<writer>-<seq>.parquet     one row per request
    activations/part-<writer>-<seq>.parquet  one row per (request, token, MoE layer)

or, for a *count trace* (``manifest.content == "counts"``: per-expert activation counts
only, e.g. imported from SGLang's ``stat`` expert-distribution dumps)::

    manifest.json
    counts/part-<writer>-<seq>.parquet       one row per (source, layer, expert, phase)

An activations part is committed only when the requests part of the same name exists
(the writer renames the activations part first and the requests part last). Files whose
name starts with ``.tmp-`` are in-progress writes and ignored by readers.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa

from moetrace.errors import TraceFormatError

FORMAT_NAME = "moetrace-trace"
FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
REQUESTS_DIR = "requests"
ACTIVATIONS_DIR = "activations"
PART_PREFIX = "part-"
TMP_PREFIX = ".tmp-"
PHASES = ("prefill", "decode")
PHASE_CODE = {name: code for code, name in enumerate(PHASES)}
DROPPED_EXPERT = -1
"""Expert id recorded when the router dropped the token (capacity overflow)."""
MAX_EXPERTS = 1 << 15
"""Most routed experts a trace can hold: expert ids are int16 (0..32767)."""
WEIGHT_DTYPES = ("float32", "float16")
SOURCE_KINDS = ("recorded", "imported", "synthetic")
COUNTS_DIR = "counts"
CONTENT_ROUTING = "routing"
CONTENT_COUNTS = "counts"
CONTENT_KINDS = (CONTENT_ROUTING, CONTENT_COUNTS)
"""What a trace holds: token-level routing (requests + activations parts) or per-expert
activation counts only (counts parts). Manifests without the field hold routing."""


def _require(cond: bool, message: str) -> None:
    if not cond:
        raise TraceFormatError(message)


@dataclass(frozen=True)
class ModelInfo:
    """What a trace knows about the model that produced it."""

    name: str
    num_layers: int
    moe_layers: tuple[int, ...]
    num_experts: int
    top_k: int
    architecture: str | None = None
    config_fingerprint: str | None = None
    bytes_per_expert: int | None = None
    dtype: str | None = None
    shared_experts: int = 0
    inferred: tuple[str, ...] = ()
    """Names of the fields above that were inferred rather than known."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "moe_layers", tuple(int(x) for x in self.moe_layers))
        object.__setattr__(self, "inferred", tuple(self.inferred))
        _require(bool(self.name), "model.name must not be empty")
        _require(self.num_layers >= 1, f"model.num_layers must be >= 1, got {self.num_layers}")
        _require(len(self.moe_layers) >= 1, "model.moe_layers must list at least one layer")
        _require(
            len(set(self.moe_layers)) == len(self.moe_layers)
            and list(self.moe_layers) == sorted(self.moe_layers),
            f"model.moe_layers must be strictly increasing, got {list(self.moe_layers)}",
        )
        _require(
            all(0 <= layer < self.num_layers for layer in self.moe_layers),
            f"model.moe_layers {list(self.moe_layers)} must lie in [0, {self.num_layers})",
        )
        _require(self.num_experts >= 1, f"model.num_experts must be >= 1, got {self.num_experts}")
        _require(
            self.num_experts <= MAX_EXPERTS,
            f"model.num_experts must be <= {MAX_EXPERTS} (expert ids are stored as int16), "
            f"got {self.num_experts}",
        )
        _require(
            1 <= self.top_k <= self.num_experts,
            f"model.top_k must be in [1, num_experts={self.num_experts}], got {self.top_k}",
        )
        _require(
            self.bytes_per_expert is None or self.bytes_per_expert > 0,
            f"model.bytes_per_expert must be positive, got {self.bytes_per_expert}",
        )
        _require(
            self.shared_experts >= 0,
            f"model.shared_experts must be >= 0, got {self.shared_experts}",
        )

    @property
    def fingerprint(self) -> str:
        """The config fingerprint, or one derived from the routing shape when unknown."""
        if self.config_fingerprint:
            return self.config_fingerprint
        return routing_fingerprint(self.num_layers, self.moe_layers, self.num_experts, self.top_k)


@dataclass(frozen=True)
class SourceInfo:
    """Where a trace came from."""

    kind: str = "recorded"
    origin: str | None = None
    """The importer format (``patterns-behind-chaos``...) or the recording command."""
    path: str | None = None
    tool_version: str | None = None
    created: float = field(default_factory=time.time)

    def __post_init__(self) -> None:
        _require(
            self.kind in SOURCE_KINDS,
            f"source.kind must be one of {SOURCE_KINDS}, got {self.kind!r}",
        )


@dataclass(frozen=True)
class Manifest:
    """The manifest.json of a trace."""

    model: ModelInfo
    source: SourceInfo = field(default_factory=SourceInfo)
    tags: Mapping[str, str] = field(default_factory=dict)
    weight_dtype: str = "float32"
    speculative: bool = False
    """True when activations carry the speculative next-layer prediction columns."""
    format_version: int = FORMAT_VERSION
    gate_weights: bool | None = None
    """Whether the source had gate weights: True (recorded from the router), False (the
    source has none, e.g. imports and server recordings: ``w*`` columns are null), None
    (not stated: traces written before this field)."""
    content: str = CONTENT_ROUTING
    """``routing`` (requests and activations parts) or ``counts`` (counts parts only);
    absent in manifests written before this field, which hold routing."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "tags", dict(self.tags))
        _require(
            self.weight_dtype in WEIGHT_DTYPES,
            f"weight_dtype must be one of {WEIGHT_DTYPES}, got {self.weight_dtype!r}",
        )
        _require(
            self.content in CONTENT_KINDS,
            f"content must be one of {CONTENT_KINDS}, got {self.content!r}",
        )
        _require(
            self.format_version == FORMAT_VERSION,
            f"trace format version {self.format_version} is not supported (this moetrace reads {FORMAT_VERSION})",
        )

    @property
    def top_k(self) -> int:
        return self.model.top_k

    @property
    def is_counts(self) -> bool:
        """Whether the trace holds per-expert counts only (no token-level routing)."""
        return self.content == CONTENT_COUNTS

    def to_json(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["model"]["moe_layers"] = list(self.model.moe_layers)
        data["model"]["inferred"] = list(self.model.inferred)
        return {"format": FORMAT_NAME, **data}

    def dumps(self) -> str:
        return json.dumps(self.to_json(), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_json(cls, data: Any, where: str = "manifest") -> Manifest:
        try:
            _require(isinstance(data, dict), f"{where}: expected a JSON object")
            _require(
                data.get("format") == FORMAT_NAME,
                f"{where}: not a moetrace trace manifest (format={data.get('format')!r})",
            )
            version = data.get("format_version")
            _require(
                version == FORMAT_VERSION,
                f"{where}: trace format version {version!r} is not supported (this moetrace reads {FORMAT_VERSION})",
            )
            model = ModelInfo(**data["model"])
            source = SourceInfo(**data.get("source", {}))
            return cls(
                model=model,
                source=source,
                tags=data.get("tags", {}),
                weight_dtype=data.get("weight_dtype", "float32"),
                speculative=bool(data.get("speculative", False)),
                format_version=version,
                gate_weights=_optional_bool(data.get("gate_weights"), f"{where}: gate_weights"),
                content=data.get("content", CONTENT_ROUTING),
            )
        except TraceFormatError as exc:
            msg = str(exc)
            raise TraceFormatError(msg if msg.startswith(where) else f"{where}: {msg}") from None
        except (KeyError, TypeError) as exc:
            raise TraceFormatError(f"{where}: missing or invalid field ({exc})") from None

    def compatible_with(self, other: Manifest) -> bool:
        """Whether two writers may append to one trace under these manifests."""
        return (
            self.model.fingerprint == other.model.fingerprint
            and self.model.moe_layers == other.model.moe_layers
            and self.model.num_experts == other.model.num_experts
            and self.model.top_k == other.model.top_k
            and self.weight_dtype == other.weight_dtype
            and self.speculative == other.speculative
            and self.content == other.content
        )


def _optional_bool(value: Any, where: str) -> bool | None:
    _require(value is None or isinstance(value, bool), f"{where} must be true, false or null")
    return value


def routing_fingerprint(
    num_layers: int, moe_layers: tuple[int, ...], num_experts: int, top_k: int
) -> str:
    blob = json.dumps([num_layers, list(moe_layers), num_experts, top_k])
    return "routing:" + hashlib.sha256(blob.encode()).hexdigest()[:16]


def config_fingerprint(config: Mapping[str, Any]) -> str:
    """A stable hash of a model config dict (ignoring bookkeeping keys)."""
    ignore = {
        "_name_or_path",
        "transformers_version",
        "torch_dtype",
        "dtype",
        "architectures",
        "_commit_hash",
    }
    clean = {k: v for k, v in config.items() if k not in ignore}
    blob = json.dumps(clean, sort_keys=True, default=str)
    return "config:" + hashlib.sha256(blob.encode()).hexdigest()[:16]


# ---------------------------------------------------------------------------- Parquet

PHASE_TYPE = pa.dictionary(pa.int8(), pa.string())
TAGS_TYPE = pa.map_(pa.string(), pa.string())


def expert_columns(top_k: int) -> list[str]:
    return [f"e{i}" for i in range(top_k)]


def weight_columns(top_k: int) -> list[str]:
    return [f"w{i}" for i in range(top_k)]


def speculative_columns(top_k: int) -> list[str]:
    return [f"s{i}" for i in range(top_k)]


def activations_schema(manifest: Manifest) -> pa.Schema:
    """Physical schema of an activations part.

    The k selected experts are exploded into columns ``e0..e{k-1}`` (rank order, int16)
    with gate weights ``w0..w{k-1}``; see docs/trace-format.md for why.
    """
    k = manifest.top_k
    wtype = pa.float16() if manifest.weight_dtype == "float16" else pa.float32()
    fields = [
        pa.field("request_id", pa.dictionary(pa.int32(), pa.string()), nullable=False),
        pa.field("token", pa.int32(), nullable=False),
        pa.field("step", pa.int32(), nullable=False),
        pa.field("phase", PHASE_TYPE, nullable=False),
        pa.field("forward", pa.int64(), nullable=False),
        pa.field("layer", pa.int16(), nullable=False),
    ]
    fields += [pa.field(c, pa.int16()) for c in expert_columns(k)]
    fields += [pa.field(c, wtype) for c in weight_columns(k)]
    if manifest.speculative:
        fields += [pa.field(c, pa.int16()) for c in speculative_columns(k)]
    return pa.schema(fields, metadata={b"moetrace.format_version": str(FORMAT_VERSION).encode()})


REQUESTS_SCHEMA = pa.schema(
    [
        pa.field("request_id", pa.string(), nullable=False),
        pa.field("arrival", pa.int64(), nullable=False),
        pa.field("arrival_time", pa.float64()),
        pa.field("prompt_tokens", pa.int32(), nullable=False),
        pa.field("generated_tokens", pa.int32(), nullable=False),
        pa.field("prompt_text", pa.string()),
        pa.field("prompt_hash", pa.string()),
        pa.field("tags", TAGS_TYPE),
    ],
    metadata={b"moetrace.format_version": str(FORMAT_VERSION).encode()},
)


COUNTS_SCHEMA = pa.schema(
    [
        pa.field("layer", pa.int16(), nullable=False),
        pa.field("expert", pa.int16(), nullable=False),
        pa.field("phase", PHASE_TYPE),
        pa.field("count", pa.int64(), nullable=False),
        pa.field("source", pa.dictionary(pa.int32(), pa.string()), nullable=False),
    ],
    metadata={b"moetrace.format_version": str(FORMAT_VERSION).encode()},
)
"""Physical schema of a counts part: activations of ``expert`` at model layer ``layer``
(one of ``model.moe_layers``), in ``phase`` (null: not known), counted in ``source`` (an
id of what was counted, e.g. ``sha256:<hex>`` of an imported dump file)."""


def prompt_hash(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


@dataclass(frozen=True)
class RequestRecord:
    """One row of the requests table."""

    request_id: str
    prompt_tokens: int
    generated_tokens: int = 0
    prompt_text: str | None = None
    prompt_hash: str | None = None
    tags: Mapping[str, str] = field(default_factory=dict)
    arrival_time: float | None = None

    def __post_init__(self) -> None:
        from moetrace.errors import TraceWriteError

        if not isinstance(self.request_id, str) or not self.request_id:
            raise TraceWriteError(f"request_id must be a non-empty string, got {self.request_id!r}")
        if self.prompt_tokens < 0 or self.generated_tokens < 0:
            raise TraceWriteError(
                f"request {self.request_id}: token counts must be >= 0, got "
                f"prompt_tokens={self.prompt_tokens}, generated_tokens={self.generated_tokens}"
            )
        object.__setattr__(self, "tags", {str(k): str(v) for k, v in dict(self.tags).items()})
        if self.prompt_hash is None and self.prompt_text is not None:
            object.__setattr__(self, "prompt_hash", prompt_hash(self.prompt_text))
