"""Shared helpers of the data layer: cache stamps, fresh connections, phase filters."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import pyarrow as pa

from moetrace.errors import AnalysisError
from moetrace.store import schema as S
from moetrace.store.arrays import Routing, load_routing
from moetrace.store.reader import Trace, open_trace
from moetrace.store.sql import connect, run_query

PHASE_CHOICES = ("all", *S.PHASES)


def stamp(path: str | os.PathLike[str]) -> tuple[float, ...]:
    """Modification times of a trace's manifest and part folders (a cache key part).

    Committing a part renames it into ``activations/`` and ``requests/``, which changes
    those folders' mtimes, so a trace that grows gets a new stamp (a count trace's
    ``counts/`` folder is added when present).
    """
    base = Path(path)
    out = []
    counts = base / S.COUNTS_DIR
    extra = (counts,) if counts.is_dir() else ()
    for p in (base / S.MANIFEST_NAME, base / S.ACTIVATIONS_DIR, base / S.REQUESTS_DIR, *extra):
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
    """A :class:`Routing` of some MoE layers only (renumbered 0..n-1), in arrival order,
    so the mining functions can run on one layer or a pair of layers.
    ``requests``: only these requests (unknown ids are ignored), still in arrival order.
    """
    if requests is not None:
        known = set(trace.requests().column("request_id").to_pylist())
        requests = [r for r in requests if r in known]
    return load_routing(
        trace, phase=phase_arg(phase), requests=requests, layers=tuple(layer_indices)
    )
