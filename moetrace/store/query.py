"""``query_trace``: a user's SQL over a trace's DuckDB views, with an optional row limit."""

from __future__ import annotations

import os
import re

import pyarrow as pa

from moetrace.errors import QueryError
from moetrace.store.reader import Trace, open_trace

_QUERY_START = re.compile(r"^\s*(select|with|from|values)\b", re.IGNORECASE)


def query_trace(
    trace: Trace | str | os.PathLike[str], query: str, *, limit: int | None = None
) -> pa.Table:
    """Run ``query`` on the trace's views (activations, activations_raw, activations_long,
    requests, manifest, moe_layers); keep at most ``limit`` rows (None = all).

    A single SELECT-like statement is wrapped in ``LIMIT`` so DuckDB stops early.
    """
    if limit is not None and limit < 0:
        raise QueryError(f"limit must be >= 0, got {limit}")
    if not query.strip():
        raise QueryError("empty SQL query")
    if not isinstance(trace, Trace):
        trace = open_trace(trace)
    text = query.strip().rstrip(";").strip()
    if limit is not None and _QUERY_START.match(text) and ";" not in text:
        try:
            return trace.sql(f"SELECT * FROM ({text}\n) AS _q LIMIT {int(limit)}")
        except QueryError:
            pass  # not wrappable after all: run it as written, for the user's own error
    table = trace.sql(query)
    return table if limit is None else table.slice(0, limit)
