"""Issue 17, "decide a plan at a glance": the Plans page charts every plan against the
baselines (zoomed axes, stall and tokens/s, splits side by side, per layer), shows each
plan its own expected row, the Skew and reuse page draws plans at their per-layer hit
rate and every layer's curves as small multiples, runtime statistics are charted, and no
page text carries a raw float or a None."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from dashkit import write_fixture_stats, write_fixture_trace, write_simulable_plan
from streamlit.testing.v1 import AppTest
from test_dashboard_app import _app, _data, _open, _specs, _title

PF_ROW = {"name": "plan", "hit_rate": 0.641, "stall_per_token_ms": 0.0214,
          "tokens_per_s": 2398.7722124046, "bytes_moved": 1732509696,
          "prefetch_precision": 0.488919815865539, "prefetch_recall": 0.35540856031128404,
          "stall_vs_lru": 0.7788505397167497, "drift_switch_at": None}  # fmt: skip
NO_PF_ROW = {"name": "plan, no prefetch", "hit_rate": 0.566, "stall_per_token_ms": 0.0260,
             "tokens_per_s": 2372.8191533299637, "bytes_moved": 1007812608,
             "prefetch_precision": None, "prefetch_recall": 0.0,
             "gap_closed_vs_lru_belady": 0.3806946323861077}  # fmt: skip
LRU_ROW = {"name": "lru", "hit_rate": 0.5272866697908235, "stall_per_token_ms": 0.0275,
           "tokens_per_s": 2364.2588512413204, "bytes_moved": 3826715197440,
           "prefetch_precision": None, "prefetch_recall": 0.0}  # fmt: skip
BELADY_ROW = {"name": "belady (oracle bound, no prefetch)", "hit_rate": 0.6217356111276786,
              "stall_per_token_ms": 0.0225, "tokens_per_s": 2392.431572226082,
              "bytes_moved": 872841216, "prefetch_precision": None, "prefetch_recall": 0.0}  # fmt: skip
ROWS = [PF_ROW, NO_PF_ROW, LRU_ROW, BELADY_ROW]
"""The rows `moetrace tune` writes (values of the demo): the plan with its prefetcher
(64.1%), the same plan without it (56.6%), LRU, Belady."""


def _time_split(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{**r, "hit_rate": r["hit_rate"] - 0.02} for r in rows]


SPLITS = [
    {"name": "random", "tune_requests": 6, "validation_requests": 6, "rows": ROWS},
    {"name": "time", "tune_requests": 6, "validation_requests": 6, "rows": _time_split(ROWS)},
]


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A trace; a prefetching plan and a plan without prefetch that carry the SAME rows
    (what the demo wrote before the fix); a plan without prefetch whose rows cannot be
    matched (no "plan, no prefetch" row); runtime stats."""
    out = tmp_path_factory.mktemp("plans17")
    trace = write_fixture_trace(out / "trace")
    return {
        "trace": trace,
        "pf": write_simulable_plan(
            out / "tuned.json", trace, prefetch=True, rows=ROWS, splits=SPLITS
        ),  # fmt: skip
        "nopf": write_simulable_plan(
            out / "tuned-no-prefetch.json", trace, prefetch=False, rows=ROWS, splits=SPLITS, slots=3
        ),  # fmt: skip
        "unmatched": write_simulable_plan(
            out / "hand-edited.json", trace, prefetch=False, rows=[PF_ROW, LRU_ROW]
        ),
        "stats": write_fixture_stats(out / "run-stats.json"),
    }


def _plans_app(monkeypatch: pytest.MonkeyPatch, files: dict[str, Path], *plans: str) -> AppTest:
    return _app(
        monkeypatch,
        traces=[files["trace"]],
        plans=[files[p] for p in plans],
        stats=[files["stats"]],
    )


def _walk(spec: dict[str, Any]) -> Iterator[dict[str, Any]]:
    yield spec
    for sub in [*spec.get("layer", []), *([spec["spec"]] if "spec" in spec else [])]:
        yield from _walk(sub)


def _check_axes(spec: dict[str, Any]) -> None:
    """A title and titled x and y axes, in plain, layered and faceted charts."""
    assert _title(spec), spec
    enc = next(s["encoding"] for s in _walk(spec) if "encoding" in s)
    assert enc["x"].get("title") and enc["y"].get("title"), enc


def _chart(at: AppTest, prefix: str) -> tuple[int, dict[str, Any]]:
    specs = _specs(at)
    i = next(i for i, s in enumerate(specs) if _title(s).startswith(prefix))
    return i, specs[i]


RAW_FLOAT = re.compile(r"\d\.\d{5,}|\bNone\b|\bnan\b|\d{10,}")


def _page_texts(at: AppTest) -> list[str]:
    """Every text the page shows: markdown, captions, alerts, metrics, table cells."""
    texts = [e.value for kind in ("markdown", "caption", "info", "warning", "error", "success")
             for e in at.get(kind)]  # fmt: skip
    texts += [f"{m.label} {m.value}" for m in at.metric]
    for d in at.dataframe:
        df = d.value
        texts += [str(c) for c in df.columns] + [str(i) for i in df.index]
        texts += [str(v) for v in df.to_numpy().reshape(-1)]
    return texts


def test_plan_without_prefetch_shows_its_own_expected_row(
    monkeypatch: pytest.MonkeyPatch, files: dict[str, Path]
) -> None:
    at = _open(_plans_app(monkeypatch, files, "pf", "nopf", "unmatched"), "plans")
    hits = [m.value for m in at.metric if m.label == "Hit rate"]
    assert hits[:3] == ["64.1%", "56.6%", "—"]  # the headline row of each plan, in order
    warnings = " ".join(w.value for w in at.warning)
    assert "hand-edited" in warnings and "no row of the file describes this plan" in warnings
    at.selectbox(key="plan_choice").set_value("tuned-no-prefetch").run()
    assert {m.label: m.value for m in at.metric}["Expected hit rate"] == "56.6%"
    at.selectbox(key="plan_choice").set_value("hand-edited").run()
    assert {m.label: m.value for m in at.metric}["Expected hit rate"] == "—"
    i, _ = _chart(at, "Hit rate: each plan vs the baselines")
    runs = _data(at, i)
    own = runs[(runs["run"] == "plan (this file)") & (runs["split"] == "random")]
    assert dict(zip(own["plan"], own["value"], strict=True)) == {
        "tuned": pytest.approx(64.1),
        "tuned-no-prefetch": pytest.approx(56.6),
    }


def test_plans_page_charts_the_deciding_figures(
    monkeypatch: pytest.MonkeyPatch, files: dict[str, Path]
) -> None:
    at = _open(_plans_app(monkeypatch, files, "pf", "nopf"), "plans")
    for spec in _specs(at):
        _check_axes(spec)
    i, spec = _chart(at, "Hit rate: each plan vs the baselines")
    lo, hi = spec["encoding"]["x"]["scale"]["domain"]
    assert 45 <= lo < 52.7 and 64.1 < hi <= 70  # zoomed on 52.7% (LRU) .. 64.1%, not 0..100
    assert spec["encoding"]["column"]["field"] == "split"  # every split side by side
    data = _data(at, i)
    assert set(data["split"]) == {"random", "time"} and set(data["plan"]) == {
        "tuned",
        "tuned-no-prefetch",
    }
    lru = data[(data["run"] == "lru") & (data["split"] == "random")]
    assert set(lru["delta"]) == {"+0.0 pt"}
    own = data[(data["run"] == "plan (this file)") & (data["plan"] == "tuned")]
    assert list(own["delta"]) == ["+11.4 pt", "+11.4 pt"]
    for prefix in ("Stall per token: each plan", "Tokens per second: each plan"):
        _, s = _chart(at, prefix)
        assert s["encoding"]["x"]["scale"]["domain"][0] > 0 or "Stall" in prefix
    stall: dict[str, str] = {}
    for m in at.metric:  # the first plan's headline row comes first
        stall.setdefault(m.label, m.value)
    assert stall["Stall per token"] == "0.0214 ms" and stall["Tokens per second"] == "2,399/s"
    deltas = [m.proto.delta for m in at.metric if m.label == "Hit rate"]
    assert deltas[:2] == ["+11.4 pt vs LRU", "+3.9 pt vs LRU"]
    i, spec = _chart(at, "Per layer: plan hit rate minus LRU's")
    assert spec["encoding"]["column"]["field"] == "phase"
    per_layer = _data(at, i)
    assert set(per_layer["phase"]) == {"prefill", "decode"}
    assert set(per_layer["layer"]) == {"L1", "L2", "L3"}
    i, _ = _chart(at, "Pin coverage")
    cov = _data(at, i)
    assert ((cov["value"] > 0) & (cov["value"] <= 100)).all() and len(cov) == 2 * 2 * 3


def test_no_raw_floats_or_none_on_the_plans_page(
    monkeypatch: pytest.MonkeyPatch, files: dict[str, Path]
) -> None:
    at = _open(_plans_app(monkeypatch, files, "pf", "nopf"), "plans")
    texts = _page_texts(at)
    assert texts and not [t for t in texts if RAW_FLOAT.search(t)]


def test_plan_points_on_the_curve_are_that_layers_hit_rate(
    monkeypatch: pytest.MonkeyPatch, files: dict[str, Path]
) -> None:
    from moetrace.dashboard.data.common import reopen
    from moetrace.dashboard.data.plan_layers import plan_layers
    from moetrace.store.plan import load_plan

    trace = reopen(files["trace"])
    at = _open(_plans_app(monkeypatch, files, "pf", "nopf"), "reuse")
    for phase in ("all", "prefill"):
        if phase != "all":
            at.sidebar.radio(key="phase").set_value(phase).run()
        for layer, li in (("L1", 0), ("L3", 2)):
            at.selectbox(key="reuse_layer").set_value(layer).run()
            i, spec = _chart(at, f"Hit rate vs cache size, layer {layer}")
            assert all("text" not in str(s.get("mark")) for s in _walk(spec))  # no labels
            points = _data(at, i).dropna(subset=["plan"]).set_index("plan")
            for key, name in (("pf", "tuned"), ("nopf", "tuned-no-prefetch")):
                plan = load_plan(files[key])
                pl = plan_layers(trace, plan, phase)
                want = 100 * pl.plan[li, pl.column(phase)]
                got = points.loc[f"plan {name}"]
                assert got["hit"] == pytest.approx(want)
                assert got["size"] == plan.layout.capacities[li]
                assert got["hit"] != pytest.approx(100 * PF_ROW["hit_rate"])


def test_every_layers_curves_as_small_multiples(
    monkeypatch: pytest.MonkeyPatch, files: dict[str, Path]
) -> None:
    from moetrace.dashboard.data.common import reopen
    from moetrace.dashboard.data.layer_curves import layer_curves
    from moetrace.tuner.mining.mrc import smallest_size

    at = _open(_plans_app(monkeypatch, files, "pf"), "reuse")
    for spec in _specs(at):
        _check_axes(spec)
    i, spec = _chart(at, "Hit rate vs cache size per layer")
    assert spec["facet"]["field"] == "layer"
    panels = _data(at, i)
    assert set(panels["layer"]) == {"L1", "L2", "L3"}
    assert set(panels[panels["kind"] == "curve"]["series"]) == {"LRU", "LFU", "Belady (optimal)"}
    assert set(panels[panels["kind"] == "plan"]["series"]) == {"plan tuned"}
    lc = layer_curves(reopen(files["trace"]), "all")
    targets = panels[(panels["kind"] == "target") & (panels["series"] == "LRU")]
    for li, lab in enumerate(("L1", "L2", "L3")):
        got = targets[targets["layer"] == lab].set_index("hit")["size"]
        for t in (0.8, 0.9):
            want = smallest_size(lc.lru[li], t)
            assert (want is None and 100 * t not in got.index) or got[100 * t] == want
    i, _ = _chart(at, "Experts per layer needed for 80% / 90% hits")
    assert {"LRU, 80% hits", "Belady (optimal), 90% hits"} <= set(_data(at, i)["series"])


def test_layer_curves_slots_are_exact(files: dict[str, Path]) -> None:
    from moetrace.dashboard.data.common import reopen, routing_for_layers
    from moetrace.dashboard.data.layer_curves import layer_curves
    from moetrace.tuner.mining.replacement import TokenStream
    from moetrace.tuner.mining.streams import layer_stream

    trace = reopen(files["trace"])
    lc = layer_curves(trace, "decode")
    assert lc.lru.shape == (3, 8) and not lc.sampled
    for li in range(3):
        st = layer_stream(routing_for_layers(trace, (li,), "decode"), 0)
        ts = TokenStream(st.experts, st.row, 8)
        n = st.num_accesses
        assert lc.accesses[li] == n
        for j, t in enumerate(lc.targets):
            c = int(lc.belady_slots[li, j])
            if c:
                assert ts.belady_hits(c) / n >= t and (c == 2 or ts.belady_hits(c - 1) / n < t)


def test_runtime_statistics_are_charted(
    monkeypatch: pytest.MonkeyPatch, files: dict[str, Path]
) -> None:
    at = _open(_plans_app(monkeypatch, files), "plans")
    metrics = {m.label: m.value for m in at.metric}
    assert metrics["Hit rate"] == "66.7%"
    assert metrics["Stall per token"] == "0.714 ms"  # 0.12 s over 168 tokens
    for prefix in ("Measured hit rate per layer", "Stall per layer", "Bytes moved per layer"):
        i, spec = _chart(at, prefix)
        _check_axes(spec)
    i, spec = _chart(at, "Measured hit rate per layer")
    hit = _data(at, i)
    assert set(hit["series"]) == {"prefill", "decode"}
    assert spec["encoding"]["y"]["scale"]["domain"][0] > 0  # zoomed: 60-70% per layer
    assert not [t for t in _page_texts(at) if RAW_FLOAT.search(t)]


SCHEDULE_ROWS = [
    {"name": "schedule", "scheduler": "affinity", "params": {"max_overtakes": 32},
     "hit_rate": 0.7263512345, "bytes_moved": 7858784123904, "mean_latency_s": 186.40412,
     "p99_latency_s": 320.2041234, "mean_waiting": 21.312345, "max_overtaken": 32},
    {"name": "fcfs", "scheduler": "fcfs", "params": {}, "hit_rate": 0.7172123,
     "bytes_moved": 8361597123904, "mean_latency_s": 202.116123, "p99_latency_s": 340.318123,
     "mean_waiting": 21.8123, "max_overtaken": 0},
]  # fmt: skip


def test_plans_page_shows_the_schedule_against_fcfs(
    monkeypatch: pytest.MonkeyPatch, files: dict[str, Path], tmp_path: Path
) -> None:
    """Issue 16: a plan's schedule and what the tuner measured against FCFS, formatted."""
    from dataclasses import replace

    from moetrace.store.plan import ScheduleConfig, load_plan, save_plan

    plan = load_plan(files["pf"])
    info = {"settings": {"batch_size": 8, "batching": "continuous", "arrival_rate": None},
            "search": [], "fallback": None,
            "splits": [{"name": "random", "rows": SCHEDULE_ROWS},
                       {"name": "time", "rows": SCHEDULE_ROWS}]}  # fmt: skip
    sched = replace(plan, schedule=ScheduleConfig("affinity", 8, params={"max_overtakes": 32}),
                    expected={**plan.expected, "schedule": info})  # fmt: skip
    path = save_plan(sched, tmp_path / "scheduled.json")
    at = _open(_app(monkeypatch, traces=[files["trace"]], plans=[path]), "plans")
    texts = _page_texts(at)
    assert any("Schedule:** affinity (max_overtakes 32), batches of up to 8" in t for t in texts)
    metrics = {m.label: m.value for m in at.metric}
    assert metrics["Bytes moved vs FCFS (random)"] == "-6%"
    assert metrics["p99 latency vs FCFS"] == "-6%"
    frames = [d.value for d in at.dataframe if list(d.value.index) == ["schedule", "fcfs"]]
    assert len(frames) == 2 and frames[0].loc["schedule", "p99 latency"] == "320 s"
    assert frames[0].loc["fcfs", "bytes moved"] == "7.6 TiB"
    assert not [t for t in texts if RAW_FLOAT.search(t)]
    # a plan that runs FCFS one at a time and measured nothing has no schedule section
    at = _open(_plans_app(monkeypatch, files, "pf"), "plans")
    assert not any("Schedule:" in t for t in _page_texts(at))
