"""summarize(): exact facts of small traces, from metadata and DuckDB aggregates."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from importkit import pbc_steps, write_json

from moetrace.store import RequestRecord, TraceWriter
from moetrace.store.importers import import_trace
from moetrace.store.schema import Manifest, ModelInfo
from moetrace.store.summary import summarize


def _manifest(**kw: object) -> Manifest:
    model = ModelInfo(name="tiny", num_layers=3, moe_layers=(0, 2), num_experts=4, top_k=2)
    return Manifest(model=model, **kw)  # type: ignore[arg-type]


def test_summary_of_written_trace_with_weights(tmp_path: Path) -> None:
    with TraceWriter(tmp_path / "t", _manifest(tags={"run": "a"})) as w:
        # prefill 3 tokens (step 0) + 2 decode tokens, 2 MoE layers each
        token = np.repeat(np.arange(5), 2)
        step = np.repeat([0, 0, 0, 1, 2], 2)
        w.write_request(
            RequestRecord("r0", prompt_tokens=3, generated_tokens=2),
            token=token,
            step=step,
            phase=(step > 0).astype(np.int8),
            forward=step,
            layer=np.tile([0, 2], 5),
            experts=np.tile([[0, 1]], (10, 1)),
            weights=np.full((10, 2), 0.5),
        )
    s = summarize(tmp_path / "t")
    assert (s.requests, s.prefill_tokens, s.decode_tokens, s.activations) == (1, 3, 2, 10)
    assert s.has_weights and not s.speculative and s.parts == 1
    assert (s.num_layers, s.moe_layers, s.num_experts, s.top_k) == (3, (0, 2), 4, 2)
    assert s.tags == {"run": "a"} and s.inferred == () and s.source["kind"] == "recorded"
    assert s.size_bytes > 0 and s.bytes_per_activation > 0
    d = s.to_dict()
    assert d["tokens"] == {"prefill": 3, "decode": 2} and d["num_moe_layers"] == 2
    json.dumps(d)  # JSON-able


def test_summary_of_empty_trace(tmp_path: Path) -> None:
    TraceWriter(tmp_path / "e", _manifest()).close()
    s = summarize(tmp_path / "e")
    assert (s.requests, s.activations, s.parts, s.prefill_tokens) == (0, 0, 0, 0)
    assert s.bytes_per_activation == 0.0 and not s.has_weights


def test_summary_of_imported_trace(tmp_path: Path) -> None:
    write_json(tmp_path / "m" / "s" / "0.json", pbc_steps(4, 3))
    write_json(tmp_path / "m" / "s" / "1.json", pbc_steps(2, 0))
    import_trace("patterns-behind-chaos", tmp_path / "m" / "s", tmp_path / "o", progress=False)
    s = summarize(tmp_path / "o")
    assert (s.requests, s.prefill_tokens, s.decode_tokens, s.activations) == (2, 6, 3, 18)
    assert s.source["origin"] == "patterns-behind-chaos" and not s.has_weights
    assert "num_experts" in s.inferred and not s.incomplete_import
