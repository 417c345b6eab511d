"""The data layer on the planted fixture trace: values, not just shapes."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
from dashkit import MOE_LAYERS, NUM_EXPERTS, TOP_K, write_fixture_trace

from moetrace.dashboard.data import experts as X
from moetrace.dashboard.data import groups as G
from moetrace.dashboard.data import overview as O
from moetrace.dashboard.data import plans as P
from moetrace.dashboard.data import requests as Q
from moetrace.dashboard.data import reuse as R
from moetrace.dashboard.data.common import stamp
from moetrace.dashboard.inputs import ENV_VAR, DashboardInputs, current_inputs, parse_argv
from moetrace.errors import AnalysisError, ConfigError
from moetrace.store import RequestRecord, TraceWriter, open_trace
from moetrace.tuner.mining.groups import pair_counts
from moetrace.tuner.mining.replacement import belady_hits, lfu_hits


@pytest.fixture(scope="module")
def trace(fixture_paths: dict[str, Path]):  # type: ignore[no-untyped-def]
    return open_trace(fixture_paths["trace"])


def test_overview_counts(trace) -> None:  # type: ignore[no-untyped-def]
    ov = O.overview(trace)
    assert ov.requests == 12
    # prompts 6..9 tokens and generations 5..7 tokens, by r % 4 and r % 3
    assert ov.tokens["prefill"] == sum(6 + r % 4 for r in range(12))
    assert ov.tokens["decode"] == sum(5 + r % 3 for r in range(12))
    assert ov.activations == (ov.tokens["prefill"] + ov.tokens["decode"]) * len(MOE_LAYERS)
    assert ov.moe_layers == MOE_LAYERS and ov.top_k == TOP_K and ov.num_experts == NUM_EXPERTS
    assert ov.request_tag_keys == ("topic",) and ov.has_weights


def test_verdict_comes_from_analyze(trace) -> None:  # type: ignore[no-untyped-def]
    v = O.verdict(trace)
    assert v.unavailable is None
    assert v.lines and v.lines[0].startswith("Caching")


def test_expert_counts_by_phase_and_tag(trace) -> None:  # type: ignore[no-untyped-def]
    ov = O.overview(trace)
    allc = X.expert_counts(trace)
    assert allc.total == ov.activations * TOP_K
    np.testing.assert_allclose(allc.share.sum(axis=1), 1.0)
    pre, dec = X.expert_counts(trace, "prefill"), X.expert_counts(trace, "decode")
    np.testing.assert_array_equal(pre.counts + dec.counts, allc.counts)
    assert X.tag_values(trace) == {"topic": ("code", "prose")}
    code = X.expert_counts(trace, "all", ("topic", "code"))
    prose = X.expert_counts(trace, "all", ("topic", "prose"))
    np.testing.assert_array_equal(code.counts + prose.counts, allc.counts)
    # planted: code requests route layer L1's first choice to expert 0, prose to expert 7
    assert code.share[0, 0] > 2 * prose.share[0, 0]
    assert prose.share[0, 7] > 2 * code.share[0, 7]
    with pytest.raises(AnalysisError, match="topic='nope'"):
        X.expert_counts(trace, "all", ("topic", "nope"))


def _token_set_lru(experts: np.ndarray, row: np.ndarray, capacity: int) -> int:
    """Reference LRU under token-set accesses: a token's experts are looked up together,
    then all move to the front (rank 0 first); evict from the back, never the token's own."""
    cache: list[int] = []
    hits = 0
    for t in np.unique(row):
        tok = [int(e) for e in experts[row == t]]
        hits += sum(e in cache for e in tok)
        cache = tok + [e for e in cache if e not in tok]
        del cache[max(capacity, len(tok)) :]
    return hits


def test_layer_reuse_matches_reference(trace) -> None:  # type: ignore[no-untyped-def]
    experts, row = R.layer_stream(trace, 1)
    lr = R.layer_reuse(trace, 1)
    n = experts.size
    assert lr.layer == MOE_LAYERS[1] and lr.accesses == n
    assert n == sum(6 + r % 4 + 5 + r % 3 for r in range(12)) * TOP_K  # no dropped slots
    for c in (TOP_K, 3, NUM_EXPERTS):
        assert lr.lru[c - 1] == pytest.approx(_token_set_lru(experts, row, c) / n)
    assert lr.sizes[0] == TOP_K and lr.sizes[-1] == NUM_EXPERTS
    for i, c in enumerate(lr.sizes):
        assert lr.belady[i] == pytest.approx(belady_hits(experts, row, NUM_EXPERTS, c) / n)
        assert lr.lfu[i] == pytest.approx(lfu_hits(experts, row, NUM_EXPERTS, c) / n)
        assert lr.belady[i] >= max(lr.lru[c - 1], lr.lfu[i]) - 1e-12
    assert lr.cold == NUM_EXPERTS  # every expert is used at this layer
    assert lr.stack_hist.sum() + lr.cold == lr.accesses
    assert lr.lru[-1] == pytest.approx(1 - NUM_EXPERTS / n)


def test_lorenz_and_gini() -> None:
    x, y = R.lorenz(np.array([0, 0, 0, 10]))
    np.testing.assert_allclose(x, [0, 0.25, 0.5, 0.75, 1.0])
    np.testing.assert_allclose(y, [0, 0, 0, 0, 1.0])
    g = R.gini_per_layer(np.array([[5, 5, 5, 5], [0, 0, 0, 10]]))
    assert g[0] == pytest.approx(0.0) and g[1] == pytest.approx(0.75)


def test_coactivation_finds_planted_pair(trace) -> None:  # type: ignore[no-untyped-def]
    co = G.coactivation(trace, 0)
    assert (co.top[0].a, co.top[0].b) == (0, 1) and co.top[0].lift > 1.5
    assert co.groups[0].experts == (0, 1)
    assert co.pairs[0, 1] == co.pairs[1, 0] == co.top[0].count
    assert np.all(np.diag(co.pairs) == 0)


def test_layer_pair_counts_match_mining(trace) -> None:  # type: ignore[no-untyped-def]
    for phase in ("all", "decode"):
        every = pair_counts(trace, None if phase == "all" else phase)
        for li in range(len(MOE_LAYERS)):
            np.testing.assert_array_equal(G.layer_pair_counts(trace, li, phase), every[li])
    assert every.sum() > 0


def test_transitions_predict_better_than_baseline(trace) -> None:  # type: ignore[no-untyped-def]
    tr = G.transitions(trace, 0)
    assert (tr.src, tr.dst) == MOE_LAYERS[:2]
    # planted: layer l+1 = layer l shifted by one expert in 80% of tokens
    assert (tr.conditional.argmax(axis=1) == (np.arange(NUM_EXPERTS) + 1) % NUM_EXPERTS).sum() >= 6
    assert tr.recall is not None and tr.baseline is not None and tr.recall > tr.baseline + 0.2
    with pytest.raises(AnalysisError, match="0..1"):
        G.transitions(trace, 2)


def test_all_transition_scores_agree_with_one_pair(trace) -> None:  # type: ignore[no-untyped-def]
    sc = G.all_transition_scores(trace)
    assert (sc.src, sc.dst) == (MOE_LAYERS[:2], MOE_LAYERS[1:])
    one = G.transitions(trace, 1)
    assert sc.recall[1] == pytest.approx(one.recall) and sc.baseline[1] == pytest.approx(
        one.baseline
    )
    assert sc.test_tokens[1] == one.test_tokens


def test_requests_views(trace) -> None:  # type: ignore[no-untyped-def]
    table = Q.request_table(trace)
    assert [r["request_id"] for r in table] == [f"req-{r:02d}" for r in range(12)]
    mat = Q.request_matrix(trace, "req-00")
    assert mat.shape == (len(MOE_LAYERS), NUM_EXPERTS)
    assert mat.sum() == (6 + 5) * len(MOE_LAYERS) * TOP_K
    rows = Q.token_routing(trace, "req-00", 0)
    assert len(rows) == (6 + 5) * TOP_K
    assert [r["pos"] for r in rows[:4]] == [0, 0, 1, 1]
    assert {r["phase"] for r in rows} == {"prefill", "decode"}
    with pytest.raises(AnalysisError, match="no request 'nope'"):
        Q.request_matrix(trace, "nope")


def test_projection_clusters_follow_topics(trace) -> None:  # type: ignore[no-untyped-def]
    proj = Q.projection(trace)
    assert proj.xy.shape == (12, 2) and proj.clusters is not None
    topic = np.array([r % 2 for r in range(12)])
    agree = (proj.clusters == topic).mean()
    assert max(agree, 1 - agree) >= 0.9


def test_plans_load_and_report_problems(fixture_paths: dict[str, Path], trace) -> None:  # type: ignore[no-untyped-def]
    paths = tuple(str(fixture_paths[k]) for k in ("plan", "bad_plan", "foreign_plan")) + (
        "/nonexistent/plan.json",
    )
    good, bad, foreign, missing = P.load_plans(paths, trace.manifest)
    assert good.plan is not None and good.error is None and good.mismatch is None
    mask = P.pinned_mask(good.plan)
    assert mask.sum() == good.plan.num_pinned == 6 and mask[0, 0] and mask[0, 1]
    assert P.expected_hit_rate(good.plan) == pytest.approx(0.6)
    assert [r["name"] for r in P.expected_rows(good.plan)][:2] == ["plan", "lru"]
    assert P.plan_facts(good.plan)["expected stall per token"] == "2 ms"
    assert P.plan_facts(good.plan)["prefetcher"] == "transition"
    assert bad.plan is None and str(fixture_paths["bad_plan"]) in (bad.error or "")
    assert foreign.plan is not None and "fingerprint" in (foreign.mismatch or "")
    assert missing.error and "/nonexistent/plan.json" in missing.error


def test_runtime_stats(fixture_paths: dict[str, Path], tmp_path: Path) -> None:
    broken = tmp_path / "s.json"
    broken.write_text("[1, 2", encoding="utf-8")
    ok, bad = P.load_stats((str(fixture_paths["stats"]), str(broken)))
    rows = P.stats_per_layer(ok.data or {})
    assert len(rows) == 2 * len(MOE_LAYERS)
    assert rows[0] == {
        "layer": 1,
        "phase": "prefill",
        "accesses": 100.0,
        "hit_rate": 0.6,
        "stall_ms": 0.0,
        "bytes": 0.0,
    }
    assert bad.error and str(broken) in bad.error and "line 1" in bad.error
    assert P.flatten({"a": {"b": 1, "c": [1, 2]}}) == {"a.b": 1, "a.c": "1, 2"}


def test_stamp_changes_when_trace_grows(tmp_path: Path) -> None:
    path = write_fixture_trace(tmp_path / "t", num_requests=2)
    before = stamp(path)
    assert stamp(path) == before
    time.sleep(0.05)
    manifest = open_trace(path).manifest
    with TraceWriter(path, manifest, threads=0) as w:
        w.write_request(
            RequestRecord("extra", prompt_tokens=1),
            token=0,
            step=0,
            phase=0,
            forward=0,
            layer=np.array([MOE_LAYERS[0]]),
            experts=np.array([[0, 1]]),
        )
    after = stamp(path)
    assert after[0] == before[0] and after[1:] != before[1:]
    assert stamp(tmp_path / "missing") == (0.0, 0.0, 0.0)


def test_inputs_parse_and_validate(monkeypatch: pytest.MonkeyPatch) -> None:
    got = parse_argv(["--trace", "a", "--plan", "p.json", "--trace", "b", "--stats", "s.json"])
    assert got == DashboardInputs(("a", "b"), ("p.json",), ("s.json",))
    assert parse_argv(got.to_argv()).traces == tuple(str(Path(p).resolve()) for p in ("a", "b"))
    with pytest.raises(ConfigError, match="'--bogus'"):
        parse_argv(["--trace", "a", "--bogus", "x"])
    with pytest.raises(ConfigError, match="--plan needs a path"):
        parse_argv(["--trace", "a", "--plan"])
    with pytest.raises(ConfigError, match="at least one trace"):
        parse_argv([])
    with pytest.raises(ConfigError, match="given twice"):
        DashboardInputs(("a", "a"))
    monkeypatch.setenv(ENV_VAR, json.dumps({"traces": ["x"], "plans": ["y"]}))
    assert current_inputs(["--trace", "ignored"]) == DashboardInputs(("x",), ("y",))
    monkeypatch.setenv(ENV_VAR, "{oops")
    with pytest.raises(ConfigError, match=ENV_VAR):
        current_inputs([])
