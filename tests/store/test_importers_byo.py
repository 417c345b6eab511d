"""The bring-your-own importer (Parquet / CSV / JSONL rows), built from the documented table."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
from importkit import byo_rows, write_byo

from moetrace.errors import ImportFormatError
from moetrace.store import open_trace
from moetrace.store.importers import import_trace

BYO = "byo"


def _activations(out: Path) -> list[tuple[object, ...]]:
    t = open_trace(out).sql(
        "SELECT request_id, token, step, phase, layer, e0, e1 FROM activations "
        "ORDER BY request_id, token, layer"
    )
    return [tuple(r.values()) for r in t.to_pylist()]


def _expected(rows: list[dict[str, object]]) -> list[tuple[object, ...]]:
    steps: dict[tuple[object, object], int] = {}
    for r in sorted(rows, key=lambda r: (r["request_id"], r["token"])):
        if r["phase"] == "decode":
            key = (r["request_id"], r["token"])
            if key not in steps:
                steps[key] = 1 + len({k for k in steps if k[0] == r["request_id"]})
    out = []
    for r in rows:
        step = steps.get((r["request_id"], r["token"]), 0)
        e = r["experts"]
        out.append((r["request_id"], r["token"], step, r["phase"], r["layer"], e[0], e[1]))  # type: ignore[index]
    return sorted(out, key=lambda x: (x[0], x[1], x[4]))  # type: ignore[return-value]


@pytest.mark.parametrize("suffix", [".jsonl", ".csv", ".parquet"])
def test_round_trip_any_order(tmp_path: Path, suffix: str) -> None:
    rows = byo_rows({"a": (3, 2), "b": (1, 4), "c": (2, 0)}, weights=True, seed=1)
    shuffled = rows[:]
    random.Random(0).shuffle(shuffled)
    write_byo(tmp_path / "src" / f"t{suffix}", shuffled)
    res = import_trace(BYO, tmp_path / "src", tmp_path / "out", model_name="m", progress=False)
    assert res.requests_imported == 3 and res.activations == len(rows)
    assert (res.prefill_tokens, res.decode_tokens) == (6, 6)
    assert _activations(tmp_path / "out") == _expected(rows)
    trace = open_trace(tmp_path / "out")
    assert trace.manifest.gate_weights is True
    model = trace.manifest.model
    assert (model.num_layers, model.moe_layers, model.top_k) == (4, (1, 3), 2)
    got = trace.sql("SELECT w0, w1 FROM activations ORDER BY request_id, token, layer")
    want = [
        r["weights"] for r in sorted(rows, key=lambda r: (r["request_id"], r["token"], r["layer"]))
    ]
    assert np.allclose(np.asarray([list(r.values()) for r in got.to_pylist()]), want)
    reqs = {r["request_id"]: r for r in trace.sql("SELECT * FROM requests").to_pylist()}
    assert (reqs["b"]["prompt_tokens"], reqs["b"]["generated_tokens"]) == (1, 4)
    assert dict(reqs["a"]["tags"])["source_file"] == f"t{suffix}"


def test_scalar_columns_step_arrival_and_dropped(tmp_path: Path) -> None:
    rows = byo_rows({"x": (2, 2), "y": (1, 1)}, seed=2)
    flat = []
    for r in rows:
        e = list(r.pop("experts"))  # type: ignore[call-overload]
        if r["request_id"] == "y" and r["token"] == 1 and r["layer"] == 3:
            e[1] = -1  # dropped
        tok = int(r["token"])  # type: ignore[call-overload]
        step = 0 if r["phase"] == "prefill" else 5 + tok  # steps given, not 1..n
        arrival = 20.0 if r["request_id"] == "x" else 10.0
        flat.append({**r, "e0": e[0], "e1": e[1], "step": step, "arrival_time": arrival,
                     "prompt_text": f"text {r['request_id']}"})  # fmt: skip
    write_byo(tmp_path / "t.parquet", flat)
    res = import_trace(BYO, tmp_path / "t.parquet", tmp_path / "out", model_name="m",
                       num_experts=8, progress=False)  # fmt: skip
    assert res.requests_imported == 2
    trace = open_trace(tmp_path / "out")
    assert trace.manifest.gate_weights is False
    reqs = trace.sql("SELECT * FROM requests ORDER BY arrival").to_pylist()
    assert [r["request_id"] for r in reqs] == ["y", "x"]  # ordered by arrival_time
    assert [r["arrival_time"] for r in reqs] == [10.0, 20.0]
    assert reqs[1]["prompt_text"] == "text x"
    steps = trace.sql("SELECT DISTINCT token, step FROM activations WHERE request_id = 'x' "
                      "ORDER BY token").to_pylist()  # fmt: skip
    assert [(r["token"], r["step"]) for r in steps] == [(0, 0), (1, 0), (2, 7), (3, 8)]
    dropped = trace.sql("SELECT e1 FROM activations WHERE request_id='y' AND token=1 AND layer=3")
    assert dropped.column(0).to_pylist() == [-1]


def _bad(rows: list[dict[str, object]], change: str) -> list[dict[str, object]]:
    rows = json.loads(json.dumps(rows))
    if change == "missing-column":
        for r in rows:
            del r["layer"]
    elif change == "mixed-top-k":
        rows[3]["experts"] = [1, 2, 3]
    elif change == "unknown-phase":
        rows[2]["phase"] = "verify"
    elif change == "repeated":
        rows[5] = {**rows[4]}
    elif change == "decode-before-prefill":
        for r in rows:
            if r["token"] == 0:
                r["phase"] = "decode"
    elif change == "non-integer-id":
        rows[1]["experts"] = [1.5, 2]
    elif change == "negative-id":
        rows[1]["experts"] = [-3, 2]
    elif change == "non-integer-token":
        rows[6]["token"] = "two"
    elif change == "missing-layer-row":
        del rows[3]
    elif change == "empty-request-id":
        rows[0]["request_id"] = ""
    return rows


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ("missing-column", "t.jsonl: missing column 'layer'"),
        ("mixed-top-k", "t.jsonl: line 4: 3 experts, expected 2 as in the first row (mixed top-k)"),
        ("unknown-phase", "t.jsonl: line 3: unknown phase 'verify' (prefill or decode)"),
        ("repeated", "t.jsonl: line 6: repeated (request 'a', token 2, layer 1), also on line 5"),
        ("decode-before-prefill", "decode token 0 of request 'a' comes before its prefill token 2"),
        ("non-integer-id", "t.jsonl: line 2: non-integer id in experts: 1.5"),
        ("negative-id", "t.jsonl: line 2: negative expert id -3 (only -1 = dropped)"),
        (
            "non-integer-token",
            "t.jsonl: line 7: column 'token' is a string, but a number on line 1",
        ),
        ("missing-layer-row", "t.jsonl: line 3: request 'a' token 1 has no row for layer(s) [3]"),
        ("empty-request-id", "t.jsonl: line 1: empty request_id"),
    ],
)
def test_bad_input_names_file_line_and_problem(tmp_path: Path, change: str, message: str) -> None:
    rows = byo_rows({"a": (3, 2)}, seed=3)
    write_byo(tmp_path / "good" / "t.jsonl", rows)  # the check passes on the good file
    import_trace(BYO, tmp_path / "good", tmp_path / "ok", model_name="m", progress=False)
    write_byo(tmp_path / "bad" / "t.jsonl", _bad(rows, change))
    with pytest.raises(ImportFormatError) as err:
        import_trace(BYO, tmp_path / "bad", tmp_path / "out", model_name="m", progress=False)
    assert message in str(err.value)


def test_csv_errors_name_the_line(tmp_path: Path) -> None:
    rows = byo_rows({"a": (2, 1)}, seed=4)
    rows[2]["experts"] = "[1, x]"  # type: ignore[assignment]
    path = write_byo(tmp_path / "t.csv", rows)
    text = path.read_text().replace('"\\"[1, x]\\""', '"[1, x]"')
    path.write_text(text)
    with pytest.raises(
        ImportFormatError, match=r"t\.csv: line 4: experts '\[1, x\]' is not a JSON list"
    ):
        import_trace(BYO, path, tmp_path / "out", model_name="m", progress=False)


def test_skip_bad_rerun_and_request_across_files(tmp_path: Path) -> None:
    src = tmp_path / "src"
    write_byo(src / "0.jsonl", byo_rows({"a": (2, 1), "b": (1, 1)}, seed=5))
    bad = byo_rows({"c": (2, 1)}, seed=6)
    bad[0]["phase"] = "nope"
    write_byo(src / "1.csv", bad)
    write_byo(src / "2.parquet", byo_rows({"d": (3, 0)}, seed=7))
    with pytest.raises(ImportFormatError, match="1.csv: line 2: unknown phase 'nope'"):
        import_trace(BYO, src, tmp_path / "strict", model_name="m", progress=False)
    res = import_trace(BYO, src, tmp_path / "out", model_name="m", skip_bad=True, progress=False)
    assert res.requests_imported == 3 and len(res.bad_files) == 1
    assert res.bad_files[0].path.endswith("1.csv")
    before = (
        open_trace(tmp_path / "out").sql("SELECT count(*) FROM activations").column(0)[0].as_py()
    )
    again = import_trace(BYO, src, tmp_path / "out", model_name="m", skip_bad=True, progress=False)
    assert again.requests_imported == 0 and again.requests_skipped_existing == 3
    trace = open_trace(tmp_path / "out")
    assert trace.sql("SELECT count(*) FROM activations").column(0)[0].as_py() == before
    assert trace.sql("SELECT count(*) FROM requests").column(0)[0].as_py() == 3
    # a request whose rows are in two files of one import
    write_byo(tmp_path / "split" / "0.jsonl", byo_rows({"z": (2, 0)}, seed=8))
    write_byo(tmp_path / "split" / "1.jsonl", byo_rows({"z": (2, 0)}, seed=9))
    with pytest.raises(
        ImportFormatError, match=r"1\.jsonl: line 1: request id 'z' also comes from"
    ):
        import_trace(BYO, tmp_path / "split", tmp_path / "o2", model_name="m", progress=False)


def test_weights_cannot_mix_in_one_trace(tmp_path: Path) -> None:
    write_byo(tmp_path / "w" / "0.jsonl", byo_rows({"a": (2, 1)}, weights=True, seed=1))
    write_byo(tmp_path / "n" / "0.jsonl", byo_rows({"b": (2, 1)}, seed=2))
    import_trace(BYO, tmp_path / "w", tmp_path / "out", model_name="m", progress=False)
    with pytest.raises(ImportFormatError, match="no gate weights, but the trace holds them"):
        import_trace(BYO, tmp_path / "n", tmp_path / "out", model_name="m", progress=False)
