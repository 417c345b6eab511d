"""A plan's host-RAM tier and sizing frontier on the Plans page: the tier's facts, the
RAM placement against RAM as LRU over disk per split (and the fallback), every candidate,
the frontier chart (one line per RAM size, frontier points marked) and the smallest sizes
reaching a target, as :func:`moetrace.tuner.sizing.smallest` finds them; a plan without a
RAM tier or a sizing grid shows none of it. Plans are tuned here on a tiny trace."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pytest
from streamlit.testing.v1 import AppTest
from test_dashboard_app import _app, _open, _specs, _title
from test_dashboard_plans import RAW_FLOAT, _check_axes, _page_texts

from moetrace.dashboard import numbers as N
from moetrace.dashboard.data.sizing import rate
from moetrace.store.plan import load_plan, save_plan

SIZING_TITLE = "Modeled tokens/s against device memory"
OLD_FACTS = [
    "budget slots", "budget", "layout", "pool slots", "slots per layer (min..max)",
    "pinned experts", "eviction policy", "eviction params", "prefetcher",
    "prefetch lookahead (layers)", "prefetch fetch (experts)", "phase overrides",
    "worst case memory", "expected hit rate", "expected stall per token", "expected tokens/s",
]  # fmt: skip
"""The facts of a plan with every expert in host RAM (as before the RAM tier)."""


def test_rates_keep_three_digits_below_a_thousand() -> None:
    assert [rate(v) for v in (9.6968, 7.8676, 2398.77, None)] == ["9.7/s", "7.87/s", "2,399/s", "—"]


def _grid() -> dict[str, Any]:
    """A hand-made sizing grid for the 3 x 16 expert trace (1 MB experts, top-2): device
    4, 8, 14 MB x RAM 14, 26 MB and every expert (48 MB); two points are dominated."""
    from moetrace.tuner.sizing import frontier

    tps = {(2, 12): 100.0, (2, 24): 150.0, (2, 48): 300.0,
           (6, 12): 120.0, (6, 24): 110.0, (6, 48): 320.0,
           (12, 12): 90.0, (12, 24): 200.0, (12, 48): 400.0}  # fmt: skip
    points = []
    for (d, r), v in tps.items():
        tier = "all in RAM" if r == 48 else "lru"
        points.append({
            "device_slots": d, "ram_slots": r, "device_mb": float(d + 2),
            "ram_mb": float(r if r == 48 else r + 2), "device_hit_rate": 0.3 + d / 100,
            "tiers": {tier: {"tokens_per_s": v, "ram_hit_rate": None if r == 48 else 0.5}},
            "tokens_per_s": v, "ram_tier": tier,
        })  # fmt: skip
    return {
        "traces": ["trace"],
        "model": {
            "name": "synthetic-moe",
            "moe_layers": 3,
            "experts": 16,
            "top_k": 2,
            "bytes_per_expert": 1_000_000,
        },  # fmt: skip
        "hardware": {"name": "pcie4-x16"},
        "granularity": "token",
        "tokens": 320,
        "points": points,
        "frontier": frontier(points),
        "target_tps": 150.0,
        "smallest": [p for p in points if (p["device_slots"], p["ram_slots"]) == (2, 24)],
    }


@pytest.fixture(scope="module")
def tiers(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A trace; the plan `moetrace tune --budget 12.5% --ram-budget 25% --sweep` writes
    for it; the same with a fallback to RAM as LRU; with the hand-made grid; and without
    a RAM tier or a grid."""
    from moetrace.tuner.sim.synthetic import write_synthetic_trace
    from moetrace.tuner.tune import TuneConfig, tune

    out = tmp_path_factory.mktemp("tiers")
    trace = write_synthetic_trace(out / "trace", num_layers=3, num_experts=16, top_k=2,
                                  requests=16, decode_tokens=12, stickiness=0.2, seed=3)  # fmt: skip
    config = TuneConfig(budget="12.5%", ram_budget="25%", sweep=True, queue=None, workers=1)
    plan = tune([trace], config, progress=False).plan
    assert plan.ram is not None and plan.ram.eviction.pinned  # a pinned placement won
    exp = dict(plan.expected)
    lost = {**exp["placement"], "written": "lru",
            "fallback": {"from": exp["placement"]["chosen"], "to": "lru",
                         "reason": "split time: stall 1.050x RAM as LRU"}}  # fmt: skip
    bare = {k: v for k, v in exp.items() if k not in ("placement", "sizing")}
    return {
        "trace": trace,
        "tiered": save_plan(plan, out / "tiered.json"),
        "fallback": save_plan(
            replace(plan, expected={**exp, "placement": lost}), out / "fallback.json"
        ),  # fmt: skip
        "grid": save_plan(
            replace(plan, ram=None, expected={**bare, "sizing": _grid()}), out / "grid.json"
        ),  # fmt: skip
        "plain": save_plan(replace(plan, ram=None, expected=bare), out / "plain.json"),
    }


def _page(monkeypatch: pytest.MonkeyPatch, tiers: dict[str, Path], name: str) -> AppTest:
    return _open(_app(monkeypatch, traces=[tiers["trace"]], plans=[tiers[name]]), "plans")


def _frames(at: AppTest, column: str) -> list[pd.DataFrame]:
    return [d.value for d in at.dataframe if column in d.value.columns]


def _facts(at: AppTest) -> pd.Series:
    (table,) = [d.value for d in at.dataframe if "budget slots" in list(d.value.index)]
    return table["value"]


def _sizing_chart(at: AppTest) -> tuple[dict[str, Any], pd.DataFrame, pd.DataFrame]:
    """The frontier chart's spec, its points and its target rule."""
    specs = _specs(at)
    i = next(i for i, s in enumerate(specs) if _title(s).startswith(SIZING_TITLE))
    proto = at.get("vega_lite_chart")[i].proto
    frames = [pa.ipc.open_stream(d.data.data).read_all().to_pandas() for d in proto.datasets]
    points = next(f for f in frames if "device_gb" in f.columns)
    rule = next(f for f in frames if "target" in f.columns)
    return specs[i], points, rule


def test_ram_tier_facts_and_placement_per_split(
    monkeypatch: pytest.MonkeyPatch, tiers: dict[str, Path]
) -> None:
    plan = load_plan(tiers["tiered"])
    ram, info = plan.ram, plan.expected["placement"]
    assert ram is not None
    pinned = sum(len(r) for r in ram.eviction.pinned)
    at = _page(monkeypatch, tiers, "tiered")
    metrics = {m.label: m.value for m in at.metric}
    assert metrics["RAM slots"] == f"{ram.slots} slots"
    assert metrics["Pinned in RAM"] == str(pinned)
    assert metrics["RAM policy"] == ram.eviction.policy
    assert metrics["RAM drift window (accesses)"] == str(ram.adaptation.window) == "512"
    assert metrics["RAM worst case"] == N.nbytes(ram.worst_case_bytes)
    facts = _facts(at)
    assert facts["RAM tier slots"] == str(ram.slots)
    assert facts["RAM tier"] == N.nbytes(ram.bytes)
    assert facts["experts pinned in RAM"] == str(pinned)
    assert facts["RAM prefetcher"] == ram.prefetch.name
    assert facts["RAM drift window"] == "512 RAM accesses"
    assert facts["worst case memory"] == N.nbytes(plan.worst_case_bytes)
    assert facts["worst case memory, RAM tier"] == N.nbytes(ram.worst_case_bytes)
    assert facts["disk store (every expert)"] == N.nbytes(3 * 16 * 1_000_000)
    # the placement against RAM as LRU: two rows per split, the tuner's figures
    (table,) = _frames(at, "stall vs RAM as LRU")
    splits = info["splits"]
    assert list(table["split"]) == [s["name"] for s in splits for _ in range(2)]
    assert list(table["RAM tier"]) == [f"{info['written']} (written)", "RAM as LRU over disk"] * len(splits)  # fmt: skip
    for i, sp in enumerate(splits):
        mine, lru = table.iloc[2 * i], table.iloc[2 * i + 1]
        assert mine["tokens/s"] == rate(sp["placement"]["tokens_per_s"])
        assert mine["RAM hit rate"] == N.pct(sp["placement"]["ram_hit_rate"])
        assert lru["stall per token"] == N.ms(sp["lru"]["stall_per_token_ms"])
        assert lru["disk reads"] == N.nbytes(sp["lru"]["disk_bytes"])
        assert mine["stall vs RAM as LRU"] == N.ratio(sp["stall_vs_lru"])
    assert metrics["Stall per token vs RAM as LRU"] == N.ratio(splits[0]["stall_vs_lru"])
    (cands,) = _frames(at, "stall vs best (worst split)")
    assert list(cands.index) == [
        c["name"] + (" (chosen)" if c["name"] == info["chosen"] else "") for c in info["candidates"]
    ]
    assert not at.warning or not any("lost to RAM as LRU" in w.value for w in at.warning)
    texts = _page_texts(at)
    assert any(t.startswith("**RAM tier:**") for t in texts)
    assert not [t for t in texts if RAW_FLOAT.search(t)]


def test_a_placement_that_lost_is_said(
    monkeypatch: pytest.MonkeyPatch, tiers: dict[str, Path]
) -> None:
    at = _page(monkeypatch, tiers, "fallback")
    chosen = load_plan(tiers["fallback"]).expected["placement"]["chosen"]
    warning = " ".join(w.value for w in at.warning)
    assert f"The search chose {chosen}, which lost to RAM as LRU on split time" in warning
    (table,) = _frames(at, "stall vs RAM as LRU")
    assert f"{chosen} (chosen, not written)" in set(table["RAM tier"])


def test_sizing_frontier_of_the_tuned_grid(
    monkeypatch: pytest.MonkeyPatch, tiers: dict[str, Path]
) -> None:
    from moetrace.tuner.sizing import smallest

    sizing = load_plan(tiers["tiered"]).expected["sizing"]
    at = _page(monkeypatch, tiers, "tiered")
    spec, points, rule = _sizing_chart(at)
    _check_axes(spec)
    enc = next(s["encoding"] for s in spec["layer"] if "color" in s.get("encoding", {}))
    assert enc["color"]["title"] == "RAM GB"
    rams = {p["ram_slots"] for p in sizing["points"]}
    assert len(points) == len(sizing["points"]) and points["ram"].nunique() == len(rams)
    every = [r for r in points["ram"].unique() if r.startswith("every expert in RAM")]
    assert every == ["every expert in RAM (0.048)"]  # 3 x 16 experts of 1 MB
    assert int(points["frontier"].sum()) == len(sizing["frontier"])
    # no target in the file: the median tokens/s, and the tuner's answer for it
    widget = at.number_input(key="sizing_target_tiered")
    target = widget.value
    tps = sorted(p["tokens_per_s"] for p in sizing["points"])
    assert target == pytest.approx(pd.Series(tps).median(), abs=0.01)
    assert rule["target"].tolist() == [pytest.approx(target)]
    (table,) = _frames(at, "tokens/s (modeled)")
    want = smallest(sizing["points"], target)
    assert want and list(table["tokens/s (modeled)"]) == [rate(p["tokens_per_s"]) for p in want]
    assert list(table["device slots"]) == [str(p["device_slots"]) for p in want]


def test_smallest_sizes_for_a_target(
    monkeypatch: pytest.MonkeyPatch, tiers: dict[str, Path]
) -> None:
    from moetrace.tuner.sizing import smallest

    grid = _grid()
    at = _page(monkeypatch, tiers, "grid")
    assert not any(m.label.startswith("RAM") for m in at.metric)  # no RAM tier in this plan
    _, points, _ = _sizing_chart(at)
    assert len(points) == 9 and points["ram"].nunique() == 3
    assert int(points["frontier"].sum()) == len(grid["frontier"]) == 7  # two dominated
    dominated = points[~points["frontier"]]
    assert sorted(zip(dominated["device_gb"], dominated["ram_gb"], strict=True)) == [
        (pytest.approx(0.008), pytest.approx(0.026)),
        (pytest.approx(0.014), pytest.approx(0.014)),
    ]
    widget = at.number_input(key="sizing_target_grid")
    assert widget.value == 150.0  # the file's target
    answers = {150.0: [("0.004 GB", "0.026 GB")], 310.0: [("0.008 GB", "0.048 GB (every expert in RAM)")],
               350.0: [("0.014 GB", "0.048 GB (every expert in RAM)")], 110.0: [("0.004 GB", "0.026 GB"), ("0.008 GB", "0.014 GB")]}  # fmt: skip
    for target, want in answers.items():
        widget.set_value(target).run()
        assert not at.exception
        (table,) = _frames(at, "tokens/s (modeled)")
        got = list(zip(table["device"], table["RAM"], strict=True))
        assert got == want
        tuner = smallest(grid["points"], target)
        assert [str(p["device_slots"]) for p in tuner] == list(table["device slots"])
        assert [str(p["ram_slots"]) for p in tuner] == list(table["RAM slots"])
    widget.set_value(150.0).run()
    (table,) = _frames(at, "tokens/s (modeled)")
    assert list(table["tokens/s (modeled)"]) == ["150/s"] and list(table["RAM tier"]) == ["lru"]
    widget.set_value(500.0).run()
    assert not _frames(at, "tokens/s (modeled)")
    assert any("No device and RAM size of the grid reaches 500 tok/s" in i.value for i in at.info)


def test_smallest_sizes_without_the_tuner(
    monkeypatch: pytest.MonkeyPatch, tiers: dict[str, Path]
) -> None:
    """The tuner's sizing module missing: said, and the file's own answer for its target."""
    monkeypatch.setitem(sys.modules, "moetrace.tuner.sizing", None)
    at = _page(monkeypatch, tiers, "grid")
    assert any("Cannot recompute the smallest sizes" in w.value for w in at.warning)
    (table,) = _frames(at, "tokens/s (modeled)")
    assert list(zip(table["device"], table["RAM"], strict=True)) == [("0.004 GB", "0.026 GB")]
    _sizing_chart(at)  # the chart needs no tuner


def test_plan_without_ram_tier_or_grid_shows_neither(
    monkeypatch: pytest.MonkeyPatch, tiers: dict[str, Path]
) -> None:
    at = _page(monkeypatch, tiers, "plain")
    texts = _page_texts(at)
    for absent in ("RAM placement", "Sizing frontier", "RAM tier:", "RAM as LRU"):
        assert not any(absent in t for t in texts), absent
    assert not any(m.label.startswith("RAM") for m in at.metric)
    assert not any(_title(s).startswith(SIZING_TITLE) for s in _specs(at))
    assert not at.number_input and not at.warning and not at.error
    assert list(_facts(at).index) == OLD_FACTS


# ---------------------------------------------------------------- a real browser


@pytest.fixture(scope="module")
def server(tiers: dict[str, Path]) -> Iterator[str]:
    """``moetrace dashboard`` on the trace with the tuned plan, in a subprocess."""
    from dashkit import dashboard_server
    from test_dashboard_browser import CHROMIUM

    pytest.importorskip("playwright.sync_api", reason="playwright is not installed")
    if not Path(CHROMIUM).exists():
        pytest.skip(f"chromium not found at {CHROMIUM}")
    with dashboard_server([str(tiers["trace"]), "--plan", str(tiers["tiered"])]) as (url, _):
        yield url


@pytest.mark.browser
def test_ram_tier_and_frontier_in_chromium(server: str, tiers: dict[str, Path]) -> None:
    from playwright.sync_api import sync_playwright
    from test_dashboard_browser import CHROMIUM, PAGE_TIMEOUT_MS, _artifacts, _screenshot

    sizing = load_plan(tiers["tiered"]).expected["sizing"]
    top = max(p["tokens_per_s"] for p in sizing["points"])
    with sync_playwright() as pw:
        browser = pw.chromium.launch(
            executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"]
        )  # fmt: skip
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.set_default_timeout(PAGE_TIMEOUT_MS)
            page.goto(f"{server}/plans")
            page.get_by_role("heading", name="Plans", exact=True).wait_for()
            for text in ("RAM placement", "Sizing frontier", "Smallest sizes reaching"):
                page.get_by_text(text).first.wait_for()
            page.wait_for_function(
                "() => !document.querySelector('[data-testid=\"stStatusWidget\"]')"
            )
            box = page.get_by_label("target tok/s", exact=True)
            box.fill(f"{top + 1:.2f}")
            box.press("Enter")
            page.get_by_text("No device and RAM size of the grid reaches").wait_for()
            page.wait_for_timeout(1000)
            _screenshot(page, _artifacts() / "plans-ram-tier.png")
            assert page.locator('[data-testid="stException"]').count() == 0
            charts = page.locator('[data-testid="stVegaLiteChart"]').count()
            assert charts >= 4  # the baselines, heatmap, slots, frontier (and more)
        finally:
            browser.close()
