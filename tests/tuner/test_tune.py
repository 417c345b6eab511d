"""Tuning: budgets, the request split, the tune/validate flow and the CLI commands."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from moetrace.cli import main
from moetrace.errors import AnalysisError, ConfigError
from moetrace.store.plan import load_plan
from moetrace.tuner.sim.synthetic import write_synthetic_trace
from moetrace.tuner.sim.trace import parse_budget
from moetrace.tuner.tune import TuneConfig, split_requests, tune


@pytest.fixture(scope="module")
def trace(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("syn") / "trace"
    return write_synthetic_trace(path, requests=16, decode_tokens=16, stickiness=0.6, seed=3)


@pytest.fixture(scope="module")
def spec_trace(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("spec") / "trace"
    return write_synthetic_trace(
        path, requests=8, decode_tokens=10, speculative=True, bytes_per_expert=None
    )


def test_parse_budget() -> None:
    assert parse_budget("12.5%", 4, 16, None) == 8
    assert parse_budget("20", 4, 16, None) == 20
    assert parse_budget("4GB", 4, 16, 10**8) == 40
    assert parse_budget("1GiB", 4, 16, 2**26) == 16
    with pytest.raises(ConfigError, match="bytes_per_expert is unknown"):
        parse_budget("4GB", 4, 16, None)
    with pytest.raises(ConfigError, match="the model has 64 experts"):
        parse_budget("65", 4, 16, None)
    with pytest.raises(ConfigError, match="expected N% of all experts"):
        parse_budget("lots", 4, 16, None)
    with pytest.raises(ConfigError, match=r"percentage must be in \(0, 100\]"):
        parse_budget("150%", 4, 16, None)


def test_split_is_seeded_and_disjoint() -> None:
    a, b = split_requests(10, 0.3, 7)
    a2, b2 = split_requests(10, 0.3, 7)
    assert list(a) == list(a2) and list(b) == list(b2)
    assert len(b) == 3 and not set(a) & set(b) and set(a) | set(b) == set(range(10))
    with pytest.raises(AnalysisError, match="at least 2 requests"):
        split_requests(1, 0.5, 0)


def test_tune_writes_plan_with_validation_table(trace: Path, tmp_path: Path) -> None:
    result = tune([trace], TuneConfig(budget="25%", seed=1))
    plan = result.plan
    assert plan.layout.total_slots == 16
    prov = plan.provenance
    assert len(prov.validation_requests) == 8 and len(prov.tune_requests) == 8
    assert not set(prov.validation_requests) & set(prov.tune_requests)
    names = [r["name"] for r in result.validation]
    assert names[0] == "plan" and "lru" in names and any("belady" in n for n in names)
    rows = {r["name"]: r for r in result.validation}
    # the oracle bounds are bounds
    assert rows["belady (oracle bound, no prefetch)"]["hit_rate"] >= rows["lru"]["hit_rate"]
    bound = rows["belady + oracle prefetch (bound)"]["stall_per_token_ms"]
    assert bound <= min(r["stall_per_token_ms"] for r in result.validation)
    assert plan.expected["rows"] == result.validation
    assert len(result.search) >= 10
    # the plan file round-trips and simulates
    from moetrace.store.plan import save_plan

    path = save_plan(plan, tmp_path / "plan.json")
    assert load_plan(path) == plan


def test_cli_simulate_policy_and_plan(trace: Path, tmp_path: Path) -> None:
    runner = CliRunner()
    out = tmp_path / "sim.json"
    res = runner.invoke(
        main, ["simulate", str(trace), "--policy", "lru", "--cache", "4", "--json", str(out)]
    )
    assert res.exit_code == 0, res.output
    assert "lru+none" in res.output and "hit rate" in res.output
    data = json.loads(out.read_text())
    assert 0 < data["summary"]["hit_rate"] < 1
    assert {r["layer"] for r in data["per_layer"]} == {0, 1, 2, 3}
    res = runner.invoke(
        main,
        [
            "simulate",
            str(trace),
            "--policy",
            "freq_lru",
            "--param",
            "beta=2",
            "--budget",
            "25%",
            "--prefetch",
            "transition",
            "--fetch",
            "2",
        ],
    )
    assert res.exit_code == 0, res.output
    plan_path = tmp_path / "plan.json"
    res = runner.invoke(
        main, ["tune", str(trace), "--budget", "16", "--out", str(plan_path), "--seed", "2"]
    )
    assert res.exit_code == 0, res.output
    assert "validation on 8 held-out requests" in res.output and "belady" in res.output
    res = runner.invoke(
        main, ["simulate", str(trace), "--plan", str(plan_path), "--hardware", "pcie5-x16"]
    )
    assert res.exit_code == 0, res.output


def test_cli_errors_exit_2(trace: Path, spec_trace: Path, tmp_path: Path) -> None:
    runner = CliRunner()
    cases = [
        (
            ["simulate", str(trace), "--policy", "nope", "--cache", "4"],
            "unknown eviction policy 'nope'",
        ),
        (["simulate", str(trace), "--policy", "lru"], "exactly one of --cache"),
        (
            ["simulate", str(trace), "--policy", "lru", "--cache", "4", "--hardware", "tpu"],
            "unknown hardware profile 'tpu'",
        ),
        (
            [
                "simulate",
                str(trace),
                "--policy",
                "lru",
                "--cache",
                "4",
                "--prefetch",
                "speculative",
            ],
            "needs a trace with speculative",
        ),
        (["simulate", str(trace), "--policy", "lru", "--cache", "99"], "exceeds the 16 experts"),
        (
            ["tune", str(trace), "--budget", "200%", "--out", str(tmp_path / "p.json")],
            "percentage must be",
        ),
        (
            ["tune", str(spec_trace), "--budget", "1GB", "--out", str(tmp_path / "p.json")],
            "bytes_per_expert is unknown",
        ),
    ]
    for args, message in cases:
        res = runner.invoke(main, args)
        assert res.exit_code == 2, (args, res.output)
        assert message in res.output, (args, res.output)
    bad = tmp_path / "bad.json"
    bad.write_text("{}")
    res = runner.invoke(main, ["simulate", str(trace), "--plan", str(bad)])
    assert res.exit_code == 2 and "bad.json" in res.output and "not a moetrace plan" in res.output


def test_plan_for_another_model_is_refused(trace: Path, spec_trace: Path, tmp_path: Path) -> None:
    runner = CliRunner()
    plan_path = tmp_path / "plan.json"
    assert (
        runner.invoke(
            main, ["tune", str(trace), "--budget", "16", "--out", str(plan_path)]
        ).exit_code
        == 0
    )
    other = tmp_path / "other"
    write_synthetic_trace(other, num_experts=8, requests=3, decode_tokens=3)
    res = runner.invoke(main, ["simulate", str(other), "--plan", str(plan_path)])
    assert res.exit_code == 2 and "plan is for model fingerprint" in res.output


def test_speculative_prefetch_from_trace_columns(spec_trace: Path) -> None:
    from moetrace.tuner.sim.trace import SimulateRequest, simulate_trace

    req = {"policy": "lru", "cache": 4, "bytes_per_expert": 1_000_000}
    _, with_spec = simulate_trace(spec_trace, SimulateRequest(prefetch="speculative", **req))
    _, without = simulate_trace(spec_trace, SimulateRequest(**req))
    s = with_spec.summary()
    assert s["prefetch_issued"] > 0 and s["prefetch_precision"] > 0.3
    assert s["stall_s"] < without.summary()["stall_s"]
    assert np.isfinite(s["tokens_per_s"])


def test_tune_progress_is_plain_lines_off_a_terminal(tmp_path: Path, monkeypatch) -> None:
    trace = write_synthetic_trace(tmp_path / "t", requests=6, decode_tokens=6)
    monkeypatch.setenv("MOETRACE_PROGRESS_INTERVAL", "0")
    res = CliRunner().invoke(
        main, ["tune", str(trace), "--budget", "25%", "--out", str(tmp_path / "p.json")]
    )
    assert res.exit_code == 0, res.output
    lines = [ln for ln in res.stderr.splitlines() if ln.startswith("tune: ")]
    assert len(lines) >= 10 and re.match(r"tune: (\d+)/\1 candidates \(100%\)", lines[-1])
    assert "\x1b" not in res.stderr


@pytest.mark.parametrize(
    ("policy", "params"), [("arc", []), ("wtinylfu", ["window=0.2"]), ("lecar", ["seed=3"])]
)
def test_cli_simulate_adaptive_policies(trace: Path, policy: str, params: list[str]) -> None:
    args = ["simulate", str(trace), "--policy", policy, "--cache", "4"]
    for p in params:
        args += ["--param", p]
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 0, res.output
    assert f"{policy}+none" in res.output
    bad = CliRunner().invoke(main, [*args, "--param", "beta=1"])
    assert bad.exit_code == 2 and f"eviction policy {policy!r}" in bad.output


def test_without_prefetch_rewrites_the_plan_rows(trace: Path) -> None:
    """The plan file without prefetch must describe itself: its "plan" rows become the
    tuned plan's "plan, no prefetch" rows, on every split (dashboard reads "plan")."""
    from dataclasses import replace

    from moetrace.store.plan import PrefetchConfig
    from moetrace.tuner.tune import without_prefetch

    plan = tune([trace], TuneConfig(budget="25%", seed=1)).plan
    rows = [
        {"name": "plan", "hit_rate": 0.70, "stall_per_token_ms": 1.0},
        {"name": "plan, no prefetch", "hit_rate": 0.60, "stall_per_token_ms": 2.0},
        {"name": "lru", "hit_rate": 0.50, "stall_per_token_ms": 4.0},
    ]
    expected = {**plan.expected, "rows": rows, "splits": [{"name": "random", "rows": rows}]}
    pf = replace(plan, prefetch=PrefetchConfig("transition", fetch=2), expected=expected)
    out = without_prefetch(pf)
    assert out.prefetch.name == "none" and out.phase_overrides == {}
    for got in (out.expected["rows"], out.expected["splits"][0]["rows"]):
        assert got[0] == {**rows[1], "name": "plan", "stall_vs_lru": 0.5}
        assert got[1:] == rows[1:]
    assert pf.expected["rows"][0]["hit_rate"] == 0.70  # the tuned plan is untouched
