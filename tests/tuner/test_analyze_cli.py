"""``moetrace analyze`` through click's CliRunner."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from miningkit import write_trace, zipf_routing

from moetrace.cli import main


@pytest.fixture(scope="module")
def trace_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    routing = zipf_routing(np.random.default_rng(0), [40] * 8, 2, 16, 2, 1.0)
    return write_trace(
        tmp_path_factory.mktemp("cli") / "t", routing, num_experts=16, moe_layers=(0, 2)
    )


def test_analyze_prints_verdict_then_table_and_writes_json(trace_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "report.json"
    res = CliRunner().invoke(
        main,
        ["analyze", str(trace_dir), "--json", str(out), "--cache-sizes", "4,50%", "--seed", "1"],
    )
    assert res.exit_code == 0, res.output
    text = res.output
    assert text.index("Verdict:") < text.index("layer   accesses")
    assert "80% hits need" in text
    lines = text.splitlines()
    table = [ln.split() for ln in lines if ln.strip().split(" ")[0] in ("0", "2", "all")]
    assert [row[0] for row in table] == ["0", "2", "all"]
    assert "LRU@8" in text  # the middle of the two sizes (4, 8)
    data = json.loads(out.read_text())
    assert data["seed"] == 1 and data["mrc"]["policy_sizes"] == [4, 8]
    assert data["moe_layers"] == [0, 2]
    assert f"report written to {out}" in text


def test_analyze_help_shows_an_example() -> None:
    res = CliRunner().invoke(main, ["analyze", "--help"])
    assert res.exit_code == 0
    assert "moetrace analyze out/deepseek --json" in res.output


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--phase", "decode"], "no activations in phase 'decode'"),
        (["--cache-sizes", "1"], "cache size '1' must be in [top_k=2, 16]"),
        (["--cache-sizes", "x"], "neither an integer nor a percentage"),
    ],
)
def test_analyze_bad_input_exits_2(trace_dir: Path, args: list[str], message: str) -> None:
    res = CliRunner().invoke(main, ["analyze", str(trace_dir), *args])
    assert res.exit_code == 2
    assert "moetrace: error:" in res.output and message in res.output


def test_analyze_missing_trace_exits_2(tmp_path: Path) -> None:
    res = CliRunner().invoke(main, ["analyze", str(tmp_path / "nope")])
    assert res.exit_code == 2
    assert "no such trace directory" in res.output
