"""DuckDB views over a trace, for users' own SQL and for the tuner's heavy lifting.

Views (see docs/trace-format.md):

``activations``       one row per (request, token, MoE layer): the physical columns plus
                      ``experts`` (SMALLINT[]) and ``weights`` (FLOAT[]) lists
``activations_long``  one row per (request, token, layer, rank, expert, weight)
``requests``          one row per request
``manifest``          one row with the manifest's scalar fields
``moe_layers``        one row per MoE layer: ``layer``, ``layer_index``
``counts``            per-expert activation counts: ``layer, expert, phase, count, source``
                      (a count trace's counts parts; for a routing trace, its activations
                      counted, ``source`` null)

``connect(trace, read_only=True)`` and :func:`open_read_only` (what ``moetrace sql`` uses)
lock the connection down for untrusted SQL: see :func:`lock_down` and :func:`check_read_only`.

A local trace's views read its parts with DuckDB's ``read_parquet``; a trace on object
storage (``s3://``) is read in place through pyarrow datasets registered on the connection
(DuckDB pushes projections and filters into them; no DuckDB extension is needed).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Sequence
from functools import cached_property

import duckdb
import pyarrow as pa
import pyarrow.dataset as ds

from moetrace.errors import QueryError
from moetrace.store import schema as S
from moetrace.store.location import RemotePath, TracePath, arrow_path
from moetrace.store.reader import Trace

READ_ONLY = "moetrace sql is read-only"

# Applied in this order after the views exist; lock_configuration last, so that no later
# statement can SET (or RESET) any of them back.
READ_ONLY_SETTINGS = (
    ("enable_external_access", "false"),
    ("autoinstall_known_extensions", "false"),
    ("autoload_known_extensions", "false"),
    ("allow_community_extensions", "false"),
    ("allow_unsigned_extensions", "false"),
    ("python_enable_replacements", "false"),
    ("lock_configuration", "true"),
)

# EXPLAIN [(options)] [ANALYZE] [(options)], before the explained statement.
_EXPLAIN = re.compile(
    r"\s*explain\s*(?:\([^)]*\)\s*)?(?:analy[sz]e\s+)?(?:\([^)]*\)\s*)?", re.IGNORECASE
)


def _files_sql(files: list[str]) -> str:
    return "[" + ", ".join("'" + f.replace("'", "''") + "'" for f in files) + "]"


def _source(
    con: duckdb.DuckDBPyConnection, name: str, parts: Sequence[TracePath], schema: pa.Schema
) -> str:
    """A FROM clause reading the parts, or an empty registered table when there are none.

    Local parts: ``read_parquet``. Remote parts: a pyarrow dataset over them (read in place
    through the trace's filesystem), registered as ``_parts_<name>``."""
    if not parts:
        con.register(f"_empty_{name}", schema.empty_table())
        return f"_empty_{name}"
    if not isinstance(parts[0], RemotePath):
        return f"read_parquet({_files_sql([str(p) for p in parts])})"
    fs = arrow_path(parts[0])[0]
    keys = [arrow_path(p)[1] for p in parts]
    dataset = ds.dataset(keys, filesystem=fs, format="parquet", schema=schema)
    con.register(f"_parts_{name}", dataset)
    return f"_parts_{name}"


def connect(
    trace: Trace, con: duckdb.DuckDBPyConnection | None = None, *, read_only: bool = False
) -> duckdb.DuckDBPyConnection:
    """A DuckDB connection with the trace's views defined.

    ``read_only=True`` then locks it down with :func:`lock_down` (for users' SQL; the
    connection can read nothing but the trace's own parts afterwards, so do not pass a shared
    ``con``). Run queries on it with ``run_query(con, query, read_only=True)``.
    """
    con = con or duckdb.connect()
    k = trace.top_k
    act_src = _source(
        con, "activations", [p.activations for p in trace.parts], trace.activation_schema
    )
    req_src = _source(con, "requests", [p.requests for p in trace.parts], S.REQUESTS_SCHEMA)
    e_cols = S.expert_columns(k)
    w_cols = S.weight_columns(k)
    con.execute(f"CREATE OR REPLACE VIEW activations_raw AS SELECT * FROM {act_src}")
    con.execute(
        "CREATE OR REPLACE VIEW activations AS SELECT *, "
        f"[{', '.join(e_cols)}]::SMALLINT[] AS experts, "
        f"[{', '.join(w_cols)}]::FLOAT[] AS weights FROM activations_raw"
    )
    ranks = " UNION ALL ".join(
        f"SELECT request_id, token, step, phase, forward, layer, {i} AS rank, "
        f"e{i} AS expert, w{i}::FLOAT AS weight FROM activations_raw"
        for i in range(k)
    )
    con.execute(f"CREATE OR REPLACE VIEW activations_long AS {ranks}")
    con.execute(f"CREATE OR REPLACE VIEW requests AS SELECT * FROM {req_src}")
    con.execute(f"CREATE OR REPLACE VIEW counts AS {_counts_sql(con, trace)}")
    m = trace.manifest
    row = {
        "format_version": m.format_version,
        "model_name": m.model.name,
        "architecture": m.model.architecture,
        "config_fingerprint": m.model.fingerprint,
        "num_layers": m.model.num_layers,
        "num_moe_layers": len(m.model.moe_layers),
        "num_experts": m.model.num_experts,
        "top_k": m.model.top_k,
        "bytes_per_expert": m.model.bytes_per_expert,
        "dtype": m.model.dtype,
        "shared_experts": m.model.shared_experts,
        "inferred": ",".join(m.model.inferred),
        "source_kind": m.source.kind,
        "source_origin": m.source.origin,
        "source_path": m.source.path,
        "tool_version": m.source.tool_version,
        "created": m.source.created,
        "weight_dtype": m.weight_dtype,
        "speculative": m.speculative,
        "gate_weights": m.gate_weights,
        "tags": json.dumps(dict(m.tags)),
        "content": m.content,
    }
    types = {"created": pa.float64(), "speculative": pa.bool_(), "gate_weights": pa.bool_()}
    manifest_tbl = pa.table(
        {
            k: pa.array(
                [v],
                type=types.get(
                    k, pa.int64() if isinstance(v, int) or k == "bytes_per_expert" else pa.string()
                ),
            )
            for k, v in row.items()
        }
    )
    con.register("_manifest_tbl", manifest_tbl)
    con.execute("CREATE OR REPLACE VIEW manifest AS SELECT * FROM _manifest_tbl")
    layers_tbl = pa.table(
        {"layer": list(m.model.moe_layers), "layer_index": list(range(len(m.model.moe_layers)))},
        schema=pa.schema([("layer", pa.int16()), ("layer_index", pa.int32())]),
    )
    con.register("_moe_layers_tbl", layers_tbl)
    con.execute("CREATE OR REPLACE VIEW moe_layers AS SELECT * FROM _moe_layers_tbl")
    if read_only:  # a remote trace's parts are read by pyarrow: DuckDB needs no file access
        files = trace.activation_files + trace.request_files + trace.count_files
        lock_down(con, [] if trace.is_remote else files)
    return con


def _counts_sql(con: duckdb.DuckDBPyConnection, trace: Trace) -> str:
    """The ``counts`` view's query: the counts parts, or the activations counted."""
    if trace.is_count_trace:
        src = _source(con, "counts", trace.count_parts, S.COUNTS_SCHEMA)
        return (
            "SELECT layer, expert, phase::VARCHAR AS phase, count, source::VARCHAR AS source "
            f"FROM {src}"
        )
    return (
        "SELECT layer, expert::SMALLINT AS expert, phase::VARCHAR AS phase, "
        "count(*)::BIGINT AS count, NULL::VARCHAR AS source "
        "FROM activations_long WHERE expert >= 0 GROUP BY ALL"
    )


def lock_down(con: duckdb.DuckDBPyConnection, files: list[str]) -> None:
    """Make ``con`` unable to touch anything outside ``files`` (the views' part files).

    ``allowed_paths`` keeps the views' ``read_parquet`` working (DuckDB 2.x refuses even
    already-defined views over local files once ``enable_external_access`` is off); every
    other file, directory, network access and extension install/load is refused, and
    ``lock_configuration`` stops a query from changing any setting back. ``allowed_paths``
    also lets DuckDB *write* those files (``COPY ... TO '<part>' (USE_TMP_FILE false)``), so
    :func:`check_read_only` must vet each query too; :func:`run_query` does with
    ``read_only=True``.
    """
    if files:
        con.execute(f"SET allowed_paths = {_files_sql(files)}")
    for name, value in READ_ONLY_SETTINGS:
        con.execute(f"SET {name} = {value}")


def _refusal(con: duckdb.DuckDBPyConnection, query: str) -> str | None:
    """Why ``query`` may not run on a read-only connection, or None when every statement is
    a query (SELECT, WITH, FROM, VALUES, DESCRIBE, SUMMARIZE, SHOW; EXPLAIN [ANALYZE] of one).
    """
    for stmt in con.extract_statements(query):
        if stmt.type == duckdb.StatementType.SELECT:
            continue
        if stmt.type == duckdb.StatementType.EXPLAIN:
            head = _EXPLAIN.match(stmt.query)
            try:
                inner = con.extract_statements(stmt.query[head.end() :]) if head else []
            except duckdb.Error:
                inner = []
            if len(inner) == 1 and inner[0].type == duckdb.StatementType.SELECT:
                continue
            return "EXPLAIN is allowed only of a SELECT query"
        kind = stmt.type.name.replace("_", " ")
        if stmt.type == duckdb.StatementType.MULTI:
            kind = "multi-part (e.g. PIVOT without an IN list)"
        return f"{kind} statements are not allowed, only queries (SELECT, WITH, ...)"
    return None


def check_read_only(con: duckdb.DuckDBPyConnection, query: str) -> None:
    """Raise :class:`QueryError` unless every statement of ``query`` only reads.

    A parse error is raised as the usual ``SQL error: ...``.
    """
    try:
        why = _refusal(con, query)
    except duckdb.Error as exc:
        raise QueryError(f"SQL error: {_first_line(exc)}") from None
    if why is not None:
        raise QueryError(f"{READ_ONLY}: {why}")


class _ReadOnlyTrace(Trace):
    """A trace whose :meth:`sql` runs on its own locked-down connection."""

    @cached_property
    def _read_only_connection(self) -> duckdb.DuckDBPyConnection:
        return connect(self, read_only=True)

    def sql(self, query: str) -> pa.Table:
        """Run a read-only query (see :func:`check_read_only`) against the trace's views."""
        return run_query(self._read_only_connection, query, read_only=True)


def open_read_only(path: str | os.PathLike[str]) -> Trace:
    """Open a trace for untrusted SQL: its ``sql()`` can read the trace's views and nothing
    else, and can write nothing (``moetrace sql`` runs users' queries through this)."""
    return _ReadOnlyTrace(path)


def coactivation_sql(top_k: int, source: str = "activations_raw") -> str:
    """SQL counting same-token co-activations: ``layer, expert_a < expert_b, n``.

    One row per (MoE layer id, unordered expert pair) chosen together for one token at that
    layer; dropped slots (-1) are skipped. Each rank pair is aggregated on its own (small
    integer keys, DuckDB's perfect-hash aggregate) before the pairs are merged.
    """
    pairs = [(i, j) for i in range(top_k) for j in range(i + 1, top_k)]
    if not pairs:
        return (
            "SELECT NULL::SMALLINT AS layer, NULL::SMALLINT AS expert_a, "
            "NULL::SMALLINT AS expert_b, NULL::BIGINT AS n WHERE false"
        )
    parts = " UNION ALL ".join(
        f"SELECT layer, e{i} AS a, e{j} AS b, count(*) AS n FROM {source} "
        f"WHERE e{i} >= 0 AND e{j} >= 0 GROUP BY ALL"
        for i, j in pairs
    )
    return (
        "SELECT layer, least(a, b) AS expert_a, greatest(a, b) AS expert_b, "
        f"sum(n)::BIGINT AS n FROM ({parts}) GROUP BY ALL"
    )


def transitions_sql(top_k: int, source: str = "activations_long") -> str:
    """SQL counting layer transitions: ``layer, next_layer, expert, next_expert, n``.

    For every token, each expert chosen at a MoE layer paired with each expert chosen at the
    next MoE layer (by ``moe_layers.layer_index``), dropped slots skipped. ``top_k`` is
    accepted for symmetry with :func:`coactivation_sql`; the long view covers any k (a
    long-form hash join measured ~2x cheaper than k x k branches over exploded columns).
    """
    del top_k
    return f"""
        WITH a AS (
            SELECT request_id, token, m.layer_index AS li, layer, expert
            FROM {source} JOIN moe_layers m USING (layer)
            WHERE expert >= 0
        )
        SELECT x.layer, y.layer AS next_layer, x.expert, y.expert AS next_expert,
               count(*) AS n
        FROM a x JOIN a y
          ON x.request_id = y.request_id AND x.token = y.token AND y.li = x.li + 1
        GROUP BY ALL
    """


def _first_line(exc: duckdb.Error) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def run_query(con: duckdb.DuckDBPyConnection, query: str, *, read_only: bool = False) -> pa.Table:
    """Run ``query`` on ``con``; DuckDB errors become one-line :class:`QueryError` s.

    ``read_only=True`` (for a :func:`connect` ``(read_only=True)`` connection) first refuses
    anything but queries (:func:`check_read_only`), and reports DuckDB's permission errors
    (a file outside the trace) as ``moetrace sql is read-only: ...``.
    """
    if read_only:
        check_read_only(con, query)
    try:
        rel = con.sql(query)
        if rel is None:  # a statement without a result (CREATE, SET...)
            return pa.table({})
        return rel.to_arrow_table()
    except duckdb.Error as exc:
        refused = read_only and isinstance(exc, duckdb.PermissionException)
        raise QueryError(f"{READ_ONLY if refused else 'SQL error'}: {_first_line(exc)}") from None
