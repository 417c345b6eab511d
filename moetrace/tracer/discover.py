"""Find a model's MoE layers, the stacks that hold them, and describe it as a ModelInfo."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
from torch import nn

from moetrace.errors import ModelError
from moetrace.store.schema import ModelInfo, config_fingerprint
from moetrace.tracer.adapters import Site, find_block

log = logging.getLogger(__name__)

PRE_MOE_NORMS = (
    "post_attention_layernorm",
    "pre_feedforward_layernorm",
    "ffn_norm",
    "norm_attn_norm.norm_2",
    "ff_layer_norm",
    "layer.2.layer_norm",
    "layer.1.layer_norm",
)
"""Submodules (of a decoder layer) tried, in order, as the norm in front of its MoE block."""

SHARED_EXPERT_KEYS = ("n_shared_experts", "num_shared_experts", "moe_num_shared_experts")
TOP_K_KEYS = ("num_experts_per_tok", "moe_top_k", "top_k", "moe_k", "num_selected_experts")


@dataclass
class Stack:
    """One list of transformer layers (a decoder-only model has one; seq2seq two)."""

    owner: nn.Module
    """The module whose forward runs the whole list (gets input_ids / attention_mask)."""
    owner_name: str
    layers: nn.ModuleList
    offset: int
    """Model layer id of this list's first layer."""
    role: str
    """``causal``, ``encoder`` or ``decoder``."""
    sites: list[int] = field(default_factory=list)
    """Positions (MoE-layer indexes) of the MoE blocks in this stack, in layer order."""


@dataclass
class ModelLayout:
    sites: list[Site]
    layer_ids: list[int]
    layer_modules: list[nn.Module]
    stacks: list[Stack]
    num_layers: int


def _layer_of(model: nn.Module, name: str) -> tuple[str, str, int]:
    """(list path, owner path, index) of the outermost ModuleList entry holding ``name``."""
    parts = name.split(".")
    for i in range(1, len(parts)):
        if not parts[i].isdigit():
            continue
        list_path = ".".join(parts[:i])
        if isinstance(model.get_submodule(list_path), nn.ModuleList):
            return list_path, ".".join(parts[: i - 1]), int(parts[i])
    raise ModelError(f"MoE block {name!r} is not inside a list of layers; cannot number it")


def _role(owner_name: str, model: nn.Module) -> str:
    if not getattr(getattr(model, "config", None), "is_encoder_decoder", False):
        return "causal"
    return "encoder" if "encoder" in owner_name.split(".") else "decoder"


def discover(model: nn.Module) -> ModelLayout:
    """Every MoE block of ``model`` with its adapter, numbered by model layer id."""
    found: dict[int, tuple[str, nn.Module, object]] = {}
    for name, module in model.named_modules():
        hit = find_block(name, module)
        if hit is not None and id(hit[0]) not in found:
            found[id(hit[0])] = (name, hit[0], hit[1])
    if not found:
        raise ModelError(
            f"{type(model).__name__} has no MoE layers moetrace understands "
            "(no experts module with forward(hidden_states, top_k_index, top_k_weights) "
            "and no registered adapter matched)"
        )
    lists: dict[str, Stack] = {}
    entries = []
    for name, block, adapter in found.values():
        list_path, owner_path, index = _layer_of(model, name)
        if list_path not in lists:
            owner = model.get_submodule(owner_path) if owner_path else model
            lists[list_path] = Stack(
                owner=owner,
                owner_name=owner_path,
                layers=model.get_submodule(list_path),
                offset=0,
                role=_role(owner_path, model),
            )
        entries.append((list_path, index, name, block, adapter))
    offset = 0
    for stack in lists.values():  # named_modules order: encoder before decoder
        stack.offset = offset
        offset += len(stack.layers)
    entries.sort(key=lambda e: lists[e[0]].offset + e[1])
    config = getattr(model, "config", None)
    sites: list[Site] = []
    layer_ids: list[int] = []
    layer_modules: list[nn.Module] = []
    for list_path, index, name, block, adapter in entries:
        stack = lists[list_path]
        num_experts = adapter.num_experts(block)
        top_k = adapter.top_k(block) or _config_int(config, TOP_K_KEYS)
        if top_k is None:
            raise ModelError(f"cannot tell the top-k of MoE block {name!r} from module or config")
        stack.sites.append(len(sites))
        sites.append(Site(name, block, adapter, num_experts, top_k))
        layer_ids.append(stack.offset + index)
        layer_modules.append(stack.layers[index])
    ks = {(s.num_experts, s.top_k) for s in sites}
    if len(ks) != 1:
        raise ModelError(f"MoE layers disagree on (num_experts, top_k): {sorted(ks)}")
    return ModelLayout(sites, layer_ids, layer_modules, list(lists.values()), offset)


def _config_int(config: object, keys: tuple[str, ...]) -> int | None:
    for cfg in (config, getattr(config, "ffn_config", None), getattr(config, "text_config", None)):
        for key in keys:
            value = getattr(cfg, key, None)
            if isinstance(value, int) and not isinstance(value, bool):
                return value
    return None


def pre_moe_norm(layer: nn.Module) -> nn.Module | None:
    """The norm a decoder layer applies in front of its MoE block (None if not found)."""
    for path in PRE_MOE_NORMS:
        try:
            return layer.get_submodule(path)
        except AttributeError:
            continue
    return None


def shared_experts(model: nn.Module, layout: ModelLayout) -> int:
    value = _config_int(getattr(model, "config", None), SHARED_EXPERT_KEYS)
    if value is not None:
        return value
    block = layout.sites[0].block
    for attr in ("shared_expert", "shared_experts", "shared_mlp"):
        if isinstance(getattr(block, attr, None), nn.Module):
            return 1
    return 0


def model_info(model: nn.Module, layout: ModelLayout, name: str | None = None) -> ModelInfo:
    """The manifest's model section, measured from ``model``."""
    config = getattr(model, "config", None)
    site = layout.sites[0]
    dtype = next((p.dtype for p in site.block.parameters()), torch.float32)
    arch = getattr(config, "model_type", None) or type(model).__name__
    fingerprint = config_fingerprint(config.to_dict()) if hasattr(config, "to_dict") else None
    label = name or getattr(config, "_name_or_path", None) or arch
    return ModelInfo(
        name=str(label),
        num_layers=layout.num_layers,
        moe_layers=tuple(layout.layer_ids),
        num_experts=site.num_experts,
        top_k=site.top_k,
        architecture=arch,
        config_fingerprint=fingerprint,
        bytes_per_expert=site.adapter.expert_bytes(site.block, site.num_experts),
        dtype=str(dtype).removeprefix("torch."),
        shared_experts=shared_experts(model, layout),
    )
