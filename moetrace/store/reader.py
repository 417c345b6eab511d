"""Open and validate traces; read them in bounded memory; query them with DuckDB."""

from __future__ import annotations

import copy
import json
import logging
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import cached_property

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from moetrace.errors import TraceFormatError
from moetrace.store import schema as S
from moetrace.store.location import RemotePath, TracePath, arrow_path, as_path, missing_hint

log = logging.getLogger(__name__)


def read_manifest(path: str | os.PathLike[str]) -> S.Manifest:
    """The manifest of the trace at ``path`` (a local folder or an ``s3://`` location)."""
    directory = as_path(path)
    target = directory / S.MANIFEST_NAME
    if not directory.exists():
        raise TraceFormatError(f"{directory}: no such trace directory{missing_hint(directory)}")
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


def committed_parts(path: str | os.PathLike[str]) -> list[tuple[TracePath, TracePath]]:
    """(activations part, requests part) pairs that are committed, in name order.

    An activations part without its requests part is an interrupted commit and is skipped;
    a requests part without its activations part means a file was lost, which is an error.
    """
    directory = as_path(path)
    act_dir = directory / S.ACTIVATIONS_DIR
    req_dir = directory / S.REQUESTS_DIR

    def names(d: TracePath) -> set[str]:
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


def committed_count_parts(path: str | os.PathLike[str]) -> list[TracePath]:
    """The committed counts parts of a count trace, in name order (``.tmp-`` files are
    writes in progress and skipped)."""
    directory = as_path(path) / S.COUNTS_DIR
    if not directory.is_dir():
        return []
    return sorted(
        p
        for p in directory.iterdir()
        if p.name.startswith(S.PART_PREFIX) and p.name.endswith(".parquet")
    )


def _read_table(part: TracePath, columns: Sequence[str] | None = None) -> pa.Table:
    """Read a part (local or remote) with pyarrow; TraceFormatError naming it on failure."""
    fs, where = arrow_path(part)
    try:
        return pq.read_table(where, columns=list(columns) if columns else None, filesystem=fs)
    except (OSError, pa.ArrowException) as exc:
        raise TraceFormatError(f"{part}: cannot read part ({exc})") from None


def _read_metadata(part: TracePath) -> pq.FileMetaData:
    fs, where = arrow_path(part)
    return pq.read_metadata(where, filesystem=fs)


def _check_counts_values(part: TracePath, manifest: S.Manifest) -> None:
    """Layers, experts and counts of a counts part must fit the manifest (parts are small:
    at most layers x experts rows per source, so the columns are read)."""
    table = _read_table(part, ["layer", "expert", "count"])
    layer, expert, count = (table.column(i).to_numpy() for i in range(3))
    bad_layer = np.setdiff1d(layer, np.asarray(manifest.model.moe_layers))
    if bad_layer.size:
        raise TraceFormatError(
            f"{part}: layer {int(bad_layer[0])} is not a MoE layer of the manifest "
            f"{list(manifest.model.moe_layers)} (the manifest and the data disagree)"
        )
    E = manifest.model.num_experts
    if expert.size and (int(expert.min()) < 0 or int(expert.max()) >= E):
        bad = int(expert[(expert < 0) | (expert >= E)][0])
        raise TraceFormatError(
            f"{part}: expert id {bad} is out of range [0, {E}) for the manifest's "
            f"num_experts={E} (the manifest and the data disagree)"
        )
    if count.size and int(count.min()) < 0:
        raise TraceFormatError(f"{part}: negative count {int(count.min())}")


def _check_part(part: TracePath, expected: pa.Schema) -> pq.FileMetaData:
    """Validate one part's footer and schema; return its Parquet metadata."""
    try:
        meta = _read_metadata(part)
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
    return meta


def expert_id_columns(manifest: S.Manifest) -> list[str]:
    """The activation columns holding expert ids (``e*``, and ``s*`` when speculative)."""
    cols = S.expert_columns(manifest.top_k)
    if manifest.speculative:
        cols += S.speculative_columns(manifest.top_k)
    return cols


def expert_id_error(part: TracePath, column: str, value: int, num_experts: int) -> TraceFormatError:
    """The error for an expert id the manifest's ``num_experts`` does not allow."""
    return TraceFormatError(
        f"{part}: expert id {value} in column {column} is out of range "
        f"[{S.DROPPED_EXPERT}, {num_experts}) for the manifest's num_experts={num_experts} "
        "(the manifest and the data disagree)"
    )


def _bad_id(values: np.ndarray, num_experts: int) -> int | None:
    """The first expert id outside ``[-1, num_experts)`` in ``values``, or None."""
    if not values.size:
        return None
    if values.min() >= S.DROPPED_EXPERT and values.max() < num_experts:
        return None
    bad = values[(values < S.DROPPED_EXPERT) | (values >= num_experts)]
    return int(bad[0])


def _check_expert_ids(part: TracePath, meta: pq.FileMetaData, manifest: S.Manifest) -> None:
    """Check that the expert ids of an activations part fit the manifest's ``num_experts``.

    Uses the row-group min/max statistics of the footer (the writer writes them for the
    expert columns); only a column of a row group without statistics is read. Nulls
    (``s*`` where there is no prediction) are not ids.
    """
    num_experts = manifest.model.num_experts
    names = meta.schema.names
    unknown: list[str] = []
    for col in expert_id_columns(manifest):
        i = names.index(col)
        for rg in range(meta.num_row_groups):
            chunk = meta.row_group(rg).column(i)
            stats = chunk.statistics
            if stats is None or not stats.has_min_max:
                if chunk.num_values and (stats is None or stats.null_count != chunk.num_values):
                    unknown.append(col)
                    break
                continue
            for value in (stats.min, stats.max):
                if value < S.DROPPED_EXPERT or value >= num_experts:
                    raise expert_id_error(part, col, int(value), num_experts)
    if unknown:  # no statistics (not written by moetrace): read just those columns
        table = _read_table(part, unknown)
        check_expert_columns(part, table, num_experts)


def check_expert_columns(part: TracePath, table: pa.Table, num_experts: int) -> None:
    """Raise :func:`expert_id_error` for the first out-of-range id in ``table``'s columns."""
    for col in table.column_names:
        values = table.column(col).drop_null().to_numpy()
        bad = _bad_id(values, num_experts)
        if bad is not None:
            raise expert_id_error(part, col, bad, num_experts)


def _check_unique_requests(parts: Sequence[TracePath]) -> None:
    """Raise TraceFormatError when a request id is in two requests parts (or twice in one).

    The writer never commits an id twice (it refuses ids already in the trace, under the
    trace lock), so a repeated id means a part pair was copied: counting it would count
    its requests twice.
    """
    seen: dict[str, TracePath] = {}
    for part in parts:
        ids = _read_table(part, ["request_id"]).column(0).to_pylist()
        mine: set[str] = set()
        for rid in ids:
            if rid in mine:
                raise TraceFormatError(f"{part}: request {rid!r} is listed twice in this part")
            mine.add(rid)
        clash = [rid for rid in ids if rid in seen]
        if clash:
            other = seen[clash[0]]
            raise TraceFormatError(
                f"{part}: request {clash[0]!r} is also in {other} ({len(clash)} of this "
                f"part's {len(ids)} request ids repeat; a copied part? remove one of the two "
                f"part pairs, {part.name} or {other.name}, from both requests/ and activations/)"
            )
        seen.update(dict.fromkeys(ids, part))


@dataclass(frozen=True)
class PartInfo:
    activations: TracePath
    requests: TracePath
    activation_rows: int
    request_rows: int
    bytes: int


class Trace:
    """A validated, read-only view of a trace directory.

    ``path`` is a :class:`pathlib.Path` for a local trace, a
    :class:`~moetrace.store.location.RemotePath` (prints as its ``s3://`` URL) for one on
    object storage, which is read in place through :attr:`fs`."""

    def __init__(self, path: str | os.PathLike[str], *, validate: bool = True) -> None:
        self.path: TracePath = as_path(path)
        self.manifest = read_manifest(self.path)
        self._act_schema = S.activations_schema(self.manifest)
        parts = []
        for act, req in committed_parts(self.path):
            if validate:
                act_meta = _check_part(act, self._act_schema)
                _check_expert_ids(act, act_meta, self.manifest)
                n_act = act_meta.num_rows
                n_req = _check_part(req, S.REQUESTS_SCHEMA).num_rows
            else:
                n_act = _read_metadata(act).num_rows
                n_req = _read_metadata(req).num_rows
            parts.append(PartInfo(act, req, n_act, n_req, act.stat().st_size + req.stat().st_size))
        if validate:
            _check_unique_requests([p.requests for p in parts])
        self.parts: tuple[PartInfo, ...] = tuple(parts)
        count_parts = committed_count_parts(self.path) if self.manifest.is_counts else []
        if self.manifest.is_counts and parts:
            raise TraceFormatError(
                f"{parts[0].activations}: the manifest says the trace holds counts only "
                "(content: counts), but it has activations parts"
            )
        for part in count_parts if validate else ():
            _check_part(part, S.COUNTS_SCHEMA)
            _check_counts_values(part, self.manifest)
        self.count_parts: tuple[TracePath, ...] = tuple(count_parts)

    def with_parts(self, keep: Sequence[int]) -> Trace:
        """The same trace restricted to the committed parts ``keep`` (indices into
        :attr:`parts`): a shard of its requests for a task that reads only those parts."""
        out = copy.copy(self)
        out.parts = tuple(self.parts[i] for i in keep)
        out.__dict__.pop("_connection", None)
        return out

    # ------------------------------------------------------------------ location
    @property
    def fs(self) -> pafs.FileSystem:
        """The pyarrow filesystem the trace is read through (local or S3)."""
        return arrow_path(self.path)[0]

    @property
    def is_remote(self) -> bool:
        """Whether the trace is on object storage (``s3://``), read in place."""
        return isinstance(self.path, RemotePath)

    # ------------------------------------------------------------------ facts
    @property
    def top_k(self) -> int:
        return self.manifest.top_k

    @property
    def is_count_trace(self) -> bool:
        """Whether the trace holds per-expert counts only (no token-level routing)."""
        return self.manifest.is_counts

    @property
    def count_files(self) -> list[str]:
        return [str(p) for p in self.count_parts]

    @property
    def num_activations(self) -> int:
        return sum(p.activation_rows for p in self.parts)

    @property
    def num_requests(self) -> int:
        return sum(p.request_rows for p in self.parts)

    @property
    def size_bytes(self) -> int:
        manifest = self.path / S.MANIFEST_NAME
        counts = sum(p.stat().st_size for p in self.count_parts)
        return sum(p.bytes for p in self.parts) + counts + manifest.stat().st_size

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

    def counts(self) -> pa.Table:
        """Per-expert activation counts: ``layer`` (model layer id), ``expert``, ``phase``
        (string; null when the source does not say) and ``count``, summed over sources,
        zero counts omitted. A count trace reads its counts parts; a routing trace counts
        its activations (dropped slots excluded); both through the ``counts`` SQL view."""
        return self.sql(
            "SELECT layer, expert, phase, sum(count)::BIGINT AS count FROM counts "
            "GROUP BY ALL HAVING sum(count) > 0 ORDER BY layer, expert, phase NULLS FIRST"
        )

    def _read(self, part: TracePath, columns: Sequence[str] | None) -> pa.Table:
        return _read_table(part, columns)

    def iter_activations(
        self, columns: Sequence[str] | None = None, batch_size: int = 1 << 18
    ) -> Iterator[pa.RecordBatch]:
        """Stream activation rows part by part in bounded memory."""
        for part in self.parts:
            fs, where = arrow_path(part.activations)
            try:
                with fs.open_input_file(where) as fh:
                    yield from pq.ParquetFile(fh).iter_batches(
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

    def check_expert_ids(self) -> None:
        """Read the expert id columns of every part and raise TraceFormatError naming the
        first part holding an id outside ``[-1, num_experts)``.

        :func:`open_trace` checks the same from the parts' footer statistics; this reads
        the data (for ``validate=False`` opens and for callers that found a bad id)."""
        cols = expert_id_columns(self.manifest)
        for p in self.parts:
            table = self._read(p.activations, cols)
            check_expert_columns(p.activations, table, self.manifest.model.num_experts)

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
    """Open a trace directory (a local path or ``s3://bucket/prefix``, read in place),
    checking its manifest and every part.

    With ``validate`` (the default) each committed part's footer and schema are checked,
    the expert ids of each activations part against ``model.num_experts`` (from the
    footer's min/max statistics), and that no request id is in two requests parts (a
    copied part pair); each problem is a TraceFormatError naming the file. Without it only
    the manifest is checked and the part footers are read for their row counts.
    """
    return Trace(path, validate=validate)
