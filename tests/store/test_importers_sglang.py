"""The sglang-dump importer: per_token recorder dumps written with torch.save."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from importkit import (
    SGLANG_DECODE,
    SGLANG_EXTEND,
    SGLANG_IDLE,
    SGLANG_MIXED,
    sglang_dump,
    sglang_expected,
)

from moetrace.errors import ImportFormatError
from moetrace.store import open_trace
from moetrace.store.importers import import_trace

SG = "sglang-dump"
PASSES = [
    (SGLANG_EXTEND, 5, [3, 2]),
    (SGLANG_DECODE, 2, None),
    (SGLANG_IDLE, 0, None),
    (SGLANG_MIXED, 4, [3, 1]),
    (SGLANG_DECODE, 0, None),  # empty: skipped
]


def _save(path: Path, dump: object) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(dump, path)
    return path


def _rows(out: Path) -> tuple[np.ndarray, list[dict[str, object]]]:
    t = open_trace(out).sql(
        "SELECT a.request_id, token, step, phase, layer, e0, e1 FROM activations a "
        "JOIN requests r USING (request_id) ORDER BY r.arrival, token, layer"
    )
    rows = t.to_pylist()
    return np.asarray([[r["e0"], r["e1"]] for r in rows]), rows


def test_round_trip_modes_and_tags(tmp_path: Path) -> None:
    dump = sglang_dump(PASSES, first_pass_id=10, seed=1)
    src = _save(tmp_path / "tiny" / "expert_distribution_recorder_1.5_0.pt", dump)
    res = import_trace(SG, src, tmp_path / "t", progress=False)
    assert res.model_name == "tiny" and res.requests_imported == 3
    assert (res.prefill_tokens, res.decode_tokens) == (5 + 3, 2 + 1)
    got, rows = _rows(tmp_path / "t")
    assert np.array_equal(got, sglang_expected(dump, (1, 3), 2))
    trace = open_trace(tmp_path / "t")
    model = trace.manifest.model
    assert (model.num_layers, model.moe_layers, model.top_k) == (4, (1, 3), 2)
    reqs = trace.sql("SELECT * FROM requests ORDER BY arrival").to_pylist()
    assert [r["request_id"] for r in reqs] == ["pass-10", "pass-11", "pass-13"]
    tags = dict(reqs[2]["tags"])
    assert (tags["forward_mode"], tags["forward_pass_id"], tags["rank"], tags["sequences"]) == (
        "mixed", "13", "0", "2",
    )  # fmt: skip
    assert "expert_map" not in tags  # identity map: nothing said
    mixed = [(r["token"], r["phase"]) for r in rows if r["request_id"] == "pass-13"][::2]
    assert mixed == [(0, "prefill"), (1, "prefill"), (2, "prefill"), (3, "decode")]
    assert {r["step"] for r in rows} == {0}
    assert {r["phase"] for r in rows if r["request_id"] == "pass-11"} == {"decode"}


def test_physical_ids_are_mapped_to_logical(tmp_path: Path) -> None:
    # 10 physical experts (EPLB: 2 redundant) for 8 logical ones, a different map per layer
    rng = np.random.default_rng(3)
    pmap = np.stack([np.concatenate([rng.permutation(8), [0, 5]]) for _ in range(4)])
    dump = sglang_dump(PASSES[:2], num_physical=10, physical_to_logical=pmap, rank=1, seed=2)
    identity = sglang_dump(PASSES[:2], num_physical=10, rank=1, seed=2)
    src = _save(tmp_path / "m" / "d_1.pt", dump)
    import_trace(SG, src, tmp_path / "t", progress=False)
    got, rows = _rows(tmp_path / "t")
    assert np.array_equal(got, sglang_expected(dump, (1, 3), 2))
    assert not np.array_equal(got, sglang_expected(identity, (1, 3), 2))
    assert int(got.max()) < 8
    trace = open_trace(tmp_path / "t")
    assert trace.manifest.model.num_experts == 8
    reqs = trace.sql("SELECT request_id, tags FROM requests ORDER BY arrival").to_pylist()
    assert [r["request_id"] for r in reqs] == ["rank1/pass-0", "rank1/pass-1"]
    assert dict(reqs[0]["tags"])["expert_map"] == "last_physical_to_logical_map"


class _Evil:
    def __reduce__(self) -> tuple[object, ...]:
        return (print, ("pwned",))


def _corrupt(dump: dict[str, object], change: str, path: Path) -> None:
    recs = dump["records"]
    if change == "missing-key":
        del recs[1]["forward_mode"]  # type: ignore[index]
    elif change == "shape":
        recs[1]["topk_ids_of_layer"] = recs[1]["topk_ids_of_layer"][:3]  # type: ignore[index]
    elif change == "range":
        recs[1]["topk_ids_of_layer"][3, 1, 0] = 8  # type: ignore[index]
    elif change == "top-k":
        recs[1]["topk_ids_of_layer"][1, 1, 1] = -1  # type: ignore[index]
    elif change == "mode":
        recs[1]["forward_mode"] = 5  # type: ignore[index]
    elif change == "no-map":
        del dump["last_physical_to_logical_map"]
    elif change == "stat":
        dump = {"rank": 0, "logical_count": torch.zeros(2, 4, 8)}
    if change == "evil":
        path.write_bytes(pickle.dumps({"records": [_Evil()]}))
    elif change == "text":
        path.write_text("not a dump")
    else:
        _save(path, dump)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ("missing-key", "d.pt: record 1: missing key 'forward_mode'"),
        (
            "shape",
            "d.pt: record 1 (forward pass 1): topk_ids_of_layer has shape [3, 2, 8], "
            "expected [4 layers (as the map), 2 tokens (input_ids), top-k]",
        ),
        (
            "range",
            "d.pt: record 1 (forward pass 1): layer 3, token 1: physical expert id 8 out "
            "of range [0, 8)",
        ),
        (
            "top-k",
            "d.pt: record 1 (forward pass 1): layer 1, token 1: 1 expert ids (not -1), "
            "expected 2 as at layer 1, token 0 (inconsistent top-k)",
        ),
        (
            "mode",
            "d.pt: record 1 (forward pass 1): forward_mode 5 is not EXTEND (1), DECODE (2) "
            "or MIXED (3)",
        ),
        ("no-map", "d.pt: missing key 'last_physical_to_logical_map'"),
        ("stat", "d.pt: not an SGLang expert distribution dump"),
        ("evil", "d.pt: not a torch.save file of plain data"),
        ("text", "d.pt: not a torch.save file of plain data"),
    ],
)
def test_bad_dumps_name_file_record_and_problem(
    tmp_path: Path, change: str, message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    _save(tmp_path / "ok" / "m" / "d.pt", sglang_dump(PASSES[:2], seed=4))  # passes as is
    import_trace(SG, tmp_path / "ok" / "m", tmp_path / "t0", progress=False)
    path = tmp_path / "bad" / "m" / "d.pt"
    path.parent.mkdir(parents=True)
    _corrupt(sglang_dump(PASSES[:2], seed=4), change, path)
    with pytest.raises(ImportFormatError) as err:
        import_trace(SG, path.parent, tmp_path / "t", progress=False)
    assert message in str(err.value)
    assert "pwned" not in capsys.readouterr().out  # weights_only: nothing of the file ran


def test_rerun_skip_bad_and_several_ranks(tmp_path: Path) -> None:
    src = tmp_path / "m"
    _save(src / "expert_distribution_recorder_1.0_0.pt", sglang_dump(PASSES, seed=5))
    _save(src / "expert_distribution_recorder_1.0_1.pt", sglang_dump(PASSES, rank=1, seed=6))
    (src / "expert_distribution_recorder_1.0_2.pt").write_bytes(b"garbage")
    res = import_trace(SG, src, tmp_path / "t", skip_bad=True, progress=False)
    assert res.requests_imported == 6 and len(res.bad_files) == 1
    assert res.bad_files[0].path.endswith("_2.pt")
    again = import_trace(SG, src, tmp_path / "t", skip_bad=True, progress=False)
    assert again.requests_imported == 0 and again.requests_skipped_existing == 6
    trace = open_trace(tmp_path / "t")
    ids = trace.sql("SELECT request_id FROM requests ORDER BY arrival").column(0).to_pylist()
    assert ids == ["pass-0", "pass-1", "pass-3", "rank1/pass-0", "rank1/pass-1", "rank1/pass-3"]
    assert trace.sql("SELECT count(*) FROM activations").column(0)[0].as_py() == res.activations
