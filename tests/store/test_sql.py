"""DuckDB views over a trace, the example queries of docs/trace-format.md, and the read-only
connection behind ``moetrace sql``."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import duckdb
import numpy as np
import pytest
from click.testing import CliRunner
from storekit import make_manifest, synth_request, write_trace
from treekit import tree_digest

from moetrace.cli import main
from moetrace.errors import QueryError
from moetrace.store import open_trace
from moetrace.store.sql import (
    READ_ONLY_SETTINGS,
    coactivation_sql,
    connect,
    open_read_only,
    run_query,
    transitions_sql,
)


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


# ---------------------------------------------------------------- read-only user SQL
# `moetrace sql` runs users' SQL on connect(trace, read_only=True): it may read the trace's
# views and nothing else, and write nothing anywhere. In-memory CREATE TABLE would be
# harmless, but it is refused with every other non-query statement (each call is a fresh
# connection, so a WITH clause does the same job).


@pytest.fixture()
def hostile_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """A small trace under a fresh cwd (so relative paths land in the snapshot too)."""
    m = make_manifest(top_k=2, num_experts=4)
    rng = np.random.default_rng(3)
    reqs = [synth_request(m, rng, f"r{i}") for i in range(3)]
    write_trace(tmp_path / "t", m, reqs, part_rows=20)
    monkeypatch.chdir(tmp_path)
    part = open_trace(tmp_path / "t").activation_files[0]
    return {"tmp": str(tmp_path), "trace": str(tmp_path / "t"), "part": part}


HOSTILE = {
    "copy-csv": "COPY (SELECT 1) TO '{tmp}/x.csv'",
    "copy-relative": "COPY (SELECT 1 AS a) TO 'x.csv'",
    "copy-new-part": "COPY activations TO '{trace}/activations/part-evil-000000.parquet'",
    "copy-over-part": "COPY (SELECT 1 AS a) TO '{part}' (FORMAT csv, USE_TMP_FILE false)",
    "explain-analyze-copy": "EXPLAIN ANALYZE COPY (SELECT 1 AS a) TO '{part}' "
    "(FORMAT csv, USE_TMP_FILE false)",
    "select-then-copy": "SELECT 1; COPY (SELECT 1) TO '{tmp}/x.csv'",
    "attach": "ATTACH '{tmp}/x.db' AS d; CREATE TABLE d.t AS SELECT 1 AS a",
    "export": "EXPORT DATABASE '{tmp}/dump'",
    "install": "INSTALL httpfs",
    "load": "LOAD httpfs",
    "set-external-access": "SET enable_external_access = true",
    "set-lock": "SET lock_configuration = false",
    "explain-options-copy": "EXPLAIN (FORMAT json) COPY (SELECT 1 AS a) TO '{tmp}/x.csv'",
    "explain-paren-trick": "EXPLAIN (FORMAT ')') COPY (SELECT 1 AS a) TO '{tmp}/x.csv'",
    "reset-allowed-paths": "RESET allowed_paths",
    "pragma": "PRAGMA enable_profiling = 'json'",
    "create-table": "CREATE TABLE t AS SELECT 1 AS a",
    "read-csv": "SELECT * FROM read_csv('/etc/passwd')",
    "read-manifest-file": "SELECT * FROM read_text('{trace}/manifest.json')",
    "glob": "SELECT * FROM glob('{tmp}/*')",
    "extensions": "SELECT * FROM duckdb_extensions()",
}


@pytest.mark.parametrize("query", HOSTILE.values(), ids=HOSTILE.keys())
def test_cli_sql_is_read_only(hostile_env: dict[str, str], query: str) -> None:
    before = tree_digest(Path(hostile_env["tmp"]))
    res = CliRunner().invoke(main, ["sql", hostile_env["trace"], query.format(**hostile_env)])
    assert res.exit_code == 2, res.output
    err = res.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("moetrace: error: moetrace sql is read-only: ")
    assert res.stdout == "" and "Traceback" not in res.output
    assert tree_digest(Path(hostile_env["tmp"])) == before  # nothing created, trace unchanged
    assert open_trace(hostile_env["trace"]).sql("SELECT count(*) FROM activations").num_rows == 1


WRITERS = ["copy-csv", "copy-relative", "copy-new-part", "copy-over-part", "attach", "export"]


@pytest.mark.parametrize("name", WRITERS)
def test_unlocked_connection_does_write(hostile_env: dict[str, str], name: str) -> None:
    """The check above can fail: the same statements on the unlocked connection write."""
    before = tree_digest(Path(hostile_env["tmp"]))
    con = connect(open_trace(hostile_env["trace"]))
    run_query(con, HOSTILE[name].format(**hostile_env))
    con.close()
    assert tree_digest(Path(hostile_env["tmp"])) != before


def test_read_only_settings_are_locked(hostile_env: dict[str, str]) -> None:
    con = connect(open_trace(hostile_env["trace"]), read_only=True)
    names = [n for n, _ in READ_ONLY_SETTINGS]
    got = dict(
        con.execute(
            "SELECT name, value FROM duckdb_settings() WHERE list_contains($1, name)", [names]
        ).fetchall()
    )
    assert got == {n: v for n, v in READ_ONLY_SETTINGS}
    with pytest.raises(duckdb.Error, match="locked"):  # even without check_read_only
        con.execute("SET enable_external_access = true")
    with pytest.raises(QueryError, match="^moetrace sql is read-only: "):
        run_query(con, "SELECT * FROM read_parquet('/nonexistent/x.parquet')", read_only=True)


READ_QUERIES = [
    "SELECT request_id, token, layer, experts, weights FROM activations "
    "ORDER BY request_id, token, layer",
    "SELECT * FROM activations_raw ORDER BY request_id, token, layer",
    "SELECT * FROM activations_long ORDER BY request_id, token, layer, rank",
    "SELECT * FROM requests ORDER BY arrival",
    "SELECT * FROM manifest",
    "FROM moe_layers ORDER BY layer",
    "WITH x AS (SELECT layer, count(*) AS n FROM activations GROUP BY layer) "
    "SELECT * FROM x ORDER BY layer",
    "VALUES (1, 'a')",
    "DESCRIBE activations",
    "SELECT 1 AS a; SELECT 2 AS b",
    DOC_TRANSITIONS,
    DOC_TOKENS,
]


@pytest.fixture(scope="module")
def quoted_trace(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A multi-part trace in a directory whose name needs SQL quoting."""
    m = make_manifest(top_k=3, num_experts=6, moe_layers=(0, 2, 3), num_layers=4)
    rng = np.random.default_rng(11)
    reqs = [synth_request(m, rng, f"q{i}", with_weights=i != 1) for i in range(4)]
    path = tmp_path_factory.mktemp("ro") / "it's a trace"
    write_trace(path, m, reqs, part_rows=20)
    return path


@pytest.mark.parametrize(
    "query", [*READ_QUERIES, coactivation_sql(3), transitions_sql(3), "SHOW TABLES"]
)
def test_read_only_queries_agree(quoted_trace: Path, query: str) -> None:
    locked = open_read_only(quoted_trace)
    assert len(locked.activation_files) > 1
    got, want = locked.sql(query), open_trace(quoted_trace).sql(query)
    assert got.schema == want.schema and got.num_rows > 0
    assert sorted(got.to_pylist(), key=repr) == sorted(want.to_pylist(), key=repr)


def test_read_only_explain_and_errors(quoted_trace: Path) -> None:
    locked = open_read_only(quoted_trace)
    assert locked.sql("EXPLAIN SELECT count(*) FROM activations").num_rows >= 1
    assert locked.sql("explain analyze SELECT count(*) FROM requests").num_rows >= 1
    assert locked.sql("EXPLAIN (FORMAT json) FROM activations_long").num_rows >= 1
    n_cols = len(locked.activation_schema)
    assert locked.sql("SUMMARIZE activations_raw").num_rows == n_cols  # float sums: not exact
    with pytest.raises(QueryError, match="SQL error: Parser Error"):
        locked.sql("SELEC 1")
    with pytest.raises(QueryError, match="SQL error: Catalog Error"):
        locked.sql("SELECT * FROM nosuch")


def test_read_only_empty_trace(tmp_path: Path) -> None:
    write_trace(tmp_path / "t", make_manifest(), [])
    locked = open_read_only(tmp_path / "t")
    assert locked.sql("SELECT count(*) AS n FROM activations").to_pylist() == [{"n": 0}]
    assert locked.sql("SELECT count(*) AS n FROM requests").to_pylist() == [{"n": 0}]


def test_cli_sql_relative_trace_path(hostile_env: dict[str, str]) -> None:
    before = tree_digest(Path(hostile_env["tmp"]))
    res = CliRunner().invoke(
        main, ["sql", "t", "SELECT count(*) AS n FROM activations", "--format", "json"]
    )
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout) == [{"n": 15 * 3}]
    assert tree_digest(Path(hostile_env["tmp"])) == before
