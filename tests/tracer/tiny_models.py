"""Tiny random-weight MoE models of every architecture the tracer supports (no downloads)."""

from __future__ import annotations

from typing import Any

import torch
import transformers

VOCAB = 96
PAD, EOS, BOS = 0, 1, 2
COMMON = dict(vocab_size=VOCAB, pad_token_id=PAD, eos_token_id=EOS, bos_token_id=BOS)
ATTN = dict(hidden_size=32, num_attention_heads=4, num_key_value_heads=2)
MLA = dict(hidden_size=32, num_attention_heads=4, num_key_value_heads=4)

# architecture -> (config class, model class, config kwargs)
SPECS: dict[str, tuple[str, str, dict[str, Any]]] = {
    "mixtral": (
        "MixtralConfig",
        "MixtralForCausalLM",
        dict(
            **ATTN,
            intermediate_size=48,
            num_hidden_layers=2,
            num_local_experts=6,
            num_experts_per_tok=2,
        ),
    ),
    "qwen2_moe": (
        "Qwen2MoeConfig",
        "Qwen2MoeForCausalLM",
        dict(
            **ATTN,
            intermediate_size=48,
            moe_intermediate_size=24,
            shared_expert_intermediate_size=24,
            num_hidden_layers=3,
            num_experts=8,
            num_experts_per_tok=2,
            mlp_only_layers=[1],
        ),
    ),
    "qwen3_moe": (
        "Qwen3MoeConfig",
        "Qwen3MoeForCausalLM",
        dict(
            **ATTN,
            head_dim=8,
            intermediate_size=48,
            moe_intermediate_size=24,
            num_hidden_layers=2,
            num_experts=8,
            num_experts_per_tok=3,
        ),
    ),
    "qwen3_next": (
        "Qwen3NextConfig",
        "Qwen3NextForCausalLM",
        dict(
            **ATTN,
            head_dim=8,
            intermediate_size=48,
            moe_intermediate_size=24,
            shared_expert_intermediate_size=24,
            num_hidden_layers=4,
            num_experts=8,
            num_experts_per_tok=2,
            linear_num_value_heads=2,
            linear_num_key_heads=2,
            linear_key_head_dim=8,
            linear_value_head_dim=8,
        ),
    ),
    "olmoe": (
        "OlmoeConfig",
        "OlmoeForCausalLM",
        dict(
            **ATTN, intermediate_size=24, num_hidden_layers=2, num_experts=8, num_experts_per_tok=2
        ),
    ),
    "flex_olmo": (
        "FlexOlmoConfig",
        "FlexOlmoForCausalLM",
        dict(
            **ATTN, intermediate_size=24, num_hidden_layers=2, num_experts=4, num_experts_per_tok=2
        ),
    ),
    "deepseek_v2": (
        "DeepseekV2Config",
        "DeepseekV2ForCausalLM",
        dict(
            **MLA,
            intermediate_size=48,
            moe_intermediate_size=16,
            num_hidden_layers=3,
            n_routed_experts=8,
            num_experts_per_tok=2,
            n_shared_experts=1,
            first_k_dense_replace=1,
            kv_lora_rank=16,
            q_lora_rank=None,
            qk_rope_head_dim=4,
            qk_nope_head_dim=4,
            v_head_dim=8,
            n_group=1,
            topk_group=1,
        ),
    ),
    "deepseek_v3": (
        "DeepseekV3Config",
        "DeepseekV3ForCausalLM",
        dict(
            **MLA,
            intermediate_size=48,
            moe_intermediate_size=16,
            num_hidden_layers=3,
            n_routed_experts=8,
            num_experts_per_tok=2,
            n_shared_experts=1,
            first_k_dense_replace=1,
            kv_lora_rank=16,
            q_lora_rank=16,
            qk_rope_head_dim=4,
            qk_nope_head_dim=4,
            v_head_dim=8,
            n_group=2,
            topk_group=1,
        ),
    ),
    "glm4_moe": (
        "Glm4MoeConfig",
        "Glm4MoeForCausalLM",
        dict(
            **ATTN,
            head_dim=8,
            intermediate_size=48,
            moe_intermediate_size=16,
            num_hidden_layers=3,
            n_routed_experts=8,
            num_experts_per_tok=2,
            n_shared_experts=1,
            first_k_dense_replace=1,
            n_group=1,
            topk_group=1,
        ),
    ),
    "ernie4_5_moe": (
        "Ernie4_5_MoeConfig",
        "Ernie4_5_MoeForCausalLM",
        dict(
            **ATTN,
            intermediate_size=48,
            moe_intermediate_size=16,
            num_hidden_layers=3,
            moe_num_experts=8,
            moe_k=2,
            moe_num_shared_experts=1,
            moe_layer_start_index=1,
            tie_word_embeddings=False,
        ),
    ),
    "hunyuan_v1_moe": (
        "HunYuanMoEV1Config",
        "HunYuanMoEV1ForCausalLM",
        dict(
            **ATTN, head_dim=8, intermediate_size=24, num_hidden_layers=2, num_experts=8, moe_topk=2
        ),
    ),
    "gpt_oss": (
        "GptOssConfig",
        "GptOssForCausalLM",
        dict(
            **ATTN,
            head_dim=8,
            intermediate_size=16,
            num_hidden_layers=2,
            num_local_experts=4,
            num_experts_per_tok=2,
            sliding_window=8,
        ),
    ),
    "phimoe": (
        "PhimoeConfig",
        "PhimoeForCausalLM",
        dict(
            **ATTN,
            intermediate_size=24,
            num_hidden_layers=2,
            num_local_experts=4,
            num_experts_per_tok=2,
        ),
    ),
    "granitemoe": (
        "GraniteMoeConfig",
        "GraniteMoeForCausalLM",
        dict(
            **ATTN,
            intermediate_size=24,
            num_hidden_layers=2,
            num_local_experts=4,
            num_experts_per_tok=2,
        ),
    ),
    "granitemoeshared": (
        "GraniteMoeSharedConfig",
        "GraniteMoeSharedForCausalLM",
        dict(
            **ATTN,
            intermediate_size=24,
            shared_intermediate_size=16,
            num_hidden_layers=2,
            num_local_experts=4,
            num_experts_per_tok=2,
        ),
    ),
    "minimax": (
        "MiniMaxConfig",
        "MiniMaxForCausalLM",
        dict(
            **ATTN,
            head_dim=8,
            intermediate_size=24,
            num_hidden_layers=2,
            num_local_experts=4,
            num_experts_per_tok=2,
            layer_types=["full_attention", "full_attention"],
        ),
    ),
    "dbrx": (
        "DbrxConfig",
        "DbrxForCausalLM",
        dict(
            d_model=32,
            n_heads=4,
            n_layers=2,
            max_seq_len=64,
            attn_config=dict(kv_n_heads=2, rope_theta=10000.0, clip_qkv=8.0),
            ffn_config=dict(ffn_hidden_size=24, moe_num_experts=4, moe_top_k=2),
        ),
    ),
    "llama4": (
        "Llama4TextConfig",
        "Llama4ForCausalLM",
        dict(
            **ATTN,
            head_dim=8,
            intermediate_size=24,
            intermediate_size_mlp=48,
            num_hidden_layers=2,
            num_local_experts=4,
            num_experts_per_tok=1,
            interleave_moe_layer_step=1,
        ),
    ),
    "jetmoe": (
        "JetMoeConfig",
        "JetMoeForCausalLM",
        dict(
            hidden_size=32,
            num_key_value_heads=2,
            kv_channels=8,
            intermediate_size=24,
            num_hidden_layers=2,
            num_local_experts=4,
            num_experts_per_tok=2,
            tie_word_embeddings=False,
        ),
    ),
    "switch_transformers": (
        "SwitchTransformersConfig",
        "SwitchTransformersForConditionalGeneration",
        dict(
            d_model=32,
            d_kv=8,
            d_ff=48,
            num_heads=4,
            num_layers=2,
            num_decoder_layers=2,
            num_sparse_encoder_layers=1,
            num_sparse_decoder_layers=1,
            num_experts=4,
            expert_capacity=64,
            decoder_start_token_id=PAD,
        ),
    ),
    "nllb_moe": (
        "NllbMoeConfig",
        "NllbMoeForConditionalGeneration",
        dict(
            d_model=32,
            encoder_layers=2,
            decoder_layers=2,
            encoder_attention_heads=4,
            decoder_attention_heads=4,
            encoder_ffn_dim=48,
            decoder_ffn_dim=48,
            num_experts=4,
            expert_capacity=64,
            encoder_sparse_step=1,
            decoder_sparse_step=1,
            max_position_embeddings=64,
            decoder_start_token_id=EOS,
        ),
    ),
}

ARCHITECTURES = tuple(SPECS)


def tiny_config(arch: str, **overrides: Any) -> Any:
    cfg_cls, _, kwargs = SPECS[arch]
    return getattr(transformers, cfg_cls)(**{**COMMON, **kwargs, **overrides})


def tiny_model(arch: str, seed: int = 0, **overrides: Any) -> Any:
    torch.manual_seed(seed)
    _, model_cls, _ = SPECS[arch]
    model = getattr(transformers, model_cls)(tiny_config(arch, **overrides)).eval()
    return model
