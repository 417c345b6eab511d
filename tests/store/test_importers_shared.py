"""Importers on the real reference traces in ../shared/traces (skipped when absent)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

from moetrace.store import open_trace
from moetrace.store.importers import import_trace
from moetrace.store.importers.facts import expert_id_gap
from moetrace.store.summary import summarize

pytestmark = pytest.mark.shared


def test_llama4_maverick_folder(llama4_dir: Path, tmp_path: Path) -> None:
    res = import_trace("patterns-behind-chaos", llama4_dir, tmp_path / "l4", progress=False)
    # independent count straight from the JSON files
    prefill = decode = 0
    for path in llama4_dir.glob("*.json"):
        steps = json.loads(path.read_text())
        prefill += len(steps[0]["1"])
        decode += len(steps) - 1
    assert res.requests_imported == 100 and not res.bad_files
    assert res.prefill_tokens + res.decode_tokens == 15_724
    assert (res.prefill_tokens, res.decode_tokens) == (prefill, decode)
    s = summarize(tmp_path / "l4")
    assert (s.requests, s.prefill_tokens + s.decode_tokens) == (100, 15_724)
    assert (s.num_moe_layers, s.top_k, s.num_experts, s.num_layers) == (24, 1, 128, 48)
    assert s.moe_layers == tuple(range(1, 48, 2))
    assert s.activations == 15_724 * 24
    assert s.model_name == "llama4-maverick-17b-128e" and not s.has_weights
    # README: layer 45 sends almost every token to one expert
    top = open_trace(tmp_path / "l4").sql(
        "SELECT max(n) / sum(n) AS share FROM "
        "(SELECT e0, count(*) AS n FROM activations WHERE layer = 45 GROUP BY e0)"
    )
    assert top.column(0)[0].as_py() > 0.9


def test_deepseek_v2_lite_folder(deepseek_dir: Path, tmp_path: Path) -> None:
    res = import_trace("moe-beyond", deepseek_dir, tmp_path / "ds", progress=False)
    files = sorted(deepseek_dir.glob("*.csv"))
    data_rows = sum(sum(1 for _ in f.open(encoding="utf-8")) - 1 for f in files)
    assert len(files) == 999 and data_rows % 26 == 0
    assert res.requests_imported == 999 and not res.bad_files
    assert (res.prefill_tokens, res.decode_tokens) == (data_rows // 26, 0)
    assert res.activations == data_rows
    s = summarize(tmp_path / "ds")
    assert (s.requests, s.num_moe_layers, s.top_k, s.num_experts) == (999, 26, 6, 64)
    assert s.moe_layers == tuple(range(1, 27))
    assert s.prefill_tokens == data_rows // 26
    trace = open_trace(tmp_path / "ds")
    ids = trace.sql("SELECT request_id FROM requests ORDER BY arrival").column(0).to_pylist()
    assert ids[:3] == ["prompt_1", "prompt_2", "prompt_3"] and "prompt_317" not in ids
    text = trace.sql("SELECT prompt_text FROM requests WHERE request_id = 'prompt_1'")
    assert text.column(0)[0].as_py().startswith("How do I center a text element vertically")
    assert res.seconds < 60


def test_deepseek_same_files_from_another_folder(deepseek_dir: Path, tmp_path: Path) -> None:
    """Puffin repeats prompts: byte-identical files of different prompts stay distinct
    requests; the same files again under another folder are skipped by content."""
    files = sorted(deepseek_dir.glob("*.csv"))
    tree = tmp_path / "deepseek-v2-lite-chat"
    for sub in ("a", "b"):
        (tree / sub).mkdir(parents=True)
        for f in files:
            (tree / sub / f.name).symlink_to(f)
    out = tmp_path / "ds"
    first = import_trace("moe-beyond", tree / "a", out, progress=False)
    assert first.requests_imported == 999
    digests = {hashlib.sha256(f.read_bytes()).hexdigest() for f in files}
    assert len(digests) < 999  # the upstream set holds byte-identical prompts
    trace = open_trace(out)
    distinct = trace.sql("SELECT count(DISTINCT tags['source_sha256']) FROM requests")
    assert distinct.column(0)[0].as_py() == len(digests)
    again = import_trace("moe-beyond", tree, out, progress=False)  # ids a/..., b/... are new
    assert (again.requests_imported, again.requests_skipped_same_content) == (0, 2 * 999)
    assert open_trace(out).num_requests == 999
    ids = trace.sql(
        "SELECT DISTINCT e0 AS e FROM activations_raw UNION SELECT DISTINCT e5 FROM activations_raw"
    )
    assert expert_id_gap(np.array(ids.column(0).to_pylist())) is None


def test_llama4_inferred_expert_count_is_not_flagged(llama4_dir: Path, tmp_path: Path) -> None:
    """With an unknown model name the expert count comes from the data; the real ids show
    no stray-id gap."""
    res = import_trace(
        "patterns-behind-chaos", llama4_dir, tmp_path / "l4", model_name="some-moe", progress=False
    )
    assert res.inferred["num_experts"] == "highest expert id + 1 over all files"
    assert open_trace(tmp_path / "l4").manifest.model.num_experts == 128
