"""Write count traces: per-expert activation counts, one crash-safe part per source.

A *count trace* (``manifest.content == "counts"``) holds no token-level routing, only how
often each expert of each MoE layer was chosen, as sources such as SGLang's ``stat``
expert-distribution dumps report it. :func:`write_counts` commits the counts of one
source (a dump file, a recording window...) as one part ``counts/part-<writer>-000000
.parquet``: encoded under a ``.tmp-`` name and fsynced, then, holding the trace's lock,
renamed into place unless a committed part already holds the same ``source`` id (so a
rerun over the same dumps does not count them twice). See docs/trace-format.md, "Count
traces".
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from moetrace.errors import TraceFormatError, TraceWriteError
from moetrace.store import encode as E
from moetrace.store import schema as S
from moetrace.store.location import require_local
from moetrace.store.reader import committed_count_parts
from moetrace.store.writer import dir_lock, fsync_dir, new_writer_id, write_manifest

log = logging.getLogger(__name__)


def count_sources(path: str | os.PathLike[str]) -> set[str]:
    """The ``source`` ids of the committed counts parts of the trace at ``path``."""
    out: set[str] = set()
    for part in committed_count_parts(path):
        try:
            column = pq.read_table(part, columns=["source"]).column(0)
        except (OSError, pa.ArrowException) as exc:
            raise TraceFormatError(f"{part}: cannot read counts part ({exc})") from None
        out.update(str(v) for v in column.unique().to_pylist() if v is not None)
    return out


def counts_table(
    manifest: S.Manifest, counts: np.ndarray, *, source: str, phase: str | None = None
) -> pa.Table:
    """The counts part of one source: ``counts`` is ``(len(moe_layers), num_experts)``
    (MoE-layer index x expert); zero cells are left out."""
    m = manifest.model
    shape = (len(m.moe_layers), m.num_experts)
    arr = np.asarray(counts)
    if arr.shape != shape:
        raise TraceWriteError(
            f"counts must have shape (MoE layers, experts) = {shape}, got {arr.shape}"
        )
    if arr.size and arr.dtype.kind not in "iu":
        raise TraceWriteError(f"counts must hold integers, got dtype {arr.dtype}")
    if arr.size and int(arr.min()) < 0:
        raise TraceWriteError(f"counts must be >= 0, got {int(arr.min())}")
    if phase is not None and phase not in S.PHASES:
        raise TraceWriteError(f"phase must be one of {S.PHASES} or None, got {phase!r}")
    if not source:
        raise TraceWriteError("source must be a non-empty id")
    li, ex = np.nonzero(arr)
    n = li.size
    layers = np.asarray(m.moe_layers, dtype=np.int16)[li]
    phase_col = pa.DictionaryArray.from_arrays(
        pa.array(
            np.full(n, S.PHASE_CODE[phase] if phase else 0, np.int8),
            mask=np.full(n, phase is None),
        ),
        pa.array(list(S.PHASES)),
    )
    return pa.table(
        {
            "layer": pa.array(layers, pa.int16()),
            "expert": pa.array(ex.astype(np.int16), pa.int16()),
            "phase": phase_col,
            "count": pa.array(arr[li, ex].astype(np.int64), pa.int64()),
            "source": pa.DictionaryArray.from_arrays(
                pa.array(np.zeros(n, np.int32)), pa.array([source], pa.string())
            ),
        },
        schema=S.COUNTS_SCHEMA,
    )


def write_counts(
    path: str | os.PathLike[str],
    manifest: S.Manifest,
    counts: np.ndarray,
    *,
    source: str,
    phase: str | None = None,
) -> Path | None:
    """Commit the counts of one ``source`` to the count trace at ``path`` (created with
    ``manifest`` when missing; an existing one must be compatible).

    Returns the committed part, or None when a part with the same ``source`` id is already
    committed (nothing is written then). Crash-safe like :class:`TraceWriter`: a killed
    writer leaves only ``.tmp-`` files, which readers ignore.
    """
    if not manifest.is_counts:
        raise TraceWriteError(
            f"{path}: write_counts needs a manifest with content={S.CONTENT_COUNTS!r}, "
            f"got {manifest.content!r}"
        )
    require_local(path)
    directory = Path(path)
    on_disk = write_manifest(directory, manifest)
    table = counts_table(on_disk, counts, source=source, phase=phase)
    parts = directory / S.COUNTS_DIR
    parts.mkdir(exist_ok=True)
    name = f"{S.PART_PREFIX}{new_writer_id()}-{0:06d}.parquet"
    tmp = parts / f"{S.TMP_PREFIX}{name}"
    try:
        E.write_synced(table, tmp, compression="zstd", use_dictionary=["phase", "source"])
        with dir_lock(directory):
            if source in count_sources(directory):
                log.info("%s: counts of %s are already in the trace; skipped", directory, source)
                return None
            os.replace(tmp, parts / name)  # the commit point
            fsync_dir(parts)
    finally:
        tmp.unlink(missing_ok=True)
    log.debug("committed %s: %d counts of %s", name, table.num_rows, source)
    return parts / name
