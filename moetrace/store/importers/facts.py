"""Resolve the model facts of an import, and check each parsed request against them.

Each fact comes from the first of: the caller (CLI flag / API kwarg), the trace already
in OUT (same model name), the known-models table, the data. Everything not given by the
caller is listed, with where it came from, as inferred.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

from moetrace.errors import ConfigError, ImportFormatError, MoetraceError
from moetrace.store.importers.base import ModelHint, ParsedRequest
from moetrace.store.importers.known_models import KnownModel, find_known_model
from moetrace.store.schema import DROPPED_EXPERT, ModelInfo


@dataclass(frozen=True)
class ModelOverrides:
    """Model facts given by the caller (None = infer)."""

    model_name: str | None = None
    num_layers: int | None = None
    num_experts: int | None = None
    top_k: int | None = None
    shared_experts: int | None = None
    bytes_per_expert: int | None = None

    def __post_init__(self) -> None:
        if self.model_name is not None and not self.model_name.strip():
            raise ConfigError("model_name must not be empty")
        for name in ("num_layers", "num_experts", "top_k", "bytes_per_expert"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or int(value) < 1):
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        if self.shared_experts is not None and self.shared_experts < 0:
            raise ConfigError(f"shared_experts must be >= 0, got {self.shared_experts!r}")


_CHECKED = ("num_layers", "num_experts", "top_k", "shared_experts", "bytes_per_expert")


def _from_existing(existing: ModelInfo, given: ModelOverrides) -> tuple[ModelInfo, dict[str, str]]:
    for name in _CHECKED:
        value = getattr(given, name)
        if value is not None and value != getattr(existing, name):
            raise ConfigError(
                f"{name}={value} conflicts with the existing trace's {name}="
                f"{getattr(existing, name)} for model {existing.name!r}"
            )
    return existing, {f: "as in the existing trace" for f in existing.inferred}


def model_hint(name: str, given: ModelOverrides, existing: ModelInfo | None) -> ModelHint:
    """What is known of the model before any file is parsed: the caller's flags, else the
    trace already in OUT, else the known-models table (MoE layers only from the latter two,
    and only when their layer count agrees with the caller's)."""
    known = find_known_model(name)
    facts: ModelInfo | KnownModel | None = existing or known
    num_layers = given.num_layers or (facts.num_layers if facts else None)
    moe = facts.moe_layers if facts is not None and facts.num_layers == num_layers else None
    return ModelHint(
        name=name,
        num_layers=num_layers,
        moe_layers=moe,
        num_experts=given.num_experts or (facts.num_experts if facts else None),
        top_k=given.top_k or (facts.top_k if facts else None),
    )


def resolve_model(
    name: str,
    name_reason: str | None,
    given: ModelOverrides,
    *,
    existing: ModelInfo | None,
    first: ParsedRequest | None,
    max_expert: int | None,
) -> tuple[ModelInfo, dict[str, str]]:
    """The import's ModelInfo and {field: where it came from} for inferred fields.

    ``first`` is the first good request (layers and top-k are read from it; may be None
    only with an ``existing`` model);
    ``max_expert`` the highest expert id over all files (needed only when neither the
    caller nor the known-models table gives the number of experts).
    """
    if existing is not None:
        return _from_existing(existing, given)
    if first is None:
        raise ConfigError("internal: no request to read the model facts from")
    known = find_known_model(name)
    reasons: dict[str, str] = {}
    if name_reason:
        reasons["name"] = name_reason
    kname = f"known facts of {known.key}" if known else ""
    where = first.source.path.name

    def pick(field: str, from_data: object, data_reason: str) -> object:
        value = getattr(given, field, None)
        if value is not None:
            return value
        if known is not None:
            reasons[field] = kname
            return getattr(known, field)
        if data_reason:
            reasons[field] = data_reason
        return from_data

    num_layers = pick("num_layers", first.num_layers_hint, f"highest layer id + 1 in {where}")
    if known is not None:
        moe_layers: tuple[int, ...] = known.moe_layers
        reasons["moe_layers"] = kname
    else:
        moe_layers = first.moe_layers
        reasons["moe_layers"] = f"layers with routing in {where}"
    experts_from_data = None if max_expert is None else max_expert + 1
    num_experts = pick("num_experts", experts_from_data, "highest expert id + 1 over all files")
    if num_experts is None:
        raise ConfigError("internal: number of experts unresolved (pass num_experts)")
    top_k = pick("top_k", first.top_k, f"experts per token in {where}")
    shared = pick("shared_experts", 0, "default 0 (the files do not log shared experts)")
    bpe = pick("bytes_per_expert", None, "")
    try:
        model = ModelInfo(
            name=name,
            num_layers=int(num_layers),  # type: ignore[call-overload]
            moe_layers=moe_layers,
            num_experts=int(num_experts),  # type: ignore[call-overload]
            top_k=int(top_k),  # type: ignore[call-overload]
            architecture=known.architecture if known else None,
            bytes_per_expert=None if bpe is None else int(bpe),  # type: ignore[call-overload]
            dtype=known.dtype if known else None,
            shared_experts=int(shared),  # type: ignore[call-overload]
            inferred=(),
        )
    except MoetraceError as exc:
        raise ConfigError(f"import: inconsistent model facts: {exc}") from None
    if known is not None:
        reasons["architecture"] = kname
        reasons["dtype"] = kname
    order = [f for f in ModelInfo.__dataclass_fields__ if f in reasons]
    inferred = {f: reasons[f] for f in order}
    model = dataclasses.replace(model, inferred=tuple(inferred))
    return model, inferred


def check_request(parsed: ParsedRequest, model: ModelInfo) -> None:
    """Raise ImportFormatError when a parsed file does not fit the import's model."""
    path = parsed.source.path
    if parsed.top_k != model.top_k:
        raise ImportFormatError(
            f"{path}: {parsed.locate(0)}: {parsed.top_k} experts per token, but the import "
            f"uses top_k={model.top_k} (inconsistent top-k)"
        )
    if parsed.num_layers_hint > model.num_layers:
        raise ImportFormatError(
            f"{path}: layer id {parsed.num_layers_hint - 1} is not below "
            f"num_layers={model.num_layers}"
        )
    if parsed.moe_layers != model.moe_layers:
        extra = sorted(set(parsed.moe_layers) - set(model.moe_layers))
        missing = sorted(set(model.moe_layers) - set(parsed.moe_layers))
        raise ImportFormatError(
            f"{path}: MoE layers differ from the import's model {model.name!r} "
            f"(unexpected {extra or 'none'}, missing {missing or 'none'})"
        )
    exp = parsed.experts
    if exp.size and (int(exp.max()) >= model.num_experts or int(exp.min()) < DROPPED_EXPERT):
        out = (exp >= model.num_experts) | (exp < DROPPED_EXPERT)
        bad = np.flatnonzero(out.any(axis=1))[0]
        value = exp[bad][out[bad]][0]
        raise ImportFormatError(
            f"{path}: {parsed.locate(int(bad))}: expert id {int(value)} out of range "
            f"[0, {model.num_experts})"
        )


def check_gate_weights(parsed: ParsedRequest, gate_weights: bool | None) -> None:
    """Raise ImportFormatError when a request's weights disagree with the trace's
    ``gate_weights`` (a trace holds weights for every request or for none)."""
    has = parsed.weights is not None
    if gate_weights is None or has == gate_weights:
        return
    if has:
        raise ImportFormatError(
            f"{parsed.source.path}: {parsed.locate(0)}: the source carries gate weights but "
            "the trace holds none (gate_weights=false); a trace cannot mix: import into "
            "another directory"
        )
    raise ImportFormatError(
        f"{parsed.source.path}: {parsed.locate(0)}: no gate weights, but the trace holds "
        "them for every request (gate_weights=true); a trace cannot mix"
    )


def expert_id_gap(ids: np.ndarray) -> int | None:
    """The highest id of the dense core of ``ids`` when the ids above it look like stray
    values rather than experts; None when the ids give no such sign.

    ``ids`` are the distinct expert ids seen over all files of an import that must infer
    the number of experts from the data (highest id + 1), where one corrupt value (a 999
    among ids 0..63) would make that 1000. Flagged when the ids seen cover under half of
    ``[0, highest id]`` and, going up, some id more than doubles the range of the ids below
    it (``next >= 2 * (id + 1)``) while those ids cover at least half of their own range
    and the ids above the jump are at most a quarter of all (a few strays, not a sparse
    sample of a large expert count); the returned id is the last one before that jump.
    """
    u = np.unique(np.asarray(ids, dtype=np.int64))
    u = u[u >= 0]
    if u.size < 2 or 2 * u.size >= u[-1] + 1:
        return None
    for j in np.flatnonzero(u[1:] >= 2 * (u[:-1] + 1)).tolist():
        dense = 2 * (j + 1) >= u[j] + 1  # j + 1 distinct ids in [0, u[j]]
        few_strays = 4 * (u.size - j - 1) <= u.size
        if dense and few_strays:
            return int(u[j])
    return None
