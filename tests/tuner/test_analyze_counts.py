"""``analyze`` of a count trace (skew only, the same figures as on routing) and the
refusals of simulate, tune and replay."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from miningkit import write_trace, zipf_routing

from moetrace.cli import main
from moetrace.errors import AnalysisError, CountTraceError
from moetrace.store import open_trace
from moetrace.store.importers.sglang_counts import import_counts
from moetrace.tuner.analyze import AnalyzeConfig, analyze
from moetrace.tuner.mining.frequency import frequency_matrices
from moetrace.tuner.mining.report import AnalysisReport, CountReport
from moetrace.tuner.sim.trace import load_traces

MOE_LAYERS, E, K = (1, 3), 16, 2


@pytest.fixture(scope="module")
def traces(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A routing trace and the count trace of its counts (as an SGLang stat dump of three
    buffered passes, plus an unused slot and the dense layers 0 and 2 all zero)."""
    base = tmp_path_factory.mktemp("counts")
    routing = zipf_routing(np.random.default_rng(0), [60] * 6, 2, E, K, 1.1)
    routing_dir = write_trace(base / "routing", routing, num_experts=E, moe_layers=MOE_LAYERS)
    table = open_trace(routing_dir).counts()
    total = np.zeros((MOE_LAYERS[-1] + 1, E), np.int64)
    for row in table.to_pylist():
        total[row["layer"], row["expert"]] += row["count"]
    rng = np.random.default_rng(1)
    lc = np.zeros((4, *total.shape), np.int64)
    for s in range(2):  # spread the counts over passes 0..2; slot 3 stays unused
        lc[s] = rng.binomial(total - lc[:s].sum(axis=0), 0.4)
    lc[2] = total - lc[:2].sum(axis=0)
    dump = base / "dumps" / "expert_distribution_recorder_1700000000.0.pt"
    dump.parent.mkdir()
    torch.save(
        {"rank": 0, "logical_count": torch.as_tensor(lc, dtype=torch.int32),
         "average_utilization_rate_over_window": None},
        dump,
    )  # fmt: skip
    counts_dir = base / "count-trace"
    import_counts(dump.parent, counts_dir, model_name="synthetic", top_k=K)
    return routing_dir, counts_dir


def test_counts_of_a_routing_trace_match_its_frequency(traces: tuple[Path, Path]) -> None:
    trace = open_trace(traces[0])
    freq = sum(frequency_matrices(trace).values())
    got = np.zeros_like(freq)
    for row in trace.counts().to_pylist():
        got[MOE_LAYERS.index(row["layer"]), row["expert"]] += row["count"]
    np.testing.assert_array_equal(got, freq)


def test_skew_of_the_count_trace_equals_the_routing_trace(traces: tuple[Path, Path]) -> None:
    routing_dir, counts_dir = traces
    full = analyze(routing_dir, AnalyzeConfig(sections=()))
    counts = analyze(counts_dir)
    assert isinstance(full, AnalysisReport) and isinstance(counts, CountReport)
    assert counts.skew.to_dict() == full.skew.to_dict()  # NaN encoded alike (null)
    assert counts.num_accesses == full.num_accesses
    assert counts.moe_layers == MOE_LAYERS and counts.source == "sglang-counts"
    assert any(line.startswith("Skew: mean Gini") for line in full.verdict.lines)
    assert counts.lines[0] in full.verdict.lines  # the same skew sentence
    assert "miss-ratio curves" in counts.lines[1]
    with pytest.raises(AnalysisError, match="no counts of phase 'decode'"):
        analyze(counts_dir, AnalyzeConfig(phase="decode"))


def test_analyze_cli_on_a_count_trace(traces: tuple[Path, Path], tmp_path: Path) -> None:
    out = tmp_path / "r.json"
    res = CliRunner().invoke(main, ["analyze", str(traces[1]), "--json", str(out)])
    assert res.exit_code == 0, res.output
    assert "per-expert counts only (from sglang-counts)" in res.output
    assert "need token-level routing" in res.output
    rows = [ln.split()[0] for ln in res.output.splitlines() if ln.strip()[:1].isdigit()]
    assert rows == ["1", "3"]
    data = json.loads(out.read_text())
    assert data["kind"] == "counts" and data["top_k"] == K
    assert CountReport.load(out).skew == CountReport.from_dict(data).skew
    with pytest.raises(AnalysisError, match="a count report"):
        AnalysisReport.load(out)


REFUSED = [
    ["simulate", "{t}", "--policy", "lru", "--cache", "4"],
    ["tune", "{t}", "--budget", "25%", "--out", "{tmp}/plan.json"],
]


@pytest.mark.parametrize("args", REFUSED, ids=["simulate", "tune"])
def test_simulate_and_tune_refuse_a_count_trace(
    traces: tuple[Path, Path], tmp_path: Path, args: list[str]
) -> None:
    argv = [a.format(t=traces[1], tmp=tmp_path) for a in args]
    res = CliRunner().invoke(main, argv)
    assert res.exit_code == 2, res.output
    errors = [ln for ln in res.output.splitlines() if ln.strip()]
    assert errors == [
        f"moetrace: error: {traces[1]} holds per-expert counts only (imported from "
        "sglang-counts); the simulator replays token-level routing: record with `moetrace "
        "record --server` or import per-token dumps (sglang-dump)"
    ], res.output
    assert not (tmp_path / "plan.json").exists()


def test_every_routing_load_refuses_counts(traces: tuple[Path, Path]) -> None:
    """The replay (``bench --replay``) and tune load through load_traces/load_routing."""
    with pytest.raises(CountTraceError, match="holds per-expert counts only"):
        load_traces([traces[0], traces[1]])
