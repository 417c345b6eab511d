"""What the queue model schedules: requests (their passes, arrival times, probe signatures)
and the batched events a schedule turns them into.

A request's routing does not depend on the requests it runs with (MoE routers see one
token at a time), so a batched forward pass needs, at each MoE layer, the union of what
its requests' own passes need there: :func:`step_events` builds a step's events from the
per-request ones, whatever the schedule, for the simulator's one replay kernel.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import numpy as np

from moetrace.errors import ConfigError
from moetrace.tuner.policy.events import Events


@dataclass(frozen=True)
class Workload:
    """Requests in arrival order: their passes (consecutive ids), probe signatures, sizes."""

    request: np.ndarray  # int32 (n,) the events' request index of each request
    pass_ptr: np.ndarray  # int64 (n+1,): request i runs passes pass_ptr[i]..pass_ptr[i+1]-1
    pass_tokens: np.ndarray  # int64 (n_pass,) tokens per pass
    pass_accesses: np.ndarray  # int64 (n_pass,) expert accesses of each pass (all layers)
    signature: np.ndarray  # float64 (n, probe_layers * E), rows of unit length (or zero)

    @property
    def num_requests(self) -> int:
        return int(self.request.shape[0])

    def num_passes(self, i: int) -> int:
        return int(self.pass_ptr[i + 1] - self.pass_ptr[i])


def probe_signature(events: Events, first_pass: np.ndarray, probe_layers: int) -> np.ndarray:
    """What a scheduler may know of a waiting request: the experts its prompt's tokens pick
    at the first ``probe_layers`` MoE layers (token counts, unit length per request).

    Layer 0's router needs no expert weights (only the dense layers before it), so the
    runtime's probe of one layer loads nothing; deeper probes would."""
    L, E = events.num_layers, events.num_experts
    if not 1 <= probe_layers <= L:
        raise ConfigError(f"probe_layers must be in [1, {L}], got {probe_layers}")
    sig = np.zeros((len(first_pass), probe_layers * E))
    for layer in range(probe_layers):
        ev = events.pass_event[first_pass, layer]
        for i in np.flatnonzero(ev >= 0).tolist():
            lo, hi = events.ptr[ev[i]], events.ptr[ev[i] + 1]
            sig[i, layer * E + events.experts[lo:hi].astype(np.int64)] = events.counts[lo:hi]
    norm = np.linalg.norm(sig, axis=1, keepdims=True)
    return np.divide(sig, norm, out=np.zeros_like(sig), where=norm > 0)


def workload(events: Events, signature: Callable[[Events, np.ndarray], np.ndarray]) -> Workload:
    """The requests of ``events`` (built in arrival order, one pass per request step);
    ``signature(events, first pass of each request)`` is what the scheduler knows of them
    (:meth:`moetrace.tuner.sched.schedulers.Scheduler.signature`)."""
    first = np.ones(events.num_events, bool)
    first[1:] = events.pass_id[1:] != events.pass_id[:-1]
    pass_req = np.zeros(events.num_passes, np.int64)
    pass_req[events.pass_id[first]] = events.request[first]
    if np.any(np.diff(pass_req) < 0):
        raise ConfigError("the queue model needs events in arrival order (order='arrival')")
    reqs, start = np.unique(pass_req, return_index=True)
    ptr = np.append(start, events.num_passes).astype(np.int64)
    pass_tokens = np.zeros(events.num_passes, np.int64)
    np.maximum.at(pass_tokens, events.pass_id.astype(np.int64), events.tokens.astype(np.int64))
    sizes = np.diff(events.ptr)
    pass_acc = np.bincount(events.pass_id, weights=sizes, minlength=events.num_passes)
    return Workload(
        request=reqs.astype(np.int32),
        pass_ptr=ptr,
        pass_tokens=pass_tokens,
        pass_accesses=pass_acc.astype(np.int64),
        signature=signature(events, ptr[:-1]),
    )


def step_events(events: Events, passes: np.ndarray) -> Events:
    """The events of batched steps: row ``s`` of ``passes`` (steps x requests; -1 where a
    request has no pass in that step, or a 1-d array for one step) runs together. At each
    layer a step needs the union of its passes' experts (token counts summed); a step with
    a prefill pass counts as prefill, and it is owned by its first request (prefetchers
    keyed by request see the batch as that request). Events come step by step, layer by
    layer. The per-token arrays are kept (they only serve fitting)."""
    L = events.num_layers
    grid = np.atleast_2d(np.asarray(passes, np.int64))
    S = grid.shape[0]
    ev = np.where(grid[:, :, None] >= 0, events.pass_event[np.maximum(grid, 0)], -1)  # S,P,L
    ev = ev.transpose(0, 2, 1)  # step, layer, request
    ids = ev[ev >= 0]
    step = np.broadcast_to(np.arange(S)[:, None, None], ev.shape)[ev >= 0]
    key = step * L + events.layer[ids].astype(np.int64)
    keys = np.unique(key)
    ptr, experts, counts = _gather_union(events.ptr, events.experts, events.counts, ids, key,
                                         keys, events.num_experts)  # fmt: skip
    spec = {}
    if events.spec_ptr is not None and events.spec_experts is not None:
        sc = events.spec_counts
        if sc is None:
            sc = np.ones(len(events.spec_experts), np.int32)
        sp, se, sn = _gather_union(events.spec_ptr, events.spec_experts, sc, ids, key, keys,
                                   events.num_experts)  # fmt: skip
        spec = {"spec_ptr": sp, "spec_experts": se, "spec_counts": sn}
    at = np.searchsorted(keys, key)
    n = len(keys)
    tokens = np.bincount(at, weights=events.tokens[ids], minlength=n)
    phase = np.ones(n, np.int8)
    np.minimum.at(phase, at, events.phase[ids])
    request = np.full(n, np.iinfo(np.int32).max, np.int64)
    np.minimum.at(request, at, events.request[ids].astype(np.int64))
    pass_event = np.full((S, L), -1, np.int64)
    pass_event[keys // L, keys % L] = np.arange(n)
    return replace(
        events,
        layer=(keys % L).astype(np.int16),
        phase=phase,
        request=request.astype(np.int32),
        pass_id=(keys // L).astype(np.int32),
        tokens=tokens.astype(np.int32),
        ptr=ptr,
        experts=experts,
        counts=counts,
        pass_event=pass_event,
        **spec,
    )


def _gather_union(
    ptr: np.ndarray,
    values: np.ndarray,
    weights: np.ndarray,
    ids: np.ndarray,
    key: np.ndarray,
    keys: np.ndarray,
    E: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """CSR rows ``ids`` merged by ``key`` (sorted unique ``keys``): union, weights summed."""
    lo = ptr[ids]
    lens = ptr[ids + 1] - lo
    starts = np.cumsum(lens) - lens
    take = np.repeat(lo - starts, lens) + np.arange(int(lens.sum()))
    code = np.repeat(key, lens) * E + values[take].astype(np.int64)
    u, back = np.unique(code, return_inverse=True)
    w = np.bincount(back, weights=weights[take].astype(np.float64), minlength=len(u))
    new_ptr = np.searchsorted(u // E, keys, side="left").astype(np.int64)
    return np.append(new_ptr, len(u)), (u % E).astype(np.int16), w.astype(np.int32)
