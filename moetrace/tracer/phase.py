"""Which phase a forward pass is: prefill (the cache is empty) or decode.

Transformers has renamed how the KV cache reaches a model's ``forward`` (``past_key_values``
up to 5.23, ``cache`` from 5.24, ``cache_position`` came and went), so nothing here
depends on one keyword name. :func:`cached_tokens` looks, in order, for

1. a cache object anywhere among the call's arguments (keyword or positional, whatever
   its name; anything with a callable ``get_seq_length``: every transformers ``Cache``,
   ``EncoderDecoderCache`` included), and asks it how many tokens it holds;
2. a ``cache_position`` tensor (older releases and remote-code models): its first entry;
3. a legacy tuple-of-tuples cache (``((k, v), ...)``): the key tensor's sequence length.

It returns ``None`` when the call carries no cache at all (``use_cache=False``): every
such forward pass recomputes the whole sequence, which is a prefill.

The tracer attributes phases per request from its own step counters (a request's first
forward pass with tokens is its prefill, see :mod:`moetrace.tracer.attribution`), which
needs no cache at all; the runtime, which knows no requests, asks the cache. Both agree on
``generate``: the first forward pass sees an empty cache.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

PREFILL, DECODE = 0, 1


def _cache_length(value: Any) -> int | None:
    get = getattr(value, "get_seq_length", None)
    if callable(get):
        try:
            return int(get())
        except (TypeError, ValueError, IndexError, AttributeError):
            return None
    return None


def _legacy_length(value: Any) -> int | None:
    if not isinstance(value, (tuple, list)) or not value:
        return None
    first = value[0]
    if isinstance(first, (tuple, list)) and first and hasattr(first[0], "shape"):
        shape = first[0].shape
        if len(shape) >= 3:
            return int(shape[-2])
    return None


def cached_tokens(args: Iterable[Any], kwargs: dict[str, Any]) -> int | None:
    """Tokens already in the KV cache of a forward call, or ``None`` without a cache."""
    values = [*kwargs.values(), *args]
    for v in values:
        n = _cache_length(v)
        if n is not None:
            return n
    pos = kwargs.get("cache_position")
    if pos is not None and hasattr(pos, "numel") and pos.numel():
        return int(pos.reshape(-1)[0])
    for key in ("past_key_values", "cache", "past_key_value"):
        n = _legacy_length(kwargs.get(key))
        if n is not None:
            return n
    return None


def forward_phase(args: Iterable[Any], kwargs: dict[str, Any]) -> int:
    """``PREFILL`` when the forward pass starts from an empty (or no) cache, else ``DECODE``."""
    seen = cached_tokens(args, kwargs)
    return PREFILL if not seen else DECODE
