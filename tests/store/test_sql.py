"""DuckDB views over a trace, and the example queries of docs/trace-format.md."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from storekit import make_manifest, synth_request, write_trace

from moetrace.errors import QueryError
from moetrace.store import open_trace
from moetrace.store.sql import coactivation_sql, transitions_sql


@pytest.fixture(scope="module")
def trace_and_reqs(tmp_path_factory: pytest.TempPathFactory):
    m = make_manifest(top_k=3, num_experts=6, moe_layers=(0, 2, 3), num_layers=4, tags={"run": "a"})
    rng = np.random.default_rng(7)
    reqs = [
        synth_request(m, rng, f"q{i}", prompt_tokens=4, generated_tokens=3, with_weights=i != 1)
        for i in range(5)
    ]
    path = tmp_path_factory.mktemp("sql") / "t"
    write_trace(path, m, reqs, part_rows=50)
    return open_trace(path), reqs


def test_activations_view_lists(trace_and_reqs) -> None:
    trace, reqs = trace_and_reqs
    rows = trace.sql(
        "SELECT request_id, token, layer, experts, weights FROM activations "
        "ORDER BY request_id, token, layer"
    ).to_pylist()
    assert len(rows) == sum(r.rows for r in reqs)
    first = reqs[0]
    got = [r for r in rows if r["request_id"] == "q0"]
    assert [r["experts"] for r in got] == first.experts.tolist()
    np.testing.assert_allclose([r["weights"] for r in got], first.weights, rtol=1e-6)
    assert all(r["weights"] == [None] * 3 for r in rows if r["request_id"] == "q1")


def test_long_view(trace_and_reqs) -> None:
    trace, reqs = trace_and_reqs
    long = trace.sql(
        "SELECT rank, expert, weight FROM activations_long WHERE request_id = 'q2' "
        "ORDER BY token, layer, rank"
    )
    assert long.column("expert").to_pylist() == reqs[2].experts.reshape(-1).tolist()
    assert long.column("rank").to_pylist() == [0, 1, 2] * reqs[2].rows
    np.testing.assert_allclose(
        long.column("weight").to_numpy(), reqs[2].weights.reshape(-1), rtol=1e-6
    )


def test_requests_manifest_and_layers_views(trace_and_reqs) -> None:
    trace, reqs = trace_and_reqs
    req = trace.sql("SELECT request_id, arrival, prompt_tokens FROM requests ORDER BY arrival")
    assert req.column("request_id").to_pylist() == [r.record.request_id for r in reqs]
    man = trace.sql("SELECT * FROM manifest").to_pylist()
    assert len(man) == 1
    row = man[0]
    assert row["top_k"] == 3 and row["num_experts"] == 6 and row["num_moe_layers"] == 3
    assert row["model_name"] == "tiny-moe" and row["weight_dtype"] == "float32"
    assert row["speculative"] is False and row["tags"] == '{"run": "a"}'
    assert row["format_version"] == 1
    layers = trace.sql("SELECT layer, layer_index FROM moe_layers ORDER BY layer").to_pylist()
    assert layers == [
        {"layer": 0, "layer_index": 0},
        {"layer": 2, "layer_index": 1},
        {"layer": 3, "layer_index": 2},
    ]


def test_hot_experts_query(trace_and_reqs) -> None:
    trace, reqs = trace_and_reqs
    got = trace.sql(
        "SELECT layer, expert, count(*) AS n FROM activations_long "
        "WHERE phase = 'decode' AND expert >= 0 GROUP BY layer, expert"
    ).to_pylist()
    want: Counter = Counter()
    for r in reqs:
        for lay, ph, ex in zip(r.layer, r.phase, r.experts, strict=True):
            if ph == 1:
                want.update((int(lay), int(e)) for e in ex if e >= 0)
    assert {(g["layer"], g["expert"]): g["n"] for g in got} == dict(want)


def test_coactivation_query(trace_and_reqs) -> None:
    trace, reqs = trace_and_reqs
    got = trace.sql(coactivation_sql(trace.top_k)).to_pylist()
    want: Counter = Counter()
    for r in reqs:
        for lay, ex in zip(r.layer, r.experts, strict=True):
            for i in range(len(ex)):
                for j in range(i + 1, len(ex)):
                    if ex[i] >= 0 and ex[j] >= 0:
                        lo, hi = sorted((int(ex[i]), int(ex[j])))
                        want[(int(lay), lo, hi)] += 1
    assert {(g["layer"], g["expert_a"], g["expert_b"]): g["n"] for g in got} == dict(want)


def test_transitions_query(trace_and_reqs) -> None:
    trace, reqs = trace_and_reqs
    got = trace.sql(transitions_sql(trace.top_k)).to_pylist()
    layers = list(trace.manifest.model.moe_layers)
    want: Counter = Counter()
    for r in reqs:
        by_tok = {}
        for t, lay, ex in zip(r.token, r.layer, r.experts, strict=True):
            by_tok[(int(t), int(lay))] = [int(e) for e in ex if e >= 0]
        for (t, lay), ex in by_tok.items():
            i = layers.index(lay)
            if i + 1 < len(layers):
                for a in ex:
                    for b in by_tok[(t, layers[i + 1])]:
                        want[(lay, layers[i + 1], a, b)] += 1
    assert {
        (g["layer"], g["next_layer"], g["expert"], g["next_expert"]): g["n"] for g in got
    } == dict(want)


def test_top1_coactivation_is_empty(tmp_path: Path) -> None:
    m = make_manifest(top_k=1, num_experts=4)
    write_trace(tmp_path / "t", m, [synth_request(m, np.random.default_rng(0), "a")])
    trace = open_trace(tmp_path / "t")
    assert trace.sql(coactivation_sql(1)).num_rows == 0
    assert trace.sql(transitions_sql(1)).num_rows > 0


def test_query_errors(trace_and_reqs) -> None:
    trace, _ = trace_and_reqs
    with pytest.raises(QueryError, match="SQL error"):
        trace.sql("SELECT nope FROM activations")
    with pytest.raises(QueryError, match="SQL error"):
        trace.sql("SELEC 1")
    assert trace.sql("CREATE TEMP TABLE x AS SELECT 1 AS a").num_columns in (0, 1)


DOC_TRANSITIONS = """
WITH a AS (
  SELECT request_id, token, m.layer_index AS li, layer, expert
  FROM activations_long JOIN moe_layers m USING (layer)
  WHERE expert >= 0
)
SELECT x.layer, y.layer AS next_layer, x.expert, y.expert AS next_expert, count(*) AS n
FROM a x JOIN a y
  ON x.request_id = y.request_id AND x.token = y.token AND y.li = x.li + 1
GROUP BY ALL
"""

DOC_TOKENS = """
SELECT r.request_id, r.prompt_tokens, r.generated_tokens,
       count(*) / (SELECT num_moe_layers FROM manifest) AS recorded_tokens
FROM activations a JOIN requests r USING (request_id)
GROUP BY ALL ORDER BY any_value(r.arrival)
"""


def test_doc_queries_agree(trace_and_reqs) -> None:
    trace, reqs = trace_and_reqs

    def rows(sql: str) -> set[tuple]:
        return {tuple(r.values()) for r in trace.sql(sql).to_pylist()}

    assert rows(DOC_TRANSITIONS) == rows(transitions_sql(trace.top_k))
    tokens = trace.sql(DOC_TOKENS).to_pylist()
    assert [t["request_id"] for t in tokens] == [r.record.request_id for r in reqs]
    assert all(t["recorded_tokens"] == 7 for t in tokens)
