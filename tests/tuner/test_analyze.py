"""The analyze API: report contents and JSON round trip, SQL vs numpy, bad input."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from miningkit import write_trace, zipf_routing

from moetrace.errors import AnalysisError
from moetrace.store import Manifest, ModelInfo, TraceWriter, open_trace
from moetrace.store.arrays import load_routing
from moetrace.tuner.analyze import AnalyzeConfig, analyze, resolve_cache_sizes
from moetrace.tuner.mining.frequency import frequency_from_routing, frequency_matrices
from moetrace.tuner.mining.groups import pair_counts, pair_counts_from_routing
from moetrace.tuner.mining.report import REPORT_VERSION, AnalysisReport
from moetrace.tuner.mining.streams import layer_stream
from moetrace.tuner.mining.transitions import transition_counts

E, K = 12, 3


@pytest.fixture(scope="module")
def trace_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    rng = np.random.default_rng(7)
    routing = zipf_routing(
        rng, [30 + 5 * i for i in range(12)], layers=3, num_experts=E, k=K, s=1.0
    )
    for ex in routing:  # a few dropped slots
        ex[rng.random(ex.shape[:2]) < 0.02, K - 1] = -1
    phases = [np.r_[np.zeros(10, np.int8), np.ones(ex.shape[0] - 10, np.int8)] for ex in routing]
    return write_trace(
        tmp_path_factory.mktemp("an") / "t",
        routing,
        num_experts=E,
        phases=phases,
        moe_layers=(1, 3, 5),
        part_rows=500,
    )


@pytest.fixture(scope="module")
def report(trace_dir: Path) -> AnalysisReport:
    return analyze(trace_dir, AnalyzeConfig(seed=3))


def _brute_lru(experts: np.ndarray, row: np.ndarray, capacity: int) -> int:
    recency: list[int] = []
    hits = 0
    for t in np.unique(row):
        s = experts[row == t].tolist()
        hits += sum(e in recency[:capacity] for e in s)
        recency = s + [x for x in recency if x not in s]
    return hits


def test_report_numbers_match_direct_computation(trace_dir: Path, report: AnalysisReport) -> None:
    trace = open_trace(trace_dir)
    routing = load_routing(trace)
    assert report.report_version == REPORT_VERSION
    assert report.moe_layers == (1, 3, 5) and report.num_experts == E and report.top_k == K
    assert report.num_rows == routing.num_rows == trace.num_activations
    valid = int((routing.experts >= 0).sum())
    assert report.num_accesses == valid
    freq = frequency_from_routing(routing.layer, routing.experts, 3, E)
    assert np.array_equal(np.array(report.skew.frequency), freq)
    for layer in range(3):
        st = layer_stream(routing, layer)
        for c in (1, 3, 6, E):
            hits = _brute_lru(st.experts, st.row, c)
            assert report.mrc.lru[layer][c - 1] == pytest.approx(hits / st.num_accesses)
        for i, c in enumerate(report.mrc.policy_sizes):
            assert report.mrc.belady[layer][i] >= report.mrc.lru[layer][c - 1] - 1e-12
    assert report.mrc.policy_sizes == (3, 6)  # 12.5% of 12 rounds to 2 -> raised to top-k
    lru80 = report.mrc.lru_size_for["0.8"]
    opt80 = report.mrc.belady_size_for["0.8"]
    assert lru80 is not None and opt80 is not None and opt80 <= lru80
    assert report.mrc.model_lru[lru80 - 1] >= 0.8 > report.mrc.model_lru[lru80 - 2]
    assert report.verdict.lru_size_80 == lru80 and report.verdict.opt_size_80 == opt80
    assert report.verdict.lines[0].startswith("Caching")
    assert sum(sum(h) for h in report.reuse.distinct_hist) + sum(report.reuse.cold) == valid
    assert report.phases.phases == ("prefill", "decode")


def test_sql_and_numpy_agree(trace_dir: Path) -> None:
    trace = open_trace(trace_dir)
    routing = load_routing(trace)
    freqs = frequency_matrices(trace)
    assert np.array_equal(
        freqs["prefill"] + freqs["decode"],
        frequency_from_routing(routing.layer, routing.experts, 3, E),
    )
    pairs = pair_counts(trace)
    assert np.array_equal(pairs, pair_counts_from_routing(routing.layer, routing.experts, 3, E))
    assert pairs.sum() > 0 and np.array_equal(pairs, pairs.transpose(0, 2, 1))
    dec = load_routing(trace, phase="decode")
    assert np.array_equal(
        pair_counts(trace, "decode"), pair_counts_from_routing(dec.layer, dec.experts, 3, E)
    )
    trans = transition_counts(routing)
    assert trans.shape == (2, E, E)
    # every token has all 3 layers: pairs (l, l+1) count valid slot combinations
    tok = routing.experts.reshape(-1, 3, K)
    want = sum(
        int(((tok[:, 0, a] >= 0) & (tok[:, 1, b] >= 0)).sum()) for a in range(K) for b in range(K)
    )
    assert trans[0].sum() == want


def test_report_json_round_trip(tmp_path: Path, report: AnalysisReport) -> None:
    out = tmp_path / "r.json"
    report.save(out)
    data = json.loads(out.read_text())
    assert data["report_version"] == REPORT_VERSION
    assert len(data["mrc"]["lru"]) == 3 and len(data["mrc"]["lru"][0]) == E
    back = AnalysisReport.load(out)
    assert back.to_dict() == report.to_dict()
    assert back.mrc.lru == report.mrc.lru
    assert back.groups is not None and back.groups.top_pairs == report.groups.top_pairs
    data["report_version"] = 99
    out.write_text(json.dumps(data))
    with pytest.raises(AnalysisError, match="report version 99"):
        AnalysisReport.load(out)


def test_seeded_and_deterministic(trace_dir: Path, report: AnalysisReport) -> None:
    again = analyze(trace_dir, AnalyzeConfig(seed=3))
    a, b = report.to_dict(), again.to_dict()
    a.pop("timings"), b.pop("timings")
    assert a == b


def test_phase_with_no_rows_is_an_error(tmp_path: Path) -> None:
    routing = zipf_routing(np.random.default_rng(0), [20, 20], 2, 8, 2, 1.0)
    path = write_trace(tmp_path / "t", routing, num_experts=8)
    with pytest.raises(AnalysisError, match=r"no activations in phase 'decode'.*prefill"):
        analyze(path, AnalyzeConfig(phase="decode"))


def test_empty_trace_is_an_error(tmp_path: Path) -> None:
    manifest = Manifest(
        model=ModelInfo(name="m", num_layers=2, moe_layers=(1,), num_experts=4, top_k=1)
    )
    with TraceWriter(tmp_path / "t", manifest):
        pass
    with pytest.raises(AnalysisError, match="trace has no activations"):
        analyze(tmp_path / "t")


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"phase": "both"}, "phase must be one of"),
        ({"request_test_fraction": 1.0}, "request_test_fraction must be in"),
        ({"prefix_tokens": 0}, "prefix_tokens must be >= 1"),
        ({"sections": ("groups", "magic")}, "unknown analysis sections"),
    ],
)
def test_config_validation(kwargs: dict, match: str) -> None:
    with pytest.raises(AnalysisError, match=match):
        AnalyzeConfig(**kwargs)


def test_cache_size_resolution() -> None:
    assert resolve_cache_sizes(None, 64, 6) == (8, 16, 32)
    assert resolve_cache_sizes(None, 8, 2) == (2, 4)
    assert resolve_cache_sizes(["25%", 16, "16"], 64, 1) == (16,)
    with pytest.raises(AnalysisError, match="cache size 'lots' is neither"):
        resolve_cache_sizes(["lots"], 64)
    with pytest.raises(AnalysisError, match=r"cache size 4 must be in \[top_k=6, 64\]"):
        resolve_cache_sizes([4], 64, 6)
    with pytest.raises(AnalysisError, match="must be in"):
        resolve_cache_sizes(["200%"], 64)


def test_max_tokens_numpy_path_equals_sql_path(trace_dir: Path, report: AnalysisReport) -> None:
    # with max_tokens the tables come from numpy over the subset; with all tokens they
    # must equal the DuckDB-based report exactly
    subset = analyze(trace_dir, AnalyzeConfig(seed=3, max_tokens=10**9))
    a, b = report.to_dict(), subset.to_dict()
    a.pop("timings"), b.pop("timings")
    assert a == b
    first = analyze(trace_dir, AnalyzeConfig(seed=3, max_tokens=50, sections=("phases",)))
    assert sum(first.skew.tokens) == 50 * 3
    assert first.num_requests == 2  # 30 + 35 tokens: the first two requests have rows


def test_minimal_trace_one_request_one_layer(tmp_path: Path) -> None:
    routing = [np.array([[[0]], [[1]], [[0]], [[2]], [[0]]], dtype=np.int16)]
    path = write_trace(tmp_path / "t", routing, num_experts=4, moe_layers=(3,))
    rep = analyze(path)
    assert rep.num_requests == 1 and rep.moe_layers == (3,)
    assert rep.groups is None  # top-1: no co-activation
    assert rep.transitions is None and rep.requests is None  # one layer, one request
    assert rep.mrc.lru[0] == pytest.approx((0.0, 0.4, 0.4, 0.4))  # size 2: hits at tokens 2, 4
    assert rep.mrc.policy_sizes == (1, 2)
    assert rep.mrc.belady[0] == pytest.approx((0.0, 0.4))
    assert rep.verdict.lines
    AnalysisReport.from_dict(json.loads(json.dumps(rep.to_dict())))
