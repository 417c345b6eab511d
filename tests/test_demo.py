"""``moetrace demo --quick``: the whole loop through the CLI, as a new user runs it."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from moetrace.cli import main
from moetrace.demo import DemoConfig
from moetrace.errors import ConfigError
from moetrace.store.plan import load_plan
from moetrace.store.reader import open_trace


def test_demo_quick_end_to_end(tmp_path):
    out = tmp_path / "demo"
    result = CliRunner().invoke(main, ["demo", "--quick", "--out", str(out), "--no-progress"])
    assert result.exit_code == 0, result.output
    text = result.output
    for needle in (
        "What the trace says",
        "belady",
        "lru",
        "measured hit rate",
        "moetrace dashboard",
    ):
        assert needle in text

    trace = open_trace(out / "trace")
    assert trace.num_requests == 96
    plan = load_plan(out / "plan.json")
    plan.check_compatible(trace.manifest.model)
    report = json.loads((out / "demo-report.json").read_text())
    rows = {r["name"]: r for r in report["validation"]}
    assert rows["plan, no prefetch"]["hit_rate"] >= rows["lru"]["hit_rate"]
    assert rows["belady (oracle bound, no prefetch)"]["hit_rate"] >= rows["lru"]["hit_rate"]
    # the plan without prefetch describes itself: its "plan" rows are the tuned plan's
    # "plan, no prefetch" rows, on every split (the dashboard reads the "plan" row)
    no_pf = load_plan(out / "plan-no-prefetch.json")
    assert no_pf.prefetch.name == "none" and no_pf.eviction == plan.eviction
    for mine, tuned in zip(no_pf.expected["splits"], plan.expected["splits"], strict=True):
        own = {r["name"]: r for r in mine["rows"]}
        src = {r["name"]: r for r in tuned["rows"]}
        assert own["plan"]["hit_rate"] == src["plan, no prefetch"]["hit_rate"]
        assert own["lru"] == src["lru"]
    runs = {r["label"]: r for r in report["runtime"]}
    # Without prefetch the runtime has no timing effects: it must match the simulator.
    exact = runs["plan without prefetch"]
    assert exact["accesses"] > 0
    assert exact["measured_hit_rate"] == pytest.approx(exact["simulated_hit_rate"], abs=1e-12)
    # With prefetch, residency is decided when a prefetch is issued: the same, too.
    assert runs["plan"]["measured_hit_rate"] == pytest.approx(
        runs["plan"]["simulated_hit_rate"], abs=1e-12
    )


def test_demo_refuses_to_overwrite(tmp_path):
    (tmp_path / "trace").mkdir()
    result = CliRunner().invoke(main, ["demo", "--quick", "--out", str(tmp_path)])
    assert result.exit_code == 2
    assert "give the demo a new --out directory" in result.output


def test_demo_config_validation():
    with pytest.raises(ConfigError, match="at least 4 prompts"):
        DemoConfig(prompts=2)
    with pytest.raises(ConfigError, match="max_new_tokens"):
        DemoConfig(max_new_tokens=0)
