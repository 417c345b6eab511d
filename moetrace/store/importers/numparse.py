"""Vectorized parsing of a string column of integer lists such as ``"[8, 26, 56]"``.

Works on the Arrow string buffers with numpy (no per-row Python objects); any row that is
not ``[int, int, ...]`` is reported by its index.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa

_ALLOWED = np.zeros(256, dtype=bool)
_ALLOWED[[ord(c) for c in "0123456789[], \t"]] = True
_MAX_DIGITS = 9


@dataclass(frozen=True)
class ListParseError:
    row: int
    reason: str


def parse_int_lists(
    column: pa.Array | pa.ChunkedArray,
) -> tuple[np.ndarray, np.ndarray] | ListParseError:
    """(flat int64 values, count per row), or the first bad row and why."""
    arr = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    if arr.null_count:
        return ListParseError(
            int(np.flatnonzero(arr.is_null().to_numpy(zero_copy_only=False))[0]), "empty value"
        )
    if pa.types.is_large_string(arr.type):
        off_type = np.int64
    elif pa.types.is_string(arr.type):
        off_type = np.int32
    else:
        return ListParseError(0, f"expected text, got {arr.type}")
    n = len(arr)
    _, off_buf, data_buf = arr.buffers()
    offsets = np.frombuffer(off_buf, dtype=off_type)[arr.offset : arr.offset + n + 1].astype(
        np.int64
    )
    data = (
        np.frombuffer(data_buf, dtype=np.uint8) if data_buf is not None else np.zeros(0, np.uint8)
    )
    b = data[offsets[0] : offsets[-1]]
    offs = offsets - offsets[0]

    lengths = np.diff(offs)
    row_id = np.repeat(np.arange(n, dtype=np.int64), lengths)

    def row_of(pos: np.ndarray | int) -> np.ndarray:
        return row_id[pos]

    bad = np.flatnonzero(~_ALLOWED[b])
    if bad.size:
        ch = chr(b[bad[0]]) if b[bad[0]] < 128 else f"byte 0x{b[bad[0]]:02x}"
        return ListParseError(int(row_of(bad[0])), f"non-integer expert id (unexpected {ch!r})")
    short = np.flatnonzero(lengths < 2)
    if short.size:
        return ListParseError(int(short[0]), "expected a list like [1, 2, 3]")
    first, last = b[offs[:-1]], b[offs[1:] - 1]
    brackets = np.flatnonzero((first != ord("[")) | (last != ord("]")))
    if brackets.size:
        return ListParseError(int(brackets[0]), "expected a list like [1, 2, 3]")
    opens = np.bincount(row_of(np.flatnonzero(b == ord("["))), minlength=n)
    closes = np.bincount(row_of(np.flatnonzero(b == ord("]"))), minlength=n)
    nested = np.flatnonzero((opens != 1) | (closes != 1))
    if nested.size:
        return ListParseError(int(nested[0]), "nested or unbalanced brackets")
    is_digit = (b >= 48) & (b <= 57)
    prev = np.concatenate(([False], is_digit[:-1]))
    nxt = np.concatenate((is_digit[1:], [False]))
    starts = np.flatnonzero(is_digit & ~prev)
    ends = np.flatnonzero(is_digit & ~nxt) + 1
    run_len = ends - starts
    if run_len.size and run_len.max() > _MAX_DIGITS:
        i = int(np.argmax(run_len))
        return ListParseError(int(row_of(starts[i])), "expert id too large")
    counts = np.bincount(row_of(starts), minlength=n)
    commas = np.bincount(row_of(np.flatnonzero(b == ord(","))), minlength=n)
    bad_sep = np.flatnonzero(commas != np.maximum(counts - 1, 0))
    if bad_sep.size:
        return ListParseError(int(bad_sep[0]), "ids must be separated by single commas")
    pos = np.flatnonzero(is_digit)
    run_id = np.repeat(np.arange(starts.size), run_len)
    place = (ends[run_id] - pos - 1).astype(np.int64)
    digits = (b[pos] - 48).astype(np.int64) * (10**place)
    if starts.size:
        run_start_idx = np.concatenate(([0], np.cumsum(run_len)[:-1]))
        values = np.add.reduceat(digits, run_start_idx)
    else:
        values = np.zeros(0, np.int64)
    return values, counts
