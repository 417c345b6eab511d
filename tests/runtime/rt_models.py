"""Tiny random-weight MoE models of several architectures, built in code (no downloads)."""

from __future__ import annotations

import copy

import torch
from transformers import AutoConfig, AutoModelForCausalLM

torch.set_num_threads(1)

COMMON = dict(
    vocab_size=64,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=8,
    eos_token_id=None,
    pad_token_id=0,
    bos_token_id=None,
)
ARCHS = {
    "qwen3_moe": dict(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=16),
    "olmoe": dict(num_experts=8, num_experts_per_tok=3),
    "mixtral": dict(num_local_experts=6, num_experts_per_tok=2),
    "qwen2_moe": dict(
        num_experts=8,
        num_experts_per_tok=4,
        moe_intermediate_size=16,
        shared_expert_intermediate_size=32,
    ),
    "deepseek_v3": dict(
        n_routed_experts=8,
        num_experts_per_tok=3,
        moe_intermediate_size=16,
        first_k_dense_replace=1,
        n_group=2,
        topk_group=1,
        q_lora_rank=None,
        kv_lora_rank=16,
        qk_rope_head_dim=8,
        qk_nope_head_dim=8,
        v_head_dim=8,
        num_key_value_heads=4,
    ),
}


def tiny_model(arch: str, implementation: str = "grouped_mm", seed: int = 0):
    torch.manual_seed(seed)
    cfg = AutoConfig.for_model(arch, **{**COMMON, **ARCHS[arch]})
    model = AutoModelForCausalLM.from_config(cfg).eval()
    model.set_experts_implementation(implementation)
    return model


def clone(model):
    return copy.deepcopy(model)


def find_layers_info(model):
    """The ModelInfo the runtime derives for ``model`` (without attaching to it)."""
    from moetrace.runtime.checks import model_info
    from moetrace.runtime.expert_store import model_fingerprint
    from moetrace.runtime.experts import find_moe_layers

    layers = find_moe_layers(model)
    return model_info(layers, model.config.num_hidden_layers, model_fingerprint(model), "tiny")


def assert_within_budget(engine, budget_bytes: int) -> None:
    """The engine's measured expert memory stayed within ``budget_bytes`` (slots and
    staging) plus the alignment padding of its buffers (one page per expert tensor)."""
    from moetrace.runtime.memory import ALIGN

    slack = ALIGN * len(engine.pool.storage)
    assert 0 < engine.stats.peak_expert_bytes <= budget_bytes + slack, (
        engine.stats.peak_expert_bytes,
        budget_bytes,
    )
    assert engine.stats.peak_expert_bytes >= engine.pool.device_bytes


def layer_plan(info, caps: tuple[int, ...], policy: str = "lru", prefetch=None):
    """A per-layer plan with ``caps`` slots per layer for the model ``info`` describes."""
    from moetrace.store.plan import (
        Budget,
        CacheLayout,
        EvictionConfig,
        Plan,
        PrefetchConfig,
        RoutingShape,
    )

    return Plan(
        routing=RoutingShape.of(info),
        budget=Budget(slots=sum(caps), bytes_per_expert=info.bytes_per_expert),
        layout=CacheLayout("per_layer", caps),
        eviction=EvictionConfig(policy),
        prefetch=prefetch or PrefetchConfig(),
    )
