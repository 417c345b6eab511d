"""The runtime's plug into transformers: an experts implementation that reads cache slots.

transformers dispatches every experts module decorated with ``use_experts_implementation``
through ``ExpertsInterface`` on ``config._experts_implementation``. The runtime registers
one more implementation, :data:`OFFLOAD_IMPLEMENTATION`; each experts module it manages
gets a removable per-instance handler (``module._moetrace_offload``) that makes the needed
experts resident and then calls the model's own implementation (``eager``, ``batched_mm``
or ``grouped_mm``) on a proxy whose expert tensors hold only those experts, in ascending
expert order, so the arithmetic is the same as without offloading.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from moetrace.errors import RuntimeEngineError

log = logging.getLogger(__name__)

OFFLOAD_IMPLEMENTATION = "moetrace_offload"
HANDLER_ATTR = "_moetrace_offload"
INNER_IMPLEMENTATIONS = ("eager", "batched_mm", "grouped_mm")

Handler = Callable[[nn.Module, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class ExpertParam:
    """One per-expert tensor of an experts module (``name`` is the attribute)."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n * torch.empty((), dtype=self.dtype).element_size()


@dataclass(frozen=True)
class MoELayerRef:
    """One MoE layer of a model as the runtime sees it."""

    index: int
    """Position among the MoE layers (0..L-1)."""
    layer_id: int
    """The decoder layer id (as in traces and plans)."""
    name: str
    experts: nn.Module
    router: nn.Module | None
    num_experts: int
    top_k: int
    params: tuple[ExpertParam, ...]

    @property
    def bytes_per_expert(self) -> int:
        return sum(p.nbytes for p in self.params)


def _is_interface_experts(module: nn.Module) -> bool:
    fwd = getattr(type(module), "forward", None)
    return (
        hasattr(module, "has_gate")
        and hasattr(module, "num_experts")
        and hasattr(fwd, "__wrapped__")
    )


def _layer_id(name: str) -> int:
    nums = re.findall(r"\.(\d+)\.", f".{name}.")
    if not nums:
        raise RuntimeEngineError(f"cannot tell the decoder layer of experts module {name!r}")
    return int(nums[-1])


def _router_of(model: nn.Module, name: str, num_experts: int) -> nn.Module | None:
    parent = model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else model
    for attr in ("gate", "router"):
        r = getattr(parent, attr, None)
        w = getattr(r, "weight", None)
        if isinstance(r, nn.Module) and isinstance(w, torch.Tensor) and w.shape[0] == num_experts:
            return r
    return None


def _top_k(router: nn.Module | None, model: nn.Module) -> int:
    for owner in (router, getattr(model, "config", None)):
        for attr in ("top_k", "num_experts_per_tok", "moe_topk"):
            value = getattr(owner, attr, None)
            if isinstance(value, int) and not isinstance(value, bool) and value > 0:
                return value
    raise RuntimeEngineError(
        f"cannot read top-k from the router or config of {type(model).__name__}"
    )


def expert_params(module: nn.Module, num_experts: int) -> tuple[ExpertParam, ...]:
    """The module's per-expert tensors (first dimension = ``num_experts``)."""
    out = []
    for pname, p in module.named_parameters(recurse=False):
        if p.dim() >= 1 and p.shape[0] == num_experts:
            out.append(ExpertParam(pname, tuple(p.shape[1:]), p.dtype))
    return tuple(out)


def find_moe_layers(model: nn.Module) -> list[MoELayerRef]:
    """The MoE layers of ``model`` that use transformers' experts interface.

    Raises RuntimeEngineError when there are none (architecture not supported yet).
    """
    found: list[tuple[int, str, nn.Module]] = []
    for name, module in model.named_modules():
        if _is_interface_experts(module):
            found.append((_layer_id(name), name, module))
    if not found:
        arch = getattr(getattr(model, "config", None), "model_type", type(model).__name__)
        raise RuntimeEngineError(
            f"architecture {arch!r} ({type(model).__name__}) has no experts module using "
            "transformers' experts interface; the offloading runtime does not support it yet"
        )
    found.sort(key=lambda t: t[0])
    ids = [t[0] for t in found]
    if len(set(ids)) != len(ids):
        raise RuntimeEngineError(f"several experts modules share a decoder layer id: {ids}")
    refs = []
    for index, (layer_id, name, module) in enumerate(found):
        num_experts = int(module.num_experts)
        router = _router_of(model, name, num_experts)
        params = getattr(module, "_moetrace_params", None) or expert_params(module, num_experts)
        if not params:
            raise RuntimeEngineError(f"experts module {name!r} has no per-expert tensors")
        refs.append(
            MoELayerRef(
                index=index,
                layer_id=layer_id,
                name=name,
                experts=module,
                router=router,
                num_experts=num_experts,
                top_k=_top_k(router, model),
                params=params,
            )
        )
    shapes = {r.params for r in refs}
    if len(shapes) != 1:
        raise RuntimeEngineError(
            "MoE layers have experts of different shapes; the runtime's slot pool needs one "
            f"shape (got {len(shapes)} kinds)"
        )
    return refs


class SlotRows:
    """Slot rows in a given order, indexed like an experts tensor, without a copy.

    ``rows[i]`` is the slot storage's row ``slots[i]`` (a view). The ``eager``
    implementations index their expert tensors one expert at a time, so the proxy can hand
    them this instead of a gathered copy and keep their ascending-expert order (and so
    their arithmetic) unchanged. Any other use gathers the rows (a copy) and says so."""

    def __init__(self, storage: torch.Tensor, slots: list[int]):
        self.storage = storage
        self.slots = slots
        self.shape = torch.Size((len(slots), *storage.shape[1:]))
        self.dtype = storage.dtype
        self.device = storage.device

    def __getitem__(self, idx: Any) -> torch.Tensor:
        if isinstance(idx, int) or (isinstance(idx, torch.Tensor) and idx.dim() == 0):
            return self.storage[self.slots[int(idx)]]
        return self.gathered()[idx]

    def __len__(self) -> int:
        return len(self.slots)

    def gathered(self) -> torch.Tensor:
        log.warning("an experts implementation used its expert tensors whole; gathering a copy")
        return self.storage[torch.tensor(self.slots, device=self.device)]

    def __getattr__(self, name: str) -> Any:
        return getattr(self.gathered(), name)


class ExpertsProxy:
    """Stands in for an experts module: its expert tensors replaced by slot storage."""

    def __init__(
        self, module: nn.Module, tensors: dict[str, torch.Tensor | SlotRows], num_experts: int
    ):
        self.__dict__.update(tensors)
        self.__dict__["_module"] = module
        self.__dict__["num_experts"] = num_experts

    def __getattr__(self, name: str) -> Any:
        """The module's attribute, kept for the next lookup (a module's flags, config and
        activation do not change while it is offloaded)."""
        value = getattr(self.__dict__["_module"], name)
        self.__dict__[name] = value
        return value


def inner_forward(module: nn.Module, implementation: str) -> Callable[..., torch.Tensor]:
    """The experts forward ``implementation`` names for this module's class."""
    if implementation == "eager":
        return type(module).forward.__wrapped__  # type: ignore[attr-defined]
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

    if implementation not in ALL_EXPERTS_FUNCTIONS or implementation == OFFLOAD_IMPLEMENTATION:
        raise RuntimeEngineError(
            f"experts implementation {implementation!r} cannot run under the runtime; "
            f"use one of {INNER_IMPLEMENTATIONS}"
        )
    return ALL_EXPERTS_FUNCTIONS[implementation]


def _offload_forward(
    self: nn.Module,
    hidden_states: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
) -> torch.Tensor:
    handler = self.__dict__.get(HANDLER_ATTR)
    if handler is None:
        raise RuntimeEngineError(
            f"{type(self).__name__} is set to the {OFFLOAD_IMPLEMENTATION!r} experts "
            "implementation but no offloading engine is attached to it"
        )
    return handler(self, hidden_states, top_k_index, top_k_weights)


def register_implementation() -> None:
    """Register :data:`OFFLOAD_IMPLEMENTATION` in transformers' ExpertsInterface (idempotent)."""
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS, ExpertsInterface

    if OFFLOAD_IMPLEMENTATION not in ALL_EXPERTS_FUNCTIONS:
        ExpertsInterface.register(OFFLOAD_IMPLEMENTATION, _offload_forward)


def current_implementation(model: nn.Module) -> str:
    impl = getattr(getattr(model, "config", None), "_experts_implementation", None)
    return str(impl) if impl else "eager"


def set_implementation(model: nn.Module, implementation: str) -> None:
    setter = getattr(model, "set_experts_implementation", None)
    if setter is None:
        raise RuntimeEngineError(
            f"{type(model).__name__} cannot switch experts implementation (not a transformers model?)"
        )
    setter(implementation)
