"""Sizing (``moetrace size``): the grid is the simulator's figure, the frontier and the
smallest sizes are read off it, and bad options are one line."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from click.testing import CliRunner

from moetrace.cli import main
from moetrace.errors import ConfigError
from moetrace.store.hardware import load_hardware
from moetrace.tuner.placement import Placement
from moetrace.tuner.sim.engine import make_plan, simulate
from moetrace.tuner.sim.layouts import uniform_layout
from moetrace.tuner.sim.synthetic import write_synthetic_trace
from moetrace.tuner.sim.trace import events_for, load_traces
from moetrace.tuner.sizing import SizingConfig, frontier, size, smallest

L, E, K, BPE = 4, 16, 2, 1_000_000
DEVICE = ("12.5%", "25%", "50%")  # 8, 16, 32 slots
RAM = ("25%", "75%", "100%")  # 16, 48, 64 slots


@pytest.fixture(scope="module")
def trace(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("sizing") / "trace"
    return write_synthetic_trace(path, num_layers=L, num_experts=E, top_k=K, requests=12,
                                 decode_tokens=16, bytes_per_expert=BPE, seed=1)  # fmt: skip


@pytest.fixture(scope="module")
def grid(trace: Path) -> dict[str, Any]:
    return size([trace], SizingConfig(device_budgets=DEVICE, ram_budgets=RAM, workers=1))


@pytest.fixture(scope="module")
def no_disk(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A hardware profile without a disk link (no ``disk_bandwidth_gbps``)."""
    path = tmp_path_factory.mktemp("hw") / "nodisk.json"
    path.write_text(json.dumps({
        "name": "no-disk", "link_bandwidth_gbps": 25.0, "transfer_latency_us": 10.0,
        "layer_compute_base_us": 50.0, "layer_compute_per_token_us": 1.0,
    }))  # fmt: skip
    return path


def _by(data: dict[str, Any]) -> dict[tuple[int, int], dict[str, Any]]:
    return {(p["device_slots"], p["ram_slots"]): p for p in data["points"]}


def test_grid_has_one_point_per_budget_pair_with_worst_case_memory(grid: dict[str, Any]) -> None:
    by = _by(grid)
    devs, rams = [8, 16, 32], [16, 48, L * E]
    assert sorted(by) == [(d, r) for d in devs for r in rams]
    assert len(grid["points"]) == len(by) == 9
    assert grid["model"] == {"name": "synthetic-moe", "moe_layers": L, "experts": E,
                             "top_k": K, "bytes_per_expert": BPE}  # fmt: skip
    assert grid["fitted_on_requests"] == 6 and grid["replayed_requests"] == 6
    for (d, r), p in by.items():
        assert p["device_mb"] == pytest.approx((d + K) * BPE / 1e6)
        if r == L * E:
            assert set(p["tiers"]) == {"all in RAM"} and p["ram_tier"] == "all in RAM"
            assert p["ram_mb"] == pytest.approx(L * E * BPE / 1e6)
        else:
            assert set(p["tiers"]) == {"lru", "pin misses 0.75"}
            assert p["ram_mb"] == pytest.approx((r + K) * BPE / 1e6)
        # the point's figure is its fastest RAM tier
        best = max(t["tokens_per_s"] for t in p["tiers"].values())
        assert p["tokens_per_s"] == best > 0
        assert p["tiers"][p["ram_tier"]]["tokens_per_s"] == best
        assert 0.0 <= p["device_hit_rate"] <= 1.0


def test_more_memory_is_never_slower(grid: dict[str, Any]) -> None:
    """Monotone over the whole grid for this trace (the model does not promise it cell by
    cell: RAM caches the device's miss stream, which changes with the device budget; the
    100% column and the largest device row are the cases that must hold)."""
    by = _by(grid)
    devs = sorted({d for d, _ in by})
    rams = sorted({r for _, r in by})
    for r in rams:
        tps = [by[(d, r)]["tokens_per_s"] for d in devs]
        assert tps == sorted(tps), (r, tps)
    for d in devs:
        tps = [by[(d, r)]["tokens_per_s"] for r in rams]
        assert tps == sorted(tps), (d, tps)
    # every expert in RAM beats any disk tier under the same device budget
    for d in devs:
        assert by[(d, L * E)]["tokens_per_s"] > by[(d, 48)]["tokens_per_s"]


def test_grid_points_are_the_simulators_figures(trace: Path, grid: dict[str, Any]) -> None:
    """Rebuild the plan the way ``size`` does and replay it on the late half directly."""
    hw = load_hardware(None)
    loaded = load_traces([trace])
    idx = np.arange(len(loaded.routing.request_ids))
    half = len(idx) // 2
    fit = events_for(loaded, idx[:half], granularity="token")
    ev = events_for(loaded, idx[half:], granularity="token")
    d = 16
    plan = make_plan(ev, loaded.shape, uniform_layout(d, L, E), "lru",
                     bytes_per_expert=BPE, fit_events=fit)  # fmt: skip
    by = _by(grid)
    s = simulate(ev, replace(plan, ram=None), hw, bytes_per_expert=BPE).summary()
    assert by[(d, L * E)]["tokens_per_s"] == pytest.approx(s["tokens_per_s"], rel=1e-12)
    assert by[(d, L * E)]["device_hit_rate"] == pytest.approx(s["hit_rate"])
    assert grid["tokens"] == int(ev.tokens_by_phase.sum())
    tier = Placement("lru").tier(plan, fit, 16, hw, BPE)  # lru gets no drift detector
    s = simulate(ev, replace(plan, ram=tier), hw, bytes_per_expert=BPE).summary()
    got = by[(d, 16)]["tiers"]["lru"]
    assert got["tokens_per_s"] == pytest.approx(s["tokens_per_s"], rel=1e-12)
    assert got["ram_hit_rate"] == pytest.approx(s["ram_hit_rate"])


def test_all_in_ram_needs_no_disk_link(trace: Path, no_disk: Path) -> None:
    data = size([trace], SizingConfig(device_budgets=("25%",), ram_budgets=("100%",),
                                      hardware=str(no_disk), workers=1))  # fmt: skip
    assert [p["ram_tier"] for p in data["points"]] == ["all in RAM"]
    assert data["hardware"]["name"] == "no-disk"
    with pytest.raises(ConfigError, match="disk link"):
        size([trace], SizingConfig(device_budgets=("25%",), ram_budgets=("50%", "100%"),
                                   hardware=str(no_disk), workers=1))  # fmt: skip


def _pt(dev: float, ram: float, tps: float, name: str = "") -> dict[str, Any]:
    return {"device_mb": dev, "ram_mb": ram, "tokens_per_s": tps, "name": name}


def _names(points: list[dict[str, Any]]) -> list[str]:
    return [p["name"] for p in points]


def test_frontier_drops_dominated_points_and_keeps_ties() -> None:
    pts = [
        _pt(10, 20, 100, "small"),
        _pt(10, 40, 90, "more RAM, slower"),  # dominated by small (equal device)
        _pt(10, 20, 80, "same memory, slower"),  # dominated by small (equal memory)
        _pt(20, 20, 150, "more device, faster"),
        _pt(20, 40, 150, "more RAM, as fast"),  # dominated (equal device and tokens/s)
        _pt(30, 10, 50, "less RAM, slowest"),  # least RAM: kept
        _pt(20, 20, 150, "twin"),  # identical to 'more device, faster': both kept
    ]
    assert _names(frontier(pts)) == ["small", "more device, faster", "less RAM, slowest", "twin"]
    assert frontier([]) == []
    assert _names(frontier([pts[1]])) == ["more RAM, slower"]


def test_frontier_of_the_grid_is_non_dominated(grid: dict[str, Any]) -> None:
    front = frontier(grid["points"])
    assert grid["frontier"] == front and front
    for p in grid["points"]:
        beaten = any(
            q is not p
            and q["device_mb"] <= p["device_mb"]
            and q["ram_mb"] <= p["ram_mb"]
            and q["tokens_per_s"] >= p["tokens_per_s"]
            and (q["device_mb"], q["ram_mb"], q["tokens_per_s"])
            != (p["device_mb"], p["ram_mb"], p["tokens_per_s"])
            for q in grid["points"]
        )
        assert (p in front) == (not beaten)


def test_smallest_per_device_size() -> None:
    pts = [
        _pt(10, 20, 50, "d10 r20"),
        _pt(10, 40, 110, "d10 r40"),
        _pt(10, 60, 130, "d10 r60"),
        _pt(20, 20, 90, "d20 r20"),
        _pt(20, 40, 120, "d20 r40"),  # reaches 100, but no less RAM than d10's answer
        _pt(30, 20, 140, "d30 r20"),
        _pt(40, 10, 100, "d40 r10"),  # exactly the target, least RAM of all
    ]
    assert _names(smallest(pts, 100)) == ["d10 r40", "d30 r20", "d40 r10"]
    assert _names(smallest(pts, 125)) == ["d10 r60", "d30 r20"]
    assert _names(smallest(pts, 140)) == ["d30 r20"]
    assert smallest(pts, 141) == []
    assert smallest([], 1) == []
    # order of the input does not matter
    assert _names(smallest(pts[::-1], 100)) == ["d10 r40", "d30 r20", "d40 r10"]


def test_grid_smallest_matches_its_points(grid: dict[str, Any]) -> None:
    by = _by(grid)
    target = by[(8, 48)]["tokens_per_s"]
    got = smallest(grid["points"], target)
    want = min((p for p in grid["points"] if p["device_slots"] == 8
                and p["tokens_per_s"] >= target), key=lambda p: p["ram_mb"])  # fmt: skip
    assert got[0] == want
    assert all(p["tokens_per_s"] >= target for p in got)
    rams = [p["ram_mb"] for p in got]
    devs = [p["device_mb"] for p in got]
    assert devs == sorted(set(devs)) and rams == sorted(set(rams), reverse=True)
    assert smallest(grid["points"], max(p["tokens_per_s"] for p in grid["points"]) * 2) == []


def test_max_requests_sizes_on_the_last_requests(trace: Path) -> None:
    data = size([trace], SizingConfig(device_budgets=("25%",), ram_budgets=("100%",),
                                      max_requests=4, workers=1))  # fmt: skip
    assert data["fitted_on_requests"] == 2 and data["replayed_requests"] == 2


def test_cli_size_writes_grid_frontier_and_smallest(trace: Path, tmp_path: Path) -> None:
    out = tmp_path / "f.json"
    r = CliRunner().invoke(main, ["size", str(trace), "--device-budget", "25%",
                                  "--device-budget", "50%", "--ram-budget", "50%",
                                  "--ram-budget", "100%", "--target-tps", "1",
                                  "--workers", "1", "--out", str(out)])  # fmt: skip
    assert r.exit_code == 0, r.output
    assert "modeled tokens/s" in r.output and "device GB |" in r.output
    assert r.output.count("RAM 0.0") >= 2  # one column per RAM budget, in GB
    assert "1 tok/s: device 0.0 GB + RAM 0.0 GB" in r.output
    assert f"wrote {out}" in r.output
    data = json.loads(out.read_text())
    assert len(data["points"]) == 4 and data["frontier"] and data["target_tps"] == 1.0
    # every point reaches 1 tok/s: the smallest device with the smallest RAM, alone
    assert [(p["device_slots"], p["ram_slots"]) for p in data["smallest"]] == [(16, 32)]
    assert {(p["device_slots"], p["ram_slots"]) for p in data["points"]} == {
        (16, 32), (16, 64), (32, 32), (32, 64)
    }  # fmt: skip


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--ram-budget", "50%", "--hardware", "NODISK"], "disk link"),
        (["--device-budget", "lots"], "lots"),
        (["--ram-budget", "65"], "exceeds the model"),
        (["--target-tps", "0"], "target tokens/s must be > 0"),
    ],
)
def test_cli_size_errors_are_one_line(
    trace: Path, no_disk: Path, args: list[str], message: str
) -> None:
    args = [str(no_disk) if a == "NODISK" else a for a in args]
    r = CliRunner().invoke(main, ["size", str(trace), "--workers", "1", *args])
    assert r.exit_code == 2, r.output
    assert message in r.output and "Traceback" not in r.output
    assert len(r.output.strip().splitlines()) == 1, r.output


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        ({"device_budgets": ()}, "at least one device budget"),
        ({"ram_budgets": []}, "at least one device budget and one RAM budget"),
        ({"granularity": "request"}, "granularity must be pass or token"),
        ({"target_tps": 0}, "target tokens/s must be > 0"),
        ({"target_tps": -1.5}, "target tokens/s must be > 0"),
        ({"target_tps": float("nan")}, "target tokens/s must be > 0"),
        ({"max_requests": 1}, "max_requests must be >= 2"),
        ({"bytes_per_expert": 0}, "bytes_per_expert must be > 0"),
    ],
)
def test_sizing_config_is_checked(kw: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        SizingConfig(**kw)
    assert SizingConfig(max_requests=2, target_tps=0.5).device_budgets  # defaults are valid
