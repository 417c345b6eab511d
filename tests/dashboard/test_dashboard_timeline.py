"""The Timeline page under AppTest: lanes per layer with the simulator's recorded
outcomes for the range, layer choice, named policies, and a runtime timeline's lanes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from streamlit.testing.v1 import AppTest
from test_dashboard_app import _app, _check_axes, _data, _open, _specs, _title

from moetrace.store import open_trace
from moetrace.store.arrays import load_routing
from moetrace.store.hardware import load_hardware
from moetrace.store.plan import CacheLayout, PrefetchConfig, RoutingShape, load_plan, save_plan
from moetrace.tuner.policy.events import build_events
from moetrace.tuner.sim.engine import make_plan, simulate
from moetrace.tuner.sim.kernel import O_HIT, O_MISS, O_PF_HIT, O_STREAM
from moetrace.tuner.sim.timeline import RecordedTimeline

PLAN_NAME = "timeline-plan"


def _events(trace: Path, requests: int):
    tr = open_trace(trace)
    ids = tr.requests().sort_by("arrival").column("request_id").to_pylist()[:requests]
    return build_events(load_routing(tr, requests=ids))


@pytest.fixture(scope="module")
def tl_paths(fixture_paths: dict[str, Path], tmp_path_factory: pytest.TempPathFactory):
    """A plan with fitted transition prefetch (prefetch hits, wasted prefetches) and a
    runtime stats file whose timeline is an LRU replay of the first two requests."""
    out = tmp_path_factory.mktemp("timeline")
    trace = fixture_paths["trace"]
    model = open_trace(trace).manifest.model
    ev = _events(trace, 12)
    L = len(model.moe_layers)
    plan = make_plan(
        ev, RoutingShape.of(model), CacheLayout("per_layer", (3,) * L), "lru",
        prefetch=PrefetchConfig("transition", fetch=2), bytes_per_expert=model.bytes_per_expert,
    )  # fmt: skip
    plan_path = save_plan(plan, out / f"{PLAN_NAME}.json")
    ev2 = _events(trace, 2)
    lru = make_plan(ev2, RoutingShape.of(model), CacheLayout("per_layer", (2,) * L), "lru")
    res = simulate(ev2, lru, load_hardware(), record=True)
    assert res.timeline is not None
    rec = RecordedTimeline(
        ev2.layer.astype(np.int64), ev2.phase.astype(np.int64), ev2.experts.astype(np.int64),
        res.timeline, events_seen=ev2.num_events, max_events=1000, moe_layers=model.moe_layers,
    )  # fmt: skip
    stats = out / "run-stats.json"
    stats.write_text(json.dumps({"total": {}, "timeline": rec.to_json()}), encoding="utf-8")
    return {"trace": trace, "plan": plan_path, "stats": stats, "lru_rate": res.summary()}


def _expected(trace: Path, plan_path: Path, requests: int) -> dict[str, int]:
    ev = _events(trace, requests)
    bpe = open_trace(trace).manifest.model.bytes_per_expert
    res = simulate(ev, load_plan(plan_path), load_hardware(), bytes_per_expert=bpe, record=True)
    tl = res.timeline
    assert tl is not None
    per = np.bincount(tl.outcome.astype(np.int64), minlength=4)
    return {
        "hit": int(per[O_HIT]), "prefetch hit": int(per[O_PF_HIT]), "miss": int(per[O_MISS]),
        "streamed": int(per[O_STREAM]), "wasted prefetch": int(tl.wasted.sum()),
    }  # fmt: skip


def _categories(df) -> dict[str, int]:
    cells = df[df["lane"] != "stall"]
    return {k: int(v) for k, v in cells.groupby("category")["count"].sum().items()}


@pytest.fixture()
def app(monkeypatch: pytest.MonkeyPatch, tl_paths) -> AppTest:
    p = tl_paths
    return _app(monkeypatch, traces=[p["trace"]], plans=[p["plan"]], stats=[p["stats"]])


def test_timeline_lanes_match_the_recorded_replay(app: AppTest, tl_paths) -> None:
    at = _open(app, "timeline")
    assert at.title[0].value == "Timeline"
    specs = _specs(at)
    assert _title(specs[0]).startswith(f"Cache timeline: plan {PLAN_NAME}, pcie4-x16")
    for spec in specs:
        _check_axes(spec)
    count = at.number_input(key="timeline_count").value
    assert count == 8  # the default: the first requests, at most 8
    df = _data(at, 0)
    assert set(df["lane"]) == {"stall", "L1", "L2", "L3"}
    got = _categories(df)
    want = _expected(tl_paths["trace"], tl_paths["plan"], count)
    assert {k: v for k, v in want.items() if v} == got
    assert {"hit", "prefetch hit", "miss", "wasted prefetch"} <= set(got)
    stall = df[df["lane"] == "stall"]
    assert len(stall) > 0 and stall["stall_ms"].sum() > 0
    assert df["request"].iloc[0] == "req-00" and df["tokens"].iloc[0] != ""
    spec = specs[0]
    assert any(p.get("bind") == "scales" for p in spec.get("params", []))  # zoom and pan

    at.multiselect(key="timeline_layers").set_value(["L1", "L3"]).run()
    assert not at.exception
    assert set(_data(at, 0)["lane"]) == {"stall", "L1", "L3"}


def test_named_policy_and_range(app: AppTest) -> None:
    at = _open(app, "timeline")
    at.selectbox(key="timeline_plan").set_value("LRU (named policy)").run()
    at.number_input(key="timeline_slots").set_value(1).run()
    at.number_input(key="timeline_first").set_value(3).run()
    at.number_input(key="timeline_count").set_value(2).run()
    assert not at.exception, [e.value for e in at.exception]
    (spec,) = _specs(at)  # the range starts at request 3: no runtime lanes
    assert "LRU at 1 slots per layer" in _title(spec)
    df = _data(at, 0)
    assert set(df["request"]) == {"req-03", "req-04"}
    assert "streamed" in set(df["category"])  # one slot, two experts a token
    assert any("No runtime lanes" in i.value for i in at.info)


def test_runtime_timeline_adds_lanes_and_agreement(app: AppTest, tl_paths) -> None:
    at = _open(app, "timeline")
    at.selectbox(key="timeline_plan").set_value("LRU (named policy)").run()
    at.number_input(key="timeline_slots").set_value(2).run()
    specs = _specs(at)
    assert len(specs) == 2 and "as the runtime recorded it (run-stats)" in _title(specs[1])
    _check_axes(specs[1])
    agreement = " ".join(m.value for m in at.markdown if "Agreement" in m.value)
    # the "runtime" is an LRU replay of the first two requests at 2 slots: it agrees
    rate = 100 * tl_paths["lru_rate"]["hit_rate"]
    assert f"simulator {rate:.1f}% vs runtime {rate:.1f}%" in agreement
    rt = _data(at, 1)
    assert set(rt["request"]) == {"req-00", "req-01"}
    assert not at.warning  # the routing agrees event by event


def test_a_plan_that_cannot_replay_is_reported(
    monkeypatch: pytest.MonkeyPatch, fixture_paths: dict[str, Path], tmp_path: Path
) -> None:
    import dataclasses

    from moetrace.store.plan import PrefetchConfig, load_plan, save_plan

    # a plan naming the transition prefetcher without its tables (not fitted)
    bare = dataclasses.replace(
        load_plan(fixture_paths["plan"]), prefetch=PrefetchConfig("transition", fetch=2)
    )
    plan = save_plan(bare, tmp_path / "unfitted.json")
    at = _open(_app(monkeypatch, traces=[fixture_paths["trace"]], plans=[plan]), "timeline")
    assert any("Cannot replay this plan" in e.value for e in at.error)
    assert not _specs(at)
    at.selectbox(key="timeline_plan").set_value("BELADY (named policy)").run()
    assert not at.exception and not at.error
    assert "BELADY at" in _title(_specs(at)[0])


def test_binning_keeps_the_counts(tl_paths) -> None:
    from moetrace.dashboard.data import timeline as T

    tr = open_trace(tl_paths["trace"])
    ids = tr.requests().sort_by("arrival").column("request_id").to_pylist()
    choice = T.PlanChoice(plan_path=str(tl_paths["plan"]))
    rr = T.replay_range(tr, ids, choice, T.RangeChoice(2, 3, "pcie4-x16", warm=True))
    assert rr.event_offset is not None and rr.event_offset > 0
    assert set(rr.pass_request) == {"req-02", "req-03", "req-04"}
    full = T.lane_rows(T.sim_lanes(rr), rr, [0, 1, 2])
    binned = T.lane_rows(T.sim_lanes(rr), rr, [0, 1, 2], max_cells=30)
    assert T.bin_size(rr, 3, 30) > 1
    assert binned["x"].nunique() <= 10 < full["x"].nunique()
    assert _categories(binned) == _categories(full)
    assert binned.loc[binned["lane"] == "stall", "stall_ms"].sum() == pytest.approx(
        full.loc[full["lane"] == "stall", "stall_ms"].sum()
    )
