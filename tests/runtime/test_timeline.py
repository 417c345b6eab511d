"""The runtime's timeline recording: per-event outcomes in the stats JSON that sum to the
runtime's own counters, and a cap on how many events are kept."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from rt_models import find_layers_info, layer_plan, tiny_model
from test_store_cli import model_dir  # noqa: F401 (a fixture)

from moetrace.cli import main
from moetrace.errors import ConfigError
from moetrace.runtime import OffloadEngine
from moetrace.store.plan import (
    Budget,
    CacheLayout,
    EvictionConfig,
    Plan,
    PrefetchConfig,
    RoutingShape,
)
from moetrace.tuner.sim.timeline import RecordedTimeline

NEW_TOKENS = 8


def _speculative_pool(info) -> Plan:  # a small pool: prefetch hits and wasted prefetches
    return Plan(
        routing=RoutingShape.of(info),
        budget=Budget(slots=5, bytes_per_expert=info.bytes_per_expert),
        layout=CacheLayout("pool", (0,) * len(info.moe_layers), pool_slots=5),
        eviction=EvictionConfig("lru"),
        prefetch=PrefetchConfig("speculative", lookahead=1, fetch=2),
    )


def _run(plan_of, prompt_ids, timeline_events: int):
    model = tiny_model("mixtral")
    plan = plan_of(find_layers_info(model))
    with OffloadEngine.from_model(model, plan, timeline_events=timeline_events) as eng:
        with torch.no_grad():
            model.generate(prompt_ids, max_new_tokens=NEW_TOKENS, do_sample=False)
        return json.loads(eng.stats.dumps()), eng.stats


@pytest.mark.parametrize(
    "plan_of",
    [
        _speculative_pool,
        lambda info: layer_plan(info, (1, 1, 1)),  # one slot, two experts a token: streams
    ],
    ids=["speculative-pool", "one-slot"],
)
def test_recorded_outcomes_sum_to_the_counters(plan_of, prompt_ids) -> None:
    data, stats = _run(plan_of, prompt_ids, timeline_events=10_000)
    rec = RecordedTimeline.from_json(data["timeline"])
    tl = rec.timeline
    assert not data["timeline"]["truncated"]
    assert rec.events_seen == tl.num_events > 0
    c, total = tl.counts(), data["total"]
    for name in ("accesses", "hits", "misses", "streamed", "prefetch_wasted", "prefetch_issued"):
        assert c[name] == total[name], name
    assert c["prefetch_served"] == total["prefetch_used"]
    assert c["stall_s"] == pytest.approx(total["stall_s"], rel=1e-9, abs=1e-12)
    # per layer too, and the experts are the ones the events needed
    sizes = np.diff(tl.ptr)
    for i, row in enumerate(data["per_layer"]):
        acc = row["prefill"]["accesses"] + row["decode"]["accesses"]
        assert sizes[rec.layer == i].sum() == acc, i
    assert rec.experts.min() >= 0 and rec.experts.max() < 6
    if plan_of is _speculative_pool:
        assert c["prefetch_served"] > 0 and c["prefetch_issued"] > 0
    else:
        assert c["streamed"] > 0
    assert stats.timeline is not None


def test_cap_and_off(prompt_ids) -> None:
    data, stats = _run(_speculative_pool, prompt_ids, timeline_events=5)
    t = data["timeline"]
    assert t["truncated"] and t["max_events"] == 5 and len(t["layer"]) == 5
    assert t["events_seen"] > 5 and len(t["ptr"]) == 6 and stats.timeline is not None
    off, _ = _run(_speculative_pool, prompt_ids, timeline_events=0)
    assert "timeline" not in off
    with pytest.raises(ConfigError, match="timeline_events"):
        _run(_speculative_pool, prompt_ids, timeline_events=-1)


def test_cli_run_timeline_events(model_dir, tmp_path) -> None:  # noqa: F811
    stats = tmp_path / "stats.json"
    res = CliRunner().invoke(
        main,
        ["run", "--model", str(model_dir), "--prompt", "w1 w2 w3", "--max-new-tokens", "3",
         "--budget", "50%", "--timeline-events", "4", "--stats-json", str(stats)],
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    t = json.loads(stats.read_text())["timeline"]
    assert t["max_events"] == 4 and len(t["layer"]) == 4 and t["events_seen"] == 9
    assert t["moe_layers"] == [0, 1, 2]
