"""Property tests of the importers' vectorized list parser and BPE piece decoder."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
from hypothesis import given, settings
from hypothesis import strategies as st

from moetrace.store.importers.bpe import _unicode_to_byte, decode_pieces
from moetrace.store.importers.numparse import ListParseError, parse_int_lists

ids = st.lists(st.integers(0, 10**6), min_size=0, max_size=8)
spaces = st.sampled_from(["", " ", "  "])


@settings(deadline=None, max_examples=60)
@given(st.lists(st.tuples(ids, spaces, spaces), min_size=1, max_size=30))
def test_parse_int_lists_matches_python(rows: list[tuple[list[int], str, str]]) -> None:
    texts = [f"[{a}" + f",{b}".join(str(x) for x in r) + "]" for r, a, b in rows]
    parsed = parse_int_lists(pa.array(texts))
    assert not isinstance(parsed, ListParseError)
    values, counts = parsed
    assert counts.tolist() == [len(r) for r, _, _ in rows]
    assert values.tolist() == [x for r, _, _ in rows for x in r]


@settings(deadline=None, max_examples=60)
@given(
    st.lists(ids.filter(bool), min_size=1, max_size=10),
    st.integers(0, 9),
    st.sampled_from(["[1, a]", "[1.5]", "[-1, 2]", "1, 2", "[[1], 2]", "[1 2]", "[1,,2]", ""]),
)
def test_parse_int_lists_reports_first_bad_row(rows: list[list[int]], at: int, bad: str) -> None:
    texts = ["[" + ", ".join(map(str, r)) + "]" for r in rows]
    at = min(at, len(texts))
    texts.insert(at, bad)
    parsed = parse_int_lists(pa.array(texts))
    assert isinstance(parsed, ListParseError)
    assert parsed.row == at


def test_parse_int_lists_on_sliced_chunked_column() -> None:
    arr = pa.chunked_array([pa.array(["[9]", "[1, 2]"]), pa.array(["[30, 4]"])]).slice(1)
    values, counts = parse_int_lists(arr)  # type: ignore[misc]
    assert values.tolist() == [1, 2, 30, 4] and counts.tolist() == [2, 2]
    assert isinstance(values, np.ndarray)


@settings(deadline=None, max_examples=60)
@given(st.text(min_size=0, max_size=40), st.integers(1, 5))
def test_decode_pieces_inverts_byte_level_bpe(text: str, piece_len: int) -> None:
    to_char = {b: c for c, b in _unicode_to_byte().items()}
    encoded = "".join(to_char[b] for b in text.encode("utf-8"))
    pieces = [encoded[i : i + piece_len] for i in range(0, len(encoded), piece_len)]
    assert decode_pieces(["<｜begin▁of▁sentence｜>", *pieces]) == text


def test_decode_pieces_examples() -> None:
    assert decode_pieces(["How", "Ġdo", "ĠI", "Ċ", "ĉx", "</s>"]) == "How do I\n\tx"
