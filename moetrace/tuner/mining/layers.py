"""Analysis as independent tasks, one per MoE layer (and per layer pair), merged exactly.

Every cache figure of ``analyze`` is per layer (each layer has its own cache), and so are
the counts behind skew, groups and phases; transitions need two adjacent layers. So the
analysis splits into tasks that each read only their layer(s) of every trace, and the
model-wide report is their exact merge: counts are stacked, reuse histograms and policy
hit rates are weighted by accesses (:func:`~moetrace.tuner.mining.curves.combine_reuse`).
Nothing is approximated by the split: a task computes what the single pass computed for
its layer, with the same seeds (tests compare 1 task per layer, a pool and Ray against
the whole routing in memory, and many traces against one).

A task reads its rows through a *source*: :class:`TraceSource` (trace locations, read by
the task itself, so a Ray worker on another machine reads from shared or object storage)
or :class:`RoutingSource` (routing already in memory, e.g. cut at ``max_tokens``).
Peak memory per task is one layer's rows (two for a transition pair).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from moetrace.store import schema as S
from moetrace.store.arrays import Routing, load_routing
from moetrace.store.reader import open_trace
from moetrace.store.traceset import concat_routing
from moetrace.tuner.mining import frequency as F
from moetrace.tuner.mining import groups as G
from moetrace.tuner.mining import phases as P
from moetrace.tuner.mining import transitions as T
from moetrace.tuner.mining.curves import LayerReuse, layer_reuse, layer_seeds
from moetrace.tuner.mining.mrc import lru_hit_curve
from moetrace.tuner.mining.reuse import stack_distances
from moetrace.tuner.mining.streams import layer_stream


def select_layers(routing: Routing, layers: Sequence[int]) -> Routing:
    """The rows of the given MoE-layer indices, renumbered 0..n-1 in the given order (as
    :func:`~moetrace.store.arrays.load_routing` with ``layers`` returns them)."""
    remap = np.full(routing.num_layers, -1, np.int16)
    remap[list(layers)] = np.arange(len(layers), dtype=np.int16)
    sub = routing.select(remap[routing.layer] >= 0)
    return Routing(
        request_ids=sub.request_ids,
        moe_layers=tuple(routing.moe_layers[i] for i in layers),
        num_experts=sub.num_experts,
        top_k=sub.top_k,
        request=sub.request,
        token=sub.token,
        step=sub.step,
        phase=sub.phase,
        forward=sub.forward,
        layer=remap[sub.layer],
        experts=sub.experts,
        speculative=sub.speculative,
    )


@dataclass(frozen=True)
class TraceSource:
    """Routing read from trace locations by the task (``requests``: per trace, the ids to
    keep, i.e. those with rows in the phase; the driver lists them once)."""

    paths: tuple[str, ...]
    phase: str | None
    requests: tuple[tuple[str, ...], ...]

    def layers(self, layers: Sequence[int]) -> Routing:
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


@dataclass(frozen=True)
class RoutingSource:
    """Routing held in memory (shared with the workers)."""

    routing: Routing

    def layers(self, layers: Sequence[int]) -> Routing:
        return select_layers(self.routing, layers)


Source = TraceSource | RoutingSource


@dataclass(frozen=True)
class LayerTask:
    """What a layer task computes (every field picklable, the same on every executor)."""

    sizes: tuple[int, ...]
    seed: int
    num_layers: int
    groups: bool
    phase_curves: bool
    transitions: bool = False
    """Also score the transition pair (layer - 1, layer) (the task reads both layers)."""
    transition_test_fraction: float = 0.2


@dataclass(frozen=True)
class LayerPart:
    """One MoE layer's share of the analysis."""

    layer: int
    rows: int
    """Rows (tokens) of this layer analyzed."""
    freq: dict[str, np.ndarray]
    """Per phase, int64 (E,) activations of each expert."""
    pairs: np.ndarray | None
    """int64 (E, E) co-activation counts within a token (None without groups or top-1)."""
    reuse: LayerReuse
    phase_lru: dict[str, np.ndarray]
    """Per phase present in this layer, the LRU hit curve of that phase's rows alone."""
    distinct_per_forward: dict[str, float]
    """Per phase present, mean distinct experts one forward pass uses at this layer."""
    phases_present: tuple[str, ...]
    transition: T.TransitionScore | None = None
    """The score of the pair (layer - 1, layer), when asked and layer > 0."""


def layer_part(source: Source, layer: int, task: LayerTask) -> LayerPart:
    """Everything ``analyze`` needs from one MoE layer (and the pair ending at it)."""
    transition = None
    if task.transitions and layer > 0:
        both = source.layers([layer - 1, layer])
        transition = transition_score(both, layer - 1, task.transition_test_fraction, task.seed)
        r = select_layers(both, [1])
    else:
        r = source.layers([layer])
    E = r.num_experts
    st = layer_stream(r, 0)
    reuse = layer_reuse(
        st.experts, st.row, E, task.sizes, layer_seeds(task.seed, task.num_layers)[layer]
    )
    freq, phase_lru, distinct = {}, {}, {}
    present = []
    for p in S.PHASES:
        sel = r.phase == S.PHASE_CODE[p]
        freq[p] = F.frequency_from_routing(r.layer[sel], r.experts[sel], 1, E)[0]
        if not sel.any():
            continue
        present.append(p)
        rows = np.flatnonzero(sel)
        distinct[p] = P.distinct_per_pass(r.forward[rows], r.experts[rows], E)
        if task.phase_curves:
            ps = layer_stream(r, 0, rows)
            sd, _ = stack_distances(ps.experts, ps.row, E)
            hist = np.bincount(sd[sd >= 0], minlength=E)
            phase_lru[p] = lru_hit_curve(hist, ps.num_accesses)
    pairs = None
    if task.groups and r.top_k >= 2:
        pairs = G.pair_counts_from_routing(r.layer, r.experts, 1, E)[0]
    return LayerPart(
        layer=layer,
        rows=r.num_rows,
        freq=freq,
        pairs=pairs,
        reuse=reuse,
        phase_lru=phase_lru,
        distinct_per_forward=distinct,
        phases_present=tuple(present),
        transition=transition,
    )


def transition_score(
    pair: Routing, first_layer: int, test_fraction: float, seed: int
) -> T.TransitionScore | None:
    """The transition score of a routing holding the two layers (first_layer, +1)."""
    scores = T.score_transitions(
        pair, top_n=pair.top_k, test_fraction=test_fraction, seed=seed, first_layer=first_layer
    )
    return scores[0] if scores else None
