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
