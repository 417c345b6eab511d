"""Trace-driven runtime replay: a recorded trace through the real engine at its expert size."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner
from rt_models import tiny_model

from moetrace.cli import main
from moetrace.errors import ConfigError
from moetrace.runtime.replay import ReplayConfig, run_replay
from moetrace.runtime.skeleton import SkeletonShape
from moetrace.store.plan import CacheLayout, save_plan
from moetrace.tracer.recorder import RoutingRecorder
from moetrace.tuner.sim.engine import make_plan
from moetrace.tuner.sim.trace import events_for, load_traces


@pytest.fixture(scope="module")
def trace_and_plan(tmp_path_factory):
    root = tmp_path_factory.mktemp("replay")
    model = tiny_model("olmoe")
    with RoutingRecorder(model, root / "trace") as rec:
        for i, n in enumerate((5, 8, 6)):
            ids = torch.randint(1, 64, (1, n), generator=torch.Generator().manual_seed(n))
            rec.generate([f"r{i}"], ids, max_new_tokens=6, do_sample=False)
    loaded = load_traces([root / "trace"])
    ev = events_for(loaded, granularity="token")
    plan = make_plan(
        ev, loaded.shape, CacheLayout("per_layer", (4, 3, 4)), "lru",
        bytes_per_expert=loaded.model.bytes_per_expert,
    )  # fmt: skip
    return root, save_plan(plan, root / "plan.json")


def test_replay_measures_what_the_simulator_models(trace_and_plan, tmp_path):
    root, plan = trace_and_plan
    cfg = ReplayConfig(
        str(root / "trace"), str(plan), str(tmp_path / "store"), requests=2, repeats=2
    )
    data = run_replay(cfg)
    assert set(data["variants"]) == {"plan", "lru", "all_resident"}
    loaded = load_traces([root / "trace"])
    shape = SkeletonShape.for_trace(loaded.model)
    assert data["skeleton"]["bytes_per_expert"] == shape.bytes_per_expert
    assert data["tokens"] == 2 * 6 + 6 + 8 - 2  # the last two requests, token by token
    for v, row in data["variants"].items():
        # deterministic policies, no prefetch: the engine hits exactly what the model says
        assert row["hit_rate"] == pytest.approx(row["model"]["hit_rate"]), v
        assert 0 < row["peak_expert_bytes"] <= row["expert_memory_limit_bytes"]
        assert len(row["tokens_per_second"]["raw"]) == 2
        assert row["stall_per_token_ms"]["median"] >= 0
    assert data["variants"]["all_resident"]["hit_rate"] == 1.0
    assert data["variants"]["plan"]["hit_rate"] < 1.0
    # the store is reused by a second replay of the same shape
    again = run_replay(ReplayConfig(**{**cfg.__dict__, "repeats": 1, "variants": ("lru",)}))
    assert set(again["variants"]) == {"lru"}


def test_replay_cli_and_bad_input(trace_and_plan, tmp_path):
    root, plan = trace_and_plan
    out = tmp_path / "r.json"
    runner = CliRunner()
    args = ["bench", "--replay", str(root / "trace"), "--plan", str(plan), "--requests", "1",
            "--repeats", "1", "--hardware", "pcie4-x16"]  # fmt: skip
    res = runner.invoke(main, [*args, "--store", str(tmp_path / "s"), "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert "all_resident" in res.output and "stall ms/tok" in res.output
    data = json.loads(out.read_text())
    assert data["hardware"]["name"] == "pcie4-x16"
    res = runner.invoke(main, args)
    assert res.exit_code == 2 and "--store" in res.output
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "x").write_text("keep me")
    res = runner.invoke(main, [*args, "--store", str(tmp_path / "busy")])
    assert res.exit_code == 2 and "not empty" in res.output and "Traceback" not in res.output
    assert (tmp_path / "busy" / "x").read_text() == "keep me"
    res = runner.invoke(main, [*args, "--store", str(tmp_path / "s2"), "--scale", "2"])
    assert res.exit_code == 2 and "--scale" in res.output
    with pytest.raises(ConfigError, match="variants"):
        ReplayConfig("t", "p", "s", variants=("fast",))


def test_replay_host_tier(trace_and_plan, tmp_path):
    """Experts read once from the store into host memory (unaligned tensors: the direct
    reader falls back to buffered reads for them), then loads are host copies."""
    root, plan = trace_and_plan
    cfg = ReplayConfig(
        str(root / "trace"), str(plan), str(tmp_path / "store"), requests=1, repeats=1,
        variants=("lru",), tier="host", hardware="pcie4-x16",
    )  # fmt: skip
    row = run_replay(cfg)["variants"]["lru"]
    assert row["hit_rate"] == pytest.approx(row["model"]["hit_rate"]) and row["hit_rate"] < 1
    with pytest.raises(ConfigError, match="tier"):
        ReplayConfig("t", "p", "s", tier="tape")


def test_replay_ram_tier(trace_and_plan, tmp_path):
    """Three tiers: the plan's RAM tier vs plain LRU at the same RAM slots, experts on disk;
    deterministic policies without prefetch hit exactly what the model says, per tier."""
    import dataclasses

    from moetrace.store.plan import load_plan
    from moetrace.tuner.placement import ram_tier

    root, plan = trace_and_plan
    base = load_plan(plan)
    shape = base.routing
    ram = ram_tier(shape.num_layers, 6, "pinned_lru", ((0,), (1,), (2,)),
                   bytes_per_expert=base.budget.bytes_per_expert, top_k=shape.top_k)  # fmt: skip
    ram_plan = save_plan(dataclasses.replace(base, ram=ram), tmp_path / "ram.json")
    cfg = ReplayConfig(
        str(root / "trace"), str(ram_plan), str(tmp_path / "store"), requests=2, repeats=2,
        tier="ram",
    )  # fmt: skip
    data = run_replay(cfg)
    assert list(data["variants"]) == ["plan", "ram_lru"]  # lru is RAM LRU, no all_resident
    assert data["hardware"]["disk_bandwidth_gbps"] > 0
    for v, row in data["variants"].items():
        m, r = row["model"], row["ram"]
        assert row["hit_rate"] == pytest.approx(m["hit_rate"]), v
        assert r["hit_rate"] == pytest.approx(m["ram_hit_rate"]), v
        assert r["disk_bytes"] == m["disk_bytes"] > 0, v
        assert 0 < r["peak_bytes"] <= r["limit_bytes"], v
        assert len(row["tokens_per_second"]["raw"]) == 2
        assert "tokens_per_second_error" in row and "model_run_link" in row
    assert data["variants"]["plan"]["ram"] != data["variants"]["ram_lru"]["ram"]
    with pytest.raises(ConfigError, match="RAM tier"):
        run_replay(dataclasses.replace(cfg, plan=str(plan)))
    with pytest.raises(ConfigError, match="tier 'ram'"):
        run_replay(dataclasses.replace(cfg, tier="disk"))
    with pytest.raises(ConfigError, match="ram_lru"):
        ReplayConfig("t", "p", "s", variants=("ram_lru",))
