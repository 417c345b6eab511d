"""Per-MoE-layer access streams: the cache's view of a trace.

Definition used by every cache figure in moetrace analyze ("token-set accesses"): each
MoE layer has its own cache of C experts; the layer's rows are replayed in
:class:`~moetrace.store.arrays.Routing` order (requests in arrival order, each request's
tokens in order); the k experts a token selects are needed *together*: each is a hit if
it is cached before the token, the missing ones are loaded on demand, and a loaded expert
never evicts another expert of the same token (victims are chosen among the cached
experts the token does not use). Dropped slots (-1) are no access. This is the definition
of the reference figures in ../shared/traces/README.md (docs/analyze.md shows the match).
For C < k (LRU curve only) the cache keeps the C top-ranked experts of the last token.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from moetrace.store.arrays import Routing


@dataclass(frozen=True)
class LayerStream:
    """The accesses of one MoE layer, in replay order."""

    layer: int
    """MoE-layer index 0..L-1."""
    experts: np.ndarray
    """int16 expert id of each access."""
    row: np.ndarray
    """int64 token ordinal (row of this layer's stream) of each access."""
    rows: np.ndarray
    """int64 indices into the Routing of this layer's rows, in order."""

    @property
    def num_accesses(self) -> int:
        return int(self.experts.shape[0])

    @property
    def num_tokens(self) -> int:
        return int(self.rows.shape[0])


def layer_rows(routing: Routing) -> list[np.ndarray]:
    """For each MoE layer index, the Routing row indices of that layer, in order."""
    order = np.argsort(routing.layer, kind="stable")
    bounds = np.searchsorted(routing.layer[order], np.arange(routing.num_layers + 1))
    return [order[bounds[i] : bounds[i + 1]] for i in range(routing.num_layers)]


def layer_stream(routing: Routing, layer: int, rows: np.ndarray | None = None) -> LayerStream:
    """The access stream of one MoE layer index."""
    if rows is None:
        rows = np.flatnonzero(routing.layer == layer)
    ex = routing.experts[rows]
    flat = ex.reshape(-1)
    pos = np.repeat(np.arange(ex.shape[0], dtype=np.int64), ex.shape[1])
    keep = flat >= 0
    return LayerStream(
        layer=layer,
        experts=np.ascontiguousarray(flat[keep]),
        row=np.ascontiguousarray(pos[keep]),
        rows=rows.astype(np.int64, copy=False),
    )


def layer_streams(routing: Routing) -> Iterator[LayerStream]:
    """One stream per MoE layer index, built lazily (memory: one layer at a time)."""
    for layer, rows in enumerate(layer_rows(routing)):
        yield layer_stream(routing, layer, rows)


def token_starts(routing: Routing) -> np.ndarray:
    """Boolean per row: the row starts a new token (request, step, token) in replay order."""
    new = np.ones(routing.num_rows, bool)
    if routing.num_rows > 1:
        new[1:] = (
            (routing.request[1:] != routing.request[:-1])
            | (routing.step[1:] != routing.step[:-1])
            | (routing.token[1:] != routing.token[:-1])
        )
    return new


def first_tokens(routing: Routing, max_tokens: int) -> Routing:
    """The rows of the first ``max_tokens`` tokens in replay order (all layers of each)."""
    index = np.cumsum(token_starts(routing)) - 1
    if index.size == 0 or index[-1] < max_tokens:
        return routing
    return compact_requests(routing.select(index < max_tokens))


def compact_requests(routing: Routing) -> Routing:
    """Renumber requests so that only those with rows remain (arrival order kept)."""
    present = np.unique(routing.request)
    if present.size == len(routing.request_ids):
        return routing
    remap = np.full(len(routing.request_ids), -1, np.int32)
    remap[present] = np.arange(present.size, dtype=np.int32)
    return dataclasses.replace(
        routing,
        request_ids=tuple(routing.request_ids[i] for i in present),
        request=remap[routing.request],
    )
