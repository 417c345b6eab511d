"""Importers on the real reference traces in ../shared/traces (skipped when absent)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from moetrace.store import open_trace
from moetrace.store.importers import import_trace
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
