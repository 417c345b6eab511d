"""Import SGLang's ``stat`` expert-distribution dumps as a count trace.

SGLang (``--expert-distribution-recorder-mode stat``; POST ``/start_expert_distribution_
record``, ``/stop_...``, ``/dump_...``) writes with ``torch.save`` a file
``expert_distribution_recorder_<unix time>.pt`` holding::

    {"rank": int,
     "logical_count": int32 tensor [buffered passes, num_layers, num_logical_experts],
     "average_utilization_rate_over_window": float | None}

``logical_count[s, l, e]`` is the tokens routed to expert ``e`` of layer ``l`` in buffered
forward pass ``s``. With a finite ``--expert-distribution-recorder-buffer-size`` the pass
axis is a circular buffer (unused slots are zeros, the order wraps), so only the sum over
passes is kept. Dense layers are all zeros. There are no requests, tokens or phases:
the result is a count trace (docs/trace-format.md, "Count traces"), which ``moetrace
analyze`` reads for skew and the simulator refuses.

Model facts are resolved like every import (:func:`moetrace.store.importers.facts.
resolve_model`): the caller, the trace already in OUT, the known-models table, the data
(experts = the tensor's last axis, layers = its middle axis, MoE layers = layers with any
nonzero count). ``top_k`` cannot come from counts and must be given or known. Each file's
counts are committed as one part whose ``source`` is ``sha256:<hex>`` of the file, so a
rerun over the same files (from any path) skips them.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from moetrace import __version__
from moetrace.errors import ConfigError, ImportFormatError, MoetraceError, TraceWriteError
from moetrace.store.counts import count_sources, write_counts
from moetrace.store.importers.base import ParsedRequest, SourceFile, check_counts, find_files
from moetrace.store.importers.driver import existing_trace_manifest, file_sha256
from moetrace.store.importers.facts import ModelOverrides, resolve_model
from moetrace.store.importers.known_models import find_known_model
from moetrace.store.importers.paths import known_model_folder
from moetrace.store.location import require_local
from moetrace.store.schema import CONTENT_COUNTS, Manifest, ModelInfo, SourceInfo

log = logging.getLogger(__name__)

FORMAT = "sglang-counts"
SUFFIX = ".pt"
COUNT_KEY = "logical_count"


@dataclass(frozen=True)
class CountImportResult:
    """What an import of count dumps did."""

    format: str
    src: str
    out: str
    model_name: str
    files_imported: int
    files_skipped_existing: int
    """Files whose content (sha256) is already in OUT, or repeats an earlier file."""
    counted: int
    """Expert activations imported (sum of the imported counts at MoE layers)."""
    passes: int
    """Buffered forward passes with any count, over the imported files."""
    moe_layers: tuple[int, ...] = ()
    inferred: Mapping[str, str] = field(default_factory=dict)
    """Model fields not given by the caller -> where their value came from."""
    seconds: float = 0.0

    def __post_init__(self) -> None:
        check_counts(self, "files_imported", "files_skipped_existing", "counted", "passes")
        object.__setattr__(self, "moe_layers", tuple(self.moe_layers))
        object.__setattr__(self, "inferred", dict(self.inferred))

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["moe_layers"] = list(self.moe_layers)
        return data


@dataclass(frozen=True)
class StatDump:
    """One dump file: its counts summed over the buffered passes."""

    path: Path
    digest: str
    counts: np.ndarray
    """(num_layers, num_experts) int64."""
    passes: int
    """Buffered passes with any count (the others are unused buffer slots)."""

    @property
    def source(self) -> str:
        return f"sha256:{self.digest}"


def load_stat_dump(path: Path, digest: str) -> StatDump:
    """Load and check one ``stat`` dump; ImportFormatError naming the file otherwise."""
    import torch

    try:
        data = torch.load(path, weights_only=True, map_location="cpu")
    except Exception as exc:  # torch raises many types for a file that is no torch.save
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ImportFormatError(f"{path}: cannot load it with torch.load ({first})") from None
    if not isinstance(data, dict):
        raise ImportFormatError(
            f"{path}: expected the dict of an SGLang stat dump (rank, {COUNT_KEY}, ...), "
            f"got {type(data).__name__}"
        )
    if COUNT_KEY not in data:
        hint = (
            " (it has 'records': a per_pass/per_token dump, not a stat dump)"
            if "records" in data
            else ""
        )
        raise ImportFormatError(
            f"{path}: no {COUNT_KEY!r} in the dump (keys {sorted(map(str, data))}){hint}; "
            "record with --expert-distribution-recorder-mode stat"
        )
    tensor = data[COUNT_KEY]
    if not isinstance(tensor, torch.Tensor):
        raise ImportFormatError(f"{path}: {COUNT_KEY} is a {type(tensor).__name__}, not a tensor")
    if tensor.ndim != 3:
        raise ImportFormatError(
            f"{path}: {COUNT_KEY} has shape {tuple(tensor.shape)}; expected 3 axes "
            "[buffered passes, layers, experts]"
        )
    if tensor.dtype.is_floating_point or tensor.dtype.is_complex or tensor.dtype == torch.bool:
        raise ImportFormatError(f"{path}: {COUNT_KEY} has dtype {tensor.dtype}; expected integers")
    arr = tensor.numpy()
    if arr.size and int(arr.min()) < 0:
        s, layer, e = (int(x) for x in np.argwhere(arr < 0)[0])
        raise ImportFormatError(
            f"{path}: negative count {int(arr[s, layer, e])} at pass {s}, layer {layer}, expert {e}"
        )
    passes = int(arr.reshape(arr.shape[0], -1).any(axis=1).sum()) if arr.size else 0
    return StatDump(path, digest, arr.sum(axis=0, dtype=np.int64), passes)


def _model_name(given: str | None, src: Path, existing: Manifest | None) -> tuple[str, str | None]:
    if given is not None:
        return given, None
    if existing is not None:
        return existing.model.name, None
    known = known_model_folder(src)
    if known is not None:
        return known, "folder name"
    raise ImportFormatError(
        f"{src}: cannot tell the model name (SGLang dumps do not name it); pass model_name "
        "(--model-name)"
    )


def _resolve(
    name: str,
    name_reason: str | None,
    given: ModelOverrides,
    moe_layers: Sequence[int] | None,
    existing: Manifest | None,
    dumps: list[StatDump],
    src: Path,
) -> tuple[ModelInfo, dict[str, str]]:
    """The model of the import (facts.resolve_model on the dumps' shape)."""
    known = find_known_model(name)
    if given.top_k is None and known is None and existing is None:
        raise ConfigError(
            f"{src}: top_k is needed and cannot be inferred from per-expert counts (they do "
            "not say how many experts each token chose): pass top_k (--top-k), or a model "
            "name the known-models table lists (docs/importers.md)"
        )
    first = dumps[0]
    L, E = first.counts.shape
    total = sum(d.counts for d in dumps)
    used = tuple(int(x) for x in np.flatnonzero(total.any(axis=1)))
    if not used and existing is None and moe_layers is None:
        raise ImportFormatError(f"{src}: every count in the dumps is zero; nothing to import")
    empty = np.zeros(0, np.int64)
    pseudo = ParsedRequest(
        source=SourceFile(first.path, first.path.name),
        token=empty,
        step=empty,
        phase=empty,
        layer=empty,
        experts=np.zeros((0, given.top_k or 1), np.int64),
        prompt_tokens=0,
        generated_tokens=0,
        num_forwards=0,
        moe_layers=used,
        num_layers_hint=L,
        locate=lambda i: COUNT_KEY,
    )
    model, inferred = resolve_model(
        name,
        name_reason,
        given,
        existing=existing.model if existing else None,
        first=pseudo,
        max_expert=E - 1,
    )
    if existing is None and known is None:  # say where the data facts came from
        data = {
            "num_layers": f"layers axis of {COUNT_KEY} in {first.path.name}",
            "moe_layers": "layers with a nonzero count in the dumps",
            "num_experts": f"experts axis of {COUNT_KEY} in {first.path.name}",
        }
        inferred.update({k: v for k, v in data.items() if k in inferred})
    if moe_layers is not None:
        wanted = tuple(sorted(int(x) for x in moe_layers))
        if existing is not None and wanted != model.moe_layers:
            raise ConfigError(
                f"moe_layers={list(wanted)} conflicts with the existing trace's "
                f"{list(model.moe_layers)}"
            )
        inferred.pop("moe_layers", None)
        try:
            model = dataclasses.replace(model, moe_layers=wanted, inferred=tuple(inferred))
        except MoetraceError as exc:  # ModelInfo's own checks
            raise ConfigError(f"import: inconsistent model facts: {exc}") from None
    return model, inferred


def _check_dump(dump: StatDump, model: ModelInfo) -> None:
    """The dump must fit the import's model (layers, experts, counts at MoE layers only)."""
    L, E = dump.counts.shape
    if L != model.num_layers:
        raise ImportFormatError(
            f"{dump.path}: {COUNT_KEY} has {L} layers, but the import's model "
            f"{model.name!r} has num_layers={model.num_layers} (dumps of another model?)"
        )
    if E != model.num_experts:
        raise ImportFormatError(
            f"{dump.path}: {COUNT_KEY} has {E} experts, but the import's model "
            f"{model.name!r} has num_experts={model.num_experts}"
        )
    dense = np.setdiff1d(np.flatnonzero(dump.counts.any(axis=1)), model.moe_layers)
    if dense.size:
        raise ImportFormatError(
            f"{dump.path}: counts at layer {int(dense[0])}, which is not a MoE layer of "
            f"{model.name!r} {list(model.moe_layers)}"
        )


def import_counts(
    src: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    model_name: str | None = None,
    num_layers: int | None = None,
    num_experts: int | None = None,
    top_k: int | None = None,
    shared_experts: int | None = None,
    bytes_per_expert: int | None = None,
    moe_layers: Sequence[int] | None = None,
) -> CountImportResult:
    """Import SGLang ``stat`` dumps at ``src`` (a ``.pt`` file or a folder of them, summed)
    into the count trace ``out``; files already in ``out`` (by content) are skipped."""
    started = time.perf_counter()
    given = ModelOverrides(
        model_name=model_name,
        num_layers=num_layers,
        num_experts=num_experts,
        top_k=top_k,
        shared_experts=shared_experts,
        bytes_per_expert=bytes_per_expert,
    )
    require_local(out, "import into a trace")
    src_path, out_path = Path(src), Path(out)
    files = find_files(src_path, SUFFIX)
    existing = existing_trace_manifest(out_path)
    if existing is not None and not existing.is_counts:
        raise TraceWriteError(
            f"{out_path} holds token-level routing, not counts; import {FORMAT} into another "
            "directory"
        )
    name, name_reason = _model_name(given.model_name, src_path, existing)
    if existing is not None and existing.model.name != name:
        raise TraceWriteError(
            f"{out_path} holds counts of model {existing.model.name!r}, not {name!r}; "
            "import into another directory (or pass the same model name)"
        )
    present = count_sources(out_path) if existing is not None else set()
    dumps: list[StatDump] = []
    skipped = 0
    for path in files:
        digest = file_sha256(path)
        if digest is None:
            raise ImportFormatError(f"{path}: cannot read the file")
        if f"sha256:{digest}" in present or any(d.digest == digest for d in dumps):
            log.debug("skipping %s: its counts are already in %s", path, out_path)
            skipped += 1
            continue
        dump = load_stat_dump(path, digest)
        if dumps and dump.counts.shape != dumps[0].counts.shape:
            (L, E), (L0, E0) = dump.counts.shape, dumps[0].counts.shape
            raise ImportFormatError(
                f"{path}: {COUNT_KEY} has {L} layers x {E} experts, but {dumps[0].path} has "
                f"{L0} x {E0} (dumps of two models?)"
            )
        dumps.append(dump)
    inferred: dict[str, str] = {}
    manifest = existing
    if dumps:  # else every file is in OUT already (so OUT exists)
        model, inferred = _resolve(name, name_reason, given, moe_layers, existing, dumps, src_path)
        for dump in dumps:
            _check_dump(dump, model)
        manifest = existing or Manifest(
            model=model,
            source=SourceInfo(
                kind="imported",
                origin=FORMAT,
                path=str(src_path.resolve()),
                tool_version=__version__,
            ),
            gate_weights=False,
            content=CONTENT_COUNTS,
        )
    imported = counted = passes = 0
    for dump in dumps:
        assert manifest is not None
        rows = dump.counts[list(manifest.model.moe_layers)]
        if write_counts(out_path, manifest, rows, source=dump.source) is None:
            skipped += 1  # committed meanwhile by another import
            continue
        imported += 1
        counted += int(rows.sum())
        passes += dump.passes
    result = CountImportResult(
        format=FORMAT,
        src=str(src_path),
        out=str(out_path),
        model_name=name,
        files_imported=imported,
        files_skipped_existing=skipped,
        counted=counted,
        passes=passes,
        moe_layers=manifest.model.moe_layers if manifest is not None else (),
        inferred=inferred,
        seconds=time.perf_counter() - started,
    )
    log.info(
        "imported %d %s file(s) (%d skipped as present, %d expert activations) into %s",
        imported,
        FORMAT,
        skipped,
        counted,
        out_path,
    )
    return result


class SglangCountsImporter:
    """``sglang-counts``: SGLang ``stat`` expert-distribution dumps -> a count trace."""

    name = "sglang-counts"
    description = "SGLang expert distribution recorder, stat mode (.pt): per-expert counts"

    def import_source(self, src: Path, out: Path, **facts: Any) -> CountImportResult:
        return import_counts(src, out, **facts)
