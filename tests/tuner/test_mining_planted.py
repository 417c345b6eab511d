"""Planted structure in synthetic traces is recovered by analyze within stated tolerances."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from miningkit import sample_distinct, write_trace, zipf_routing
from sklearn.metrics import adjusted_rand_score

from moetrace.tuner.analyze import AnalyzeConfig, analyze
from moetrace.tuner.mining.frequency import gini, hot_set_size, zipf_exponent

ONLY = ("groups", "transitions", "requests", "phases")


def _cfg(*sections: str, **kw: object) -> AnalyzeConfig:
    return AnalyzeConfig(sections=tuple(sections), **kw)  # type: ignore[arg-type]


@pytest.mark.parametrize("s", [0.8, 1.2])
def test_zipf_exponent_is_recovered(tmp_path: Path, s: float) -> None:
    # Tolerance: +-0.1 on the exponent with 20k top-1 tokens over 32 experts per layer.
    rng = np.random.default_rng(1)
    routing = zipf_routing(rng, [500] * 40, layers=2, num_experts=32, k=1, s=s)
    rep = analyze(write_trace(tmp_path / "t", routing, num_experts=32), _cfg())
    for got in rep.skew.zipf_exponent:
        assert got == pytest.approx(s, abs=0.1)
    assert rep.skew.model_zipf_exponent == pytest.approx(s, abs=0.1)
    # a steeper law concentrates more: hot set of 80% well below 80% of the experts
    assert max(rep.skew.hot_set["0.8"]) < 0.8 * 32
    assert rep.skew.accesses == (20000, 20000)


def test_skew_statistics_on_known_vectors() -> None:
    assert gini(np.ones(8)) == pytest.approx(0.0)
    assert gini(np.r_[np.zeros(9), 1.0]) == pytest.approx(0.9)
    assert hot_set_size(np.array([50, 30, 10, 10]), 0.8) == 2
    assert hot_set_size(np.array([50, 30, 10, 10]), 0.81) == 3
    counts = 1e6 * np.arange(1, 65, dtype=float) ** -1.5
    assert zipf_exponent(counts) == pytest.approx(1.5, abs=1e-6)


def _grouped_routing(
    rng: np.random.Generator,
    groups: list[list[int]],
    tokens: int,
    layers: int,
    num_experts: int,
    p_group: float,
) -> np.ndarray:
    k = len(groups[0])
    ex = np.empty((tokens, layers, k), np.int16)
    for layer in range(layers):
        pick = rng.integers(len(groups), size=tokens)
        grouped = np.array(groups)[pick]
        noise = sample_distinct(rng, np.ones(num_experts) / num_experts, tokens, k)
        use = rng.random(tokens) < p_group
        ex[:, layer, :] = np.where(use[:, None], grouped, noise)
    return ex


def test_planted_coactivation_groups_are_the_strongest(tmp_path: Path) -> None:
    # 4 groups of 4 experts; 80% of tokens pick a whole group, 20% four random experts.
    rng = np.random.default_rng(2)
    perm = rng.permutation(16)
    groups = [sorted(perm[i : i + 4].tolist()) for i in range(0, 16, 4)]
    routing = [_grouped_routing(rng, groups, 250, 2, 16, 0.8) for _ in range(20)]
    rep = analyze(write_trace(tmp_path / "t", routing, num_experts=16), _cfg("groups"))
    assert rep.groups is not None
    planted_pairs = {(a, b) for g in groups for a in g for b in g if a < b}
    for layer in range(2):
        top = [p for p in rep.groups.top_pairs if p.layer == layer]
        assert len(top) == 10
        assert {(p.a, p.b) for p in top} <= planted_pairs  # the 10 strongest are planted
        assert min(p.lift for p in top) > 2.0
        found = sorted(g.experts for g in rep.groups.groups if g.layer == layer)
        assert found == sorted(tuple(g) for g in groups)


def _markov_routing(
    rng: np.random.Generator, perms: list[np.ndarray], tokens: int, p: float, num_experts: int
) -> np.ndarray:
    layers = len(perms) + 1
    ex = np.empty((tokens, layers, 1), np.int16)
    cur = rng.integers(num_experts, size=tokens)
    ex[:, 0, 0] = cur
    for layer, perm in enumerate(perms, start=1):
        follow = rng.random(tokens) < p
        cur = np.where(follow, perm[cur], rng.integers(num_experts, size=tokens))
        ex[:, layer, 0] = cur
    return ex


def test_planted_transitions_predict_at_the_planted_rate(tmp_path: Path) -> None:
    # next expert = perm(current) with p = 0.7, else uniform: recall@1 = 0.7 + 0.3/16.
    rng = np.random.default_rng(3)
    E, p = 16, 0.7
    perms = [rng.permutation(E) for _ in range(2)]
    routing = [_markov_routing(rng, perms, 200, p, E) for _ in range(60)]
    rep = analyze(write_trace(tmp_path / "t", routing, num_experts=E), _cfg("transitions"))
    assert rep.transitions is not None
    assert len(rep.transitions.scores) == 2
    expected = p + (1 - p) / E
    for score in rep.transitions.scores:
        assert score.recall == pytest.approx(expected, abs=0.04)
        assert score.baseline < 0.15
        assert score.test_tokens > 1000
    assert "transitions" in rep.verdict.predictors_with_lift


def test_two_request_clusters_are_recovered_and_predict(tmp_path: Path) -> None:
    # cluster A routes to experts 0-7, cluster B to 8-15 (10% uniform noise); prompts
    # carry the cluster's topic words.
    rng = np.random.default_rng(4)
    E, k, layers = 16, 2, 3
    labels = rng.integers(2, size=40)
    routing, prompts = [], []
    for lab in labels:
        probs = np.full(E, 0.1 / E)
        half = slice(0, 8) if lab == 0 else slice(8, 16)
        probs[half] += 0.9 / 8 * np.linspace(2.0, 0.5, 8) / np.linspace(2.0, 0.5, 8).mean()
        probs /= probs.sum()
        n = 120
        ex = np.stack([sample_distinct(rng, probs, n, k) for _ in range(layers)], axis=1)
        routing.append(ex)
        topic = "group theory ring field" if lab == 0 else "sonnet rhyme meter verse"
        prompts.append(f"please explain {topic} {rng.integers(1000)}")
    path = write_trace(tmp_path / "t", routing, num_experts=E, prompts=prompts)
    rep = analyze(path, _cfg("requests", cache_sizes=(4, "25%", 8)))
    req = rep.requests
    assert req is not None and req.n_clusters == 2
    assert adjusted_rand_score(labels, req.cluster_labels) > 0.9
    pred = req.predictors
    assert pred is not None and pred.sizes == (4, 8)
    base = pred.recall["frequency"][0]
    for name in ("prefix", "cluster", "nearest", "prompt"):
        assert pred.recall[name][0] > base + 0.08, name
    assert set(rep.verdict.predictors_with_lift) >= {"prefix", "cluster", "nearest", "prompt"}


def test_phase_disparity(tmp_path: Path) -> None:
    # prefill tokens route to experts 0-3, decode tokens to 4-7: disjoint mixes.
    rng = np.random.default_rng(5)
    routing, phases = [], []
    for _ in range(6):
        ph = np.r_[np.zeros(20, np.int8), np.ones(30, np.int8)]
        ex = np.where(
            ph[:, None, None] == 0, rng.integers(0, 4, (50, 2, 1)), rng.integers(4, 8, (50, 2, 1))
        )
        routing.append(ex.astype(np.int16))
        phases.append(ph)
    path = write_trace(tmp_path / "t", routing, num_experts=8, phases=phases)
    rep = analyze(path, _cfg("phases"))
    ps = rep.phases
    assert ps.phases == ("prefill", "decode")
    assert ps.tokens == {"prefill": 120, "decode": 180}
    assert ps.js_divergence is not None
    assert all(js == pytest.approx(1.0) for js in ps.js_divergence)
    # one prefill forward pass of 20 tokens uses the 4 prefill experts; a decode pass 1
    assert ps.distinct_per_forward["prefill"] == pytest.approx((4.0, 4.0))
    assert ps.distinct_per_forward["decode"] == pytest.approx((1.0, 1.0))
    assert set(ps.lru_by_phase) == {"prefill", "decode"}
    assert ps.lru_by_phase["decode"][0][3] > 0.9  # 4 decode experts fit a cache of 4
    assert any("JS divergence" in line for line in rep.verdict.lines)
    decode = analyze(path, _cfg("phases", phase="decode"))
    assert decode.num_rows == 180 * 2
    assert decode.skew.frequency[0][:4] == (0, 0, 0, 0)
