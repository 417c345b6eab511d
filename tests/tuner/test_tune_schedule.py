"""Tuning the schedule: searched on the tune split, judged against FCFS on every split,
written to the plan (v3), shown by the CLI; simulate's queue model."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
from click.testing import CliRunner

from moetrace.cli import main
from moetrace.store.plan import PLAN_VERSION, ScheduleConfig, load_plan
from moetrace.tuner.sched.search import QueueSettings, loses_to_fcfs
from moetrace.tuner.sim.synthetic import write_synthetic_trace
from moetrace.tuner.tune import TuneConfig, tune


@pytest.fixture(scope="module")
def topics(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Requests of two topics needing disjoint experts, arriving interleaved."""
    path = tmp_path_factory.mktemp("topics") / "trace"
    return write_synthetic_trace(path, requests=48, decode_tokens=12, stickiness=0.3,
                                 groups=2, seed=5)  # fmt: skip


def test_tune_chooses_affinity_where_topics_interleave(topics: Path) -> None:
    q = QueueSettings(batch_size=4, batching="static")
    result = tune([topics], TuneConfig(budget="25%", seed=1, queue=q), progress=False)
    plan = result.plan
    assert plan.schedule.scheduler == "affinity" and plan.schedule.batch_size == 4
    info = plan.expected["schedule"]
    assert info["fallback"] is None and info["settings"]["batch_size"] == 4
    assert [r["name"] for r in info["search"]][0] == "fcfs"
    assert {s["name"] for s in info["splits"]} == {"random", "time"}
    for sp in info["splits"]:
        mine, fcfs = sp["rows"]
        assert (mine["name"], fcfs["name"]) == ("schedule", "fcfs")
        assert mine["bytes_moved"] < 0.95 * fcfs["bytes_moved"]
        assert mine["p99_latency_s"] <= 1.2 * fcfs["p99_latency_s"]
        assert loses_to_fcfs(sp["rows"], 0.005) is None


def test_losing_schedule_falls_back_to_fcfs(topics: Path, monkeypatch) -> None:
    """A schedule that loses to FCFS on a split is not written (the check can fail)."""
    import moetrace.tuner.tune as T

    def rigged(plan, tune_ev, hw, q, *args):  # chooses badly on purpose
        return q.config("affinity", {"max_overtakes": 1e9}), []

    def worse(rows, tolerance):
        return "rigged" if rows[0]["scheduler"] != "fcfs" else None

    monkeypatch.setattr(T, "choose_schedule", rigged)
    monkeypatch.setattr(T, "loses_to_fcfs", worse)
    q = QueueSettings(batch_size=4)
    plan = tune([topics], TuneConfig(budget="25%", queue=q), progress=False).plan
    assert plan.schedule.scheduler == "fcfs"
    fb = plan.expected["schedule"]["fallback"]
    assert fb["to"] == "fcfs" and "rigged" in fb["reason"]
    rows = plan.expected["schedule"]["splits"][0]["rows"]
    bad = [replace_row(rows[0], bytes_moved=2 * rows[1]["bytes_moved"]), rows[1]]
    assert "bytes vs FCFS" in loses_to_fcfs(bad, 0.005)
    late = [replace_row(rows[0], p99_latency_s=2 * rows[1]["p99_latency_s"]), rows[1]]
    assert "p99 latency" in loses_to_fcfs(late, 0.005)


def replace_row(row: dict, **kw: float) -> dict:
    return {**row, **kw}


def test_tune_without_schedule_keeps_fcfs(topics: Path) -> None:
    plan = tune([topics], TuneConfig(budget="25%", queue=None), progress=False).plan
    assert plan.schedule == ScheduleConfig() and "schedule" not in plan.expected


def test_cli_tune_and_simulate_queue(topics: Path, tmp_path: Path) -> None:
    r = CliRunner().invoke(main, ["tune", str(topics), "--budget", "25%", "--batch-size", "4",
                                  "--batching", "static", "--out", str(tmp_path / "p.json")])  # fmt: skip
    assert r.exit_code == 0, r.output
    assert "schedule: affinity" in r.output and "[random]" in r.output and "fcfs" in r.output
    plan = load_plan(tmp_path / "p.json")
    assert plan.format_version == PLAN_VERSION and plan.schedule.batch_size == 4
    out = tmp_path / "q.json"
    r = CliRunner().invoke(main, ["simulate", str(topics), "--plan", str(tmp_path / "p.json"),
                                  "--arrival-rate", "50", "--json", str(out)])  # fmt: skip
    assert r.exit_code == 0, r.output
    q = json.loads(out.read_text())
    assert q["scheduler"] == "affinity" and q["arrivals"] == "poisson 50/s"
    assert q["requests"] == 48 and q["p99_latency_s"] >= q["p50_latency_s"] > 0
    r = CliRunner().invoke(main, ["simulate", str(topics), "--policy", "lru", "--budget", "25%",
                                  "--scheduler", "fcfs", "--batch-size", "2"])  # fmt: skip
    assert r.exit_code == 0 and "batches of up to 2" in r.output, r.output


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--scheduler", "sjf"], "unknown scheduler 'sjf'"),
        (["--scheduler", "affinity", "--scheduler-param", "beta=1"], "has no parameter 'beta'"),
        (["--batch-size", "0"], "0 is not in the range"),
        (["--arrival-rate", "0"], "--arrival-rate"),
        (["--scheduler", "fcfs", "--phase", "decode"], "replays whole requests"),
        (["--policy", "belady", "--scheduler", "fcfs"], "needs the whole future"),
    ],
)
def test_cli_queue_errors_are_one_line(topics: Path, args: list[str], message: str) -> None:
    base = ["simulate", str(topics), "--budget", "25%"]
    if "--policy" not in args:
        base += ["--policy", "lru"]
    r = CliRunner().invoke(main, base + args)
    assert r.exit_code == 2, r.output
    assert message in r.output and "Traceback" not in r.output


def test_v2_plan_simulates_as_fcfs(topics: Path, tmp_path: Path) -> None:
    """A plan written before v3 (no schedule) replays as FCFS, one at a time."""
    plan = tune([topics], TuneConfig(budget="25%", queue=None), progress=False).plan
    data = json.loads(replace(plan, schedule=ScheduleConfig()).dumps())
    data["format_version"] = 2
    del data["schedule"]
    (tmp_path / "v2.json").write_text(json.dumps(data))
    r = CliRunner().invoke(main, ["simulate", str(topics), "--plan", str(tmp_path / "v2.json"),
                                  "--batch-size", "1"])  # fmt: skip
    assert r.exit_code == 0 and "fcfs {}" in r.output, r.output


def test_queue_settings_are_checked() -> None:
    from moetrace.errors import ConfigError, PlanError

    with pytest.raises(PlanError, match="schedule.batch_size must be an integer >= 1"):
        QueueSettings(batch_size=0)
    with pytest.raises(PlanError, match="schedule.batching must be one of"):
        QueueSettings(batching="dynamic")
    with pytest.raises(ConfigError, match="arrival rate must be > 0"):
        QueueSettings(arrival_rate=-1.0)
