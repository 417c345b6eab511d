"""The offloading engine: token identity, budget accounting, bad plans, restore."""

from __future__ import annotations

import json

import pytest
import torch
from rt_models import ARCHS, assert_within_budget, clone, tiny_model
from transformers import AutoConfig, AutoModelForCausalLM

from moetrace.errors import ConfigError, MoetraceError, PlanError, RuntimeEngineError
from moetrace.runtime import OffloadEngine
from moetrace.runtime.checks import default_plan
from moetrace.runtime.experts import find_moe_layers
from moetrace.store.plan import (
    Budget,
    CacheLayout,
    EvictionConfig,
    Plan,
    PrefetchConfig,
    RoutingShape,
    load_plan,
    save_plan,
)

NEW_TOKENS = 6


def _bpe(model) -> int:
    return find_moe_layers(model)[0].bytes_per_expert


def _run(model, ids, **kw):
    with torch.no_grad():
        logits = model(ids).logits
    out = model.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False, **kw)
    return logits, out


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_greedy_identical_across_budgets(arch, prompt_ids):
    base = tiny_model(arch)
    ref_logits, ref_out = _run(base, prompt_ids)
    layers = find_moe_layers(base)
    k, L, E, bpe = layers[0].top_k, len(layers), layers[0].num_experts, _bpe(base)
    for slots in (k, L * E):  # just the top-k of one layer .. everything
        model = clone(base)
        with OffloadEngine.from_model(model, budget_bytes=(slots + k) * bpe) as eng:
            logits, out = _run(model, prompt_ids)
            assert eng.footprint.slots == slots
            assert_within_budget(eng, (slots + k) * bpe)
            summary = eng.stats.summary()
            assert summary["accesses"] == summary["hits"] + summary["misses"]
        assert torch.equal(out, ref_out), (arch, slots)
        assert torch.equal(logits, ref_logits), (arch, slots)
        if slots == L * E:
            assert summary["streamed"] == 0
        else:
            assert summary["misses"] > 0


@pytest.mark.parametrize("implementation", ["eager", "batched_mm", "grouped_mm"])
def test_identical_per_inner_implementation(implementation, prompt_ids):
    base = tiny_model("olmoe", implementation)
    _, ref_out = _run(base, prompt_ids)
    bpe = _bpe(base)
    model = clone(base)
    with OffloadEngine.from_model(model, budget_bytes=(5 + 3) * bpe) as eng:
        assert eng.inner == implementation
        assert model.config._experts_implementation == "moetrace_offload"
        _, out = _run(model, prompt_ids)
    assert torch.equal(out, ref_out)
    assert model.config._experts_implementation == implementation
    assert not hasattr(find_moe_layers(model)[0].experts, "_moetrace_offload")


def test_stats_json_and_phases(prompt_ids):
    model = tiny_model("qwen3_moe")
    bpe = _bpe(model)
    with OffloadEngine.from_model(model, budget_bytes=(6 + 2) * bpe) as eng:
        _run(model, prompt_ids)
        data = json.loads(eng.stats.dumps())
    assert data["tokens"]["prefill"] == 2 * prompt_ids.shape[1]  # forward + generate prefill
    assert data["tokens"]["decode"] == NEW_TOKENS - 1
    assert [row["layer"] for row in data["per_layer"]] == [0, 1, 2]
    dec = data["by_phase"]["decode"]
    assert 2 <= dec["accesses"] <= (NEW_TOKENS - 1) * 3 * 2
    assert dec["hits"] + dec["misses"] == dec["accesses"]
    assert (
        data["total"]["bytes_demand"] >= (data["total"]["misses"] - data["total"]["streamed"]) * bpe
    )


def test_speculative_prefetch_keeps_output(prompt_ids):
    base = tiny_model("mixtral")
    _, ref_out = _run(base, prompt_ids)
    bpe = _bpe(base)
    layers = find_moe_layers(base)
    with OffloadEngine.from_model(clone(base), budget_bytes=(8 + 2) * bpe) as eng0:
        info_plan = eng0.plan
        info = eng0.info
    plan = Plan(
        routing=RoutingShape.of(info),
        budget=Budget(slots=8, bytes_per_expert=bpe),
        layout=CacheLayout("pool", (0,) * len(layers), pool_slots=8),
        eviction=EvictionConfig("lru"),
        prefetch=PrefetchConfig("speculative", lookahead=1, fetch=2),
    )
    assert info_plan is not None
    model = clone(base)
    with OffloadEngine.from_model(model, plan, budget_bytes=(8 + 2) * bpe) as eng:
        _, out = _run(model, prompt_ids)
        s = eng.stats.summary()
    assert torch.equal(out, ref_out)
    assert s["prefetch_issued"] > 0
    assert s["prefetch_used"] + s["prefetch_wasted"] <= s["prefetch_issued"]
    assert 0.0 < s["prefetch_precision"] <= 1.0


def _plan_for(model, **kw) -> Plan:
    probe = clone(model)
    with OffloadEngine.from_model(probe) as eng:
        info = eng.info
    return default_plan(info, **kw)


def test_plan_for_other_model_rejected():
    a = tiny_model("qwen3_moe")
    b = tiny_model("olmoe")
    plan = _plan_for(b, slots=4)
    with pytest.raises(PlanError, match="fingerprint"):
        OffloadEngine.from_model(a, plan)


def test_budget_too_small_for_pins(tmp_path):
    model = tiny_model("qwen3_moe")
    bpe = _bpe(model)
    base = _plan_for(model, slots=6)
    plan = Plan(
        routing=base.routing,
        budget=Budget(slots=6),
        layout=CacheLayout("pool", (0, 0, 0), pool_slots=6),
        eviction=EvictionConfig("pinned_lru", pinned=((0, 1), (2, 3), (4, 5))),
    )
    with pytest.raises(PlanError, match="the 6 the plan pins"):
        OffloadEngine.from_model(clone(model), plan, budget_bytes=(4 + 2) * bpe)
    with pytest.raises(ConfigError, match="at least top_k"):
        OffloadEngine.from_model(clone(model), plan, budget_bytes=2 * bpe)
    # the same plan fits a larger budget and loads its pins at start
    with OffloadEngine.from_model(clone(model), plan, budget_bytes=(6 + 2) * bpe) as eng:
        assert eng.cache.resident(1, 3) and eng.stats.summary()["accesses"] == 0


def test_plan_larger_than_device():
    model = tiny_model("qwen3_moe")
    base = _plan_for(model, slots=4)
    huge = 10**12
    plan = Plan(
        routing=base.routing,
        budget=Budget(slots=huge),
        layout=CacheLayout("pool", (0, 0, 0), pool_slots=huge),
        eviction=EvictionConfig("lru"),
    )
    with pytest.raises(RuntimeEngineError, match="available"):
        OffloadEngine.from_model(clone(model), plan)


def test_malformed_plan_file(tmp_path):
    bad = tmp_path / "plan.json"
    bad.write_text('{"format": "moetrace-plan", "format_version": 1, "routing": 3}')
    with pytest.raises(PlanError, match="plan.json"):
        load_plan(bad)
    model = tiny_model("qwen3_moe")
    plan = _plan_for(model, slots=4)
    good = save_plan(plan, tmp_path / "good.json")
    assert load_plan(good).layout.pool_slots == 4


def test_oracle_policy_cannot_run_online():
    model = tiny_model("qwen3_moe")
    base = _plan_for(model, slots=4)
    plan = Plan(
        routing=base.routing,
        budget=Budget(slots=4),
        layout=base.layout,
        eviction=EvictionConfig("belady"),
    )
    with pytest.raises(RuntimeEngineError, match="online"):
        OffloadEngine.from_model(clone(model), plan)


def test_unsupported_architecture():
    cfg = AutoConfig.for_model(
        "llama", vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2,
    )  # fmt: skip
    model = AutoModelForCausalLM.from_config(cfg)
    with pytest.raises(RuntimeEngineError, match="does not support it yet"):
        OffloadEngine.from_model(model)
    assert issubclass(RuntimeEngineError, MoetraceError)


def test_speculative_hooks_removed_and_lookahead_checked():
    """The speculative prefetch's layer hooks go with close(); it predicts the next layer
    only, so another lookahead is refused before anything is attached."""
    import dataclasses

    base = tiny_model("olmoe")
    plan = dataclasses.replace(
        _plan_for(base, slots=6), prefetch=PrefetchConfig("speculative", lookahead=1, fetch=2)
    )
    model = clone(base)
    layers = list(model.model.layers)
    with OffloadEngine.from_model(model, plan):
        assert sum(len(layer._forward_hooks) for layer in layers) == len(layers) - 1
    assert not any(layer._forward_hooks for layer in layers)
    assert not model._forward_hooks and not model._forward_pre_hooks
    far = dataclasses.replace(plan, prefetch=PrefetchConfig("speculative", lookahead=2))
    model = clone(base)
    with pytest.raises(RuntimeEngineError, match="lookahead 1"):
        OffloadEngine.from_model(model, far)
    assert not model._forward_hooks and not model._forward_pre_hooks
