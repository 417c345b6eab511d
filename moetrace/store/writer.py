"""Streaming, crash-safe trace writer.

Rows are buffered per open request; :meth:`TraceWriter.end_request` makes a request
committable, and once enough committable rows are buffered they are written as one part.
A part is written under a temporary name, fsynced and renamed, activations first and the
requests part (the commit marker) last, so a writer killed at any moment leaves only whole
requests visible. Each writer has its own id in part names: two writers never collide.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
import uuid
from collections.abc import Iterable
from pathlib import Path
from types import TracebackType

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from moetrace.errors import TraceWriteError
from moetrace.store import schema as S

log = logging.getLogger(__name__)

DEFAULT_PART_ROWS = 1 << 20
COMPRESSION = "zstd"


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):  # not every filesystem lets a directory be fsynced
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def write_manifest(directory: Path, manifest: S.Manifest) -> S.Manifest:
    """Create ``manifest.json`` atomically, or check an existing one is compatible.

    Returns the manifest now on disk.
    """
    from moetrace.store.reader import read_manifest

    directory.mkdir(parents=True, exist_ok=True)
    target = directory / S.MANIFEST_NAME
    tmp = directory / f"{S.TMP_PREFIX}manifest-{uuid.uuid4().hex}.json"
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.write(manifest.dumps())
        fh.flush()
        os.fsync(fh.fileno())
    try:
        os.link(tmp, target)  # atomic and exclusive: fails if another writer won
        _fsync_dir(directory)
        return manifest
    except FileExistsError:
        existing = read_manifest(directory)
        if not existing.compatible_with(manifest):
            raise TraceWriteError(
                f"{target}: the trace holds another model or layout "
                f"(fingerprint {existing.model.fingerprint}, top_k {existing.top_k}, "
                f"{existing.model.num_experts} experts) than this writer's "
                f"({manifest.model.fingerprint}, top_k {manifest.top_k}, {manifest.model.num_experts} experts)"
            ) from None
        return existing
    finally:
        tmp.unlink(missing_ok=True)


class _PendingRequest:
    __slots__ = ("chunks", "rows")

    def __init__(self) -> None:
        self.chunks: list[dict[str, np.ndarray]] = []
        self.rows = 0


class TraceWriter:
    """Append requests and their activations to a trace directory.

    Use as a context manager; on a clean exit buffered complete requests are committed,
    on an exception they are committed too (open, unfinished requests never are).
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        manifest: S.Manifest,
        *,
        part_rows: int = DEFAULT_PART_ROWS,
        compression: str = COMPRESSION,
    ) -> None:
        if part_rows < 1:
            raise TraceWriteError(f"part_rows must be >= 1, got {part_rows}")
        self.path = Path(path)
        self.manifest = write_manifest(self.path, manifest)
        self.top_k = self.manifest.top_k
        self.part_rows = part_rows
        self.compression = compression
        self.writer_id = f"{time.time_ns():x}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self._act_schema = S.activations_schema(self.manifest)
        self._weight_np = np.float16 if self.manifest.weight_dtype == "float16" else np.float32
        self._layers = np.asarray(self.manifest.model.moe_layers, dtype=np.int64)
        (self.path / S.REQUESTS_DIR).mkdir(exist_ok=True)
        (self.path / S.ACTIVATIONS_DIR).mkdir(exist_ok=True)
        self._existing = self._committed_request_ids()
        self._arrival = self._next_arrival()
        self._open: dict[str, _PendingRequest] = {}
        self._ready_chunks: list[dict[str, np.ndarray]] = []
        self._ready_rows = 0
        self._ready_requests: list[S.RequestRecord] = []
        self._ready_arrivals: list[int] = []
        self._seq = 0
        self._closed = False
        self.parts_written = 0
        self.rows_written = 0
        self.requests_written = 0

    # ------------------------------------------------------------------ helpers
    def _committed_request_ids(self) -> set[str]:
        from moetrace.store.reader import committed_parts

        ids: set[str] = set()
        for _, req_part in committed_parts(self.path):
            ids.update(pq.read_table(req_part, columns=["request_id"]).column(0).to_pylist())
        return ids

    def _next_arrival(self) -> int:
        from moetrace.store.reader import committed_parts

        top = -1
        for _, req_part in committed_parts(self.path):
            col = pq.read_table(req_part, columns=["arrival"]).column(0)
            if len(col):
                top = max(top, int(pa.compute.max(col).as_py()))
        return top + 1

    @property
    def existing_request_ids(self) -> frozenset[str]:
        """Request ids committed in the trace before or by this writer."""
        return frozenset(self._existing)

    def _check_open(self) -> None:
        if self._closed:
            raise TraceWriteError(f"{self.path}: writer is closed")

    # ------------------------------------------------------------------ API
    def begin_request(self, request_id: str) -> None:
        self._check_open()
        if request_id in self._existing:
            raise TraceWriteError(f"{self.path}: request {request_id!r} is already in the trace")
        if request_id in self._open:
            raise TraceWriteError(f"{self.path}: request {request_id!r} is already open")
        self._open[request_id] = _PendingRequest()

    def add_activations(
        self,
        request_id: str,
        *,
        token: Iterable[int] | np.ndarray,
        step: Iterable[int] | np.ndarray,
        phase: Iterable[int] | np.ndarray,
        forward: Iterable[int] | np.ndarray,
        layer: Iterable[int] | np.ndarray,
        experts: np.ndarray,
        weights: np.ndarray | None = None,
        speculative: np.ndarray | None = None,
    ) -> None:
        """Buffer rows of one open request.

        ``phase`` holds codes (0 = prefill, 1 = decode). ``experts`` is ``(n, k)`` in rank
        order (-1 = dropped); ``weights`` ``(n, k)`` or None when unknown; ``speculative``
        ``(n, k)`` predicted next-layer experts (-1/None = no prediction), required iff the
        manifest says the trace is speculative.
        """
        self._check_open()
        pending = self._open.get(request_id)
        if pending is None:
            raise TraceWriteError(f"{self.path}: request {request_id!r} was not begun")
        experts = np.asarray(experts)
        if experts.ndim != 2 or experts.shape[1] != self.top_k:
            raise TraceWriteError(
                f"request {request_id!r}: experts must have shape (n, top_k={self.top_k}), got {experts.shape}"
            )
        n = experts.shape[0]
        cols: dict[str, np.ndarray] = {}
        for name, values, dtype in (
            ("token", token, np.int32),
            ("step", step, np.int32),
            ("phase", phase, np.int8),
            ("forward", forward, np.int64),
            ("layer", layer, np.int16),
        ):
            arr = np.broadcast_to(np.asarray(values, dtype=dtype), (n,))
            cols[name] = arr
        if n and (cols["phase"].min() < 0 or cols["phase"].max() >= len(S.PHASES)):
            raise TraceWriteError(
                f"request {request_id!r}: phase codes must be 0 (prefill) or 1 (decode)"
            )
        if n and not np.isin(cols["layer"], self._layers).all():
            bad = sorted(set(cols["layer"].tolist()) - set(self._layers.tolist()))
            raise TraceWriteError(
                f"request {request_id!r}: layers {bad[:5]} are not MoE layers of the manifest"
            )
        num_experts = self.manifest.model.num_experts
        if n and (experts.min() < S.DROPPED_EXPERT or experts.max() >= num_experts):
            raise TraceWriteError(
                f"request {request_id!r}: expert ids must lie in [-1, {num_experts}), "
                f"got min {experts.min()} max {experts.max()}"
            )
        cols["experts"] = experts.astype(np.int16, copy=False)
        if weights is not None:
            weights = np.asarray(weights)
            if weights.shape != experts.shape:
                raise TraceWriteError(
                    f"request {request_id!r}: weights shape {weights.shape} != experts shape {experts.shape}"
                )
            cols["weights"] = weights.astype(self._weight_np, copy=False)
        if self.manifest.speculative:
            if speculative is None:
                raise TraceWriteError(
                    f"request {request_id!r}: speculative trace needs speculative experts"
                )
            speculative = np.asarray(speculative)
            if speculative.shape != experts.shape:
                raise TraceWriteError(
                    f"request {request_id!r}: speculative shape {speculative.shape} != experts shape {experts.shape}"
                )
            cols["speculative"] = speculative.astype(np.int16, copy=False)
        elif speculative is not None:
            raise TraceWriteError(
                "speculative experts given but the manifest has speculative=False"
            )
        pending.chunks.append(cols)
        pending.rows += n

    def end_request(self, record: S.RequestRecord) -> None:
        """Close an open request; its rows become committable with this record."""
        self._check_open()
        pending = self._open.pop(record.request_id, None)
        if pending is None:
            raise TraceWriteError(f"{self.path}: request {record.request_id!r} was not begun")
        for chunk in pending.chunks:
            chunk["request_id"] = record.request_id  # type: ignore[assignment]
        self._ready_chunks.extend(pending.chunks)
        self._ready_rows += pending.rows
        self._ready_requests.append(record)
        self._ready_arrivals.append(self._arrival)
        self._arrival += 1
        self._existing.add(record.request_id)
        if self._ready_rows >= self.part_rows:
            self.flush()

    def abandon_request(self, request_id: str) -> None:
        """Drop an open request and its buffered rows."""
        self._open.pop(request_id, None)

    def write_request(self, record: S.RequestRecord, **activations: object) -> None:
        """Begin, add one batch of activations and end a request in one call."""
        self.begin_request(record.request_id)
        try:
            if activations:
                self.add_activations(record.request_id, **activations)  # type: ignore[arg-type]
        except BaseException:
            self.abandon_request(record.request_id)
            raise
        self.end_request(record)

    # ------------------------------------------------------------------ flushing
    def _activation_table(self) -> pa.Table:
        chunks = self._ready_chunks
        k = self.top_k
        n = self._ready_rows
        ids = [c["request_id"] for c in chunks]
        uniq = list(dict.fromkeys(ids))
        index = {rid: i for i, rid in enumerate(uniq)}
        codes = np.repeat(
            np.array([index[r] for r in ids], dtype=np.int32),
            [len(c["token"]) for c in chunks],
        )
        arrays: dict[str, pa.Array] = {
            "request_id": pa.DictionaryArray.from_arrays(
                pa.array(codes), pa.array(uniq, pa.string())
            ),
        }
        for name in ("token", "step", "forward", "layer"):
            arrays[name] = pa.array(np.concatenate([c[name] for c in chunks]))
        arrays["phase"] = pa.DictionaryArray.from_arrays(
            pa.array(np.concatenate([c["phase"] for c in chunks])), pa.array(list(S.PHASES))
        )
        experts = (
            np.concatenate([c["experts"] for c in chunks]) if n else np.zeros((0, k), np.int16)
        )
        for i, name in enumerate(S.expert_columns(k)):
            arrays[name] = pa.array(experts[:, i])
        has_w = [("weights" in c) for c in chunks]
        wtype = self._act_schema.field("w0").type
        if any(has_w):
            w = np.concatenate(
                [
                    c["weights"]
                    if "weights" in c
                    else np.zeros(c["experts"].shape, self._weight_np)
                    for c in chunks
                ]
            )
            mask = np.repeat(~np.array(has_w), [len(c["token"]) for c in chunks])
            for i, name in enumerate(S.weight_columns(k)):
                arrays[name] = pa.array(w[:, i], type=wtype, mask=mask if not all(has_w) else None)
        else:
            for name in S.weight_columns(k):
                arrays[name] = pa.nulls(n, type=wtype)
        if self.manifest.speculative:
            spec = np.concatenate([c["speculative"] for c in chunks])
            for i, name in enumerate(S.speculative_columns(k)):
                arrays[name] = pa.array(spec[:, i], mask=spec[:, i] < 0)
        return pa.table([arrays[f.name] for f in self._act_schema], schema=self._act_schema)

    def _request_table(self) -> pa.Table:
        recs = self._ready_requests
        return pa.table(
            {
                "request_id": [r.request_id for r in recs],
                "arrival": self._ready_arrivals,
                "arrival_time": [r.arrival_time for r in recs],
                "prompt_tokens": [r.prompt_tokens for r in recs],
                "generated_tokens": [r.generated_tokens for r in recs],
                "prompt_text": [r.prompt_text for r in recs],
                "prompt_hash": [r.prompt_hash for r in recs],
                "tags": [list(r.tags.items()) if r.tags else None for r in recs],
            },
            schema=S.REQUESTS_SCHEMA,
        )

    def _write_tmp(self, table: pa.Table, directory: Path, **kwargs: object) -> Path:
        tmp = directory / f"{S.TMP_PREFIX}{self.writer_id}-{self._seq:06d}.parquet"
        with open(tmp, "wb") as fh:
            pq.write_table(table, fh, compression=self.compression, **kwargs)  # type: ignore[arg-type]
            fh.flush()
            os.fsync(fh.fileno())
        return tmp

    def flush(self) -> None:
        """Commit every complete buffered request as one part (no-op when none)."""
        self._check_open()
        if not self._ready_requests:
            return
        acts = self._activation_table()
        reqs = self._request_table()
        k = self.top_k
        name = f"{S.PART_PREFIX}{self.writer_id}-{self._seq:06d}.parquet"
        act_dir = self.path / S.ACTIVATIONS_DIR
        req_dir = self.path / S.REQUESTS_DIR
        act_tmp = self._write_tmp(
            acts,
            act_dir,
            row_group_size=self.part_rows,
            use_dictionary=["request_id", "phase"],
            column_encoding={c: "BYTE_STREAM_SPLIT" for c in S.weight_columns(k)},
            write_statistics=["request_id", "token", "step", "forward", "layer"],
        )
        req_tmp = self._write_tmp(reqs, req_dir)
        os.replace(act_tmp, act_dir / name)
        _fsync_dir(act_dir)
        os.replace(req_tmp, req_dir / name)  # the commit point
        _fsync_dir(req_dir)
        self.parts_written += 1
        self.rows_written += acts.num_rows
        self.requests_written += reqs.num_rows
        log.debug("committed %s: %d requests, %d activations", name, reqs.num_rows, acts.num_rows)
        self._seq += 1
        self._ready_chunks = []
        self._ready_rows = 0
        self._ready_requests = []
        self._ready_arrivals = []

    def close(self) -> None:
        if self._closed:
            return
        try:
            self.flush()
        finally:
            if self._open:
                log.warning(
                    "%s: %d unfinished request(s) were not committed: %s",
                    self.path,
                    len(self._open),
                    ", ".join(list(self._open)[:5]),
                )
            self._closed = True

    def __enter__(self) -> TraceWriter:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
