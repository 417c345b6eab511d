"""open_trace: validation of malformed traces (each error names the file), reading."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from storekit import make_manifest, synth_request, write_trace

from moetrace.errors import TraceFormatError
from moetrace.store import committed_parts, open_trace, read_manifest


@pytest.fixture
def trace_path(tmp_path: Path) -> Path:
    m = make_manifest(top_k=2, num_experts=8, moe_layers=(1, 2, 3))
    rng = np.random.default_rng(0)
    reqs = [synth_request(m, rng, f"r{i}", prompt_tokens=3, generated_tokens=2) for i in range(4)]
    path = tmp_path / "trace"
    write_trace(path, m, reqs, part_rows=30)  # 15 rows per request -> 2 parts
    return path


def _first_part(path: Path, kind: str = "activations") -> Path:
    return sorted((path / kind).glob("part-*.parquet"))[0]


def _raises(path: Path, culprit: Path, needle: str) -> None:
    with pytest.raises(TraceFormatError, match=needle) as err:
        open_trace(path)
    assert str(culprit) in str(err.value)


def test_valid_trace_facts(trace_path: Path) -> None:
    trace = open_trace(trace_path)
    assert len(trace.parts) == 2
    assert trace.num_requests == 4 and trace.num_activations == 60
    assert trace.top_k == 2
    assert trace.size_bytes == sum(
        f.stat().st_size for f in trace_path.rglob("*") if f.is_file() and f.name != ".lock"
    )
    batches = list(trace.iter_activations(columns=["token", "e1"], batch_size=7))
    assert sum(b.num_rows for b in batches) == 60
    assert max(b.num_rows for b in batches) <= 7
    assert batches[0].schema.names == ["token", "e1"]
    assert trace.read_activations(["layer"]).num_rows == 60


def test_empty_trace(tmp_path: Path) -> None:
    write_trace(tmp_path / "t", make_manifest(), [])
    trace = open_trace(tmp_path / "t")
    assert trace.num_activations == 0 and trace.parts == ()
    assert trace.read_activations(["e0", "w0"]).schema.names == ["e0", "w0"]
    assert trace.requests().num_rows == 0
    assert trace.sql("SELECT count(*) FROM activations_long").column(0)[0].as_py() == 0


def test_missing_directory(tmp_path: Path) -> None:
    _raises(tmp_path / "nope", tmp_path / "nope", "no such trace directory")


def test_not_a_directory(tmp_path: Path) -> None:
    f = tmp_path / "file"
    f.write_text("x")
    _raises(f, f, "not a directory")


def test_missing_manifest(trace_path: Path) -> None:
    (trace_path / "manifest.json").unlink()
    _raises(trace_path, trace_path / "manifest.json", "missing manifest")


def test_bad_json_manifest(trace_path: Path) -> None:
    (trace_path / "manifest.json").write_text('{"format": "moetrace-trace",')
    _raises(trace_path, trace_path / "manifest.json", "not valid JSON")


def test_manifest_of_other_version(trace_path: Path) -> None:
    target = trace_path / "manifest.json"
    data = json.loads(target.read_text())
    data["format_version"] = 2
    target.write_text(json.dumps(data))
    _raises(trace_path, target, "format version 2 is not supported")


def test_manifest_bad_field(trace_path: Path) -> None:
    target = trace_path / "manifest.json"
    data = json.loads(target.read_text())
    data["model"]["top_k"] = 0
    target.write_text(json.dumps(data))
    _raises(trace_path, target, "top_k")
    with pytest.raises(TraceFormatError, match="top_k"):
        read_manifest(trace_path)


@pytest.mark.parametrize("kind", ["activations", "requests"])
def test_truncated_part(trace_path: Path, kind: str) -> None:
    part = _first_part(trace_path, kind)
    data = part.read_bytes()
    part.write_bytes(data[: len(data) // 2])
    _raises(trace_path, part, "corrupt or truncated")


def test_garbage_part(trace_path: Path) -> None:
    part = _first_part(trace_path)
    part.write_bytes(b"\x00garbage" * 100)
    _raises(trace_path, part, "corrupt or truncated")


def test_empty_part_file(trace_path: Path) -> None:
    part = _first_part(trace_path, "requests")
    part.write_bytes(b"")
    _raises(trace_path, part, "corrupt or truncated")


def test_part_with_other_schema(trace_path: Path) -> None:
    part = _first_part(trace_path)
    table = pq.read_table(part).drop_columns(["w1"])
    pq.write_table(table, part)  # keeps the format-version metadata
    _raises(trace_path, part, r"schema does not match the manifest .*missing .*'w1'")


def test_part_with_other_column_type(trace_path: Path) -> None:
    part = _first_part(trace_path)
    table = pq.read_table(part)
    i = table.schema.get_field_index("e0")
    table = table.set_column(i, "e0", table.column("e0").cast(pa.int32()))
    pq.write_table(table, part)
    _raises(trace_path, part, r"unexpected .*'e0', DataType\(int32\)")


@pytest.mark.parametrize(("version", "needle"), [(b"2", "version 2"), (None, "version none")])
def test_part_of_other_format_version(trace_path: Path, version: bytes | None, needle: str) -> None:
    part = _first_part(trace_path, "requests")
    table = pq.read_table(part)
    meta = dict(table.schema.metadata or {})
    if version is None:
        meta.pop(b"moetrace.format_version")
    else:
        meta[b"moetrace.format_version"] = version
    pq.write_table(table.replace_schema_metadata(meta), part)
    _raises(trace_path, part, needle)


def test_requests_part_without_activations(trace_path: Path) -> None:
    act = _first_part(trace_path)
    act.unlink()
    req = trace_path / "requests" / act.name
    _raises(trace_path, req, "has no activations part")
    with pytest.raises(TraceFormatError, match=act.name):
        committed_parts(trace_path)


def test_corrupt_page_found_on_read(trace_path: Path) -> None:
    """A part whose footer is intact but whose data pages are damaged."""
    part = _first_part(trace_path)
    data = bytearray(part.read_bytes())
    footer_start = len(data) - 8 - int.from_bytes(data[-8:-4], "little")
    for i in range(4, footer_start):
        data[i] = 0xFF
    part.write_bytes(bytes(data))
    trace = open_trace(trace_path)  # footer and schema still valid
    with pytest.raises(TraceFormatError) as err:
        trace.read_activations()
    assert str(part) in str(err.value)


def test_ignores_temp_files_and_uncommitted_parts(
    trace_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    before = open_trace(trace_path)
    act = _first_part(trace_path)
    (act.parent / ".tmp-part-x-000000.parquet").write_bytes(b"partial")
    (trace_path / "requests" / ".tmp-part-x-000000.parquet").write_bytes(b"partial")
    (act.parent / "part-x-000000.parquet").write_bytes(act.read_bytes())  # no requests part
    (act.parent / "notes.txt").write_text("not a part")
    (trace_path / ".tmp-manifest-1.json").write_text("{")
    with caplog.at_level(logging.WARNING, logger="moetrace.store.reader"):
        after = open_trace(trace_path)
    assert after.num_activations == before.num_activations
    assert after.activation_files == before.activation_files
    assert "uncommitted activations part" in caplog.text


def test_validate_false_skips_schema_check(trace_path: Path) -> None:
    part = _first_part(trace_path)
    pq.write_table(pq.read_table(part).drop_columns(["w1"]), part)
    assert open_trace(trace_path, validate=False).num_activations == 60


# ---------------------------------------------------------------- copied parts, expert ids


def _copy_pair(path: Path, name: str = "part-copy-000000.parquet") -> tuple[Path, Path]:
    """Copy the first committed part pair under another name (as a careless user would)."""
    act = _first_part(path)
    req = path / "requests" / act.name
    (path / "activations" / name).write_bytes(act.read_bytes())
    (path / "requests" / name).write_bytes(req.read_bytes())
    return req, path / "requests" / name


def test_copied_part_pair_is_an_error_naming_both_parts(trace_path: Path) -> None:
    original, copy = _copy_pair(trace_path)
    with pytest.raises(TraceFormatError) as err:
        open_trace(trace_path)
    msg = str(err.value)
    assert str(original) in msg and str(copy) in msg
    assert "is also in" in msg and "\n" not in msg
    assert open_trace(trace_path, validate=False).num_requests == 6  # unchecked: counted twice


def test_request_listed_twice_in_one_part(trace_path: Path) -> None:
    part = _first_part(trace_path, "requests")
    table = pq.read_table(part)
    pq.write_table(pa.concat_tables([table, table.slice(0, 1)]), part)
    _raises(trace_path, part, r"request 'r0' is listed twice in this part")


def _set_expert(part: Path, value: int, column: str = "e1", **write_options: object) -> None:
    table = pq.read_table(part)
    col = table.column(column).to_numpy().copy()
    col[3] = value
    i = table.schema.get_field_index(column)
    table = table.set_column(i, table.schema.field(i), pa.array(col, pa.int16()))
    pq.write_table(table, part, **write_options)  # type: ignore[arg-type]


def test_manifest_num_experts_below_the_data(trace_path: Path) -> None:
    target = trace_path / "manifest.json"
    data = json.loads(target.read_text())
    data["model"]["num_experts"] = 4  # the parts hold ids up to 7
    target.write_text(json.dumps(data))
    with pytest.raises(TraceFormatError, match=r"expert id \d+ in column e\d") as err:
        open_trace(trace_path)
    msg = str(err.value)
    assert "activations/part-" in msg and "num_experts=4" in msg
    assert int(msg.split("expert id ")[1].split()[0]) >= 4


@pytest.mark.parametrize("value", [999, -2])
def test_part_with_expert_id_out_of_range(trace_path: Path, value: int) -> None:
    part = _first_part(trace_path)
    _set_expert(part, value)
    _raises(trace_path, part, rf"expert id {value} in column e1 .*num_experts=8")


def test_part_without_statistics_is_still_checked(trace_path: Path) -> None:
    part = _first_part(trace_path)
    _set_expert(part, 999, write_statistics=False)
    assert pq.read_metadata(part).row_group(0).column(6).statistics is None
    _raises(trace_path, part, r"expert id 999 in column e1 .*num_experts=8")


def test_speculative_expert_ids_are_checked(tmp_path: Path) -> None:
    m = make_manifest(top_k=2, num_experts=8, speculative=True)
    rng = np.random.default_rng(1)
    write_trace(tmp_path / "t", m, [synth_request(m, rng, "r0")])
    assert open_trace(tmp_path / "t").num_requests == 1
    part = _first_part(tmp_path / "t")
    _set_expert(part, 8, column="s0")
    _raises(tmp_path / "t", part, r"expert id 8 in column s0")
