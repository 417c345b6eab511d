"""A model skeleton with a trace's routing shape at a real expert size, and its store.

For trace-driven runtime replay (:mod:`moetrace.runtime.replay`): a transformers MoE model
(``qwen3_moe`` experts, which use the experts interface) built on the ``meta`` device with
the trace's MoE layer ids, experts and top-k, whose experts have the trace's bytes per
expert (times ``scale``); its dense layers are never materialized (the replay drives the
experts modules directly). The experts live in a version 2 expert store with random
weights, read without the page cache like any other store.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from moetrace.errors import ConfigError, RuntimeEngineError
from moetrace.runtime.direct_io import write_layer_file
from moetrace.runtime.expert_store import (
    EXPERTS_DIR,
    STORE_INDEX,
    StoreIndex,
    is_store,
    layer_file,
    meta_model,
)
from moetrace.runtime.experts import find_moe_layers
from moetrace.store.schema import ModelInfo

log = logging.getLogger(__name__)

SKELETON_HIDDEN = 1024
"""Hidden size of the skeleton: every expert tensor is then a whole number of 4 KiB
blocks in float32 (so direct reads land in the slots without a bounce copy)."""


@dataclass(frozen=True)
class SkeletonShape:
    """The skeleton for a trace: routing shape, expert size, dtype."""

    moe_layers: tuple[int, ...]
    num_experts: int
    top_k: int
    hidden: int
    intermediate: int
    dtype: str = "float32"
    fingerprint: str = ""

    @property
    def bytes_per_expert(self) -> int:
        return (
            3
            * self.hidden
            * self.intermediate
            * torch.empty((), dtype=self.torch_dtype).element_size()
        )

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)

    @classmethod
    def for_trace(
        cls, model: ModelInfo, scale: float = 1.0, *, bytes_per_expert: int | None = None
    ) -> SkeletonShape:
        """The shape whose experts are ``scale`` times the trace's bytes per expert."""
        bpe = bytes_per_expert or model.bytes_per_expert
        if not bpe:
            raise ConfigError(
                "the trace does not say its bytes per expert; give --bytes-per-expert"
            )
        if not 0 < scale <= 1:
            raise ConfigError(f"--scale must be in (0, 1], got {scale}")
        h = SKELETON_HIDDEN
        inter = max(1, round(bpe * scale / (3 * h * 4)))
        return cls(
            tuple(model.moe_layers), model.num_experts, model.top_k, h, inter,
            fingerprint=f"replay:{model.fingerprint}:{h}x{inter}",
        )  # fmt: skip

    def config(self) -> object:
        from transformers import Qwen3MoeConfig

        n = max(self.moe_layers) + 1
        return Qwen3MoeConfig(
            vocab_size=16,
            hidden_size=self.hidden,
            intermediate_size=16,
            moe_intermediate_size=self.intermediate,
            num_hidden_layers=n,
            mlp_only_layers=[i for i in range(n) if i not in self.moe_layers],
            num_experts=self.num_experts,
            num_experts_per_tok=self.top_k,
            num_attention_heads=2,
            num_key_value_heads=1,
            head_dim=8,
            decoder_sparse_step=1,
        )


def build_skeleton(shape: SkeletonShape, implementation: str = "eager") -> nn.Module:
    """The skeleton on the meta device, its expert tensors detached (the runtime's slots
    hold them)."""
    model = meta_model(shape.config(), shape.torch_dtype, implementation)
    if tuple(r.layer_id for r in find_moe_layers(model)) != shape.moe_layers:
        raise RuntimeEngineError("the skeleton's MoE layers do not match the trace's")
    return model.eval()


def build_store(shape: SkeletonShape, out: str | os.PathLike[str], seed: int = 0) -> StoreIndex:
    """Write (or reuse, when ``out`` holds this shape's store) the skeleton's experts:
    random weights, one layer file per MoE layer, dropped from the page cache."""
    root = Path(out)
    layers = find_moe_layers(build_skeleton(shape))
    index = StoreIndex(
        shape.moe_layers, shape.num_experts, shape.top_k, layers[0].params,
        shape.fingerprint, shape.dtype,
    )  # fmt: skip
    if is_store(root):
        old = StoreIndex.load(root)
        if old.fingerprint == index.fingerprint and old.params == index.params:
            log.info("%s: reusing the replay store", root)
            return old
        raise RuntimeEngineError(f"{root}: holds another store ({old.fingerprint})")
    if root.exists() and any(root.iterdir()):
        raise RuntimeEngineError(f"{root}: output folder exists and is not empty")
    (root / EXPERTS_DIR).mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(seed)
    std = 1.0 / shape.hidden**0.5
    for layer_id in shape.moe_layers:
        experts = [
            {p.name: (torch.randn(p.shape, generator=gen) * std).to(p.dtype) for p in index.params}
            for _ in range(shape.num_experts)
        ]
        write_layer_file(root / layer_file(layer_id), index.layout, experts)
    (root / "config.json").write_text(shape.config().to_json_string())  # type: ignore[attr-defined]
    (root / STORE_INDEX).write_text(json.dumps(index.to_json(), indent=1) + "\n")
    return index
