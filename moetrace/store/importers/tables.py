"""Reading a table file (Parquet, CSV, JSONL) into Arrow, with the spot of every row.

Used by the bring-your-own importer: :func:`read_table` picks the reader by extension and
returns the table with a function naming where row ``i`` lies in the file (``line 7`` for
CSV/JSONL, ``row 7`` for Parquet); the column helpers turn Arrow columns into checked
numpy arrays and raise :class:`ImportFormatError` naming the file, the spot and the value.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.json as pajson
import pyarrow.parquet as pq

from moetrace.errors import ImportFormatError

TABLE_SUFFIXES = (".parquet", ".csv", ".jsonl")
_TEXT_COLUMNS = ("request_id", "phase", "prompt_text", "experts", "weights")


@dataclass(frozen=True)
class LoadedTable:
    path: Path
    table: pa.Table
    where: Callable[[int], str]
    """Where data row ``i`` lies in the file (``line 7``, ``row 7``)."""

    def fail(self, row: int, message: str) -> ImportFormatError:
        return ImportFormatError(f"{self.path}: {self.where(row)}: {message}")


def read_table(path: Path) -> LoadedTable:
    """The file as an Arrow table (by extension); ImportFormatError when it cannot be read."""
    suffix = path.suffix.lower()
    try:
        if suffix == ".parquet":
            return LoadedTable(path, pq.read_table(path), lambda i: f"row {i + 1}")
        if suffix == ".csv":
            return LoadedTable(path, _read_csv(path), lambda i: f"line {i + 2}")
        if suffix == ".jsonl":
            return _read_jsonl(path)
    except OSError as exc:
        raise ImportFormatError(f"{path}: cannot read ({exc})") from None
    except pa.ArrowException as exc:
        first = str(exc).strip().splitlines()[0]
        raise ImportFormatError(f"{path}: not a valid {suffix[1:]} file ({first})") from None
    raise ImportFormatError(f"{path}: unknown table type {suffix!r} (use {TABLE_SUFFIXES})")


def _read_csv(path: Path) -> pa.Table:
    with open(path, encoding="utf-8", errors="replace", newline="") as fh:
        header = fh.readline().strip().split(",")
    types = {name: pa.string() for name in _TEXT_COLUMNS if name in header}
    convert = pacsv.ConvertOptions(column_types=types, strings_can_be_null=False)
    return pacsv.read_csv(path, read_options=pacsv.ReadOptions(use_threads=False),
                          convert_options=convert)  # fmt: skip


def _read_jsonl(path: Path) -> LoadedTable:
    data = path.read_bytes()
    lines = [i + 1 for i, ln in enumerate(data.split(b"\n")) if ln.strip()]
    try:
        table = pajson.read_json(path, read_options=pajson.ReadOptions(use_threads=False))
    except pa.ArrowInvalid as exc:
        raise _locate_jsonl_problem(path, data, str(exc)) from None
    if table.num_rows != len(lines):  # pragma: no cover - Arrow skips only blank lines
        raise ImportFormatError(f"{path}: {table.num_rows} rows for {len(lines)} lines")
    return LoadedTable(path, table, lambda i: f"line {lines[i]}")


def _kind(value: object) -> str:
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int | float):
        return "number"
    return {str: "string", list: "list", dict: "object", type(None): "null"}[type(value)]


def _locate_jsonl_problem(path: Path, data: bytes, arrow_message: str) -> ImportFormatError:
    """The first line that is not a JSON object or changes a column's kind."""
    first_kind: dict[str, tuple[str, int]] = {}
    for n, raw in enumerate(data.split(b"\n"), start=1):
        if not raw.strip():
            continue
        try:
            obj = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            return ImportFormatError(f"{path}: line {n}: invalid JSON ({exc})")
        if not isinstance(obj, dict):
            return ImportFormatError(f"{path}: line {n}: expected a JSON object per line")
        for key, value in obj.items():
            kind = _kind(value)
            if kind == "null":
                continue
            seen = first_kind.setdefault(key, (kind, n))
            if seen[0] != kind:
                return ImportFormatError(
                    f"{path}: line {n}: column {key!r} is a {kind}, but a {seen[0]} on line "
                    f"{seen[1]}"
                )
    first = arrow_message.strip().splitlines()[0]
    return ImportFormatError(f"{path}: not valid JSONL ({first})")


# ---------------------------------------------------------------- column helpers
def column(t: LoadedTable, name: str) -> pa.ChunkedArray:
    if name not in t.table.column_names:
        raise ImportFormatError(
            f"{t.path}: missing column {name!r} (columns: {', '.join(t.table.column_names)})"
        )
    col = t.table.column(name)
    if col.null_count:
        row = int(np.flatnonzero(col.is_null().to_numpy(zero_copy_only=False))[0])
        raise t.fail(row, f"{name} is empty")
    return col


def int_column(t: LoadedTable, name: str, *, minimum: int | None = 0) -> np.ndarray:
    """An integer column as int64: integral numbers only, each >= ``minimum``."""
    col = column(t, name)
    typ = col.type
    if pa.types.is_integer(typ):
        arr = col.to_numpy().astype(np.int64)
    elif pa.types.is_floating(typ):
        f = col.to_numpy()
        bad = np.flatnonzero(~np.isfinite(f) | (f != np.round(f)))
        if bad.size:
            raise t.fail(int(bad[0]), f"non-integer {name} {float(f[bad[0]])!r}")
        arr = f.astype(np.int64)
    else:
        values = col.to_pylist()
        for row, v in enumerate(values):
            if not (isinstance(v, str) and re.fullmatch(r"\s*-?\d+\s*", v)):
                raise t.fail(row, f"non-integer {name} {v!r}")
        arr = np.asarray([int(v) for v in values], dtype=np.int64)
    if minimum is not None and arr.size and arr.min() < minimum:
        row = int(np.flatnonzero(arr < minimum)[0])
        raise t.fail(row, f"negative {name} {int(arr[row])}")
    return arr


def list_column(t: LoadedTable, name: str, kind: str) -> np.ndarray:
    """A list column (or JSON text of lists) as ``(rows, k)``; ``kind`` ``int``/``float``."""
    col = column(t, name)
    if pa.types.is_string(col.type) or pa.types.is_large_string(col.type):
        col = _parse_text_lists(t, name, col, kind)
    if not (pa.types.is_list(col.type) or pa.types.is_large_list(col.type)):
        raise t.fail(0, f"{name} must be a list per row, got {col.type}")
    arr = col.combine_chunks()
    lengths = pc.list_value_length(arr).to_numpy(zero_copy_only=False)
    k = int(lengths[0]) if len(lengths) else 0
    odd = np.flatnonzero(lengths != k)
    if odd.size:
        row = int(odd[0])
        raise t.fail(row, f"{lengths[row]} {name}, expected {k} as in the first row "
                          "(mixed top-k)")  # fmt: skip
    if k == 0 and len(lengths):
        raise t.fail(0, f"empty {name} list")
    flat = arr.flatten()
    if flat.null_count:
        pos = int(np.flatnonzero(flat.is_null().to_numpy(zero_copy_only=False))[0])
        raise t.fail(pos // k, f"null in {name}")
    values = flat.to_numpy(zero_copy_only=False)
    return _typed(t, name, values, kind, k).reshape(-1, k)


def columns_block(t: LoadedTable, names: list[str], kind: str) -> np.ndarray:
    """Scalar columns ``e0..e{k-1}`` (or ``w0..``) as ``(rows, k)``."""
    parts = []
    for name in names:
        col = t.table.column(name)
        if col.null_count:
            row = int(np.flatnonzero(col.is_null().to_numpy(zero_copy_only=False))[0])
            raise t.fail(row, f"{name} is empty (mixed top-k?)")
        if kind == "int":
            parts.append(int_column(t, name, minimum=None))
        else:
            parts.append(_typed(t, name, col.to_numpy(zero_copy_only=False), kind, 1))
    return np.stack(parts, axis=1)


def _typed(t: LoadedTable, name: str, values: np.ndarray, kind: str, k: int) -> np.ndarray:
    if values.dtype.kind in "iu":
        return values.astype(np.int64 if kind == "int" else np.float64)
    if values.dtype.kind == "f":
        if kind == "float":
            return values.astype(np.float64)
        bad = np.flatnonzero(~np.isfinite(values) | (values != np.round(values)))
        if bad.size:
            raise t.fail(int(bad[0]) // k, f"non-integer id in {name}: {float(values[bad[0]])!r}")
        return values.astype(np.int64)
    raise t.fail(0, f"{name} must hold numbers, got {values.dtype}")


def _parse_text_lists(
    t: LoadedTable, name: str, col: pa.ChunkedArray, kind: str
) -> pa.ChunkedArray | pa.Array:
    """``"[1, 2]"`` text (CSV) as a list column; the first bad row named on failure."""
    target = pa.list_(pa.int64() if kind == "int" else pa.float64())
    num = r"-?\d+" if kind == "int" else r"-?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?"
    pattern = rf"^\s*\[\s*{num}\s*(,\s*{num}\s*)*\]\s*$"
    ok = pc.match_substring_regex(col, pattern).to_numpy(zero_copy_only=False)
    if ok.all():
        inner = pc.replace_substring_regex(col, r"[\[\]\s]", "")
        return pc.split_pattern(inner, ",").cast(target)
    first_bad = int(np.flatnonzero(~ok)[0])
    for row, text in enumerate(col.to_pylist()[first_bad:], start=first_bad):
        try:
            value = json.loads(text)
        except json.JSONDecodeError:
            raise t.fail(row, f"{name} {text!r} is not a JSON list") from None
        if not isinstance(value, list):
            raise t.fail(row, f"{name} {text!r} is not a JSON list")
        for x in value:
            ok = type(x) is int if kind == "int" else isinstance(x, int | float)
            if not ok or isinstance(x, bool):
                what = "id" if kind == "int" else "weight"
                raise t.fail(row, f"non-{'integer' if kind == 'int' else 'numeric'} {what} "
                                  f"{x!r} in {name}")  # fmt: skip
        if not value:
            raise t.fail(row, f"empty {name} list")
    raise t.fail(first_bad, f"{name} {col[first_bad]} is not a list of numbers")
