"""Every page under streamlit's AppTest on the fixture: no exception, the expected
titles, metrics and charts (with axis titles), and widgets that change the view."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pytest
from streamlit.testing.v1 import AppTest

from moetrace.dashboard.inputs import ENV_VAR
from moetrace.dashboard.launch import APP

TIMEOUT = 120


def _app(monkeypatch: pytest.MonkeyPatch, **inputs: list[Any]) -> AppTest:
    monkeypatch.setenv(ENV_VAR, json.dumps({k: [str(p) for p in v] for k, v in inputs.items()}))
    return AppTest.from_file(str(APP), default_timeout=TIMEOUT)


def _open(at: AppTest, page: str) -> AppTest:
    if page != "overview":
        at.switch_page(f"views/{page}.py")
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    return at


def _specs(at: AppTest) -> list[dict[str, Any]]:
    return [json.loads(c.proto.spec) for c in at.get("vega_lite_chart")]


def _data(at: AppTest, index: int) -> pd.DataFrame:
    """The rows a chart sends to the browser (all its datasets, concatenated)."""
    proto = at.get("vega_lite_chart")[index].proto
    frames = [pa.ipc.open_stream(d.data.data).read_all().to_pandas() for d in proto.datasets]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def _walk(spec: dict[str, Any]) -> Iterator[dict[str, Any]]:
    yield spec
    for sub in [*spec.get("layer", []), *([spec["spec"]] if "spec" in spec else [])]:
        yield from _walk(sub)  # layers, and the panel of a faceted chart


def _title(spec: dict[str, Any]) -> str:
    t = spec.get("title")
    return t if isinstance(t, str) else (t or {}).get("text", "")


def _check_axes(spec: dict[str, Any]) -> None:
    """Every chart has a title and titled x and y axes."""
    assert _title(spec), spec
    enc = next(s["encoding"] for s in _walk(spec) if "encoding" in s)
    assert enc["x"].get("title") and enc["y"].get("title"), enc


@pytest.fixture()
def full(monkeypatch: pytest.MonkeyPatch, fixture_paths: dict[str, Path]) -> AppTest:
    p = fixture_paths
    return _app(
        monkeypatch,
        traces=[p["trace"], p["trace2"]],
        plans=[p["plan"], p["plan2"]],
        stats=[p["stats"]],
    )


def test_overview(full: AppTest) -> None:
    at = _open(full, "overview")
    assert at.title[0].value == "Overview"
    metrics = {m.label: m.value for m in at.metric}
    assert metrics["Requests"] == "12"
    assert metrics["Top-k"] == "2" and metrics["Experts per layer"] == "8"
    assert metrics["MoE layers"] == "3 of 4"
    verdict = " ".join(s.value for s in [*at.success, *at.warning])
    assert "Caching" in verdict and "Belady" in verdict
    specs = _specs(at)
    assert [_title(s) for s in specs] == ["Tokens by phase"]
    _check_axes(specs[0])
    assert len(at.dataframe) == 1  # facts of both traces side by side


def test_experts_heatmap_and_tag_filter(full: AppTest) -> None:
    at = _open(full, "experts")
    assert at.title[0].value == "Experts"
    (spec,) = _specs(at)
    _check_axes(spec)
    assert "all requests" in _title(spec)
    total = at.metric[0].value
    at.selectbox(key="experts_tag").set_value("topic=code").run()
    assert not at.exception
    (spec,) = _specs(at)
    assert "topic=code" in _title(spec)
    assert at.metric[0].value != total
    at.radio(key="experts_scale").set_value("log").run()
    (spec,) = _specs(at)
    assert spec["encoding"]["color"]["scale"]["type"] == "symlog"


def test_reuse_page_curves_and_plan_points(full: AppTest) -> None:
    at = _open(full, "reuse")
    titles = [_title(s) for s in _specs(at)]
    assert titles[0].startswith("Gini coefficient")
    assert titles[1].startswith("Lorenz curves")
    assert "Hit rate vs cache size, layer L1" in titles[2]
    assert "Reuse distance in tokens" in titles and any("stack distance" in t for t in titles)
    for spec in _specs(at):
        _check_axes(spec)
    mrc = _data(at, 2)
    assert set(mrc["policy"].dropna()) == {"LRU", "LFU", "Belady (optimal)"}
    lru = mrc[mrc["policy"] == "LRU"]
    assert len(lru) == 8 and lru["hit"].iloc[-1] > 90  # every size, nearly all hits at 8/8
    # each plan's point: its slots at this layer and its own hit rate there, replayed (not
    # the plan file's all-layer expected 60% / 65%; test_dashboard_plans.py checks values)
    points = mrc.dropna(subset=["plan"]).set_index("plan")
    assert points.loc["plan plan-a", "size"] == 4 and points.loc["plan plan-b", "size"] == 3
    assert all(0 <= h <= 100 and h not in (60.0, 65.0) for h in points["hit"])
    at.selectbox(key="reuse_layer").set_value("L3").run()
    assert "layer L3" in _title(_specs(at)[2])


def test_groups_layer_choice_changes_matrix(full: AppTest) -> None:
    at = _open(full, "groups")
    specs = _specs(at)
    assert _title(specs[0]) == "Co-activation of expert pairs, layer L1 (phase all)"
    assert _title(specs[1]).startswith("P(expert at L2 | expert at L1)")
    for spec in specs:
        _check_axes(spec)
    pairs_l1 = at.dataframe[0].value
    assert pairs_l1.iloc[0]["experts"] == "0 + 1"
    before = _data(at, 0)
    cell = before.set_index(["y", "x"])["value"]
    assert cell[(0, 1)] == cell[(1, 0)] == pairs_l1.iloc[0]["tokens"]
    at.selectbox(key="groups_layer").set_value("L2").run()
    assert not at.exception
    assert _title(_specs(at)[0]) == "Co-activation of expert pairs, layer L2 (phase all)"
    assert not at.dataframe[0].value.equals(pairs_l1)
    after = _data(at, 0)
    assert after.shape == before.shape and not after["value"].equals(before["value"])
    recall = at.metric[0].value
    assert recall.endswith("%") and float(recall[:-1]) > float(at.metric[1].value[:-1])
    at.selectbox(key="transition_layer").set_value("L2").run()
    assert _title(_specs(at)[1]).startswith("P(expert at L3 | expert at L2)")
    assert _title(_specs(at)[2]) == "Recall@2 of the next layer's experts on held-out requests"
    pairs = _data(at, 2)
    assert set(pairs["label"]) == {"L1→L2", "L2→L3"}
    table = pairs[pairs["series"] == "transition table"].set_index("label")["value"]
    base = pairs[pairs["series"] == "2 most used experts"].set_index("label")["value"]
    assert (table > base + 20).all()  # planted: layer l+1 follows layer l


def test_requests_page(full: AppTest) -> None:
    at = _open(full, "requests")
    titles = [_title(s) for s in _specs(at)]
    assert titles[0] == "Activation matrix of request req-00 (all phases)"
    assert titles[1].startswith("Token-by-token routing of req-00")
    assert titles[2].startswith("Requests by their normalized activation matrices")
    for spec in _specs(at):
        _check_axes(spec)
    at.selectbox(key="request_id").set_value("req-03").run()
    assert _title(_specs(at)[0]) == "Activation matrix of request req-03 (all phases)"
    at.selectbox(key="projection_colour").set_value("tag topic").run()
    assert "tag topic" in json.dumps(_specs(at)[2]["encoding"]["color"])


def test_plans_page(full: AppTest) -> None:
    at = _open(full, "plans")
    assert not at.error
    titles = [_title(s) for s in _specs(at)]
    assert titles[0] == "Hit rate: each plan vs the baselines, per validation split"
    pins = titles.index(
        "Pinned experts of plan-a (red squares) over the activation share (phase all)"
    )
    assert "Cache slots per layer" in titles
    diff = titles.index("Activation share difference, A minus B (phase all)")
    by_layer = _data(at, diff).groupby("layer")["value"].sum()
    assert len(by_layer) == 3 and by_layer.abs().max() < 1e-6  # shares sum to 100% in both
    assert any(t.startswith("Measured hit rate per layer") for t in titles)
    for spec in _specs(at):
        _check_axes(spec)
    assert {m.label: m.value for m in at.metric}["Expected hit rate"] == "60.0%"
    heat = _data(at, pins)
    pinned = heat[heat["mark"] == "pinned"]
    assert set(zip(pinned["layer"], pinned["expert"], strict=True)) == {
        ("L1", 0),
        ("L1", 1),
        ("L2", 1),
        ("L2", 2),
        ("L3", 2),
        ("L3", 3),
    }
    at.selectbox(key="plan_choice").set_value("plan-b").run()
    assert any(_title(s).startswith("Pinned experts of plan-b") for s in _specs(at))
    assert {m.label: m.value for m in at.metric}["Expected hit rate"] == "70.0%"
    compare = [d.value for d in at.dataframe if "A: plan-a" in d.value.columns]
    assert compare and compare[0].loc["budget slots"].tolist() == ["12", "9"]
    assert compare[0].loc["expected stall per token"].tolist() == ["2 ms", "2 ms"]
    runs = _data(at, 0)
    hit = runs.set_index(["plan", "run"])["value"]
    assert hit[("plan-b", "lru")] == pytest.approx(50.0)
    assert hit[("plan-b", "plan (this file)")] == pytest.approx(70.0)


def test_plans_page_without_plans(
    monkeypatch: pytest.MonkeyPatch, fixture_paths: dict[str, Path]
) -> None:
    at = _open(_app(monkeypatch, traces=[fixture_paths["trace"]]), "plans")
    assert "No plans loaded" in at.info[0].value
    assert not at.error


def test_broken_plans_are_reported(
    monkeypatch: pytest.MonkeyPatch, fixture_paths: dict[str, Path]
) -> None:
    p = fixture_paths
    at = _open(
        _app(monkeypatch, traces=[p["trace"]], plans=[p["bad_plan"], p["foreign_plan"]]), "plans"
    )
    errors = " ".join(e.value for e in at.error)
    assert str(p["bad_plan"]) in errors and "missing field" in errors
    assert "not for the selected trace's model" in errors


def test_empty_trace(monkeypatch: pytest.MonkeyPatch, fixture_paths: dict[str, Path]) -> None:
    at = _app(monkeypatch, traces=[fixture_paths["empty"]])
    at = _open(at, "overview")
    assert "has no activations" in at.error[0].value
    assert next(m.value for m in at.metric if m.label == "Requests") == "0"
    for page in ("experts", "reuse", "groups", "requests", "timeline"):
        at = _open(at, page)
        assert "has no activations" in at.error[0].value


def test_malformed_trace(monkeypatch: pytest.MonkeyPatch, fixture_paths: dict[str, Path]) -> None:
    at = _open(_app(monkeypatch, traces=[fixture_paths["broken_trace"]]), "groups")
    assert "Cannot open trace" in at.error[0].value and "not valid JSON" in at.error[0].value


def test_bad_inputs(monkeypatch: pytest.MonkeyPatch) -> None:
    at = _open(_app(monkeypatch, traces=[]), "overview")
    assert "at least one trace" in at.error[0].value


def test_phase_without_rows(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """A prefill-only trace viewed in the decode phase: messages, no exception."""
    import numpy as np

    from moetrace.store import Manifest, ModelInfo, RequestRecord, TraceWriter

    path = tmp_path / "prefill-only"
    with TraceWriter(path, Manifest(ModelInfo("p-moe", 3, (1, 2), 4, 2)), threads=0) as w:
        for r in range(4):
            n = 5
            w.write_request(
                RequestRecord(f"q{r}", prompt_tokens=n),
                token=np.repeat(np.arange(n), 2),
                step=0,
                phase=0,
                forward=r,
                layer=np.tile([1, 2], n),
                experts=np.array([[(t + r) % 4, (t + r + 1) % 4] for t in range(2 * n)]),
            )
    at = _app(monkeypatch, traces=[path])
    at = _open(at, "overview")
    at.sidebar.radio(key="phase").set_value("decode").run()
    assert not at.exception
    assert "no activations in phase 'decode'" in " ".join(w.value for w in at.warning)
    for page in ("experts", "reuse", "groups", "requests", "timeline"):
        at = _open(at, page)
        assert at.session_state["phase"] == "decode"
    at = _open(at, "experts")
    assert "No activations in phase 'decode'" in at.warning[0].value


def test_reuse_page_says_when_curves_come_from_a_sample(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from dashkit import write_fixture_trace

    from moetrace.dashboard.data import reuse as R

    monkeypatch.setattr(R, "REUSE_SAMPLE_TOKENS", 40)
    trace = write_fixture_trace(tmp_path / "sampled", num_requests=6)
    at = _open(_app(monkeypatch, traces=[trace]), "reuse")
    notes = " ".join(c.value for c in at.caption)
    assert "A sample:" in notes and "of 6 requests" in notes
    assert "about 40 tokens" in notes


def test_no_page_prints_a_stray_string() -> None:
    """Streamlit's "magic" writes every module-level string expression of a page (and of
    the app script) onto the page: only the module docstring may stand alone."""
    import ast

    for path in [APP, *sorted((Path(APP).parent / "views").glob("*.py"))]:
        body = ast.parse(Path(path).read_text(encoding="utf-8")).body
        stray = [
            node.lineno
            for node in body[1:]
            if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant)
        ]
        assert not stray, f"{path}: module-level strings at lines {stray} show on the page"


def test_every_layer_curves_wait_for_a_button_on_large_traces(
    monkeypatch: pytest.MonkeyPatch, fixture_paths: dict[str, Path], tmp_path: Path
) -> None:
    """Above VERDICT_AUTO_ROWS (3M rows) the all-layer curves (a replay per layer) are not
    computed on open, so the page's first open stays fast; a button computes them, and
    once in the disk cache they show at once."""
    from moetrace.dashboard.data import overview
    from moetrace.dashboard.diskcache import ENV_VAR as CACHE_VAR

    monkeypatch.setattr(overview, "VERDICT_AUTO_ROWS", 10)  # the fixture counts as large
    monkeypatch.setenv(CACHE_VAR, str(tmp_path / "cache"))
    import streamlit as st

    st.cache_data.clear()  # earlier tests' in-memory results would skip the disk cache
    at = _open(_app(monkeypatch, traces=[fixture_paths["trace"]]), "reuse")
    titles = [_title(s) for s in _specs(at)]
    assert not any("Hit rate vs cache size per layer" in t for t in titles)
    at = at.button(key="all_layer_curves_button").click().run()
    assert any("Hit rate vs cache size per layer" in _title(s) for s in _specs(at))
    again = _open(_app(monkeypatch, traces=[fixture_paths["trace"]]), "reuse")  # new session
    assert any("Hit rate vs cache size per layer" in _title(s) for s in _specs(again))
