"""Importers on small generated files: exact counts, inference, errors, re-import."""

from __future__ import annotations

import hashlib
import json
import logging
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from importkit import mb_rows, pbc_experts, pbc_steps, write_csv, write_json

from moetrace.errors import ConfigError, ImportFormatError, TraceWriteError
from moetrace.store import open_trace
from moetrace.store.importers import IMPORT_MARKER, available_formats, import_trace
from moetrace.store.importers.facts import expert_id_gap
from moetrace.store.summary import summarize

PBC = "patterns-behind-chaos"
MB = "moe-beyond"


def _pbc_tree(root: Path) -> dict[str, list[dict[str, object]]]:
    """tiny-moe/{mmlu-algebra: 0,1,2,10 ; mmlu-bio: 0}; experts < 7 except one id 6."""
    files = {
        "mmlu-algebra/0": pbc_steps(3, 2, num_experts=6, seed=1),
        "mmlu-algebra/1": pbc_steps(1, 0, num_experts=6, seed=2),
        "mmlu-algebra/10": pbc_steps(2, 4, num_experts=6, seed=3),
        "mmlu-algebra/2": pbc_steps(5, 1, num_experts=6, seed=4),
        "mmlu-bio/0": pbc_steps(2, 3, num_experts=6, seed=5),
    }
    files["mmlu-bio/0"][1]["3"] = [[6, 0]]  # the highest id anywhere: 6 -> 7 experts
    for rid, steps in files.items():
        write_json(root / "tiny-moe" / f"{rid}.json", steps)
    return files


def test_formats_registered() -> None:
    formats = available_formats()
    assert formats == sorted(formats)
    assert {"moe-beyond", "patterns-behind-chaos", "byo", "vllm-offline", "sglang-dump"} <= set(
        formats
    )


def test_pbc_tree_exact_counts_and_inference(tmp_path: Path) -> None:
    files = _pbc_tree(tmp_path / "src")
    res = import_trace(PBC, tmp_path / "src" / "tiny-moe", tmp_path / "out", progress=False)
    assert res.model_name == "tiny-moe"
    assert res.requests_imported == 5 and res.requests_skipped_existing == 0
    assert res.prefill_tokens == 3 + 1 + 2 + 5 + 2
    assert res.decode_tokens == 2 + 0 + 4 + 1 + 3
    assert res.activations == (13 + 10) * 2
    assert res.forwards == 3 + 1 + 5 + 2 + 4
    assert list(res.inferred) == [
        "name",
        "num_layers",
        "moe_layers",
        "num_experts",
        "top_k",
        "shared_experts",
    ]
    trace = open_trace(tmp_path / "out")
    model = trace.manifest.model
    assert (model.num_layers, model.moe_layers, model.num_experts, model.top_k) == (4, (1, 3), 7, 2)
    assert model.inferred == tuple(res.inferred)
    assert trace.manifest.source.kind == "imported"
    assert trace.manifest.source.origin == PBC
    reqs = trace.sql("SELECT * FROM requests ORDER BY arrival").to_pylist()
    order = ["mmlu-algebra/0", "mmlu-algebra/1", "mmlu-algebra/2", "mmlu-algebra/10", "mmlu-bio/0"]
    assert [r["request_id"] for r in reqs] == order
    tags = dict(reqs[3]["tags"])
    assert (tags["benchmark"], tags["subject"], tags["dataset"]) == (
        "mmlu",
        "algebra",
        "mmlu-algebra",
    )
    assert [r["prompt_tokens"] for r in reqs] == [3, 1, 5, 2, 2]
    assert [r["generated_tokens"] for r in reqs] == [2, 0, 1, 4, 3]
    # forward numbering runs across requests in arrival order
    first_fwd = trace.sql(
        "SELECT request_id, min(forward) f, max(forward) l FROM activations GROUP BY 1"
    ).to_pylist()
    fwd = {r["request_id"]: (r["f"], r["l"]) for r in first_fwd}
    assert [fwd[r] for r in order] == [(0, 2), (3, 3), (4, 5), (6, 10), (11, 14)]
    # experts round-trip in rank order, tokens numbered prefill then decode
    rows = trace.sql(
        "SELECT token, step, phase::VARCHAR ph, layer, e0, e1 FROM activations "
        "WHERE request_id = 'mmlu-algebra/10' ORDER BY token, layer"
    ).to_pylist()
    want = pbc_experts(files["mmlu-algebra/10"], (1, 3))
    assert np.array_equal(np.array([[r["e0"], r["e1"]] for r in rows]), want)
    assert [r["token"] for r in rows][::2] == [0, 1, 2, 3, 4, 5]
    assert [r["step"] for r in rows][::2] == [0, 0, 1, 2, 3, 4]
    assert [r["ph"] for r in rows][::2] == ["prefill"] * 2 + ["decode"] * 4


def test_pbc_flags_are_not_inferred(tmp_path: Path) -> None:
    write_json(tmp_path / "src" / "x" / "sub" / "0.json", pbc_steps(2, 1))
    res = import_trace(
        PBC,
        tmp_path / "src",
        tmp_path / "out",
        model_name="my-moe",
        num_layers=6,
        num_experts=8,
        top_k=2,
        shared_experts=1,
        bytes_per_expert=1000,
        progress=False,
    )
    assert list(res.inferred) == ["moe_layers"]
    model = open_trace(tmp_path / "out").manifest.model
    assert (model.name, model.num_layers, model.num_experts, model.shared_experts) == (
        "my-moe",
        6,
        8,
        1,
    )
    assert model.bytes_per_expert == 1000


def test_known_model_facts(tmp_path: Path) -> None:
    moe = tuple(range(1, 48, 2))
    src = tmp_path / "llama4-maverick-17b-128e" / "mmlu-x"
    write_json(src / "0.json", pbc_steps(2, 2, num_layers=48, moe_layers=moe, k=1, num_experts=128))
    res = import_trace(PBC, src, tmp_path / "out", progress=False)
    model = open_trace(tmp_path / "out").manifest.model
    assert (model.num_experts, model.top_k, model.num_layers, model.moe_layers) == (128, 1, 48, moe)
    assert model.shared_experts == 1 and model.bytes_per_expert == 3 * 5120 * 8192 * 2
    assert res.inferred["num_experts"] == "known facts of llama4-maverick"
    assert res.inferred["name"] == "folder name"


def test_known_model_mismatch_is_an_error(tmp_path: Path) -> None:
    src = tmp_path / "deepseek-v2-lite-chat" / "p"
    write_csv(src / "prompt_1_data.csv", mb_rows(["a", "b"], moe_layers=(1, 2), k=6))
    with pytest.raises(ImportFormatError, match=r"prompt_1_data.csv: MoE layers differ"):
        import_trace(MB, src, tmp_path / "out", progress=False)


def test_moe_beyond_exact_and_prompt_text(tmp_path: Path) -> None:
    src = tmp_path / "tiny-ds" / "puffin"
    tokens = ["<｜begin▁of▁sentence｜>", "Hello", ",", 'Ġw"orld', "Ċ", "ĠcafÃ©"]
    rows1 = mb_rows(tokens, seed=1)
    write_csv(src / "prompt_10_data.csv", mb_rows(["a"], seed=2))
    write_csv(src / "prompt_1_data.csv", rows1)
    write_csv(src / "prompt_2_data.csv", mb_rows(["b", "c"], seed=3))
    res = import_trace(MB, src, tmp_path / "out", num_experts=16, progress=False)
    assert res.requests_imported == 3
    assert (res.prefill_tokens, res.decode_tokens) == (6 + 1 + 2, 0)
    assert res.activations == (6 + 1 + 2) * 2
    assert res.forwards == 3
    assert list(res.inferred) == ["name", "num_layers", "moe_layers", "top_k", "shared_experts"]
    trace = open_trace(tmp_path / "out")
    assert trace.manifest.model.name == "tiny-ds"
    assert (trace.manifest.model.num_layers, trace.manifest.model.top_k) == (3, 3)
    reqs = trace.sql("SELECT request_id, prompt_tokens, prompt_text FROM requests ORDER BY arrival")
    assert reqs.column("request_id").to_pylist() == ["prompt_1", "prompt_2", "prompt_10"]
    assert reqs.column("prompt_text")[0].as_py() == 'Hello, w"orld\n café'
    got = trace.sql(
        "SELECT token, layer, e0, e1, e2, step, forward, phase::VARCHAR ph FROM activations "
        "WHERE request_id = 'prompt_1' ORDER BY layer, token"
    ).to_pylist()
    want = np.sort(np.array([ids for _, _, ids in rows1]), axis=1)  # a set: stored sorted
    assert np.array_equal(np.array([[r["e0"], r["e1"], r["e2"]] for r in got]), want)
    assert [r["token"] for r in got] == list(range(6)) * 2
    assert {r["step"] for r in got} == {0} and {r["ph"] for r in got} == {"prefill"}
    assert {r["forward"] for r in got} == {0}


# ---------------------------------------------------------------- malformed input


def _bad_pbc_cases() -> list[tuple[str, object, str]]:
    good = pbc_steps(2, 2)
    decode2 = json.loads(json.dumps(good))
    decode2[2]["1"] = [[1, 2], [3, 4]]
    decode2[2]["3"] = [[1, 2], [3, 4]]
    floats = json.loads(json.dumps(good))
    floats[1]["3"] = [[1.5, 2]]
    strings = json.loads(json.dumps(good))
    strings[0]["1"][1] = ["a", 2]
    ragged = json.loads(json.dumps(good))
    ragged[2]["3"] = [[1]]
    negative = json.loads(json.dumps(good))
    negative[1]["1"] = [[-3, 1]]
    null_moe = json.loads(json.dumps(good))
    null_moe[2]["3"] = None
    return [
        ("not-json", '[\n  {\n  "0": nul\n', r"line 3 column \d+: invalid JSON"),
        ("not-a-list", {"0": None}, "expected a non-empty JSON list"),
        ("decode-two-tokens", decode2, "step 2, layer 1: a decode step must hold 1 token"),
        ("float-id", floats, r"step 1, layer 3, token 0: non-integer expert id 1.5"),
        ("string-id", strings, r"step 0, layer 1, token 1: non-integer expert id 'a'"),
        ("ragged-top-k", ragged, r"step 2, layer 3, token 0: 1 expert ids, expected 2"),
        ("negative-id", negative, r"step 1, layer 1, token 0: negative expert id -3"),
        ("null-moe-layer", null_moe, r"step 2, layer 3: expected a list .* got null"),
    ]


@pytest.mark.parametrize(("name", "data", "message"), _bad_pbc_cases(), ids=lambda x: str(x)[:20])
def test_pbc_malformed_file_names_file_and_position(
    tmp_path: Path, name: str, data: object, message: str
) -> None:
    src = tmp_path / "m" / "s"
    write_json(src / "0.json", pbc_steps(1, 1))
    path = src / "1.json"
    if isinstance(data, str):
        path.write_text(data, encoding="utf-8")
    else:
        write_json(path, data)
    with pytest.raises(ImportFormatError, match=rf"1\.json: {message}"):
        import_trace(PBC, src, tmp_path / "out", num_experts=8, progress=False)


def test_pbc_out_of_range_and_cross_file_top_k(tmp_path: Path) -> None:
    src = tmp_path / "m" / "s"
    write_json(src / "0.json", pbc_steps(1, 1))
    bad = pbc_steps(2, 2)
    bad[2]["3"] = [[9, 1]]
    write_json(src / "1.json", bad)
    with pytest.raises(
        ImportFormatError,
        match=r"1\.json: step 2, layer 3, token 0: expert id 9 out of range \[0, 8\)",
    ):
        import_trace(PBC, src, tmp_path / "o1", num_experts=8, progress=False)
    write_json(src / "1.json", pbc_steps(2, 2, k=3))
    with pytest.raises(
        ImportFormatError,
        match=r"1\.json: step 0, layer 1, token 0: 3 experts per token, but the import uses top_k=2",
    ):
        import_trace(PBC, src, tmp_path / "o2", progress=False)


def _csv_text(lines: list[str]) -> str:
    return "\n".join(["Layer ID,Batch Number,Token,Activated Expert IDs", *lines]) + "\n"


GOOD = ['1,0,a,"[1, 2]"', '1,0,b,"[3, 4]"', '2,0,a,"[5, 6]"', '2,0,b,"[7, 0]"']


@pytest.mark.parametrize(
    ("lines", "message"),
    [
        (GOOD[:2] + ['2,0,a,"[5, 6]",extra', GOOD[3]], r"line 4: 5 columns, expected 4"),
        (GOOD[:3] + ['2,0,b,"[7, x]"'], r"line 5: non-integer expert id \(unexpected 'x'\)"),
        (GOOD[:3] + ['2,0,b,"[7.5, 1]"'], r"line 5: non-integer expert id \(unexpected '.'\)"),
        (GOOD[:1] + ['one,0,b,"[3, 4]"'] + GOOD[2:], r"line 3: Layer ID 'one' is not an integer"),
        (
            GOOD[:2] + ['2,0,a,"[5, 6, 1]"', GOOD[3]],
            r"line 4: 3 expert ids, expected 2 .*inconsistent top-k",
        ),
        (GOOD[:2] + ['2,0,a,"5, 6"', GOOD[3]], r"line 4: expected a list"),
        (GOOD[:3] + ['2,0,b,"[7, 7]"'], r"line 5: repeated expert id"),
        (GOOD[:3] + ['2,1,b,"[7, 1]"'], r"line 5: Batch Number 1 differs"),
        (GOOD[:3], r"line 4: layer 2 has 1 rows but layer 1 has 2"),
        ([], r"line 2: no data rows"),
        (GOOD[:3] + ['2,0,b,"[7, 99]"'], r"line 5: expert id 99 out of range \[0, 16\)"),
    ],
)
def test_csv_malformed_names_file_and_line(tmp_path: Path, lines: list[str], message: str) -> None:
    src = tmp_path / "m" / "p"
    src.mkdir(parents=True)
    (src / "prompt_1_data.csv").write_text(_csv_text(GOOD), encoding="utf-8")
    (src / "prompt_2_data.csv").write_text(_csv_text(lines), encoding="utf-8")
    with pytest.raises(ImportFormatError, match=rf"prompt_2_data\.csv: {message}"):
        import_trace(MB, src, tmp_path / "out", num_experts=16, progress=False)


def test_csv_bad_header(tmp_path: Path) -> None:
    src = tmp_path / "m" / "p"
    write_csv(src / "prompt_1_data.csv", mb_rows(["a"]), header="layer,batch,token,ids")
    with pytest.raises(ImportFormatError, match=r"prompt_1_data\.csv: line 1: header"):
        import_trace(MB, src, tmp_path / "out", progress=False)


# ---------------------------------------------------------------- skip-bad, re-import, OUT


def test_skip_bad_counts_and_reports(tmp_path: Path) -> None:
    src = tmp_path / "m" / "p"
    for i in (1, 2, 3):
        write_csv(src / f"prompt_{i}_data.csv", mb_rows(["a", "b"], seed=i))
    (src / "prompt_4_data.csv").write_text(_csv_text(['1,0,a,"[1, x]"']), encoding="utf-8")
    write_csv(src / "prompt_5_data.csv", mb_rows(["a"], k=2))  # top-2 among top-3 files
    res = import_trace(MB, src, tmp_path / "out", skip_bad=True, progress=False)
    assert res.requests_imported == 3
    assert [Path(b.path).name for b in res.bad_files] == ["prompt_4_data.csv", "prompt_5_data.csv"]
    assert "line 2: non-integer expert id" in res.bad_files[0].reason
    assert "inconsistent top-k" in res.bad_files[1].reason
    assert open_trace(tmp_path / "out").num_requests == 3


def test_reimport_skips_existing_and_continues_numbering(tmp_path: Path) -> None:
    src = tmp_path / "tiny" / "s"
    for i in range(3):
        write_json(src / f"{i}.json", pbc_steps(2, 1, seed=i))
    out = tmp_path / "out"
    first = import_trace(PBC, src, out, num_experts=8, progress=False)
    assert (first.requests_imported, first.forwards) == (3, 6)
    write_json(src / "3.json", pbc_steps(1, 2, seed=9))
    again = import_trace(PBC, src, out, progress=False)
    assert (again.requests_imported, again.requests_skipped_existing) == (1, 3)
    assert list(again.inferred) == list(first.inferred)  # facts from the existing trace
    assert set(again.inferred.values()) == {"as in the existing trace"}
    trace = open_trace(out)
    assert trace.num_requests == 4
    row = trace.sql(
        "SELECT min(forward) f, max(forward) l, min(arrival) a FROM activations "
        "JOIN requests USING (request_id) WHERE request_id = 's/3'"
    ).to_pylist()[0]
    assert (row["f"], row["l"], row["a"]) == (6, 8, 3)


def test_failed_import_is_marked_and_resumable(tmp_path: Path) -> None:
    src = tmp_path / "tiny" / "s"
    for i in range(4):
        write_json(src / f"{i}.json", pbc_steps(2, 1, seed=i))
    (src / "2.json").write_text("[", encoding="utf-8")
    out = tmp_path / "out"
    with pytest.raises(ImportFormatError, match=r"2\.json: line 1"):
        import_trace(PBC, src, out, num_experts=8, progress=False)
    assert (out / IMPORT_MARKER).exists()
    summary = summarize(out)
    assert summary.incomplete_import and summary.requests == 2
    write_json(src / "2.json", pbc_steps(2, 1, seed=2))
    res = import_trace(PBC, src, out, num_experts=8, progress=False)
    assert (res.requests_imported, res.requests_skipped_existing) == (2, 2)
    assert not (out / IMPORT_MARKER).exists()
    assert not summarize(out).incomplete_import


def test_out_holding_another_model_is_an_error(tmp_path: Path) -> None:
    write_json(tmp_path / "a" / "s" / "0.json", pbc_steps(1, 1))
    write_json(tmp_path / "b" / "s" / "0.json", pbc_steps(1, 1))
    out = tmp_path / "out"
    import_trace(PBC, tmp_path / "a" / "s", out, num_experts=8, progress=False)
    with pytest.raises(TraceWriteError, match=r"holds a trace of model 'a', not 'b'"):
        import_trace(PBC, tmp_path / "b" / "s", out, num_experts=8, progress=False)
    with pytest.raises(ConfigError, match=r"num_experts=9 conflicts"):
        import_trace(PBC, tmp_path / "a" / "s", out, num_experts=9, progress=False)


def test_bad_out_and_src(tmp_path: Path) -> None:
    write_json(tmp_path / "a" / "s" / "0.json", pbc_steps(1, 1))
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "x.txt").write_text("x")
    with pytest.raises(TraceWriteError, match=r"junk: not empty and not a moetrace trace"):
        import_trace(PBC, tmp_path / "a", tmp_path / "junk", progress=False)
    with pytest.raises(ImportFormatError, match=r"nope: no such file or directory"):
        import_trace(PBC, tmp_path / "nope", tmp_path / "o", progress=False)
    with pytest.raises(ImportFormatError, match=r"no \.csv files found"):
        import_trace(MB, tmp_path / "a", tmp_path / "o", progress=False)
    with pytest.raises(
        ImportFormatError, match=r"unknown import format 'x'; available: .*moe-beyond"
    ):
        import_trace("x", tmp_path / "a", tmp_path / "o", progress=False)
    with pytest.raises(ConfigError, match=r"top_k must be a positive integer, got 0"):
        import_trace(PBC, tmp_path / "a", tmp_path / "o", top_k=0, progress=False)
    assert not (tmp_path / "o").exists()


# ---------------------------------------------------------------- same files, other path


def test_same_files_from_a_renamed_folder_are_skipped_by_content(tmp_path: Path) -> None:
    root = tmp_path / "tiny"
    for i in range(3):
        write_json(root / "s" / f"{i}.json", pbc_steps(2, 1, seed=i))
    out = tmp_path / "out"
    first = import_trace(PBC, root / "s", out, num_experts=8, progress=False)
    assert first.requests_imported == 3
    shutil.copytree(root / "s", root / "s-copy")  # request ids s-copy/0.. are new
    write_json(root / "s-copy" / "2.json", pbc_steps(2, 1, seed=7))  # changed: new content
    again = import_trace(PBC, root / "s-copy", out, progress=False)
    assert (again.requests_imported, again.requests_skipped_existing) == (1, 2)
    assert again.requests_skipped_same_content == 2
    trace = open_trace(out)
    ids = trace.sql("SELECT request_id FROM requests ORDER BY arrival").column(0).to_pylist()
    assert ids == ["s/0", "s/1", "s/2", "s-copy/2"]
    tags = dict(trace.requests().column("tags")[0].as_py())
    assert tags["source_sha256"] == hashlib.sha256((root / "s" / "0.json").read_bytes()).hexdigest()
    # the whole tree (both folders) again: everything is already present
    tree = import_trace(PBC, root, out, progress=False)
    assert (tree.requests_imported, tree.requests_skipped_existing) == (0, 6)
    assert open_trace(out).num_requests == 4


def test_identical_files_under_other_names_are_distinct_requests(tmp_path: Path) -> None:
    """The Puffin prompt list repeats: byte-identical CSVs of different prompts are kept."""
    src = tmp_path / "m" / "p"
    rows = mb_rows(["a", "b"], seed=1)
    write_csv(src / "prompt_1_data.csv", rows)
    write_csv(src / "prompt_2_data.csv", rows)
    write_csv(src / "prompt_3_data.csv", mb_rows(["c"], seed=2))
    out = tmp_path / "out"
    assert (
        import_trace(MB, tmp_path / "m", out, num_experts=16, progress=False).requests_imported == 3
    )
    shutil.copytree(src, tmp_path / "m" / "q")  # ids q/prompt_* are new, the files are not
    again = import_trace(MB, tmp_path / "m", out, progress=False)
    assert (again.requests_imported, again.requests_skipped_existing) == (0, 6)
    assert again.requests_skipped_same_content == 3
    assert open_trace(out).num_requests == 3


# ---------------------------------------------------------------- stray expert ids


def _mb_with_stray(src: Path, n: int = 8, stray: int = 999, **kw: object) -> Path:
    for i in range(1, n + 1):
        write_csv(src / f"prompt_{i}_data.csv", mb_rows(["a", "b", "c"], seed=i, **kw))  # type: ignore[arg-type]
    bad = src / "prompt_5_data.csv"
    lines = bad.read_text(encoding="utf-8").splitlines()
    lines[3] = re.sub(r"\[(\d+)", f"[{stray}", lines[3], count=1)  # line 4 of the file
    bad.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return bad


@pytest.mark.parametrize("skip_bad", [False, True])
def test_stray_expert_id_does_not_define_the_inferred_count(tmp_path: Path, skip_bad: bool) -> None:
    src = tmp_path / "tiny-ds" / "p"
    _mb_with_stray(src)
    out = tmp_path / "out"
    with pytest.raises(
        ImportFormatError,
        match=r"prompt_5_data\.csv: line 4: expert id 999 is far above .*dense up to 15.*"
        r"--num-experts \(16 makes",
    ):
        import_trace(MB, src, out, skip_bad=skip_bad, progress=False)
    assert not out.exists()
    res = import_trace(MB, src, out, num_experts=16, skip_bad=True, progress=False)
    assert res.requests_imported == 7
    assert [Path(b.path).name for b in res.bad_files] == ["prompt_5_data.csv"]
    assert "line 4: expert id 999 out of range [0, 16)" in res.bad_files[0].reason


def test_high_ids_that_are_not_strays_are_inferred(tmp_path: Path) -> None:
    src = tmp_path / "tiny-ds" / "p"
    _mb_with_stray(src, stray=31, num_experts=24)  # 0..23 and one 31: plausible, not flagged
    res = import_trace(MB, src, tmp_path / "out", progress=False)
    assert res.requests_imported == 8
    assert open_trace(tmp_path / "out").manifest.model.num_experts == 32


def test_stray_expert_id_with_known_model_is_a_bad_file(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    src = tmp_path / "deepseek-v2-lite-chat" / "p"
    bad = _mb_with_stray(src, n=6, moe_layers=tuple(range(1, 27)), k=6, num_experts=64)
    with caplog.at_level(logging.WARNING, logger="moetrace.store.importers.driver"):
        res = import_trace(MB, src, tmp_path / "out", skip_bad=True, progress=False)
    assert res.requests_imported == 5 and len(res.bad_files) == 1
    assert open_trace(tmp_path / "out").manifest.model.num_experts == 64
    assert f"{bad}: line 4: expert id 999 out of range [0, 64)" in caplog.text
    with pytest.raises(ImportFormatError, match=r"prompt_5_data\.csv: line 4: expert id 999"):
        import_trace(MB, src, tmp_path / "out2", progress=False)


@pytest.mark.parametrize(
    ("ids", "core"),
    [
        (list(range(64)) + [999], 63),
        (list(range(64)) + [500, 999], 63),
        (list(range(7)), None),
        (list(range(0, 121, 10)), None),  # sparse but even: a small sample, not strays
        ([0, 5], None),
        (list(range(6)) + [99], 5),
    ],
)
def test_expert_id_gap(ids: list[int], core: int | None) -> None:
    assert expert_id_gap(np.array(ids)) == core
