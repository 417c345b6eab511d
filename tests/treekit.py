"""One helper for the tests that assert "nothing already written changed"."""

from __future__ import annotations

import hashlib
from pathlib import Path


def tree_digest(root: Path) -> dict[str, str]:
    """Every file (its sha256) and folder (``/``) under ``root``; empty when it is missing."""
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "/"
        for p in sorted(Path(root).rglob("*"))
    }
