"""Analysis as independent tasks, one per (MoE layer, shard of requests), merged exactly.

Every cache figure of ``analyze`` is per layer (each layer has its own cache), and a
layer's stream splits into shards: runs of consecutive requests in replay order (groups
of a trace's committed parts when the parts are in arrival order, the trace otherwise).
A task reads one layer of one shard and returns a :class:`ShardPart` of mergeable
aggregates: per-phase expert counts, co-activation counts, the reuse partial
(:mod:`moetrace.tuner.mining.partial`, exact LRU stack distances and token distances
across shard boundaries), the same per phase, each forward pass's expert set (a pass
split between shards is united at the merge), and the shard's compact access stream.
:func:`merge_layer` merges a layer's shards in order into a :class:`LayerPart`: sums,
OR-ed pass sets and the partials' monoid merge are exact, and Belady/LFU rates, which
need the whole stream (the future), run on the concatenated stream. Transition scores
need two whole adjacent layers and run as their own task (:func:`pair_task`).

A task reads its rows through a *source*: :class:`TraceSource` (trace locations, read by
the task itself: a Ray worker on another machine reads from shared or object storage)
or :class:`RoutingSource` (routing already in memory, e.g. cut at ``max_tokens``).
Nothing is approximated by the split (tests compare shards, a pool and Ray against the
whole routing in memory, and many traces against one).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from moetrace.store import schema as S
from moetrace.store.arrays import Routing, load_routing
from moetrace.store.reader import Trace, open_trace
from moetrace.store.traceset import concat_routing, shard_parts
from moetrace.tuner.mining import frequency as F
from moetrace.tuner.mining import groups as G
from moetrace.tuner.mining import transitions as T
from moetrace.tuner.mining.curves import LayerReuse, policy_reuse
from moetrace.tuner.mining.mrc import lru_hit_curve
from moetrace.tuner.mining.partial import StreamPartial, merge_all, stream_partial
from moetrace.tuner.mining.replacement import TokenStream
from moetrace.tuner.mining.streams import layer_stream

SHARD_ROWS = 4_000_000
"""Rows (all layers) a shard holds at least before the next part starts a new one."""


def select_layers(routing: Routing, layers: Sequence[int]) -> Routing:
    """The rows of the given MoE-layer indices, renumbered 0..n-1 in the given order (as
    :func:`~moetrace.store.arrays.load_routing` with ``layers`` returns them)."""
    remap = np.full(routing.num_layers, -1, np.int16)
    remap[list(layers)] = np.arange(len(layers), dtype=np.int16)
    sub = routing.select(remap[routing.layer] >= 0)
    return dataclasses.replace(
        sub, moe_layers=tuple(routing.moe_layers[i] for i in layers), layer=remap[sub.layer]
    )


@dataclass(frozen=True)
class TraceSource:
    """Routing read from trace locations by the task.

    ``requests``: per trace, the ids with rows in the phase (the driver lists them once;
    they number requests for the whole-layer tasks); ``shards``: (trace position, part
    indices) of each shard, in replay order."""

    paths: tuple[str, ...]
    phase: str | None
    requests: tuple[tuple[str, ...], ...]
    shards: tuple[tuple[int, tuple[int, ...]], ...]

    def layers(self, layers: Sequence[int]) -> Routing:
        """Whole layers of every trace (all shards), requests numbered across traces."""
        parts = [
            load_routing(
                open_trace(p, validate=False),  # the driver validated every part
                phase=self.phase,
                requests=list(ids),
                layers=layers,
            )
            for p, ids in zip(self.paths, self.requests, strict=True)
        ]
        return concat_routing(parts)

    def shard(self, layer: int, shard: int) -> tuple[int, Routing]:
        """(trace position, routing of one layer of one shard)."""
        index, keep = self.shards[shard]
        trace = open_trace(self.paths[index], validate=False).with_parts(keep)
        return index, load_routing(trace, phase=self.phase, layers=[layer])


@dataclass(frozen=True)
class RoutingSource:
    """Routing held in memory; shards are ranges of its request indices."""

    routing: Routing
    bounds: tuple[int, ...] = ()
    """Request index where each shard after the first starts."""

    @property
    def shards(self) -> tuple[int, ...]:
        return (0, *self.bounds)

    def layers(self, layers: Sequence[int]) -> Routing:
        return select_layers(self.routing, layers)

    def shard(self, layer: int, shard: int) -> tuple[int, Routing]:
        edges = (*self.shards, len(self.routing.request_ids))
        r = self.routing
        keep = (r.layer == layer) & (r.request >= edges[shard]) & (r.request < edges[shard + 1])
        return 0, select_layers(r.select(keep), [layer])


Source = TraceSource | RoutingSource


def trace_source(
    traces: Sequence[Trace],
    phase: str | None,
    requests: Sequence[tuple[str, ...]],
    shard_rows: int = SHARD_ROWS,
) -> TraceSource:
    """A :class:`TraceSource` over opened traces, shards of about ``shard_rows`` rows."""
    shards = [(i, keep) for i, t in enumerate(traces) for keep in shard_parts(t, shard_rows)]
    paths = tuple(str(t.path) for t in traces)
    return TraceSource(paths, phase, tuple(requests), tuple(shards))


def routing_source(routing: Routing, shard_rows: int = SHARD_ROWS) -> RoutingSource:
    """A :class:`RoutingSource` cut at request boundaries every ``shard_rows`` rows."""
    per_request = np.bincount(routing.request, minlength=len(routing.request_ids))
    cum = np.cumsum(per_request)
    bounds = []
    next_cut = shard_rows
    for i in range(1, len(per_request)):
        if cum[i - 1] >= next_cut:
            bounds.append(i)
            next_cut = cum[i - 1] + shard_rows
    return RoutingSource(routing, tuple(bounds))


@dataclass(frozen=True)
class LayerTask:
    """What the tasks compute (every field picklable, the same on every executor)."""

    sizes: tuple[int, ...]
    groups: bool
    phase_curves: bool
    transition_test_fraction: float = 0.2
    seed: int = 0


@dataclass(frozen=True)
class ShardPart:
    """One layer of one shard: mergeable aggregates (see the module docstring)."""

    layer: int
    shard: int
    rows: int
    freq: dict[str, np.ndarray]
    pairs: np.ndarray | None
    partial: StreamPartial
    phase_partials: dict[str, StreamPartial]
    pass_keys: np.ndarray
    """int64: (trace, phase, forward) of each forward pass that used this layer."""
    pass_masks: np.ndarray
    """uint64 (passes, ceil(E/64)): the experts each of those passes used here."""
    experts: np.ndarray
    row: np.ndarray


def _pass_sets(trace: int, r: Routing, num_experts: int) -> tuple[np.ndarray, np.ndarray]:
    """Each forward pass's expert set in ``r`` as bit masks (keys: trace, phase, forward)."""
    words = max(1, math.ceil(num_experts / 64))
    key = (np.int64(trace) << 42) | (r.phase.astype(np.int64) << 41) | r.forward.astype(np.int64)
    keys, inv = np.unique(key, return_inverse=True)
    masks = np.zeros((keys.size, words), np.uint64)
    ex = r.experts.astype(np.int64)
    owner = np.repeat(inv, ex.shape[1])
    flat = ex.reshape(-1)
    keep = flat >= 0
    bits = np.left_shift(np.uint64(1), (flat[keep] % 64).astype(np.uint64))
    np.bitwise_or.at(masks, (owner[keep], flat[keep] // 64), bits)
    return keys, masks


def shard_part(source: Source, layer: int, shard: int, task: LayerTask) -> ShardPart:
    """Everything ``analyze`` needs from one layer of one shard."""
    trace, r = source.shard(layer, shard)
    E = r.num_experts
    st = layer_stream(r, 0)
    freq: dict[str, np.ndarray] = {}
    phase_partials: dict[str, StreamPartial] = {}
    for p in S.PHASES:
        sel = r.phase == S.PHASE_CODE[p]
        freq[p] = F.frequency_from_routing(r.layer[sel], r.experts[sel], 1, E)[0]
        if task.phase_curves:
            rows = np.flatnonzero(sel)
            ps = layer_stream(r, 0, rows)
            phase_partials[p] = stream_partial(ps.experts, ps.row, E, tokens=rows.size)
    pairs = None
    if task.groups and r.top_k >= 2:
        pairs = G.pair_counts_from_routing(r.layer, r.experts, 1, E)[0]
    keys, masks = _pass_sets(trace, r, E)
    return ShardPart(
        layer=layer,
        shard=shard,
        rows=r.num_rows,
        freq=freq,
        pairs=pairs,
        partial=stream_partial(st.experts, st.row, E, tokens=r.num_rows),
        phase_partials=phase_partials,
        pass_keys=keys,
        pass_masks=masks,
        experts=st.experts,
        row=st.row.astype(np.int32),
    )


@dataclass(frozen=True)
class LayerPart:
    """One MoE layer's share of the analysis (its shards merged)."""

    layer: int
    rows: int
    freq: dict[str, np.ndarray]
    pairs: np.ndarray | None
    reuse: LayerReuse
    phase_lru: dict[str, np.ndarray]
    """Per phase, the LRU hit curve of that phase's rows alone (zeros without rows)."""
    distinct_per_forward: dict[str, float]
    """Per phase present, mean distinct experts one forward pass uses at this layer."""
    phases_present: tuple[str, ...]


def merge_layer(parts: Sequence[ShardPart], sizes: tuple[int, ...]) -> LayerPart:
    """A layer's shards (any order given; merged in shard order) as one :class:`LayerPart`."""
    parts = sorted(parts, key=lambda p: p.shard)
    E = parts[0].partial.num_experts
    partial = merge_all([p.partial for p in parts])
    offsets = np.cumsum([0] + [p.partial.tokens for p in parts[:-1]])
    stream = TokenStream(
        np.concatenate([p.experts for p in parts]),
        np.concatenate(
            [p.row.astype(np.int64) + off for p, off in zip(parts, offsets, strict=True)]
        ),
        E,
    )
    freq = {ph: sum(p.freq[ph] for p in parts) for ph in S.PHASES}
    present = tuple(ph for ph in S.PHASES if freq[ph].sum() > 0)
    phase_lru = {}
    if parts[0].phase_partials:
        for ph in S.PHASES:  # every phase: another layer may have rows where this has none
            merged = merge_all([p.phase_partials[ph] for p in parts])
            phase_lru[ph] = lru_hit_curve(merged.stack_hist, merged.accesses)
    keys = np.concatenate([p.pass_keys for p in parts])
    masks = np.concatenate([p.pass_masks for p in parts])
    uniq, inv = np.unique(keys, return_inverse=True)
    union = np.zeros((uniq.size, masks.shape[1]), np.uint64)
    np.bitwise_or.at(union, inv, masks)
    counts = np.unpackbits(union.view(np.uint8), axis=1).sum(axis=1)
    used = counts > 0  # a pass whose every slot was dropped used no expert
    counts, phase_of = counts[used], ((uniq >> 41) & 1)[used]
    distinct = {
        ph: float(counts[phase_of == S.PHASE_CODE[ph]].mean())
        for ph in present
        if (phase_of == S.PHASE_CODE[ph]).any()
    }
    pairs = None if parts[0].pairs is None else sum(p.pairs for p in parts)  # type: ignore[misc]
    return LayerPart(
        layer=parts[0].layer,
        rows=sum(p.rows for p in parts),
        freq=freq,
        pairs=pairs,
        reuse=policy_reuse(partial, stream, sizes),
        phase_lru=phase_lru,
        distinct_per_forward=distinct,
        phases_present=present,
    )


def merge_layers(
    parts: Sequence[ShardPart], num_layers: int, sizes: tuple[int, ...], workers: int = 1
) -> list[LayerPart]:
    """Every layer's shards merged (layers on a thread pool: the policy replays release
    the GIL)."""
    by_layer: list[list[ShardPart]] = [[] for _ in range(num_layers)]
    for p in parts:
        by_layer[p.layer].append(p)
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        return list(pool.map(lambda ps: merge_layer(ps, sizes), by_layer))


def pair_task(source: Source, layer: int, task: LayerTask) -> T.TransitionScore | None:
    """The transition score of the layer pair (layer - 1, layer), from both whole layers."""
    both = source.layers([layer - 1, layer])
    scores = T.score_transitions(
        both,
        top_n=both.top_k,
        test_fraction=task.transition_test_fraction,
        seed=task.seed,
        first_layer=layer - 1,
    )
    return scores[0] if scores else None


def warm_up(task: LayerTask) -> None:
    """Run a task and a merge on a tiny routing, so that the numba kernels they use are
    compiled (or loaded from the cache) in this process before a pool forks: a worker
    then never compiles, and compiling in a child forked from a process that had run
    DuckDB and pyarrow threads crashed (seen in the test suite)."""
    k = 2
    experts = np.array([[0, 1], [1, 2], [0, 2], [2, 3]] * 2, np.int16)
    n = experts.shape[0]
    routing = Routing(
        request_ids=("a", "b"),
        moe_layers=(0, 1),
        num_experts=4,
        top_k=k,
        request=np.repeat(np.arange(2, dtype=np.int32), n // 2),
        token=np.tile(np.repeat(np.arange(n // 4, dtype=np.int32), 2), 2),
        step=np.zeros(n, np.int32),
        phase=np.zeros(n, np.int8),
        forward=np.repeat(np.arange(2, dtype=np.int64), n // 2),
        layer=np.tile(np.arange(2, dtype=np.int16), n // 2),
        experts=experts,
    )
    tiny = LayerTask(sizes=(k,), groups=task.groups, phase_curves=task.phase_curves)
    source = RoutingSource(routing, (1,))
    merge_layers([shard_part(source, lay, sh, tiny) for lay in (0, 1) for sh in (0, 1)], 2, (k,))
    pair_task(source, 1, tiny)
