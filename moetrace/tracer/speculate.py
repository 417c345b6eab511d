"""Speculative routing: the experts the next MoE layer's router picks from a layer's output.

One definition for the tracer's speculative columns (``s0..``, docs/tracer.md) and the
offloading runtime's ``speculative`` prefetch, so what the simulator replays from a trace
is what the runtime fetches. At MoE layer ``l`` (except the last of its layer stack)::

    s = top_k( router_l'( norm_l'( h_l ) ) )

``h_l`` is the output of the decoder layer holding ``l``, ``norm_l'`` the norm the next MoE
layer ``l'`` applies in front of its MoE block (:func:`~moetrace.tracer.discover.pre_moe_norm`)
and ``router_l'`` its router, run by the block's routing adapter as the model runs it
(group limits, correction bias...).
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from moetrace.tracer.adapters import Site
from moetrace.tracer.discover import ModelLayout, pre_moe_norm

log = logging.getLogger(__name__)

_state = threading.local()

Emit = Callable[[int, Callable[[], torch.Tensor]], None]
"""``emit(pos, predict)`` after MoE layer ``pos``'s decoder layer ran; ``predict()``
returns the next MoE layer's pick ``(tokens, top_k)`` (computed only when called)."""


def speculating() -> bool:
    """True while a speculative prediction runs on this thread: the router calls it makes
    are not routing, and hooks must not record them."""
    return getattr(_state, "depth", 0) > 0


@contextlib.contextmanager
def _predicting() -> Iterator[None]:
    _state.depth = getattr(_state, "depth", 0) + 1
    try:
        yield
    finally:
        _state.depth -= 1


class NextLayerGate:
    """Predicts MoE layer ``site``'s top-k from the output of the decoder layer before it
    (``layer`` is the decoder layer holding ``site``; its pre-MoE norm is applied)."""

    def __init__(self, site: Site, layer: nn.Module) -> None:
        self.site = site
        self.norm = pre_moe_norm(layer)
        if self.norm is None:
            log.warning(
                "no pre-MoE norm found in %s; speculating on the raw hidden state", site.name
            )

    def __call__(self, output: Any) -> torch.Tensor:
        """``(tokens, top_k)`` expert ids from a decoder layer's output (batch-major rows)."""
        hidden = output[0] if isinstance(output, (tuple, list)) else output
        with _predicting(), torch.no_grad():
            h = hidden.reshape(-1, hidden.shape[-1])
            normed = self.norm(h) if self.norm is not None else h
            return self.site.adapter.predict(self.site, normed)


def attach_speculation(layout: ModelLayout, emit: Emit) -> list[RemovableHandle]:
    """Removable forward hooks: after the decoder layer of each MoE layer that has a next
    one in its stack, ``emit(pos, predict)`` (``pos`` indexes ``layout.sites``)."""
    handles: list[RemovableHandle] = []
    for stack in layout.stacks:
        for pos, nxt in zip(stack.sites, stack.sites[1:], strict=False):
            gate = NextLayerGate(layout.sites[nxt], layout.layer_modules[nxt])
            hook = _hook(pos, gate, emit)
            handles.append(layout.layer_modules[pos].register_forward_hook(hook))
    return handles


def _hook(pos: int, gate: NextLayerGate, emit: Emit) -> Callable[[nn.Module, tuple, Any], None]:
    def hook(mod: nn.Module, args: tuple, out: Any) -> None:
        if not speculating():
            emit(pos, lambda: gate(out))

    return hook
