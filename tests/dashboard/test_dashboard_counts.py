"""The dashboard on a count trace (per-expert counts only): the Overview and Experts
pages show the counts, the pages that need routing say so, none crashes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from streamlit.testing.v1 import AppTest

from moetrace.dashboard.inputs import ENV_VAR
from moetrace.dashboard.launch import APP
from moetrace.store import Manifest, ModelInfo, SourceInfo
from moetrace.store.counts import write_counts

TIMEOUT = 120


@pytest.fixture(scope="module")
def count_trace(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("dash-counts") / "counts"
    manifest = Manifest(
        ModelInfo("count-moe", 3, (1, 2), 8, 2),
        source=SourceInfo(kind="imported", origin="sglang-counts"),
        content="counts",
    )
    counts = np.array([[40, 20, 10, 5, 3, 2, 0, 0], [10, 10, 10, 10, 10, 10, 10, 10]])
    write_counts(out, manifest, counts, source="sha256:test")
    return out


def _open(monkeypatch: pytest.MonkeyPatch, trace: Path, page: str) -> AppTest:
    monkeypatch.setenv(ENV_VAR, json.dumps({"traces": [str(trace)]}))
    at = AppTest.from_file(str(APP), default_timeout=TIMEOUT)
    if page != "overview":
        at.switch_page(f"views/{page}.py")
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    return at


def test_count_trace_pages(monkeypatch: pytest.MonkeyPatch, count_trace: Path) -> None:
    at = _open(monkeypatch, count_trace, "overview")
    assert "per-expert counts only (160 expert activations" in at.info[0].value
    verdict = " ".join(w.value for w in at.warning)
    assert "Skew: mean Gini" in verdict and "need token-level routing" in verdict
    at = _open(monkeypatch, count_trace, "experts")
    assert at.title[0].value == "Experts"
    assert at.metric[0].value == "160"
    assert len(at.get("vega_lite_chart")) == 1  # the heatmap
    for page in ("reuse", "groups", "requests", "plans", "timeline"):
        at = _open(monkeypatch, count_trace, page)
        assert "needs token-level routing" in at.info[0].value, page
