"""CUDA code paths: pinned host tier, side-stream prefetch with events (skipped without CUDA)."""

from __future__ import annotations

import pytest
import torch
from rt_models import assert_within_budget, clone, find_layers_info, tiny_model

from moetrace.runtime import OffloadEngine
from moetrace.store.plan import (
    Budget,
    CacheLayout,
    EvictionConfig,
    Plan,
    PrefetchConfig,
    RoutingShape,
)

pytestmark = pytest.mark.gpu


@pytest.fixture(autouse=True)
def _need_cuda():
    if not torch.cuda.is_available():
        pytest.skip("CUDA not available")


@pytest.mark.parametrize("arch", ["qwen3_moe", "olmoe"])
def test_cuda_identical_with_speculative_prefetch(arch, prompt_ids):
    base = tiny_model(arch).to("cuda")
    ids = prompt_ids.to("cuda")
    ref = base.generate(ids, max_new_tokens=6, do_sample=False)
    info = find_layers_info(base)
    plan = Plan(
        routing=RoutingShape.of(info),
        budget=Budget(slots=6, bytes_per_expert=info.bytes_per_expert),
        layout=CacheLayout("pool", (0, 0, 0), pool_slots=6),
        eviction=EvictionConfig("lru"),
        prefetch=PrefetchConfig("speculative", fetch=2),
    )
    model = clone(base).to("cpu")
    with OffloadEngine.from_model(model, plan, device="cuda") as eng:
        assert eng.pool.storage["down_proj"].is_cuda
        out = model.generate(ids, max_new_tokens=6, do_sample=False)
        s = eng.stats.summary()
    assert torch.equal(out, ref)
    assert s["prefetch_issued"] > 0
    assert_within_budget(eng, 6 * info.bytes_per_expert)


def test_cuda_disk_store_and_replay(tmp_path, prompt_ids):
    """A v2 store read into CUDA slots (pinned bounce), outputs identical; the trace
    replay host -> GPU runs and its hit rates equal the simulator's."""
    from moetrace.runtime import prepare_store
    from moetrace.runtime.replay import ReplayConfig, run_replay
    from moetrace.store.plan import save_plan
    from moetrace.tracer.recorder import RoutingRecorder
    from moetrace.tuner.sim.engine import make_plan
    from moetrace.tuner.sim.trace import events_for, load_traces

    base = tiny_model("olmoe")
    ref = base.generate(prompt_ids, max_new_tokens=5, do_sample=False)
    base.save_pretrained(tmp_path / "model")
    prepare_store(tmp_path / "model", tmp_path / "store")
    bpe = find_layers_info(base).bytes_per_expert
    with OffloadEngine.from_store(
        str(tmp_path / "store"), device="cuda", budget_bytes=7 * bpe
    ) as eng:
        out = eng.model.generate(prompt_ids.cuda(), max_new_tokens=5, do_sample=False)
        assert eng.stats.summary()["misses"] > 0
        assert_within_budget(eng, 7 * bpe)
    assert torch.equal(out.cpu(), ref)
    with RoutingRecorder(base, tmp_path / "trace") as rec:
        rec.generate(["r0"], prompt_ids, max_new_tokens=6, do_sample=False)
    loaded = load_traces([tmp_path / "trace"])
    ev = events_for(loaded, granularity="token")
    plan = make_plan(ev, loaded.shape, CacheLayout("per_layer", (4, 3, 4)), "lru",
                     bytes_per_expert=bpe)  # fmt: skip
    save_plan(plan, tmp_path / "plan.json")
    data = run_replay(
        ReplayConfig(
            str(tmp_path / "trace"),
            str(tmp_path / "plan.json"),
            str(tmp_path / "rs"),
            requests=1,
            repeats=1,
            device="cuda",
            tier="host",
        )  # fmt: skip
    )
    for row in data["variants"].values():
        assert row["hit_rate"] == pytest.approx(row["model"]["hit_rate"])
        assert row["peak_expert_bytes"] <= row["expert_memory_limit_bytes"]
