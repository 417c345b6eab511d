"""The runtime runs waiting prompts in the plan's schedule; on the demo model its batches
and hit rate equal the simulator's queue model on the same prompts' trace."""

from __future__ import annotations

import json
import random
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from moetrace.cli import main
from moetrace.runtime.batches import generate_scheduled
from moetrace.runtime.checks import default_plan
from moetrace.runtime.session import generate, open_engine
from moetrace.store.hardware import load_hardware
from moetrace.store.plan import ScheduleConfig, save_plan
from moetrace.tracer.demo import demo_model_path
from moetrace.tuner.sched.queue import simulate_queue
from moetrace.tuner.sim.trace import events_for, load_traces


def demo_prompts(n: int) -> list[str]:
    path = demo_model_path().parent / "prompts" / "demo_prompts.jsonl"
    lines = [json.loads(x)["prompt"][:200] for x in path.read_text().splitlines()]
    random.Random(0).shuffle(lines)  # mixed domains, so grouping has something to find
    return lines[:n]


@pytest.fixture(scope="module")
def demo_plan():
    eng, _ = open_engine(None, None)
    info, L, E = eng.info, len(eng.layers), eng.info.num_experts
    eng.close()
    return default_plan(info, L * E // 4)


@pytest.mark.parametrize(
    "sched",
    [
        ScheduleConfig("affinity", 4, "static"),
        ScheduleConfig("fcfs", 3, "static"),
        ScheduleConfig("affinity", 3, "static", {"max_overtakes": 2}),
    ],  # fmt: skip
)
def test_runtime_schedule_matches_the_queue_model(tmp_path: Path, demo_plan, sched) -> None:
    """Record the prompts one at a time; the simulator schedules that trace, the runtime
    schedules the prompts from its own probes: same batches, same accesses and hits; and
    batching does not change the text."""
    plan = replace(demo_plan, schedule=sched)
    prompts = demo_prompts(12)
    eng, tok = open_engine(None, plan)
    try:
        one = generate(eng, tok, prompts, 10, trace_dir=tmp_path / "one")
    finally:
        eng.close()
    eng, tok = open_engine(None, plan)
    try:
        run = generate_scheduled(eng, tok, prompts, 10)
        rt = eng.stats.summary()
    finally:
        eng.close()
    assert run.texts == one.texts
    ev = events_for(load_traces([tmp_path / "one"]))
    q = simulate_queue(ev, plan, load_hardware(), schedule=sched)
    sim = q.sim.summary()
    assert [tuple(b["requests"]) for b in run.batches] == list(q.schedule.batches)
    assert (rt["accesses"], rt["hits"]) == (
        sim["accesses"],
        round(sim["hit_rate"] * sim["accesses"]),
    )
    assert rt["hit_rate"] == pytest.approx(sim["hit_rate"], abs=1e-12)
    if sched.scheduler == "affinity" and not sched.params:
        assert [tuple(b["requests"]) for b in run.batches] != [(0, 1, 2, 3), (4, 5, 6, 7),
                                                              (8, 9, 10, 11)]  # fmt: skip
    assert sum(r["new_tokens"] for r in run.requests) == run.new_tokens == one.new_tokens


def test_probe_loads_nothing(demo_plan) -> None:
    eng, tok = open_engine(None, demo_plan)
    try:
        before = {k: v.copy() for k, v in eng.stats.counters.items()}
        slots = dict(eng.cache.slot_of)
        enc = tok("def main():\n    return 1", return_tensors="pt")
        counts = eng.probe(enc["input_ids"])
        assert counts.sum() == enc["input_ids"].shape[1] * eng.info.top_k
        assert all(np.array_equal(before[k], v) for k, v in eng.stats.counters.items())
        assert dict(eng.cache.slot_of) == slots and eng.stats.tokens.sum() == 0
        again = eng.probe(enc["input_ids"])
        assert np.array_equal(counts, again)
    finally:
        eng.close()


def test_run_cli_batches_with_stats(tmp_path: Path, demo_plan) -> None:
    plan = replace(demo_plan, schedule=ScheduleConfig("affinity", 2, "continuous"))
    save_plan(plan, tmp_path / "plan.json")
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"id": str(i), "prompt": p}) + "\n"
                               for i, p in enumerate(demo_prompts(5))))  # fmt: skip
    out = tmp_path / "stats.json"
    res = CliRunner().invoke(main, ["run", "--plan", str(tmp_path / "plan.json"), "--prompts",
                                    str(prompts), "--batch-size", "3", "--max-new-tokens", "4",
                                    "--stats-json", str(out)])  # fmt: skip
    assert res.exit_code == 0, res.output
    data = json.loads(out.read_text())
    assert data["schedule"]["batch_size"] == 3 and data["schedule"]["scheduler"] == "affinity"
    assert sorted(r["prompt"] for r in data["requests"]) == list(range(5))
    assert [len(b["requests"]) for b in data["batches"]] == [3, 2]
    assert all(0 <= b["hit_rate"] <= 1 for b in data["batches"])
    assert data["total"]["accesses"] == sum(b["accesses"] for b in data["batches"])
    bad = replace(plan, schedule=ScheduleConfig("affinity", 2, params={"probe_layers": 2}))
    save_plan(bad, tmp_path / "bad.json")
    res = CliRunner().invoke(main, ["run", "--plan", str(tmp_path / "bad.json"), "--prompts",
                                    str(prompts)])  # fmt: skip
    assert res.exit_code == 2 and "probes the first MoE layer only" in res.output
