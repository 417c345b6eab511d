"""What a forward call carries: its arguments by name, the attention mask of its positions.

Shared by the tracer's layer-stack hook and the offloading runtime's model hook, so both
read a forward pass (ids, mask) the same way.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

ArgReader = Callable[[tuple, dict, str], Any]
"""``read(args, kwargs, name)``: a forward argument by name, keyword or positional (None)."""


def argument_reader(module: nn.Module) -> ArgReader:
    """A reader of ``module.forward``'s arguments by name, for hooks ``with_kwargs``."""
    try:
        params = list(inspect.signature(module.forward).parameters)
    except (TypeError, ValueError):
        params = []
    pos = {n: i for i, n in enumerate(params)}

    def read(args: tuple, kwargs: dict, name: str) -> Any:
        if name in kwargs:
            return kwargs[name]
        i = pos.get(name)
        return args[i] if i is not None and i < len(args) else None

    return read


def forward_mask(mask: Any, seq: int) -> torch.Tensor | None:
    """The ``(B, seq)`` columns of a 2-D attention mask covering a forward pass's own
    positions (its last ``seq``), or None when there is no such mask (every position is
    real)."""
    if isinstance(mask, torch.Tensor) and mask.dim() == 2 and mask.shape[1] >= seq:
        return mask[:, -seq:]
    return None
