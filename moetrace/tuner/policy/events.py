"""Replay events: per forward pass and MoE layer, the union of experts its tokens need.

Built from a routing (``moetrace.store.arrays.Routing`` or anything with the same
arrays) with numpy only, so the runtime can use the same structure without DuckDB.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from moetrace.errors import AnalysisError

GRANULARITIES = ("pass", "token")
"""``pass``: a forward pass (a prefill, a decode step, a batch) needs the union of its
tokens' experts at a layer; ``token``: every token is replayed as its own pass."""


@dataclass(frozen=True)
class Events:
    """Events in replay order: pass by pass, layer by layer; expert unions as CSR."""

    num_layers: int
    num_experts: int
    top_k: int
    layer: np.ndarray  # int16 (n,)
    phase: np.ndarray  # int8 (n,) 0 prefill, 1 decode
    request: np.ndarray  # int32 (n,) request index of the pass's first row
    pass_id: np.ndarray  # int32 (n,)
    tokens: np.ndarray  # int32 (n,) tokens in the pass at this layer
    ptr: np.ndarray  # int64 (n+1,)
    experts: np.ndarray  # int16 (m,) union of experts, sorted per event
    counts: np.ndarray  # int32 (m,) tokens of the event choosing each expert
    pass_event: np.ndarray  # int64 (n_pass, L) event index or -1
    tokens_by_phase: np.ndarray  # int64 (2,)
    token_experts: np.ndarray  # int16 (n_tok, L, k) per token: experts at each layer (-1)
    token_phase: np.ndarray  # int8 (n_tok,)
    token_request: np.ndarray  # int32 (n_tok,)
    spec_ptr: np.ndarray | None = None  # speculative next-layer experts, CSR per event
    spec_experts: np.ndarray | None = None
    spec_counts: np.ndarray | None = None  # int32: tokens of the event predicting each

    @property
    def num_events(self) -> int:
        return int(self.layer.shape[0])

    @property
    def num_accesses(self) -> int:
        return int(self.experts.shape[0])

    @property
    def num_passes(self) -> int:
        return int(self.pass_event.shape[0])

    @property
    def num_tokens(self) -> int:
        return int(self.tokens_by_phase.sum())


def _union_csr(evkey: np.ndarray, values: np.ndarray, uniq_ev: np.ndarray, num_experts: int):
    k = values.shape[1]
    keys = np.repeat(evkey, k)
    flat = values.reshape(-1).astype(np.int64)
    ok = flat >= 0
    code = keys[ok] * num_experts + flat[ok]
    u, c = np.unique(code, return_counts=True)
    ev_of = u // num_experts
    ptr = np.searchsorted(ev_of, uniq_ev, side="left").astype(np.int64)
    ptr = np.append(ptr, len(u)).astype(np.int64)
    return ptr, (u % num_experts).astype(np.int16), c.astype(np.int32)


def build_events(routing: Any, *, order: str = "arrival", granularity: str = "pass") -> Events:
    """Group routing rows (already in replay order) into events.

    ``order`` must be the order the routing was loaded in: ``arrival`` cuts passes at each
    (request, step), ``forward`` at each global forward index (batches interleave).
    """
    if order not in ("arrival", "forward"):
        raise AnalysisError(f"order must be 'arrival' or 'forward', got {order!r}")
    if granularity not in GRANULARITIES:
        raise AnalysisError(f"granularity must be one of {GRANULARITIES}, got {granularity!r}")
    n = int(routing.request.shape[0])
    if n == 0:
        raise AnalysisError("no routing rows to replay (empty trace, phase or request set)")
    L = len(routing.moe_layers)
    E = int(routing.num_experts)
    k = int(routing.top_k)
    req = routing.request.astype(np.int64)
    step = routing.step.astype(np.int64)
    tok = routing.token.astype(np.int64)
    fwd = routing.forward.astype(np.int64)
    layer = routing.layer.astype(np.int64)

    def changed(a: np.ndarray) -> np.ndarray:
        out = np.ones(n, dtype=bool)
        out[1:] = a[1:] != a[:-1]
        return out

    tok_new = changed(req) | changed(step) | changed(tok)
    if order == "arrival":
        new = changed(req) | changed(step)
    else:
        new = changed(fwd)
    if granularity == "token":
        new = new | tok_new
    pass_id = np.cumsum(new) - 1
    n_pass = int(pass_id[-1]) + 1
    evkey = pass_id * L + layer
    uniq_ev, first, rows = np.unique(evkey, return_index=True, return_counts=True)
    ptr, experts, counts = _union_csr(evkey, routing.experts, uniq_ev, E)
    ev_pass = uniq_ev // L
    ev_layer = uniq_ev % L
    pass_event = np.full((n_pass, L), -1, dtype=np.int64)
    pass_event[ev_pass, ev_layer] = np.arange(len(uniq_ev))
    ev_phase = routing.phase[first].astype(np.int8)
    pass_tokens = np.zeros(n_pass, dtype=np.int64)
    np.maximum.at(pass_tokens, ev_pass, rows)
    pass_phase = np.zeros(n_pass, dtype=np.int8)
    pass_phase[ev_pass] = ev_phase
    tokens_by_phase = np.bincount(pass_phase, weights=pass_tokens, minlength=2).astype(np.int64)

    tok_id = np.cumsum(tok_new) - 1
    n_tok = int(tok_id[-1]) + 1
    token_experts = np.full((n_tok, L, k), -1, dtype=np.int16)
    token_experts[tok_id, layer] = routing.experts
    tok_first = np.flatnonzero(tok_new)
    spec_ptr = spec_experts = spec_counts = None
    if getattr(routing, "speculative", None) is not None:
        spec_ptr, spec_experts, spec_counts = _union_csr(evkey, routing.speculative, uniq_ev, E)
    return Events(
        num_layers=L,
        num_experts=E,
        top_k=k,
        layer=ev_layer.astype(np.int16),
        phase=ev_phase,
        request=routing.request[first].astype(np.int32),
        pass_id=ev_pass.astype(np.int32),
        tokens=rows.astype(np.int32),
        ptr=ptr,
        experts=experts,
        counts=counts,
        pass_event=pass_event,
        tokens_by_phase=tokens_by_phase,
        token_experts=token_experts,
        token_phase=routing.phase[tok_first].astype(np.int8),
        token_request=routing.request[tok_first].astype(np.int32),
        spec_ptr=spec_ptr,
        spec_experts=spec_experts,
        spec_counts=spec_counts,
    )


def expert_frequency(events: Events) -> np.ndarray:
    """(2, L, E) fraction of passes of each phase in which each expert is needed."""
    L, E = events.num_layers, events.num_experts
    ev_of = np.repeat(np.arange(events.num_events), np.diff(events.ptr))
    ph = events.phase[ev_of].astype(np.int64)
    code = (ph * L + events.layer[ev_of].astype(np.int64)) * E + events.experts
    counts = np.bincount(code, minlength=2 * L * E).reshape(2, L, E).astype(np.float64)
    passes = np.zeros(2, dtype=np.float64)
    first_layer_ev = np.diff(np.append(-1, events.pass_id)) != 0
    np.add.at(passes, events.phase[first_layer_ev].astype(np.int64), 1.0)
    return counts / np.maximum(passes, 1.0)[:, None, None]
