"""Small output files (reports, plans, statistics): checked before the work, written atomically.

:func:`check_writable` is called when a command starts, so a bad ``--out`` fails before
minutes of measuring; :func:`write_text_atomic` creates missing folders and replaces the
file in one rename, so an interrupted write never leaves half a file where a good one was.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from moetrace.errors import OutputError


def check_writable(path: str | os.PathLike[str]) -> Path:
    """Raise OutputError unless ``path`` can be written as a file (folders may be missing)."""
    p = Path(path)
    if p.is_dir():
        raise OutputError(f"{p}: is a folder; give a file name")
    parent = p.parent
    while not parent.exists():
        if parent.parent == parent:
            break
        parent = parent.parent
    if not parent.is_dir():
        raise OutputError(f"{p}: cannot create it, {parent} is a file, not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputError(f"{p}: cannot write in {parent} (permission denied)")
    return p


def write_text_atomic(path: str | os.PathLike[str], text: str) -> Path:
    """Write ``text`` to ``path`` (folders created, temporary file, fsync, rename)."""
    p = check_writable(path)
    try:
        p.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".tmp-{p.name}-", dir=p.parent)
    except OSError as exc:
        raise OutputError(f"{p}: cannot write ({exc.strerror})") from None
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, p)
    except OSError as exc:
        Path(tmp).unlink(missing_ok=True)
        raise OutputError(f"{p}: cannot write ({exc.strerror})") from None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return p
