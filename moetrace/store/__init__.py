"""The trace store: format v1 schema, crash-safe writer, validating reader, DuckDB views."""

from moetrace.store.reader import Trace, committed_parts, open_trace, read_manifest
from moetrace.store.schema import (
    DROPPED_EXPERT,
    FORMAT_VERSION,
    PHASE_CODE,
    PHASES,
    Manifest,
    ModelInfo,
    RequestRecord,
    SourceInfo,
)
from moetrace.store.writer import TraceWriter

__all__ = [
    "DROPPED_EXPERT",
    "FORMAT_VERSION",
    "PHASES",
    "PHASE_CODE",
    "Manifest",
    "ModelInfo",
    "RequestRecord",
    "SourceInfo",
    "Trace",
    "TraceWriter",
    "committed_parts",
    "open_trace",
    "read_manifest",
]
