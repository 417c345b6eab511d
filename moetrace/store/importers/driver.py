"""``import_trace``: run an importer over SRC and write a moetrace trace into OUT.

Flow: find the files, resolve the model facts (caller > trace already in OUT > known
models > data; a pre-scan of all files only when the number of experts must come from the
data), then parse, check and write request by request with the store's TraceWriter, which
commits whole requests in batched parts. Requests already in OUT are skipped, so a failed
or interrupted import can be rerun: by request id, and by content (each request is tagged
with the sha256 of its source file, so the same files imported again from a renamed or
copied folder are found too); while an import runs (and after one failed) OUT holds
an ``.import-incomplete.json`` marker that ``moetrace inspect`` reports. Formats whose
files hold many requests (:class:`~moetrace.store.importers.base.ManyRequestImporter`)
go through the same flow: each file is parsed once into its requests, request ids come
from the data, a rerun skips the ids already in OUT, and a file is good or bad as a whole.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from moetrace import __version__
from moetrace.errors import ImportFormatError, TraceWriteError
from moetrace.progress import OnProgress, track
from moetrace.store.importers.base import (
    IMPORT_MARKER,
    Importer,
    ManyRequestImporter,
    ModelHint,
    ParsedRequest,
    SourceFile,
    SourceImporter,
    check_counts,
    get_importer,
    require_source,
)
from moetrace.store.importers.facts import (
    ModelOverrides,
    check_gate_weights,
    check_request,
    expert_id_gap,
    model_hint,
    resolve_model,
)
from moetrace.store.importers.known_models import find_known_model
from moetrace.store.location import require_local
from moetrace.store.reader import Trace, open_trace, read_manifest
from moetrace.store.schema import MANIFEST_NAME, Manifest, RequestRecord, SourceInfo
from moetrace.store.writer import TraceWriter

if TYPE_CHECKING:
    from moetrace.store.importers.sglang_counts import CountImportResult

log = logging.getLogger(__name__)

SCAN_CACHE_BYTES = 512 << 20
"""Parsed requests kept in memory between the pre-scan and the write pass."""

SOURCE_HASH_TAG = "source_sha256"
"""Request tag: sha256 (hex) of the bytes of the source file the request was imported from.

With the file's name (the ``source_file`` tag) it identifies the file, wherever it lies:
a file whose name and content match a request already in OUT is skipped as already
present even when its path (hence its request id) differs."""
SOURCE_FILE_TAG = "source_file"


@dataclass(frozen=True)
class BadFile:
    path: str
    reason: str


@dataclass(frozen=True)
class ImportResult:
    """What an import did."""

    format: str
    src: str
    out: str
    model_name: str
    requests_imported: int
    requests_skipped_existing: int
    prefill_tokens: int
    decode_tokens: int
    activations: int
    forwards: int
    bad_files: tuple[BadFile, ...] = ()
    inferred: Mapping[str, str] = field(default_factory=dict)
    """Model fields not given by the caller -> where their value came from."""
    seconds: float = 0.0
    requests_skipped_same_content: int = 0
    """Of ``requests_skipped_existing``, those whose request id is new but whose source
    file (name and sha256) is already in OUT: the same files from another path."""

    def __post_init__(self) -> None:
        check_counts(
            self,
            "requests_imported",
            "requests_skipped_existing",
            "prefill_tokens",
            "decode_tokens",
            "activations",
            "forwards",
            "requests_skipped_same_content",
        )
        object.__setattr__(self, "bad_files", tuple(self.bad_files))
        object.__setattr__(self, "inferred", dict(self.inferred))

    @property
    def tokens(self) -> dict[str, int]:
        return {"prefill": self.prefill_tokens, "decode": self.decode_tokens}

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["bad_files"] = [asdict(b) for b in self.bad_files]
        data["tokens"] = self.tokens
        return data


class _BadFiles:
    """Bad files: raise at once, or (skip_bad) record and go on."""

    def __init__(self, skip_bad: bool) -> None:
        self.skip_bad = skip_bad
        self.files: dict[str, BadFile] = {}

    def parse(
        self, importer: Importer, source: SourceFile, hint: ModelHint
    ) -> list[ParsedRequest] | None:
        """The requests of one file (one, or many for a ManyRequestImporter); None if bad."""
        try:
            if isinstance(importer, ManyRequestImporter):
                return list(importer.parse_many(source, hint))
            return [importer.parse(source)]
        except ImportFormatError as exc:
            self.add(source, exc)
            return None

    def add(self, source: SourceFile, exc: ImportFormatError) -> None:
        if not self.skip_bad:
            raise exc
        log.warning("skipping bad file: %s", exc)
        self.files[source.request_id] = BadFile(str(source.path), str(exc))


def existing_trace_manifest(out: Path) -> Manifest | None:
    """The manifest of the trace in OUT; None for a missing or empty OUT; TraceWriteError
    for an OUT that is a file or a non-empty folder that is not a trace."""
    if not out.exists():
        return None
    if not out.is_dir():
        raise TraceWriteError(
            f"{out}: exists and is not a directory; OUT must be a trace directory"
        )
    if (out / MANIFEST_NAME).exists():
        return read_manifest(out)
    if any(p.name != IMPORT_MARKER for p in out.iterdir()):
        raise TraceWriteError(
            f"{out}: not empty and not a moetrace trace (no {MANIFEST_NAME}); "
            "import into a new or empty directory"
        )
    return None


def _write_marker(out: Path, info: dict[str, Any]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / f".tmp-{IMPORT_MARKER}-{os.getpid()}"
    tmp.write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, out / IMPORT_MARKER)


def file_sha256(path: Path) -> str | None:
    """sha256 (hex) of a file's bytes, or None when it cannot be read (parsing reports it)."""
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                digest.update(block)
    except OSError:
        return None
    return digest.hexdigest()


_ContentKey = tuple[str, str]
"""(file name, sha256 of its bytes) of a source file."""


def _present_contents(trace: Trace) -> dict[_ContentKey, str]:
    """The trace's requests by source file: (file name, sha256) -> first request id.

    Requests imported before the sha256 tag existed (or not imported) have no key."""
    table = trace.requests().select(["request_id", "tags"])
    out: dict[_ContentKey, str] = {}
    for rid, tags in zip(table.column(0).to_pylist(), table.column(1).to_pylist(), strict=True):
        tag = dict(tags or ())
        digest, name = tag.get(SOURCE_HASH_TAG), tag.get(SOURCE_FILE_TAG)
        if digest and name:
            out.setdefault((Path(name).name, digest), rid)
    return out


def _gap_error(
    files: list[tuple[SourceFile, int, str]], ids: np.ndarray, core_top: int
) -> ImportFormatError:
    """The error for expert ids far above the others while num_experts is inferred."""
    stray = [(f, top, where) for f, top, where in files if top > core_top]
    f, top, where = stray[0]
    stray_ids = int((ids > core_top).sum())
    more = f", {len(stray)} files hold such ids" if len(stray) > 1 else ""
    return ImportFormatError(
        f"{f.path}: {where}: expert id {top} is far above the bulk of the ids (dense up to "
        f"{core_top}, then {stray_ids} stray id(s) up to {int(ids.max())}{more}), so the "
        f"number of experts cannot be inferred from the data: pass --num-experts "
        f"({core_top + 1} makes such files bad files, see --skip-bad) or the model's real count"
    )


def _progress(
    items: list[SourceFile], desc: str, enabled: bool, on_progress: OnProgress | None
) -> Any:
    return track(items, len(items), label=desc, unit="file", enabled=enabled,
                 on_progress=on_progress)  # fmt: skip


def import_trace(
    format: str,
    src: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    model_name: str | None = None,
    num_layers: int | None = None,
    num_experts: int | None = None,
    top_k: int | None = None,
    shared_experts: int | None = None,
    bytes_per_expert: int | None = None,
    skip_bad: bool = False,
    progress: bool = True,
    on_progress: OnProgress | None = None,
) -> ImportResult | CountImportResult:
    """Import the published trace files at ``src`` (format ``format``) into trace ``out``.

    A format of per-expert counts (:class:`SourceImporter`, e.g. ``sglang-counts``) writes
    a count trace and returns its :class:`CountImportResult`; ``skip_bad`` and progress
    do not apply to it.

    Raises ImportFormatError naming file and line for a malformed file unless
    ``skip_bad``, in which case bad files are skipped and listed in the result.
    ``progress``: a bar when stderr is a terminal, else ``on_progress(done, total,
    elapsed)`` every few seconds (see :mod:`moetrace.progress`).
    """
    started = time.perf_counter()
    importer = get_importer(format)
    if isinstance(importer, SourceImporter):  # not routing (counts): its own trace kind
        return importer.import_source(  # type: ignore[no-any-return]
            Path(src), Path(out), model_name=model_name, num_layers=num_layers,
            num_experts=num_experts, top_k=top_k, shared_experts=shared_experts,
            bytes_per_expert=bytes_per_expert,
        )  # fmt: skip
    given = ModelOverrides(
        model_name=model_name,
        num_layers=num_layers,
        num_experts=num_experts,
        top_k=top_k,
        shared_experts=shared_experts,
        bytes_per_expert=bytes_per_expert,
    )
    require_local(out, "import into a trace")
    src_path, out_path = require_source(Path(src)), Path(out)
    existing = existing_trace_manifest(out_path)
    name, name_reason = given.model_name, None
    if name is None:
        name = importer.model_name_hint(src_path) or (existing.model.name if existing else None)
        name_reason = "folder name"
        if not name:
            raise ImportFormatError(f"{src_path}: cannot tell the model name; pass model_name")
    if existing is not None and existing.model.name != name:
        raise TraceWriteError(
            f"{out_path} holds a trace of model {existing.model.name!r}, not {name!r}; "
            "import into another directory (or pass the same model name)"
        )
    files = importer.discover(src_path, name)
    seen: dict[str, Path] = {}
    for f in files:
        if f.request_id in seen:
            raise ImportFormatError(
                f"{f.path}: request id {f.request_id!r} also comes from {seen[f.request_id]}"
            )
        seen[f.request_id] = f.path
    many = isinstance(importer, ManyRequestImporter)
    have: set[str] = set()
    forward = 0
    digests: dict[Path, str | None] = {}

    def digest_of(path: Path) -> str | None:
        if path not in digests:
            digests[path] = file_sha256(path)
        return digests[path]

    present: dict[_ContentKey, str] = {}
    if existing is not None:
        trace = open_trace(out_path)
        have = set(trace.sql("SELECT request_id FROM requests").column(0).to_pylist())
        top = trace.sql("SELECT max(forward) FROM activations_raw").column(0)[0].as_py()
        forward = 0 if top is None else int(top) + 1
        present = _present_contents(trace)
    # files of many requests: ids come from the data and are checked after parsing
    todo = files if many else [f for f in files if f.request_id not in have]
    same_content = 0
    if present and not many:  # the same file (name and bytes) already imported elsewhere
        kept = []
        for f in todo:
            digest = digest_of(f.path)
            twin = present.get((f.path.name, digest)) if digest else None
            if twin is None:
                kept.append(f)
                continue
            log.debug("skipping %s: the same file as request %r already in %s", f.path, twin, out)
            same_content += 1
        todo = kept
    skipped = len(files) - len(todo)
    bad = _BadFiles(skip_bad)
    hint = model_hint(name, given, existing.model if existing else None)

    already: dict[str, int] = {}  # file -> its requests already in OUT (files of many)

    def parse(f: SourceFile) -> list[ParsedRequest] | None:
        parsed = bad.parse(importer, f, hint)
        if parsed is None:
            return None
        fresh = [p for p in parsed if p.source.request_id not in have]
        already[f.request_id] = len(parsed) - len(fresh)
        return fresh

    cache: dict[str, list[ParsedRequest]] = {}
    first: ParsedRequest | None = None
    max_expert: int | None = None
    scan = existing is None and given.num_experts is None and find_known_model(name) is None
    if scan:  # the number of experts must come from the data: look at every file first
        max_expert, cached = -1, 0
        distinct = np.zeros(0, np.int64)
        tops: list[tuple[SourceFile, int, str]] = []  # per request: highest id, where
        for f in _progress(todo, f"scan {format}", progress, on_progress):
            requests = parse(f)
            if requests is None:
                continue
            for parsed in requests:
                first = first or parsed
                if parsed.experts.size:
                    top_row = int(np.argmax(parsed.experts.max(axis=1)))
                    top = int(parsed.experts[top_row].max())
                    max_expert = max(max_expert, top)
                    tops.append((parsed.source, top, parsed.locate(top_row)))
                    distinct = np.union1d(distinct, np.unique(parsed.experts))
            size = sum(p.nbytes for p in requests)
            if cached + size <= SCAN_CACHE_BYTES:
                cache[f.request_id] = requests
                cached += size
        core_top = expert_id_gap(distinct)
        if core_top is not None:  # one stray id must not define the number of experts
            raise _gap_error(tops, distinct, core_top)
    elif existing is None:  # layers and top-k come from the first good request
        for f in todo:
            requests = parse(f)
            if requests is not None:
                cache[f.request_id] = requests
                if requests:
                    first = requests[0]
                    break
    if first is None and todo and existing is None:
        raise ImportFormatError(
            f"{src_path}: no importable files ({len(bad.files)} bad)"
            if not many
            else f"{src_path}: no requests to import ({len(bad.files)} bad files)"
        )
    model, inferred = resolve_model(
        name,
        name_reason,
        given,
        existing=existing.model if existing else None,
        first=first,
        max_expert=max_expert,
    )
    manifest = existing or Manifest(
        model=model,
        source=SourceInfo(
            kind="imported",
            origin=importer.name,
            path=str(src_path.resolve()),
            tool_version=__version__,
        ),
        gate_weights=first is not None and first.weights is not None,
    )
    counts = {"requests": 0, "prefill": 0, "decode": 0, "activations": 0, "forwards": 0}
    written: dict[str, Path] = {}  # request id -> file, for files of many requests
    marker = {"format": format, "src": str(src_path), "started": time.time(), "error": None}
    _write_marker(out_path, marker)
    try:
        with TraceWriter(out_path, manifest) as writer:
            for f in _progress(todo, f"import {format}", progress, on_progress):
                if f.request_id in bad.files:
                    continue
                requests = cache.pop(f.request_id, None)
                if requests is None:
                    requests = parse(f)
                    if requests is None:
                        continue
                try:  # a file is written whole or not at all
                    pending: dict[str, Path] = {}
                    for parsed in requests:
                        _check_unique(parsed, written, pending)
                        check_request(parsed, model)
                        check_gate_weights(parsed, manifest.gate_weights)
                except ImportFormatError as exc:
                    bad.add(f, exc)
                    continue
                for parsed in requests:
                    _write(writer, parsed, forward, digest_of(parsed.source.path))
                    written[parsed.source.request_id] = parsed.source.path
                    forward += parsed.num_forwards
                    counts["requests"] += 1
                    counts["prefill"] += parsed.prompt_tokens
                    counts["decode"] += parsed.generated_tokens
                    counts["activations"] += parsed.experts.shape[0]
                    counts["forwards"] += parsed.num_forwards
    except BaseException as exc:
        _write_marker(out_path, {**marker, "error": str(exc) or type(exc).__name__})
        raise
    (out_path / IMPORT_MARKER).unlink(missing_ok=True)
    skipped += sum(already.values())
    result = ImportResult(
        format=format,
        src=str(src_path),
        out=str(out_path),
        model_name=model.name,
        requests_imported=counts["requests"],
        requests_skipped_existing=skipped,
        requests_skipped_same_content=same_content,
        prefill_tokens=counts["prefill"],
        decode_tokens=counts["decode"],
        activations=counts["activations"],
        forwards=counts["forwards"],
        bad_files=tuple(bad.files.values()),
        inferred=inferred,
        seconds=time.perf_counter() - started,
    )
    log.info(
        "imported %d requests (%d skipped as present, %d of them by content, %d bad) "
        "into %s in %.1f s",
        result.requests_imported,
        skipped,
        same_content,
        len(result.bad_files),
        out_path,
        result.seconds,
    )
    return result


def _check_unique(
    parsed: ParsedRequest, written: dict[str, Path], pending: dict[str, Path]
) -> None:
    """A request id must not come from two places of one import (``written``: ids already
    written; ``pending``: ids of the file being checked, the request is added to it)."""
    rid = parsed.source.request_id
    where = written.get(rid) or pending.get(rid)
    if where is not None:
        same = "earlier in this file" if where == parsed.source.path else f"from {where}"
        raise ImportFormatError(
            f"{parsed.source.path}: {parsed.locate(0)}: request id {rid!r} also comes {same}"
        )
    pending[rid] = parsed.source.path


def _write(writer: TraceWriter, parsed: ParsedRequest, forward: int, digest: str | None) -> None:
    src = parsed.source
    tags = {SOURCE_FILE_TAG: src.path.name, **src.tags}
    if digest:
        tags[SOURCE_HASH_TAG] = digest
    writer.write_request(
        RequestRecord(
            request_id=src.request_id,
            prompt_tokens=parsed.prompt_tokens,
            generated_tokens=parsed.generated_tokens,
            prompt_text=parsed.prompt_text,
            tags=tags,
            arrival_time=parsed.arrival_time,
        ),
        token=parsed.token,
        step=parsed.step,
        phase=parsed.phase,
        forward=forward + parsed.step.astype("int64"),
        layer=parsed.layer,
        experts=parsed.experts,
        weights=parsed.weights,
    )
