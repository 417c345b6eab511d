"""moetrace.tracer: record per-request, per-token, per-MoE-layer expert routing.

Public API: :class:`RoutingRecorder` (a context manager around any transformers MoE
model), :func:`record` (prompts file in, trace out), :func:`load_prompts`, and the adapter
registry (:class:`RoutingAdapter`, :func:`register_adapter`) for new architectures.
"""

from moetrace.tracer.adapters import RoutingAdapter, register_adapter
from moetrace.tracer.prompts import Prompt, load_prompts
from moetrace.tracer.record import RecordConfig, RecordResult, load_model, record
from moetrace.tracer.recorder import RoutingRecorder, manifest_for

__all__ = [
    "Prompt",
    "RecordConfig",
    "RecordResult",
    "RoutingAdapter",
    "RoutingRecorder",
    "load_model",
    "load_prompts",
    "manifest_for",
    "record",
    "register_adapter",
]
