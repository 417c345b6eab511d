"""Open and validate traces; read them in bounded memory; query them with DuckDB."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from moetrace.errors import TraceFormatError
from moetrace.store import schema as S

log = logging.getLogger(__name__)


def read_manifest(path: str | os.PathLike[str]) -> S.Manifest:
    directory = Path(path)
    target = directory / S.MANIFEST_NAME
    if not directory.exists():
        raise TraceFormatError(f"{directory}: no such trace directory")
    if not directory.is_dir():
        raise TraceFormatError(
            f"{directory}: not a directory (a trace is a directory with manifest.json)"
        )
    if not target.exists():
        raise TraceFormatError(f"{target}: missing manifest (is {directory} a moetrace trace?)")
    try:
        data = json.loads(target.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise TraceFormatError(f"{target}: not valid JSON ({exc})") from None
    return S.Manifest.from_json(data, where=str(target))


def committed_parts(path: str | os.PathLike[str]) -> list[tuple[Path, Path]]:
    """(activations part, requests part) pairs that are committed, in name order.

    An activations part without its requests part is an interrupted commit and is skipped;
    a requests part without its activations part means a file was lost, which is an error.
    """
    directory = Path(path)
    act_dir = directory / S.ACTIVATIONS_DIR
    req_dir = directory / S.REQUESTS_DIR

    def names(d: Path) -> set[str]:
        if not d.is_dir():
            return set()
        return {
            p.name
            for p in d.iterdir()
            if p.name.startswith(S.PART_PREFIX) and p.name.endswith(".parquet")
        }

    acts, reqs = names(act_dir), names(req_dir)
    missing = sorted(reqs - acts)
    if missing:
        raise TraceFormatError(
            f"{req_dir / missing[0]}: committed requests part has no activations part "
            f"({act_dir / missing[0]} is missing)"
        )
    orphans = sorted(acts - reqs)
    if orphans:
        log.warning(
            "%s: ignoring %d uncommitted activations part(s), e.g. %s",
            directory,
            len(orphans),
            orphans[0],
        )
    return [(act_dir / n, req_dir / n) for n in sorted(acts & reqs)]


def _check_part(part: Path, expected: pa.Schema) -> int:
    """Validate one part's footer and schema; return its row count."""
    try:
        meta = pq.read_metadata(part)
        schema = meta.schema.to_arrow_schema()
    except (OSError, pa.ArrowException) as exc:
        raise TraceFormatError(f"{part}: corrupt or truncated Parquet part ({exc})") from None
    version = (schema.metadata or {}).get(b"moetrace.format_version")
    if version is None or version.decode() != str(S.FORMAT_VERSION):
        got = version.decode() if version else "none"
        raise TraceFormatError(
            f"{part}: part of trace format version {got}, expected {S.FORMAT_VERSION}"
        )
    got_fields = [(f.name, f.type) for f in schema]
    want_fields = [(f.name, f.type) for f in expected]
    if got_fields != want_fields:
        diff = [f"{g}" for g in got_fields if g not in want_fields][:3]
        miss = [f"{w}" for w in want_fields if w not in got_fields][:3]
        raise TraceFormatError(
            f"{part}: schema does not match the manifest (unexpected {diff or 'nothing'}, missing {miss or 'nothing'})"
        )
    return int(meta.num_rows)


@dataclass(frozen=True)
class PartInfo:
    activations: Path
    requests: Path
    activation_rows: int
    request_rows: int
    bytes: int


class Trace:
    """A validated, read-only view of a trace directory."""

    def __init__(self, path: str | os.PathLike[str], *, validate: bool = True) -> None:
        self.path = Path(path)
        self.manifest = read_manifest(self.path)
        self._act_schema = S.activations_schema(self.manifest)
        parts = []
        for act, req in committed_parts(self.path):
            if validate:
                n_act = _check_part(act, self._act_schema)
                n_req = _check_part(req, S.REQUESTS_SCHEMA)
            else:
                n_act = pq.read_metadata(act).num_rows
                n_req = pq.read_metadata(req).num_rows
            parts.append(PartInfo(act, req, n_act, n_req, act.stat().st_size + req.stat().st_size))
        self.parts: tuple[PartInfo, ...] = tuple(parts)

    # ------------------------------------------------------------------ facts
    @property
    def top_k(self) -> int:
        return self.manifest.top_k

    @property
    def num_activations(self) -> int:
        return sum(p.activation_rows for p in self.parts)

    @property
    def num_requests(self) -> int:
        return sum(p.request_rows for p in self.parts)

    @property
    def size_bytes(self) -> int:
        manifest = self.path / S.MANIFEST_NAME
        return sum(p.bytes for p in self.parts) + manifest.stat().st_size

    @property
    def activation_files(self) -> list[str]:
        return [str(p.activations) for p in self.parts]

    @property
    def request_files(self) -> list[str]:
        return [str(p.requests) for p in self.parts]

    @property
    def activation_schema(self) -> pa.Schema:
        return self._act_schema

    # ------------------------------------------------------------------ reading
    def requests(self) -> pa.Table:
        """The requests table, ordered by arrival."""
        tables = [self._read(p.requests, None) for p in self.parts]
        if not tables:
            return S.REQUESTS_SCHEMA.empty_table()
        table = pa.concat_tables(tables)
        return table.sort_by([("arrival", "ascending"), ("request_id", "ascending")])

    def _read(self, part: Path, columns: Sequence[str] | None) -> pa.Table:
        try:
            return pq.read_table(part, columns=list(columns) if columns else None)
        except (OSError, pa.ArrowException) as exc:
            raise TraceFormatError(f"{part}: cannot read part ({exc})") from None

    def iter_activations(
        self, columns: Sequence[str] | None = None, batch_size: int = 1 << 18
    ) -> Iterator[pa.RecordBatch]:
        """Stream activation rows part by part in bounded memory."""
        for part in self.parts:
            try:
                pf = pq.ParquetFile(part.activations)
                yield from pf.iter_batches(
                    batch_size=batch_size, columns=list(columns) if columns else None
                )
            except (OSError, pa.ArrowException) as exc:
                raise TraceFormatError(f"{part.activations}: cannot read part ({exc})") from None

    def read_activations(self, columns: Sequence[str] | None = None) -> pa.Table:
        """All activation rows in one table (only for traces that fit in memory)."""
        tables = [self._read(p.activations, columns) for p in self.parts]
        if not tables:
            schema = self._act_schema
            if columns:
                schema = pa.schema([schema.field(c) for c in columns])
            return schema.empty_table()
        return pa.concat_tables(tables)

    # ------------------------------------------------------------------ SQL
    @cached_property
    def _connection(self):  # type: ignore[no-untyped-def]
        from moetrace.store.sql import connect

        return connect(self)

    def sql(self, query: str) -> pa.Table:
        """Run a DuckDB query against the trace's views; see docs/trace-format.md."""
        from moetrace.store.sql import run_query

        return run_query(self._connection, query)


def open_trace(path: str | os.PathLike[str], *, validate: bool = True) -> Trace:
    """Open a trace directory, checking its manifest and every part's schema."""
    return Trace(path, validate=validate)
