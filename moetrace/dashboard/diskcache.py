"""A versioned on-disk cache of the dashboard's per-trace aggregates (numpy arrays).

Entries live in ``$MOETRACE_CACHE_DIR`` (else ``$XDG_CACHE_HOME/moetrace``, else
``~/.cache/moetrace``), under ``dashboard/v{CACHE_VERSION}/<key>/<name>.npz``, never inside
the trace directory. The key hashes the trace's absolute path, its manifest and the name,
size and mtime of every committed part, so adding a part (or rewriting one) starts a new
entry (and the older state's entries are deleted). Values are plain arrays (``np.savez``, no pickles); writes go to a temporary file
renamed into place, and an unwritable cache directory only costs the speed-up.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np

from moetrace.store import schema as S
from moetrace.store.reader import committed_parts

log = logging.getLogger(__name__)

CACHE_VERSION = 1
"""Bumped whenever a cached aggregate changes meaning or layout."""
ENV_VAR = "MOETRACE_CACHE_DIR"

Arrays = dict[str, np.ndarray]


def cache_root() -> Path:
    """The dashboard's cache folder (see the module docstring for the lookup order)."""
    env = os.environ.get(ENV_VAR)
    if env:
        base = Path(env)
    else:
        xdg = os.environ.get("XDG_CACHE_HOME")
        base = (Path(xdg) if xdg else Path.home() / ".cache") / "moetrace"
    return base / "dashboard" / f"v{CACHE_VERSION}"


def _file_sig(p: Path) -> list[object]:
    st = p.stat()
    return [p.name, st.st_size, st.st_mtime_ns]


def trace_key(path: str | os.PathLike[str]) -> str:
    """A digest of the trace's identity: its path, manifest and committed part files."""
    base = Path(path).resolve()
    sig: list[object] = [CACHE_VERSION, str(base)]
    try:
        sig.append(_file_sig(base / S.MANIFEST_NAME))
    except OSError:
        sig.append(None)
    for act, req in committed_parts(base):
        sig.append(_file_sig(act) + _file_sig(req))
    return hashlib.sha256(json.dumps(sig).encode("utf-8")).hexdigest()[:32]


def entry_path(path: str | os.PathLike[str], name: str) -> Path:
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in name)
    return cache_root() / trace_key(path) / f"{safe}.npz"


def load(path: str | os.PathLike[str], name: str) -> Arrays | None:
    """The cached arrays of ``name`` for this trace state, or None (missing or unreadable)."""
    p = entry_path(path, name)
    if not p.is_file():
        return None
    try:
        with np.load(p, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except (OSError, ValueError) as exc:
        log.warning("ignoring unreadable dashboard cache entry %s: %s", p, exc)
        return None


SOURCE_FILE = "source.json"


def _prune_stale(entry_dir: Path, trace_path: str) -> None:
    """Remove the entries of earlier states of the same trace (other keys, same path)."""
    for other in entry_dir.parent.iterdir():
        if other == entry_dir or not (other / SOURCE_FILE).is_file():
            continue
        try:
            src = json.loads((other / SOURCE_FILE).read_text(encoding="utf-8")).get("path")
        except (OSError, ValueError, AttributeError):
            continue
        if src == trace_path:
            log.info("removing stale dashboard cache entries %s", other)
            shutil.rmtree(other, ignore_errors=True)


def save(path: str | os.PathLike[str], name: str, arrays: Arrays) -> Path | None:
    """Write an entry atomically; returns its path, or None when the cache is unwritable.

    The first entry of a new trace state removes the entries of the trace's older states.
    """
    p = entry_path(path, name)
    try:
        if not p.parent.is_dir():
            p.parent.mkdir(parents=True, exist_ok=True)
            resolved = str(Path(path).resolve())
            (p.parent / SOURCE_FILE).write_text(json.dumps({"path": resolved}), encoding="utf-8")
            _prune_stale(p.parent, resolved)
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".npz", dir=p.parent)
        try:
            with os.fdopen(fd, "wb") as fh:
                np.savez(fh, **arrays)
            os.replace(tmp, p)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    except OSError as exc:
        log.warning("cannot write dashboard cache entry %s: %s", p, exc)
        return None
    return p


def get_or_compute(
    path: str | os.PathLike[str], name: str, compute: Callable[[], Arrays]
) -> Arrays:
    """The cached arrays of ``name``, computing and saving them on a miss."""
    hit = load(path, name)
    if hit is not None:
        return hit
    arrays = compute()
    save(path, name, arrays)
    return arrays
