"""The one-pass summary, the request sample of the reuse curves and the on-disk cache."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from dashkit import MOE_LAYERS, NUM_EXPERTS, write_fixture_trace

from moetrace.dashboard import diskcache, persisted
from moetrace.dashboard.data import experts as X
from moetrace.dashboard.data import groups as G
from moetrace.dashboard.data import requests as Q
from moetrace.dashboard.data import reuse as R
from moetrace.dashboard.data.common import reopen
from moetrace.dashboard.data.summary import TraceSummary, trace_summary
from moetrace.store import RequestRecord, TraceWriter, open_trace
from moetrace.store import schema as S


@pytest.fixture
def cache_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = tmp_path / "cache"
    monkeypatch.setenv(diskcache.ENV_VAR, str(path))
    return path


def _add_request(path: Path, request_id: str, expert_pair: tuple[int, int]) -> None:
    with TraceWriter(path, open_trace(path).manifest, threads=0) as w:
        w.write_request(
            RequestRecord(request_id, prompt_tokens=1),
            token=0,
            step=0,
            phase=0,
            forward=0,
            layer=np.array(MOE_LAYERS),
            experts=np.array([expert_pair] * len(MOE_LAYERS)),
        )


def test_summary_matches_duckdb_counts(fixture_paths: dict[str, Path]) -> None:
    trace = reopen(fixture_paths["trace"])
    s = trace_summary(trace)
    ref = X.phase_counts(trace)
    for i, p in enumerate(S.PHASES):
        np.testing.assert_array_equal(s.counts[i], ref.counts[p])
        np.testing.assert_array_equal(s.tokens[i], ref.tokens[p])
    np.testing.assert_array_equal(s.phase_counts().select("all").counts, ref.select().counts)
    assert not s.sampled and len(s.request_ids) == trace.num_requests
    for rid in ("req-00", "req-07"):
        np.testing.assert_array_equal(s.request_matrix(rid), Q.request_matrix(trace, rid))
    assert s.request_matrix("nope") is None
    back = TraceSummary.from_arrays(s.to_arrays())
    assert back.request_ids == s.request_ids
    np.testing.assert_array_equal(back.request_counts, s.request_counts)


def test_summary_samples_requests(
    fixture_paths: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    from moetrace.dashboard.data import summary as SM

    monkeypatch.setattr(SM, "MAX_REQUESTS", 5)
    trace = reopen(fixture_paths["trace"])
    s = trace_summary(trace)
    assert len(s.request_ids) == 5 and s.sampled_from == trace.num_requests and s.sampled
    full = trace_summary(trace, seed=1)  # phase totals never depend on the sample
    np.testing.assert_array_equal(s.counts, full.counts)
    for rid in s.request_ids:
        np.testing.assert_array_equal(s.request_matrix(rid), Q.request_matrix(trace, rid))


def test_reuse_sample_of_requests(fixture_paths: dict[str, Path]) -> None:
    trace = reopen(fixture_paths["trace"])
    full = R.layer_reuse(trace, 1, max_tokens=None)
    assert not full.sampled and full.requests_used == trace.num_requests
    default = R.layer_reuse(trace, 1)  # the fixture is below the sample budget
    np.testing.assert_array_equal(default.lru, full.lru)
    small = R.layer_reuse(trace, 1, max_tokens=40)
    assert small.sampled and 0 < small.requests_used < trace.num_requests
    assert 0 < small.tokens < full.tokens
    chosen, used, total = R.sample_requests(trace, "all", 40)
    assert chosen is not None and len(chosen) == used and total == trace.num_requests
    order = [str(r) for r in trace.requests().column("request_id").to_pylist()]
    assert chosen == [r for r in order if r in set(chosen)]  # arrival order kept
    back = R.LayerReuse.from_arrays(small.to_arrays())
    assert back.sizes == small.sizes and back.requests_used == small.requests_used
    np.testing.assert_array_equal(back.belady, small.belady)


def test_disk_cache_location(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(diskcache.ENV_VAR, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    root = diskcache.cache_root()
    assert root == tmp_path / "xdg" / "moetrace" / "dashboard" / f"v{diskcache.CACHE_VERSION}"
    monkeypatch.setenv(diskcache.ENV_VAR, str(tmp_path / "mine"))
    assert diskcache.cache_root().parent.parent == tmp_path / "mine"


def test_disk_cache_hit_and_invalidation_when_a_part_is_added(
    tmp_path: Path, cache_dir: Path
) -> None:
    path = write_fixture_trace(tmp_path / "t", num_requests=4)
    before_files = sorted(p.name for p in path.rglob("*"))
    calls = []

    def compute() -> dict[str, np.ndarray]:
        calls.append(1)
        return {"x": np.arange(3)}

    first = diskcache.get_or_compute(path, "probe", compute)
    again = diskcache.get_or_compute(path, "probe", compute)
    np.testing.assert_array_equal(first["x"], again["x"])
    assert len(calls) == 1
    s1 = persisted.summary(path)
    assert diskcache.entry_path(path, "summary").is_file()
    assert diskcache.entry_path(path, "summary").is_relative_to(cache_dir)
    assert sorted(p.name for p in path.rglob("*")) == before_files  # nothing in the trace
    key = diskcache.trace_key(path)
    old_dir = diskcache.entry_path(path, "summary").parent
    assert old_dir.name == key

    _add_request(path, "extra", (6, 7))
    assert diskcache.trace_key(path) != key
    assert diskcache.load(path, "probe") is None
    s2 = persisted.summary(path)
    assert s2.request_ids == (*s1.request_ids, "extra")
    li = MOE_LAYERS.index(MOE_LAYERS[0])
    assert s2.counts.sum() == s1.counts.sum() + 2 * len(MOE_LAYERS)
    assert s2.counts[0, li, 6] == s1.counts[0, li, 6] + 1
    diskcache.get_or_compute(path, "probe", compute)
    assert len(calls) == 2
    assert not old_dir.exists()  # the first state's entries were pruned
    keys = [d.name for d in diskcache.cache_root().iterdir()]
    assert keys == [diskcache.trace_key(path)]


def test_persisted_aggregates_equal_direct_ones(
    fixture_paths: dict[str, Path], cache_dir: Path
) -> None:
    path = fixture_paths["trace"]
    trace = reopen(path)
    for _ in range(2):  # computed, then read back from disk
        t = persisted.transitions(path, 0, "all")
        ref = G.transitions(trace, 0, "all")
        np.testing.assert_array_equal(t.counts, ref.counts)
        assert (t.src, t.dst, t.recall, t.baseline) == (ref.src, ref.dst, ref.recall, ref.baseline)
        np.testing.assert_array_equal(
            persisted.layer_pair_counts(path, 1, "decode"), G.layer_pair_counts(trace, 1, "decode")
        )
        lr, lref = persisted.layer_reuse(path, 2, "all"), R.layer_reuse(trace, 2, "all")
        np.testing.assert_array_equal(lr.lru, lref.lru)
        assert lr.cold == lref.cold and lr.layer == lref.layer
        p, pref = persisted.projection(path), Q.projection(trace)
        assert p.request_ids == pref.request_ids
        np.testing.assert_allclose(p.xy, pref.xy, atol=1e-6)
        np.testing.assert_array_equal(p.clusters, pref.clusters)
        np.testing.assert_array_equal(
            persisted.request_matrix(path, "req-03"), Q.request_matrix(trace, "req-03")
        )
    for _ in range(2):
        sc, sref = persisted.transition_scores(path, "all"), G.all_transition_scores(trace, "all")
        assert (sc.src, sc.dst, sc.test_tokens) == (sref.src, sref.dst, sref.test_tokens)
        np.testing.assert_allclose(sc.recall, sref.recall)
    names = {p.name for p in (cache_dir / "dashboard").rglob("*.npz")}
    assert {"summary.npz", "projection.npz", "transitions-0-all.npz"} <= names
    assert NUM_EXPERTS == persisted.summary(path).num_experts


def test_unwritable_cache_still_computes(
    fixture_paths: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a folder", encoding="utf-8")
    monkeypatch.setenv(diskcache.ENV_VAR, str(blocker))
    s = persisted.summary(fixture_paths["trace"])
    assert s.counts.sum() > 0
    assert diskcache.load(fixture_paths["trace"], "summary") is None
