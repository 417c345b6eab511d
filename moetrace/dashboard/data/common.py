"""Shared helpers of the data layer: cache stamps, fresh connections, phase filters."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa

from moetrace.errors import AnalysisError
from moetrace.store import schema as S
from moetrace.store.arrays import Routing
from moetrace.store.reader import Trace, open_trace
from moetrace.store.sql import connect, run_query

PHASE_CHOICES = ("all", *S.PHASES)


def stamp(path: str | os.PathLike[str]) -> tuple[float, ...]:
    """Modification times of a trace's manifest and part folders (a cache key part).

    Committing a part renames it into ``activations/`` and ``requests/``, which changes
    those folders' mtimes, so a trace that grows gets a new stamp.
    """
    base = Path(path)
    out = []
    for p in (base / S.MANIFEST_NAME, base / S.ACTIVATIONS_DIR, base / S.REQUESTS_DIR):
        try:
            out.append(p.stat().st_mtime)
        except OSError:
            out.append(0.0)
    return tuple(out)


def reopen(path: str | os.PathLike[str]) -> Trace:
    """A fresh :class:`Trace` (its own DuckDB connection: safe across app threads)."""
    return open_trace(path, validate=False)


def query(trace: Trace, sql: str) -> pa.Table:
    """Run one query on a new connection to the trace's views and close it."""
    con = connect(trace)
    try:
        return run_query(con, sql)
    finally:
        con.close()


def phase_arg(phase: str) -> str | None:
    """``'all'`` -> None; a phase name -> itself; anything else is an AnalysisError."""
    if phase not in PHASE_CHOICES:
        raise AnalysisError(f"phase must be one of {PHASE_CHOICES}, got {phase!r}")
    return None if phase == "all" else phase


def phase_where(phase: str, alias: str = "") -> str:
    """``AND <alias>phase = '...'`` for a phase name, empty for ``'all'``."""
    p = phase_arg(phase)
    return "" if p is None else f" AND {alias}phase = '{p}'"


def layer_id(trace: Trace, layer_index: int) -> int:
    """The model layer id of MoE-layer index ``layer_index``."""
    layers = trace.manifest.model.moe_layers
    if not 0 <= layer_index < len(layers):
        raise AnalysisError(
            f"MoE-layer index {layer_index} out of range [0, {len(layers)}) for {trace.path}"
        )
    return int(layers[layer_index])


def unpivot_sql(top_k: int, where: str = "TRUE", extra: str = "") -> str:
    """One row per (activation row, rank) with column ``e``; dropped slots excluded.

    One scan with ``unnest`` of the k rank columns (a UNION ALL of k scans is about 1.5x
    slower on a 6M-row trace). ``extra`` prefixes more columns, e.g. ``"request_id, "``.
    """
    cols = ", ".join(f"e{i}" for i in range(top_k))
    return (
        f"SELECT {extra}layer, e FROM (SELECT {extra}layer, unnest([{cols}]) AS e "
        f"FROM activations_raw WHERE ({where})) WHERE e >= 0"
    )


def routing_for_layers(
    trace: Trace,
    layer_indices: Sequence[int],
    phase: str = "all",
    requests: Sequence[str] | None = None,
) -> Routing:
    """A :class:`Routing` of some MoE layers only (renumbered 0..n-1), in arrival order.

    The same row order as :func:`moetrace.store.arrays.load_routing`, without loading the
    other layers, so the mining functions can run on one layer or a pair of layers.
    ``requests``: only these requests (unknown ids are ignored), still in arrival order.
    """
    m = trace.manifest
    k = m.top_k
    ids = [layer_id(trace, i) for i in layer_indices]
    case = " ".join(f"WHEN {lid} THEN {n}" for n, lid in enumerate(ids))
    cols = ", ".join(f"x.e{i}" for i in range(k))
    chosen = "TRUE" if requests is None else "request_id IN (SELECT request_id FROM _chosen)"
    con = connect(trace)
    try:
        if requests is not None:
            con.register("_chosen", pa.table({"request_id": pa.array(list(requests), pa.string())}))
        req = run_query(
            con,
            f"SELECT request_id FROM requests WHERE {chosen} ORDER BY arrival, request_id",
        )
        tbl = run_query(
            con,
            f"""WITH r AS (SELECT request_id, row_number() OVER (ORDER BY arrival, request_id) - 1
                           AS rix FROM requests WHERE {chosen})
                SELECT r.rix::INTEGER AS rix, x.token, x.step,
                       (x.phase = 'decode')::TINYINT AS ph, x.forward,
                       (CASE x.layer {case} END)::SMALLINT AS lix, {cols}
                FROM activations_raw x JOIN r USING (request_id)
                WHERE x.layer IN ({", ".join(map(str, ids))}){phase_where(phase, "x.")}
                ORDER BY r.rix, x.step, x.token, lix""",
        )
    finally:
        con.close()
    experts = np.empty((tbl.num_rows, k), np.int16)
    for i in range(k):
        experts[:, i] = tbl.column(f"e{i}").to_numpy().astype(np.int16)

    def col(name: str, dtype: type) -> np.ndarray:
        return tbl.column(name).to_numpy().astype(dtype)

    return Routing(
        request_ids=tuple(req.column(0).to_pylist()),
        moe_layers=tuple(ids),
        num_experts=m.model.num_experts,
        top_k=k,
        request=col("rix", np.int32),
        token=col("token", np.int32),
        step=col("step", np.int32),
        phase=col("ph", np.int8),
        forward=col("forward", np.int64),
        layer=col("lix", np.int16),
        experts=experts,
    )
