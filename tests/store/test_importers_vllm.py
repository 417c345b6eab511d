"""The vllm-offline importer: RequestOutputs saved as JSONL by the documented snippet."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from importkit import vllm_output, write_jsonl

from moetrace.errors import ImportFormatError
from moetrace.store import open_trace
from moetrace.store.importers import import_trace

VLLM = "vllm-offline"
DS = "deepseek-v2-lite"  # known: 27 layers, MoE layers 1..26, 64 experts, top-6


def _routing(out: Path, rid: str) -> tuple[np.ndarray, list[dict[str, object]]]:
    t = open_trace(out).sql(
        f"SELECT token, step, phase, layer, e0, e1, e2, e3, e4, e5 FROM activations "
        f"WHERE request_id = '{rid}' ORDER BY token, layer"
    )
    rows = t.to_pylist()
    return np.asarray([[r[f"e{i}"] for i in range(6)] for r in rows]), rows


def _expected(obj: dict[str, object], index: int, cols: list[int]) -> np.ndarray:
    comp = obj["outputs"][index]  # type: ignore[index]
    rows = obj["prompt_routed_experts"] + comp["routed_experts"][: len(comp["token_ids"]) - 1]  # type: ignore[operator, index]
    return np.asarray(rows)[:, cols, :].reshape(-1, 6)


@pytest.mark.parametrize(("width", "dense"), [(26, ()), (27, (0,))])
def test_both_layer_axis_widths_of_a_known_model(
    tmp_path: Path, width: int, dense: tuple[int, ...]
) -> None:
    objs = [
        vllm_output("r0", 4, [3], width=width, k=6, num_experts=64, dense=dense, seed=1),
        vllm_output("r1", 2, [1], width=width, k=6, num_experts=64, dense=dense, seed=2),
    ]
    objs[0]["arrival_time"] = 1.5
    src = write_jsonl(tmp_path / DS / "out.jsonl", objs)
    res = import_trace(VLLM, src, tmp_path / "t", progress=False)
    assert res.model_name == DS and res.requests_imported == 2
    assert (res.prefill_tokens, res.decode_tokens) == (6, 4)  # generated tokens: 3 + 1
    trace = open_trace(tmp_path / "t")
    assert trace.manifest.gate_weights is False
    assert trace.manifest.model.moe_layers == tuple(range(1, 27))
    cols = list(range(26)) if width == 26 else list(range(1, 27))
    got, rows = _routing(tmp_path / "t", "r0")
    assert np.array_equal(got, _expected(objs[0], 0, cols))
    assert sorted({(r["token"], r["step"], r["phase"]) for r in rows}) == [
        (0, 0, "prefill"), (1, 0, "prefill"), (2, 0, "prefill"), (3, 0, "prefill"),
        (4, 1, "decode"), (5, 2, "decode"),
    ]  # fmt: skip
    req = trace.sql("SELECT * FROM requests WHERE request_id = 'r0'").to_pylist()[0]
    assert (req["prompt_tokens"], req["generated_tokens"]) == (4, 3)
    assert req["prompt_text"] == "prompt of r0" and req["arrival_time"] == 1.5
    assert len(_routing(tmp_path / "t", "r1")[1]) == 2 * 26  # 1 generated token: no decode row


def test_n_greater_than_one_repeats_the_prefill(tmp_path: Path) -> None:
    obj = vllm_output("q", 3, [2, 4], width=26, k=6, num_experts=64, seed=3)
    src = write_jsonl(tmp_path / DS / "o.jsonl", [obj])
    res = import_trace(VLLM, src, tmp_path / "t", progress=False)
    assert res.requests_imported == 2
    trace = open_trace(tmp_path / "t")
    reqs = {r["request_id"]: r for r in trace.sql("SELECT * FROM requests").to_pylist()}
    assert sorted(reqs) == ["q/0", "q/1"]
    tags = dict(reqs["q/1"]["tags"])
    assert tags["completion_index"] == "1" and tags["prefill_shared"] == "true"
    for i in (0, 1):
        got, _ = _routing(tmp_path / "t", f"q/{i}")
        assert np.array_equal(got, _expected(obj, i, list(range(26))))
    p0, p1 = (
        _routing(tmp_path / "t", "q/0")[0][: 3 * 26],
        _routing(tmp_path / "t", "q/1")[0][: 3 * 26],
    )
    assert np.array_equal(p0, p1)


def test_generated_rows_the_last_token_never_ran_are_dropped(tmp_path: Path) -> None:
    a = vllm_output("a", 2, [3], width=26, k=6, num_experts=64, extra_row=True, seed=4)
    write_jsonl(tmp_path / DS / "o.jsonl", [a])
    import_trace(VLLM, tmp_path / DS, tmp_path / "t", progress=False)
    got, _ = _routing(tmp_path / "t", "a")
    assert got.shape[0] == (2 + 2) * 26
    assert np.array_equal(got, _expected(a, 0, list(range(26))))


def test_unknown_model_layer_axis(tmp_path: Path) -> None:
    dense = vllm_output("a", 2, [2], width=4, dense=(0, 2), seed=5)
    write_jsonl(tmp_path / "tiny" / "o.jsonl", [dense])
    import_trace(VLLM, tmp_path / "tiny", tmp_path / "t1", progress=False)
    model = open_trace(tmp_path / "t1").manifest.model
    assert (model.num_layers, model.moe_layers) == (4, (1, 3))
    every = vllm_output("b", 2, [2], width=3, seed=6)
    write_jsonl(tmp_path / "tiny2" / "o.jsonl", [every])
    with pytest.raises(ImportFormatError, match="o.jsonl: line 1: the routing has 3 layers per "
                       "token and the model's layer count is unknown: pass --num-layers"):  # fmt: skip
        import_trace(VLLM, tmp_path / "tiny2", tmp_path / "t2", progress=False)
    import_trace(VLLM, tmp_path / "tiny2", tmp_path / "t3", num_layers=3, progress=False)
    assert open_trace(tmp_path / "t3").manifest.model.moe_layers == (0, 1, 2)
    import_trace(VLLM, tmp_path / "tiny2", tmp_path / "t4", num_layers=5, progress=False)
    assert open_trace(tmp_path / "t4").manifest.model.moe_layers == (2, 3, 4)  # dense first


def _corrupt(obj: dict[str, object], change: str) -> dict[str, object]:
    obj = json.loads(json.dumps(obj))
    out = obj["outputs"][0]  # type: ignore[index]
    if change == "rows":
        out["routed_experts"] = out["routed_experts"][:1]
    elif change == "missing":
        del obj["prompt_routed_experts"]
    elif change == "negative":
        obj["prompt_routed_experts"][0][1][0] = -2  # type: ignore[index]
    elif change == "shape":
        out["routed_experts"][1][3] = [1, 2, 3]  # ragged
    elif change == "dense-routed":
        obj["prompt_routed_experts"][0][0] = [1, 2, 3, 4, 5, 6]  # type: ignore[index]
    elif change == "prompt-ids":
        obj["prompt_token_ids"] = [1]
    return obj


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            "rows",
            "line 2: outputs[0]: routed_experts has 1 rows for 4 generated tokens (expected 3",
        ),
        (
            "missing",
            "line 2: missing prompt_routed_experts (build the LLM with "
            "enable_return_routed_experts=True)",
        ),
        ("negative", "line 2: prompt_routed_experts: negative expert id -2"),
        ("shape", "line 2: outputs[0]: routed_experts is not a [tokens][layers][top_k] array"),
        ("dense-routed", "line 2: layer 0 has routing but is dense in model"),
        ("prompt-ids", "line 2: prompt_routed_experts has 3 rows for 1 prompt_token_ids"),
        ("json", "line 2: invalid JSON"),
    ],
)
def test_bad_lines_name_file_line_and_problem(tmp_path: Path, change: str, message: str) -> None:
    good = vllm_output("g", 3, [4], width=27, dense=(0,), k=6, num_experts=64, seed=7)
    first = vllm_output("f", 2, [2], width=27, dense=(0,), k=6, num_experts=64, seed=8)
    write_jsonl(tmp_path / "ok" / DS / "o.jsonl", [first, good])  # passes uncorrupted
    import_trace(VLLM, tmp_path / "ok" / DS, tmp_path / "t0", progress=False)
    path = write_jsonl(tmp_path / "bad" / DS / "o.jsonl", [first, _corrupt(good, change)])
    if change == "json":
        path.write_text(path.read_text().splitlines()[0] + "\n{nope\n")
    with pytest.raises(ImportFormatError) as err:
        import_trace(VLLM, tmp_path / "bad" / DS, tmp_path / "t", progress=False)
    assert "o.jsonl: " + message in str(err.value)


def test_rerun_and_skip_bad(tmp_path: Path) -> None:
    src = tmp_path / DS
    write_jsonl(src / "0.jsonl", [vllm_output("a", 2, [2], width=26, k=6, num_experts=64, seed=1),
                                  vllm_output("b", 3, [1, 2], width=26, k=6, num_experts=64, seed=2)])  # fmt: skip
    (src / "1.jsonl").write_text("[1, 2]\n")
    write_jsonl(src / "2.jsonl", [vllm_output("c", 2, [3], width=26, k=6, num_experts=64, seed=3)])
    res = import_trace(VLLM, src, tmp_path / "t", skip_bad=True, progress=False)
    assert res.requests_imported == 4 and [b.path.endswith("1.jsonl") for b in res.bad_files] == [
        True
    ]
    assert "1.jsonl: line 1: expected one RequestOutput object per line" in res.bad_files[0].reason
    again = import_trace(VLLM, src, tmp_path / "t", skip_bad=True, progress=False)
    assert again.requests_imported == 0 and again.requests_skipped_existing == 4
    trace = open_trace(tmp_path / "t")
    assert trace.sql("SELECT count(*) FROM requests").column(0)[0].as_py() == 4
    assert trace.sql("SELECT count(*) FROM activations").column(0)[0].as_py() == res.activations
