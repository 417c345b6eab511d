"""Count traces (per-expert counts only) and the sglang-counts importer of SGLang's
``stat`` expert-distribution dumps."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from storekit import make_manifest

from moetrace.cli import main
from moetrace.errors import ConfigError, ImportFormatError, TraceFormatError, TraceWriteError
from moetrace.store import Manifest, ModelInfo, TraceWriter, open_trace
from moetrace.store.counts import count_sources, write_counts
from moetrace.store.importers.sglang_counts import import_counts

LAYERS, EXPERTS, MOE = 4, 8, (1, 2)  # layers 0 and 3 are dense (all zeros)


def stat_counts(seed: int, passes: int = 5) -> np.ndarray:
    """A logical_count buffer: counts at the MoE layers, an unused (zero) buffer slot."""
    rng = np.random.default_rng(seed)
    lc = np.zeros((passes, LAYERS, EXPERTS), np.int32)
    lc[:, list(MOE)] = rng.integers(0, 20, size=(passes, len(MOE), EXPERTS))
    lc[passes // 2] = 0
    return lc


def dump(path: Path, lc: Any, **extra: Any) -> Path:
    """What SGLang's stat recorder writes with torch.save (``extra`` replaces keys)."""
    data = {
        "rank": 0,
        "logical_count": torch.as_tensor(lc) if isinstance(lc, np.ndarray) else lc,
        "average_utilization_rate_over_window": None,
    }
    data.update(extra)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(data, path)
    return path


def counts_of(out: Path) -> np.ndarray:
    """(num_layers, E) counts of a trace, from trace.counts()."""
    table = open_trace(out).counts()
    mat = np.zeros((LAYERS, EXPERTS), np.int64)
    for row in table.to_pylist():
        mat[row["layer"], row["expert"]] += row["count"]
    return mat


def test_import_sums_the_passes_of_the_moe_layers(tmp_path: Path) -> None:
    lc = stat_counts(0)
    src = dump(tmp_path / "expert_distribution_recorder_1700000000.5.pt", lc)
    res = import_counts(src, tmp_path / "out", model_name="toy-moe", top_k=2)
    assert (res.files_imported, res.files_skipped_existing) == (1, 0)
    assert res.counted == int(lc.sum()) and res.passes == 4 and res.moe_layers == MOE
    assert "top_k" not in res.inferred
    assert res.inferred["num_experts"].startswith("experts axis of logical_count")
    trace = open_trace(tmp_path / "out")
    assert trace.is_count_trace and trace.manifest.content == "counts"
    assert trace.num_activations == 0 and trace.num_requests == 0
    m = trace.manifest.model
    assert (m.num_layers, m.moe_layers, m.num_experts, m.top_k) == (LAYERS, MOE, EXPERTS, 2)
    assert trace.manifest.source.origin == "sglang-counts"
    np.testing.assert_array_equal(counts_of(tmp_path / "out"), lc.sum(axis=0))
    assert trace.counts().column("phase").null_count == trace.counts().num_rows


def test_rerun_and_copies_do_not_double_count(tmp_path: Path) -> None:
    lc = stat_counts(1)
    src = dump(tmp_path / "a" / "d.pt", lc)
    out = tmp_path / "out"
    import_counts(src, out, model_name="toy-moe", top_k=2)
    again = import_counts(src, out, model_name="toy-moe", top_k=2)
    assert (again.files_imported, again.files_skipped_existing, again.counted) == (0, 1, 0)
    copy = tmp_path / "elsewhere" / "renamed.pt"
    copy.parent.mkdir()
    shutil.copy(src, copy)
    assert import_counts(copy.parent, out, top_k=2).files_imported == 0  # name from OUT
    np.testing.assert_array_equal(counts_of(out), lc.sum(axis=0))
    assert len(count_sources(out)) == 1 and len(open_trace(out).count_parts) == 1


def test_files_of_a_folder_are_summed_and_new_ones_added(tmp_path: Path) -> None:
    a, b, c = stat_counts(2), stat_counts(3), stat_counts(4)
    folder = tmp_path / "dumps"
    dump(folder / "expert_distribution_recorder_1.pt", a)
    dump(folder / "expert_distribution_recorder_2.pt", b)
    out = tmp_path / "out"
    res = import_counts(folder, out, model_name="toy-moe", top_k=2)
    assert res.files_imported == 2
    np.testing.assert_array_equal(counts_of(out), a.sum(axis=0) + b.sum(axis=0))
    dump(folder / "expert_distribution_recorder_3.pt", c)
    res = import_counts(folder, out, model_name="toy-moe", top_k=2)
    assert (res.files_imported, res.files_skipped_existing) == (1, 2)
    np.testing.assert_array_equal(counts_of(out), (a + b + c).sum(axis=0))


BAD_DUMPS = [
    ("not-a-dict", lambda p: torch.save([1, 2], p), "got list"),
    ("missing-key", lambda p: torch.save({"rank": 0}, p), "no 'logical_count' in the dump"),
    ("per-token", lambda p: torch.save({"records": [], "last_physical_to_logical_map": None}, p),
     "a per_pass/per_token dump"),
    ("rank-2", lambda p: dump(p, stat_counts(0)[0]), "expected 3 axes"),
    ("negative", lambda p: dump(p, np.where(np.arange(5 * 4 * 8).reshape(5, 4, 8) == 42, -3,
                                           stat_counts(0))), "negative count -3 at pass 1, layer 1, expert 2"),
    ("float", lambda p: dump(p, stat_counts(0).astype(np.float32)), "expected integers"),
    ("not-a-tensor", lambda p: dump(p, [[[1]]]), "not a tensor"),
    ("garbage", lambda p: p.write_bytes(b"not a torch file"), "cannot load it with torch.load"),
]  # fmt: skip


@pytest.mark.parametrize(("name", "write", "message"), BAD_DUMPS, ids=[b[0] for b in BAD_DUMPS])
def test_bad_dumps_are_named(tmp_path: Path, name: str, write: Any, message: str) -> None:
    path = tmp_path / f"{name}.pt"
    write(path)
    with pytest.raises(ImportFormatError) as err:
        import_counts(path, tmp_path / "out", model_name="toy-moe", top_k=2)
    assert str(path) in str(err.value) and message in str(err.value), err.value
    assert not (tmp_path / "out").exists()
    good = dump(tmp_path / "good" / f"{name}.pt", stat_counts(0))  # the check passes a good one
    assert import_counts(good, tmp_path / "out", model_name="toy-moe", top_k=2).files_imported


def test_files_of_two_models_are_refused(tmp_path: Path) -> None:
    folder = tmp_path / "dumps"
    dump(folder / "a1.pt", stat_counts(0))
    other = np.zeros((2, LAYERS + 1, EXPERTS), np.int32)
    other[:, 1] = 1
    bad = dump(folder / "a2.pt", other)
    with pytest.raises(ImportFormatError, match="has 5 layers x 8 experts, but .*a1.pt has 4 x 8"):
        import_counts(folder, tmp_path / "out", model_name="toy-moe", top_k=2)
    assert not (tmp_path / "out").exists()
    bad.unlink()
    import_counts(folder, tmp_path / "out", model_name="toy-moe", top_k=2)
    dump(tmp_path / "later" / "b.pt", other)
    with pytest.raises(ImportFormatError, match="has 5 layers, but the import's model"):
        import_counts(tmp_path / "later", tmp_path / "out", top_k=2)


def test_top_k_must_be_given_or_known(tmp_path: Path) -> None:
    src = dump(tmp_path / "d.pt", stat_counts(0))
    with pytest.raises(ConfigError, match="top_k is needed and cannot be inferred from per-expert"):
        import_counts(src, tmp_path / "out", model_name="toy-moe")
    with pytest.raises(ImportFormatError, match="cannot tell the model name"):
        import_counts(src, tmp_path / "out", top_k=2)
    # a known model gives top_k, the MoE layers and the shape the dumps must have
    lc = np.zeros((3, 27, 64), np.int32)
    lc[:, 1:] = 2
    known = dump(tmp_path / "ds" / "d.pt", lc)
    res = import_counts(known, tmp_path / "ds-out", model_name="deepseek-v2-lite")
    m = open_trace(tmp_path / "ds-out").manifest.model
    assert (m.top_k, m.moe_layers, res.counted) == (6, tuple(range(1, 27)), 3 * 26 * 64 * 2)
    lc[0, 0, 5] = 1  # a count at the dense layer 0
    dump(tmp_path / "ds2" / "d.pt", lc)
    with pytest.raises(ImportFormatError, match="counts at layer 0, which is not a MoE layer"):
        import_counts(tmp_path / "ds2", tmp_path / "ds-out2", model_name="deepseek-v2-lite")
    dump(tmp_path / "ds3" / "d.pt", np.ones((1, 27, 60), np.int32))
    with pytest.raises(ImportFormatError, match="has 60 experts, but the import's model"):
        import_counts(tmp_path / "ds3", tmp_path / "ds-out3", model_name="deepseek-v2-lite")


def test_moe_layers_given_and_all_zero_dumps(tmp_path: Path) -> None:
    lc = stat_counts(5)
    src = dump(tmp_path / "d.pt", lc)
    import_counts(src, tmp_path / "out", model_name="toy-moe", top_k=2, moe_layers=(1, 2, 3))
    trace = open_trace(tmp_path / "out")
    assert trace.manifest.model.moe_layers == (1, 2, 3)
    assert "moe_layers" not in trace.manifest.model.inferred
    zero = dump(tmp_path / "z" / "d.pt", np.zeros((2, LAYERS, EXPERTS), np.int32))
    with pytest.raises(ImportFormatError, match="every count in the dumps is zero"):
        import_counts(zero, tmp_path / "out-z", model_name="toy-moe", top_k=2)


def test_counts_do_not_go_into_a_routing_trace(tmp_path: Path) -> None:
    with TraceWriter(tmp_path / "routing", make_manifest(), threads=0):
        pass
    src = dump(tmp_path / "d.pt", stat_counts(0))
    with pytest.raises(TraceWriteError, match="holds token-level routing, not counts"):
        import_counts(src, tmp_path / "routing", model_name="tiny-moe", top_k=2)
    counts = Manifest(ModelInfo("tiny-moe", 4, (1, 2, 3), 8, 2), content="counts")
    with pytest.raises(TraceWriteError, match="content routing"):
        write_counts(tmp_path / "routing", counts, np.ones((3, 8), np.int64), source="x")


def test_write_counts_is_atomic_and_checked_on_open(tmp_path: Path) -> None:
    manifest = Manifest(ModelInfo("tiny-moe", 4, (1, 2), 8, 2), content="counts")
    mat = np.arange(16, dtype=np.int64).reshape(2, 8)
    out = tmp_path / "t"
    part = write_counts(out, manifest, mat, source="run-1", phase="decode")
    assert part is not None and write_counts(out, manifest, mat, source="run-1") is None
    (out / "counts" / ".tmp-part-killed.parquet").write_bytes(b"half a part")
    trace = open_trace(out)
    assert trace.count_files == [str(part)]
    assert set(trace.counts().column("phase").to_pylist()) == {"decode"}
    assert trace.sql("SELECT sum(count)::BIGINT FROM counts").column(0)[0].as_py() == mat.sum()
    with pytest.raises(TraceWriteError, match=r"counts must have shape \(MoE layers, experts\)"):
        write_counts(out, manifest, mat[:1], source="run-2")
    data = json.loads((out / "manifest.json").read_text())
    data["model"]["num_experts"] = 4  # below the data
    (out / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(TraceFormatError, match="expert id 4 is out of range"):
        open_trace(out)


def test_old_manifest_without_content_reads_as_routing(tmp_path: Path) -> None:
    with TraceWriter(tmp_path / "old", make_manifest(), threads=0):
        pass
    path = tmp_path / "old" / "manifest.json"
    data = json.loads(path.read_text())
    assert data.pop("content") == "routing"
    path.write_text(json.dumps(data))
    trace = open_trace(tmp_path / "old")
    assert trace.manifest.content == "routing" and not trace.is_count_trace
    assert trace.counts().num_rows == 0


def test_inspect_and_sql_on_a_count_trace(tmp_path: Path) -> None:
    lc = stat_counts(6)
    import_counts(dump(tmp_path / "d.pt", lc), tmp_path / "out", model_name="toy-moe", top_k=2)
    runner = CliRunner()
    res = runner.invoke(main, ["inspect", str(tmp_path / "out")])
    assert res.exit_code == 0, res.output
    assert "per-expert counts only" in res.output
    assert f"{int(lc.sum())} expert activations from 1 source(s)" in res.output
    res = runner.invoke(
        main,
        ["sql", str(tmp_path / "out"), "SELECT sum(count) AS n FROM counts", "--format", "csv"],
    )
    assert res.exit_code == 0 and res.output.split() == ["n", str(int(lc.sum()))], res.output
    res = runner.invoke(main, ["inspect", str(tmp_path / "out"), "--json"])
    assert json.loads(res.output)["content"] == "counts"


def test_moetrace_import_sglang_counts_then_analyze_and_refusals(tmp_path: Path) -> None:
    """Through the CLI: the registered format writes a count trace, analyze reads it,
    simulate refuses it in one line; a rerun counts nothing twice."""
    src = dump(tmp_path / "dumps" / "expert_distribution_recorder_1.pt", stat_counts(3))
    out = tmp_path / "out"
    runner = CliRunner()
    args = ["import", "sglang-counts", str(src.parent), str(out), "--model-name", "toy-moe",
            "--top-k", "2"]  # fmt: skip
    res = runner.invoke(main, args)
    assert res.exit_code == 0, res.output
    assert "1 imported, 0 skipped" in res.output and "count trace" in res.output
    res = runner.invoke(main, args)
    assert res.exit_code == 0 and "0 imported, 1 skipped" in res.output, res.output
    np.testing.assert_array_equal(counts_of(out), stat_counts(3).sum(axis=0))
    res = runner.invoke(main, ["analyze", str(out)])
    assert res.exit_code == 0, res.output
    res = runner.invoke(main, ["simulate", str(out), "--policy", "lru", "--budget", "4"])
    assert res.exit_code == 2 and "holds per-expert counts only" in res.output, res.output
