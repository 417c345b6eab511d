"""Streaming, crash-safe trace writer.

Rows are buffered per open request; :meth:`TraceWriter.end_request` makes a request
committable, and once ``part_rows`` committable rows are buffered they are handed to a
background thread that encodes and commits them as one part while the caller keeps
producing (at most ``threads`` parts in flight, so memory stays bounded).

Commit protocol (docs/trace-format.md): each part is written under a ``.tmp-`` name and
fsynced; then, holding the trace's ``.lock`` (flock), the writer reads the requests parts
other writers committed meanwhile (to number arrivals uniquely and refuse duplicate request
ids), writes the requests part, and renames the activations part and then the requests
part (the commit marker) into place, fsyncing the directories. A writer killed at any
moment therefore leaves only whole requests visible; each writer has its own id in part
names, so two writers never collide.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
import uuid
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from types import TracebackType

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from moetrace.errors import TraceFormatError, TraceWriteError
from moetrace.store import encode as E
from moetrace.store import schema as S
from moetrace.store.location import require_local

try:  # POSIX advisory locks; elsewhere concurrent writers only avoid name collisions
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

log = logging.getLogger(__name__)

DEFAULT_PART_ROWS = 1 << 20
COMPRESSION = E.COMPRESSION
DEFAULT_THREADS = 2
LOCK_NAME = ".lock"


def new_writer_id() -> str:
    """A writer's id in part names: ``<time_ns hex>-<pid>-<random>``, unique per writer."""
    return f"{time.time_ns():x}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):  # not every filesystem lets a directory be fsynced
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def dir_lock(directory: Path) -> Iterator[None]:
    """An exclusive advisory lock on the trace (released by the kernel if we are killed)."""
    if fcntl is None:  # pragma: no cover
        yield
        return
    fd = os.open(directory / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the flock


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
        fsync_dir(directory)
        return manifest
    except FileExistsError:
        existing = read_manifest(directory)
        if not existing.compatible_with(manifest):
            raise TraceWriteError(
                f"{target}: the trace holds another model or layout "
                f"(fingerprint {existing.model.fingerprint}, top_k {existing.top_k}, "
                f"{existing.model.num_experts} experts, weight_dtype {existing.weight_dtype}, "
                f"speculative {existing.speculative}, content {existing.content}) than this "
                f"writer's ({manifest.model.fingerprint}, top_k {manifest.top_k}, "
                f"{manifest.model.num_experts} experts, weight_dtype {manifest.weight_dtype}, "
                f"speculative {manifest.speculative}, content {manifest.content})"
            ) from None
        return existing
    finally:
        tmp.unlink(missing_ok=True)


class _PendingRequest:
    __slots__ = ("chunks", "rows", "order")

    def __init__(self, order: int) -> None:
        self.chunks: list[E.Chunk] = []
        self.rows = 0
        self.order = order


class TraceWriter:
    """Append requests and their activations to a trace directory.

    Use as a context manager; on exit (clean or by exception) buffered complete requests
    are committed; open, unfinished requests never are. :meth:`flush` and :meth:`close`
    return once everything handed over is committed; parts cut automatically every
    ``part_rows`` rows are committed in the background (``threads=0``: in the caller).
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        manifest: S.Manifest,
        *,
        part_rows: int = DEFAULT_PART_ROWS,
        compression: str = COMPRESSION,
        threads: int = DEFAULT_THREADS,
    ) -> None:
        if part_rows < 1:
            raise TraceWriteError(f"part_rows must be >= 1, got {part_rows}")
        if threads < 0:
            raise TraceWriteError(f"threads must be >= 0, got {threads}")
        require_local(path)
        self.path = Path(path)
        self.manifest = write_manifest(self.path, manifest)
        self.top_k = self.manifest.top_k
        self.part_rows = part_rows
        self.compression = compression
        self.writer_id = new_writer_id()
        self._act_schema = S.activations_schema(self.manifest)
        self._weight_np = np.float16 if self.manifest.weight_dtype == "float16" else np.float32
        self._moe_layers = np.asarray(self.manifest.model.moe_layers, dtype=np.int64)
        self._act_dir = self.path / S.ACTIVATIONS_DIR
        self._req_dir = self.path / S.REQUESTS_DIR
        self._act_dir.mkdir(exist_ok=True)
        self._req_dir.mkdir(exist_ok=True)
        self._write_options = E.activation_write_options(
            self.top_k, compression, part_rows, self.manifest.weight_dtype
        )
        # state shared with the commit threads (guarded by _state)
        self._state = threading.Condition()
        self._seen_parts: set[str] = set()
        self._foreign_ids: set[str] = set()
        self._max_arrival = -1
        self._next_commit = 0
        with dir_lock(self.path):
            self._refresh_committed()
        self._existing = set(self._foreign_ids)
        # caller-side buffers
        self._open: dict[str, _PendingRequest] = {}
        self._begun = 0
        self._ready_ids: list[str] = []
        self._ready_chunks: list[E.Chunk] = []
        self._ready_rows = 0
        self._ready_requests: list[tuple[int, S.RequestRecord]] = []
        self._seq = 0
        self._threads = threads
        self._pool = ThreadPoolExecutor(threads, "moetrace-writer") if threads else None
        self._inflight: list[Future[None]] = []
        self._closed = False
        self.parts_written = 0
        self.rows_written = 0
        self.requests_written = 0

    # ------------------------------------------------------------------ helpers
    def _refresh_committed(self) -> None:
        """Read requests parts committed since the last look (holding the trace lock)."""
        names = sorted(
            p.name
            for p in self._req_dir.iterdir()
            if p.name.startswith(S.PART_PREFIX) and p.name.endswith(".parquet")
        )
        for name in names:
            if name in self._seen_parts:
                continue
            part = self._req_dir / name
            try:
                table = pq.read_table(part, columns=["request_id", "arrival"])
            except (OSError, pa.ArrowException) as exc:
                raise TraceFormatError(f"{part}: cannot read requests part ({exc})") from None
            self._foreign_ids.update(table.column("request_id").to_pylist())
            if table.num_rows:
                top = pa.compute.max(table.column("arrival")).as_py()
                self._max_arrival = max(self._max_arrival, int(top))
            self._seen_parts.add(name)

    @property
    def existing_request_ids(self) -> frozenset[str]:
        """Request ids committed in the trace before or by this writer."""
        return frozenset(self._existing)

    def _check_open(self) -> None:
        if self._closed:
            raise TraceWriteError(f"{self.path}: writer is closed")

    def _raise_failed(self) -> None:
        """Re-raise the error of a background commit that failed."""
        done = [f for f in self._inflight if f.done()]
        self._inflight = [f for f in self._inflight if not f.done()]
        for fut in done:
            fut.result()

    # ------------------------------------------------------------------ API
    def begin_request(self, request_id: str) -> None:
        self._check_open()
        if not isinstance(request_id, str) or not request_id:
            raise TraceWriteError(f"request_id must be a non-empty string, got {request_id!r}")
        if request_id in self._existing:
            raise TraceWriteError(f"{self.path}: request {request_id!r} is already in the trace")
        if request_id in self._open:
            raise TraceWriteError(f"{self.path}: request {request_id!r} is already open")
        self._open[request_id] = _PendingRequest(self._begun)
        self._begun += 1

    def _row_column(self, request_id: str, name: str, values: object, n: int) -> np.ndarray:
        arr = np.asarray(values)
        if arr.ndim == 0 or (arr.ndim == 1 and arr.shape[0] == n):
            if arr.size and arr.dtype.kind not in "iub":
                raise TraceWriteError(
                    f"request {request_id!r}: {name} must hold integers, got dtype {arr.dtype}"
                )
            return np.broadcast_to(arr, (n,))
        raise TraceWriteError(
            f"request {request_id!r}: {name} must be a scalar or have shape ({n},) like "
            f"experts, got shape {arr.shape}"
        )

    def _phase_codes(self, request_id: str, phase: object, n: int) -> np.ndarray:
        arr = np.asarray(phase)
        if arr.dtype.kind in "UO":
            codes = np.full(arr.shape, -1, dtype=np.int8)
            for name, code in S.PHASE_CODE.items():
                codes[arr == name] = code
            if (codes < 0).any():
                bad = arr[codes < 0].tolist()[0]
                raise TraceWriteError(
                    f"request {request_id!r}: unknown phase {bad!r} (expected one of {S.PHASES} "
                    f"or codes 0..{len(S.PHASES) - 1})"
                )
            arr = codes
        arr = self._row_column(request_id, "phase", arr, n)
        if n and (arr.min() < 0 or arr.max() >= len(S.PHASES)):
            bad = arr[(arr < 0) | (arr >= len(S.PHASES))][0]
            raise TraceWriteError(
                f"request {request_id!r}: unknown phase code {int(bad)} (0 = prefill, 1 = decode)"
            )
        return arr.astype(np.int8, copy=False)

    def _expert_ids(self, request_id: str, name: str, values: object, shape: tuple) -> np.ndarray:
        arr = np.asarray(values)
        if arr.shape != shape:
            raise TraceWriteError(
                f"request {request_id!r}: {name} must have shape (n, top_k={self.top_k}) = "
                f"{shape}, got {arr.shape}"
            )
        if arr.size and arr.dtype.kind not in "iu":
            raise TraceWriteError(
                f"request {request_id!r}: {name} must hold integer expert ids, got {arr.dtype}"
            )
        num_experts = self.manifest.model.num_experts
        if arr.size and (arr.min() < S.DROPPED_EXPERT or arr.max() >= num_experts):
            bad = arr[(arr < S.DROPPED_EXPERT) | (arr >= num_experts)][0]
            raise TraceWriteError(
                f"request {request_id!r}: {name} id {int(bad)} out of range "
                f"[{S.DROPPED_EXPERT}, {num_experts}) (-1 = dropped)"
            )
        return arr.astype(np.int16, copy=False)

    def add_activations(
        self,
        request_id: str,
        *,
        token: Iterable[int] | np.ndarray,
        step: Iterable[int] | np.ndarray,
        phase: Iterable[int] | Iterable[str] | np.ndarray | int | str,
        forward: Iterable[int] | np.ndarray,
        layer: Iterable[int] | np.ndarray,
        experts: np.ndarray,
        weights: np.ndarray | None = None,
        speculative: np.ndarray | None = None,
    ) -> None:
        """Buffer rows of one open request.

        Per-row values (``token``, ``step``, ``phase``, ``forward``, ``layer``) are scalars
        or length-``n`` arrays. ``phase`` holds codes (0 = prefill, 1 = decode) or names.
        ``layer`` holds model layer ids that must be MoE layers of the manifest.
        ``experts`` is ``(n, k)`` in rank order (-1 = dropped); ``weights`` ``(n, k)`` or
        None when unknown; ``speculative`` ``(n, k)`` predicted next-layer experts (-1 =
        no prediction), required iff the manifest says the trace is speculative.
        """
        self._check_open()
        pending = self._open.get(request_id)
        if pending is None:
            raise TraceWriteError(f"{self.path}: request {request_id!r} was not begun")
        raw = np.asarray(experts)
        if raw.ndim != 2 or raw.shape[1] != self.top_k:
            raise TraceWriteError(
                f"request {request_id!r}: experts must have shape (n, top_k={self.top_k}), "
                f"got {raw.shape}"
            )
        n = raw.shape[0]
        shape = (n, self.top_k)
        expert_ids = self._expert_ids(request_id, "experts", raw, shape)
        layer_arr = self._row_column(request_id, "layer", layer, n)
        if n and not np.isin(layer_arr, self._moe_layers).all():
            bad = sorted(set(layer_arr.tolist()) - set(self._moe_layers.tolist()))
            raise TraceWriteError(
                f"request {request_id!r}: layer(s) {bad[:5]} are not MoE layers of the manifest "
                f"{list(self.manifest.model.moe_layers)}"
            )
        w = None
        if weights is not None:
            if self.manifest.gate_weights is False:
                raise TraceWriteError(
                    f"request {request_id!r}: the manifest says the source has no gate "
                    "weights (gate_weights=false), so weights must be None"
                )
            w = np.asarray(weights)
            if w.shape != shape:
                raise TraceWriteError(
                    f"request {request_id!r}: weights shape {w.shape} != experts shape {shape}"
                )
            w = w.astype(self._weight_np, copy=False)
        spec = None
        if self.manifest.speculative:
            if speculative is None:
                raise TraceWriteError(
                    f"request {request_id!r}: the manifest has speculative=True, so "
                    "speculative experts are required"
                )
            spec = self._expert_ids(request_id, "speculative", speculative, shape)
        elif speculative is not None:
            raise TraceWriteError(
                f"request {request_id!r}: speculative experts given but the manifest has "
                "speculative=False"
            )
        chunk = E.Chunk(
            token=self._row_column(request_id, "token", token, n),
            step=self._row_column(request_id, "step", step, n),
            phase=self._phase_codes(request_id, phase, n),
            forward=self._row_column(request_id, "forward", forward, n),
            layer=layer_arr,
            experts=expert_ids,
            weights=w,
            speculative=spec,
        )
        pending.chunks.append(chunk)
        pending.rows += n

    def end_request(self, record: S.RequestRecord) -> None:
        """Close an open request; its rows become committable with this record."""
        self._check_open()
        pending = self._open.pop(record.request_id, None)
        if pending is None:
            raise TraceWriteError(f"{self.path}: request {record.request_id!r} was not begun")
        self._ready_ids.extend([record.request_id] * len(pending.chunks))
        self._ready_chunks.extend(pending.chunks)
        self._ready_rows += pending.rows
        self._ready_requests.append((pending.order, record))
        self._existing.add(record.request_id)
        if self._ready_rows >= self.part_rows:
            self._submit()

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

    # ------------------------------------------------------------------ committing
    def _submit(self) -> None:
        """Hand the complete buffered requests to a commit (background when threads > 0)."""
        self._raise_failed()
        if not self._ready_requests:
            return
        job = (self._seq, self._ready_ids, self._ready_chunks, self._ready_requests)
        self._seq += 1
        self._ready_ids, self._ready_chunks, self._ready_rows = [], [], 0
        self._ready_requests = []
        if self._pool is None:
            self._commit(*job)
            return
        while len(self._inflight) >= self._threads:  # bound memory: wait for the oldest
            self._inflight.pop(0).result()
        self._inflight.append(self._pool.submit(self._commit, *job))

    def _commit(
        self,
        seq: int,
        ids: list[str],
        chunks: list[E.Chunk],
        requests: list[tuple[int, S.RequestRecord]],
    ) -> None:
        name = f"{S.PART_PREFIX}{self.writer_id}-{seq:06d}.parquet"
        act_tmp = self._act_dir / f"{S.TMP_PREFIX}{name}"
        req_tmp = self._req_dir / f"{S.TMP_PREFIX}{name}"
        try:
            acts = E.activations_table(self._act_schema, self.top_k, ids, chunks)
            E.write_synced(acts, act_tmp, **self._write_options)
            records = [r for _, r in sorted(requests, key=lambda x: x[0])]
            with self._state:  # commit parts in sequence order
                self._state.wait_for(lambda: self._next_commit == seq)
            with dir_lock(self.path):
                self._refresh_committed()
                dup = [r.request_id for r in records if r.request_id in self._foreign_ids]
                if dup:
                    raise TraceWriteError(
                        f"{self.path}: request {dup[0]!r} was committed meanwhile by another "
                        f"writer; part {name} ({len(records)} requests) is not committed"
                    )
                first = self._max_arrival + 1
                arrivals = list(range(first, first + len(records)))
                E.write_synced(E.requests_table(records, arrivals), req_tmp, compression="zstd")
                os.replace(act_tmp, self._act_dir / name)
                fsync_dir(self._act_dir)
                os.replace(req_tmp, self._req_dir / name)  # the commit point
                fsync_dir(self._req_dir)
                self._seen_parts.add(name)
                self._foreign_ids.update(r.request_id for r in records)
                self._max_arrival = first + len(records) - 1
            self.parts_written += 1
            self.rows_written += acts.num_rows
            self.requests_written += len(records)
            log.debug("committed %s: %d requests, %d activations", name, len(records), len(acts))
        finally:
            act_tmp.unlink(missing_ok=True)
            req_tmp.unlink(missing_ok=True)
            with self._state:
                self._next_commit = max(self._next_commit, seq + 1)
                self._state.notify_all()

    def flush(self) -> None:
        """Commit every complete buffered request; return once all are committed."""
        self._check_open()
        self._submit()
        while self._inflight:
            self._inflight.pop(0).result()

    def close(self) -> None:
        if self._closed:
            return
        try:
            self.flush()
        finally:
            for fut in self._inflight:  # after an error: still wait for the others
                with contextlib.suppress(Exception):
                    fut.result()
            self._inflight = []
            if self._pool is not None:
                self._pool.shutdown(wait=True)
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
