"""Prompt files for ``moetrace record``: JSONL, plain text (one per line) or Parquet."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow.parquet as pq

from moetrace.errors import PromptsError


@dataclass(frozen=True)
class Prompt:
    """One prompt to run: its request id, text (not empty or whitespace only) and tags.

    ``where`` is the place it was read from (``file:line`` or ``file: row i``), for
    error messages.
    """

    id: str
    text: str
    tags: Mapping[str, str] = field(default_factory=dict)
    where: str | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        if not isinstance(self.id, str) or not self.id:
            raise PromptsError(f"prompt id must be a non-empty string, got {self.id!r}")
        if not isinstance(self.text, str):
            raise PromptsError(f"prompt {self.id!r}: text must be a string, got {self.text!r}")
        if not self.text.strip():
            raise PromptsError(f"{self.describe()}: the prompt is empty (or only whitespace)")
        object.__setattr__(self, "tags", {str(k): str(v) for k, v in dict(self.tags).items()})

    def describe(self) -> str:
        """``file:line (prompt 'id')``, or ``prompt 'id'`` when not read from a file."""
        return f"{self.where} (prompt {self.id!r})" if self.where else f"prompt {self.id!r}"


def _from_obj(obj: object, where: str, default_id: str) -> Prompt:
    if not isinstance(obj, dict):
        raise PromptsError(f"{where}: expected a JSON object with a 'prompt' field")
    text = obj.get("prompt")
    if not isinstance(text, str):
        raise PromptsError(f"{where}: 'prompt' must be a string, got {text!r}")
    if not text.strip():
        raise PromptsError(f"{where}: the prompt is empty (or only whitespace)")
    pid = obj.get("id", default_id)
    if pid is None or (not isinstance(pid, (str, int))) or pid == "":
        raise PromptsError(f"{where}: 'id' must be a non-empty string or integer, got {pid!r}")
    tags = obj.get("tags") or {}
    if not isinstance(tags, dict):
        raise PromptsError(f"{where}: 'tags' must be an object, got {tags!r}")
    return Prompt(str(pid), text, tags, where=where)


def _check_unique(prompts: list[Prompt], path: Path) -> list[Prompt]:
    seen: set[str] = set()
    for p in prompts:
        if p.id in seen:
            raise PromptsError(f"{path}: duplicate prompt id {p.id!r}")
        seen.add(p.id)
    return prompts


def load_prompts(path: str | os.PathLike[str]) -> list[Prompt]:
    """Read prompts; ids default to ``p<line or row number>``.

    ``.jsonl``: one object per line with ``prompt``, optional ``id`` and ``tags``;
    ``.parquet``: columns ``prompt``, optional ``id`` and ``tags``; anything else: plain
    text, one prompt per non-empty line. Blank (or whitespace-only) lines of text and JSONL
    files are skipped: they are not prompts. A prompt whose text is empty or only
    whitespace (``{"prompt": ""}``, an empty Parquet cell) is a :class:`PromptsError`
    naming the file and line, so a bad file is rejected before anything is recorded.
    """
    path = Path(path)
    if not path.is_file():
        raise PromptsError(f"{path}: prompts file not found")
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        try:
            rows = pq.read_table(path).to_pylist()
        except Exception as exc:  # pyarrow raises several types for a bad file
            raise PromptsError(f"{path}: not a readable Parquet file ({exc})") from None
        prompts = [_from_obj(row, f"{path}: row {i}", f"p{i}") for i, row in enumerate(rows)]
        return _check_unique(prompts, path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as exc:
        raise PromptsError(f"{path}: not UTF-8 text ({exc})") from None
    prompts = []
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        if suffix in (".jsonl", ".json", ".ndjson"):
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise PromptsError(f"{where}: invalid JSON ({exc.msg})") from None
            prompts.append(_from_obj(obj, where, f"p{lineno}"))
        else:
            prompts.append(Prompt(f"p{lineno}", line, where=where))
    if not prompts:
        raise PromptsError(f"{path}: no prompts")
    return _check_unique(prompts, path)
