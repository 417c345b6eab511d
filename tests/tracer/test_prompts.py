from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from moetrace.errors import PromptsError
from moetrace.tracer.prompts import Prompt, load_prompts


def test_jsonl_with_ids_tags_and_defaults(tmp_path) -> None:
    f = tmp_path / "p.jsonl"
    f.write_text(
        json.dumps({"id": "a", "prompt": "hello", "tags": {"domain": "math"}})
        + "\n\n"
        + json.dumps({"prompt": "bye"})
        + "\n"
    )
    prompts = load_prompts(f)
    assert [(p.id, p.text, dict(p.tags)) for p in prompts] == [
        ("a", "hello", {"domain": "math"}),
        ("p3", "bye", {}),
    ]


def test_plain_text_one_per_line(tmp_path) -> None:
    f = tmp_path / "p.txt"
    f.write_text("first prompt\n\nsecond\n")
    assert [(p.id, p.text) for p in load_prompts(f)] == [("p1", "first prompt"), ("p3", "second")]


def test_parquet(tmp_path) -> None:
    f = tmp_path / "p.parquet"
    pq.write_table(pa.table({"id": ["x", "y"], "prompt": ["one", "two"]}), f)
    assert [(p.id, p.text) for p in load_prompts(f)] == [("x", "one"), ("y", "two")]


@pytest.mark.parametrize(
    ("line", "needle"),
    [
        ("{not json", "invalid JSON"),
        (json.dumps({"text": "no prompt field"}), "'prompt' must be a string"),
        (json.dumps({"prompt": "x", "tags": [1]}), "'tags' must be an object"),
        (json.dumps(["a list"]), "expected a JSON object"),
    ],
)
def test_malformed_line_names_file_and_line(tmp_path, line: str, needle: str) -> None:
    f = tmp_path / "bad.jsonl"
    f.write_text(json.dumps({"prompt": "ok"}) + "\n" + line + "\n")
    with pytest.raises(PromptsError, match=needle) as info:
        load_prompts(f)
    assert f"{f}:2" in str(info.value)


def test_duplicate_ids_and_missing_file(tmp_path) -> None:
    f = tmp_path / "dup.jsonl"
    f.write_text(
        json.dumps({"id": "a", "prompt": "x"}) + "\n" + json.dumps({"id": "a", "prompt": "y"})
    )
    with pytest.raises(PromptsError, match="duplicate prompt id 'a'"):
        load_prompts(f)
    with pytest.raises(PromptsError, match="not found"):
        load_prompts(tmp_path / "missing.jsonl")


@pytest.mark.parametrize("text", ["", " ", " \t \u3000"])
def test_empty_jsonl_prompt_names_file_and_line(tmp_path, text: str) -> None:
    f = tmp_path / "p.jsonl"
    f.write_text(
        json.dumps({"id": "a", "prompt": "ok"})
        + "\n\n"  # a blank line is not a prompt: skipped, and it still counts as line 2
        + json.dumps({"id": "b", "prompt": text})
        + "\n"
        + json.dumps({"id": "c", "prompt": "fine"})
        + "\n"
    )
    with pytest.raises(PromptsError, match="empty") as info:
        load_prompts(f)
    assert str(info.value).startswith(f"{f}:3: ")


def test_empty_parquet_prompt_and_list_prompt(tmp_path) -> None:
    f = tmp_path / "p.parquet"
    pq.write_table(pa.table({"id": ["x", "y"], "prompt": ["one", "  "]}), f)
    with pytest.raises(PromptsError, match=r"row 1: the prompt is empty"):
        load_prompts(f)
    with pytest.raises(PromptsError, match=r"prompts\[1\] \(prompt 'p1'\): the prompt is empty"):
        Prompt("p1", "\n", where="prompts[1]")


def test_prompts_remember_where_they_were_read(tmp_path) -> None:
    f = tmp_path / "p.txt"
    f.write_text("first\n\nsecond\n")
    assert [p.describe() for p in load_prompts(f)] == [
        f"{f}:1 (prompt 'p1')",
        f"{f}:3 (prompt 'p3')",
    ]


_text = st.text(st.characters(blacklist_categories=("Cs",)), max_size=40)


@settings(max_examples=40, deadline=None)
@given(
    st.lists(
        st.tuples(
            _text.filter(bool),
            _text.filter(str.strip),  # empty / whitespace-only prompts are errors
            st.dictionaries(_text, _text, max_size=3),
        ),
        min_size=1,
        max_size=5,
        unique_by=lambda t: t[0],
    )
)
def test_jsonl_round_trip(tmp_path_factory, rows) -> None:
    f = tmp_path_factory.mktemp("h") / "p.jsonl"
    f.write_text(
        "".join(json.dumps({"id": i, "prompt": p, "tags": t}) + "\n" for i, p, t in rows),
        encoding="utf-8",
    )
    assert [(p.id, p.text, dict(p.tags)) for p in load_prompts(f)] == rows
