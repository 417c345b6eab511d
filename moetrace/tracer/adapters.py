"""Routing adapters: how to see the experts a model's MoE block really used.

An adapter recognises one kind of MoE block and attaches removable hooks that hand the
block's top-k expert ids and gate weights, still on device, to a sink. Most transformers
MoE models share one experts interface, ``experts(hidden_states, top_k_index,
top_k_weights)`` (the classes wrapped by ``use_experts_implementation``, plus DBRX); a
forward pre-hook on that module sees exactly the experts used. Models that route
differently (Llama 4, JetMoE, Switch Transformers, NLLB-MoE) get a small adapter of their
own, registered by the class name of their MoE block. Register more with
:func:`register_adapter`.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

Sink = Callable[[torch.Tensor, torch.Tensor | None], None]
"""Receives ``(top_k_index (T, k), top_k_weights (T, k) or None)`` for one MoE layer."""

_INDEX_NAMES = ("top_k_index", "router_indices")
_WEIGHT_NAMES = ("top_k_weights", "routing_weights")


@dataclass(frozen=True)
class Site:
    """One MoE block found in a model: where to hook and how it routes."""

    name: str
    """Qualified name of the MoE block module."""
    block: nn.Module
    adapter: RoutingAdapter
    num_experts: int
    top_k: int


class RoutingAdapter:
    """Base class: recognise an MoE block, hook it, predict its routing for a hidden state."""

    name = "base"

    def find(self, name: str, module: nn.Module) -> nn.Module | None:
        """The MoE block ``module`` stands for (itself or its parent), or None."""
        raise NotImplementedError

    def attach(self, site: Site, sink: Sink) -> list[RemovableHandle]:
        raise NotImplementedError

    def num_experts(self, block: nn.Module) -> int:
        return int(block.experts.num_experts)

    def top_k(self, block: nn.Module) -> int | None:
        for owner in (block, getattr(block, "gate", None), getattr(block, "router", None)):
            for attr in ("top_k", "num_experts_per_tok"):
                value = getattr(owner, attr, None)
                if isinstance(value, int):
                    return value
        return None

    def expert_bytes(self, block: nn.Module, num_experts: int) -> int | None:
        """Bytes of one routed expert's weights, measured from the expert tensors."""
        params = list(block.experts.parameters())
        stacked = [p for p in params if p.dim() >= 1 and p.shape[0] == num_experts]
        # experts stored stacked (E, ...) or, like DBRX, flattened (E * rows, cols)
        total = sum(p.numel() * p.element_size() for p in (stacked or params))
        return total // num_experts or None

    def predict(self, site: Site, hidden: torch.Tensor) -> torch.Tensor:
        """Top-k expert ids this block's router picks for ``hidden`` (T, H)."""
        raise NotImplementedError


def _router(block: nn.Module) -> nn.Module:
    for attr in ("gate", "router"):
        r = getattr(block, attr, None)
        if isinstance(r, nn.Module):
            return r
    raise AttributeError(f"{type(block).__name__} has no gate/router submodule")


def _int_2d(values: object, rows: int) -> torch.Tensor | None:
    items = values if isinstance(values, (tuple, list)) else (values,)
    for item in reversed(items):
        if (
            isinstance(item, torch.Tensor)
            and not item.is_floating_point()
            and item.dim() == 2
            and item.shape[0] == rows
        ):
            return item
    return None


class ExpertsInterfaceAdapter(RoutingAdapter):
    """``experts(hidden_states, top_k_index, top_k_weights)``: mixtral, qwen*_moe, olmoe,
    deepseek_v2/v3, glm4_moe, gpt_oss, dbrx, ... (any module with that forward signature)."""

    name = "experts-interface"

    def __init__(self) -> None:
        self._sig_cache: dict[type, tuple[str, str] | None] = {}

    def _names(self, module: nn.Module) -> tuple[str, str] | None:
        """(index, weights) parameter names when ``module`` has the experts interface."""
        cls = type(module)
        if cls not in self._sig_cache:
            try:
                params = list(inspect.signature(cls.forward).parameters)
            except (TypeError, ValueError):
                params = []
            hit = (
                len(params) >= 4
                and params[1] == "hidden_states"
                and params[2] in _INDEX_NAMES
                and params[3] in _WEIGHT_NAMES
            )
            self._sig_cache[cls] = (params[2], params[3]) if hit else None
        return self._sig_cache[cls]

    def find(self, name: str, module: nn.Module) -> nn.Module | None:
        experts = getattr(module, "experts", None)
        if isinstance(experts, nn.Module) and self._names(experts) is not None:
            return module
        return None

    def attach(self, site: Site, sink: Sink) -> list[RemovableHandle]:
        names = self._names(site.block.experts)
        assert names is not None
        index_name, weight_name = names

        def hook(mod: nn.Module, args: tuple, kwargs: dict) -> None:
            idx = args[1] if len(args) > 1 else kwargs[index_name]
            w = args[2] if len(args) > 2 else kwargs.get(weight_name)
            sink(idx, w)

        return [site.block.experts.register_forward_pre_hook(hook, with_kwargs=True)]

    def predict(self, site: Site, hidden: torch.Tensor) -> torch.Tensor:
        block = site.block
        out = _router(block)(hidden)
        idx = _int_2d(out, hidden.shape[0])
        if idx is None:
            logits = out[0] if isinstance(out, (tuple, list)) else out
            route = getattr(block, "route_tokens_to_experts", None)
            idx = _int_2d(route(logits), hidden.shape[0]) if route is not None else None
            if idx is None:
                idx = logits.topk(site.top_k, dim=-1).indices
        return idx


class _NamedBlockAdapter(RoutingAdapter):
    """Adapters keyed by the MoE block's class name."""

    block_classes: tuple[str, ...] = ()

    def find(self, name: str, module: nn.Module) -> nn.Module | None:
        return module if type(module).__name__ in self.block_classes else None


class Llama4Adapter(_NamedBlockAdapter):
    """Llama 4: the router returns sigmoid scores over all experts (-inf outside top-k)."""

    name = "llama4"
    block_classes = ("Llama4TextMoe",)

    def num_experts(self, block: nn.Module) -> int:
        return int(block.num_experts)

    def attach(self, site: Site, sink: Sink) -> list[RemovableHandle]:
        k = site.top_k

        def hook(mod: nn.Module, args: tuple, out: tuple) -> None:
            top = out[1].topk(k, dim=1)  # the router's own top-k on its logits
            sink(top.indices, torch.sigmoid(top.values.float()))

        return [site.block.router.register_forward_hook(hook)]

    def predict(self, site: Site, hidden: torch.Tensor) -> torch.Tensor:
        return site.block.router(hidden)[1].topk(site.top_k, dim=1).indices


class JetMoeAdapter(_NamedBlockAdapter):
    """JetMoE's MLP experts (the mixture-of-attention heads are not offloadable experts)."""

    name = "jetmoe"
    block_classes = ("JetMoeMoE",)

    def num_experts(self, block: nn.Module) -> int:
        return int(block.router.num_experts)

    def expert_bytes(self, block: nn.Module, num_experts: int) -> int | None:
        total = 0
        for lin in (block.input_linear, block.output_linear):
            for p in lin.parameters():
                total += p.numel() // num_experts * p.element_size()
        return total or None

    def attach(self, site: Site, sink: Sink) -> list[RemovableHandle]:
        k = site.top_k

        def hook(mod: nn.Module, args: tuple, out: tuple) -> None:
            top = out[-1].topk(k, dim=1)  # same top-k as JetMoeTopKGating on its logits
            sink(top.indices, torch.softmax(top.values, dim=1))

        return [site.block.router.register_forward_hook(hook)]

    def predict(self, site: Site, hidden: torch.Tensor) -> torch.Tensor:
        return site.block.router.layer(hidden).topk(site.top_k, dim=1).indices


class _MaskRouterAdapter(_NamedBlockAdapter):
    """Capacity-limited routers that dispatch with one-hot masks (dropped token -> -1)."""

    def num_experts(self, block: nn.Module) -> int:
        return int(block.router.num_experts)

    def expert_bytes(self, block: nn.Module, num_experts: int) -> int | None:
        first = next(iter(block.experts.values()))
        return sum(p.numel() * p.element_size() for p in first.parameters()) or None


def _mask_to_ids(mask: torch.Tensor) -> torch.Tensor:
    """(T, E) one-hot (or all-zero = dropped) -> (T,) expert ids, -1 where dropped."""
    hit = mask.sum(-1) > 0
    return torch.where(hit, mask.argmax(-1), torch.full_like(hit, -1, dtype=torch.long))


class SwitchAdapter(_MaskRouterAdapter):
    """Switch Transformers: top-1 with expert capacity; reads the dispatch mask."""

    name = "switch_transformers"
    block_classes = ("SwitchTransformersSparseMLP",)

    def top_k(self, block: nn.Module) -> int | None:
        return 1

    def attach(self, site: Site, sink: Sink) -> list[RemovableHandle]:
        def hook(mod: nn.Module, args: tuple) -> None:
            mask, weights = args[1], args[2]  # (T, 1, E) capacity-masked one-hot, (T, 1)
            ids = _mask_to_ids(mask[:, 0, :])[:, None]
            sink(ids, weights.reshape(-1, 1))

        return [site.block.experts.register_forward_pre_hook(hook)]

    def predict(self, site: Site, hidden: torch.Tensor) -> torch.Tensor:
        router = site.block.router
        return router.classifier(hidden.to(router.dtype)).argmax(-1, keepdim=True)


class NllbMoeAdapter(_MaskRouterAdapter):
    """NLLB-MoE: top-2 with capacity; reads the router's capacity-masked dispatch."""

    name = "nllb_moe"
    block_classes = ("NllbMoeSparseMLP",)

    def top_k(self, block: nn.Module) -> int | None:
        return 2

    def attach(self, site: Site, sink: Sink) -> list[RemovableHandle]:
        def hook(mod: nn.Module, args: tuple, out: tuple) -> None:
            top1, gates = out[0], out[1]  # (T, E) masks after capacity, combine weights
            e0 = _mask_to_ids(top1)
            second = (gates > 0) & (top1 == 0)
            e1 = _mask_to_ids(second.to(top1.dtype))
            ids = torch.stack([e0, e1], dim=1)
            w = gates.float().gather(1, ids.clamp(min=0)) * (ids >= 0)
            sink(ids, w)

        return [site.block.router.register_forward_hook(hook)]

    def predict(self, site: Site, hidden: torch.Tensor) -> torch.Tensor:
        router = site.block.router
        return router.classifier(hidden.to(router.dtype)).topk(2, dim=-1).indices


_REGISTRY: list[RoutingAdapter] = [
    Llama4Adapter(),
    JetMoeAdapter(),
    SwitchAdapter(),
    NllbMoeAdapter(),
    ExpertsInterfaceAdapter(),
]


def register_adapter(adapter: RoutingAdapter) -> None:
    """Add an adapter; it is tried before the built-in ones."""
    _REGISTRY.insert(0, adapter)


def adapters() -> tuple[RoutingAdapter, ...]:
    return tuple(_REGISTRY)


def find_block(name: str, module: nn.Module) -> tuple[nn.Module, RoutingAdapter] | None:
    """The MoE block ``module`` is, with its adapter, or None."""
    for adapter in _REGISTRY:
        block = adapter.find(name, module)
        if block is not None:
            return block, adapter
    return None
