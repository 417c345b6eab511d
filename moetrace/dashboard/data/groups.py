"""Within-layer co-activation (pair counts, lift, strongest groups) and cross-layer
transitions with their predictive power, from the mining functions."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from moetrace.dashboard.data.common import (
    layer_id,
    phase_arg,
    phase_where,
    query,
    routing_for_layers,
)
from moetrace.dashboard.data.experts import ExpertCounts, expert_counts
from moetrace.errors import AnalysisError
from moetrace.store.arrays import Routing, load_routing
from moetrace.store.reader import Trace
from moetrace.tuner.mining import groups as G
from moetrace.tuner.mining import transitions as T

TOP_PAIRS = 10


@dataclass(frozen=True)
class CoActivation:
    """Co-activation of one MoE layer: counts of tokens that picked both experts."""

    layer: int
    pairs: np.ndarray
    """(E, E) symmetric pair counts (diagonal zero)."""
    lift: np.ndarray
    """(E, E) lift over independence (NaN where an expert is unused)."""
    tokens: int
    top: tuple[G.PairStat, ...]
    groups: tuple[G.Group, ...]
    min_support: int

    def __post_init__(self) -> None:
        if self.pairs.shape != self.lift.shape or self.pairs.ndim != 2:
            raise AnalysisError(
                f"pairs {self.pairs.shape} and lift {self.lift.shape} must be equal (E, E)"
            )


def layer_pair_counts(trace: Trace, layer_index: int, phase: str = "all") -> np.ndarray:
    """(E, E) symmetric pair counts of one layer, diagonal zero.

    The same counts as :func:`moetrace.tuner.mining.groups.pair_counts` (which does every
    layer at once), with the layer filter applied before the k*(k-1)/2-way unpivot, so a
    page showing one layer of a large trace scans once and unpivots 1/L of the rows.
    """
    k, E = trace.top_k, trace.manifest.model.num_experts
    out = np.zeros((E, E), np.int64)
    if k < 2:
        return out
    lid = layer_id(trace, layer_index)
    cols = ", ".join(f"e{i}" for i in range(k))
    pairs = " UNION ALL ".join(
        f"SELECT least(e{i}, e{j}) AS a, greatest(e{i}, e{j}) AS b FROM t"
        for i in range(k)
        for j in range(i + 1, k)
    )
    rows = query(
        trace,
        f"""WITH t AS (SELECT {cols} FROM activations_raw WHERE layer = {lid}{phase_where(phase)})
            SELECT a, b, count(*) AS n FROM ({pairs}) WHERE a >= 0 AND a <> b GROUP BY ALL""",
    )
    a = rows.column("a").to_numpy().astype(np.int64)
    b = rows.column("b").to_numpy().astype(np.int64)
    n = rows.column("n").to_numpy().astype(np.int64)
    np.add.at(out, (a, b), n)
    np.add.at(out, (b, a), n)
    return out


def coactivation(
    trace: Trace,
    layer_index: int,
    phase: str = "all",
    counts: ExpertCounts | None = None,
    pairs: np.ndarray | None = None,
) -> CoActivation:
    """One layer's co-activation: pair counts, lift, strongest pairs and greedy groups
    (``counts``: the phase's :func:`expert_counts`, ``pairs``: the layer's
    :func:`layer_pair_counts`, when already at hand)."""
    k = trace.top_k
    if pairs is None:
        pairs = layer_pair_counts(trace, layer_index, phase)
    pairs = np.asarray(pairs, np.int64)[None]
    counts = counts if counts is not None else expert_counts(trace, phase)
    sl = slice(layer_index, layer_index + 1)
    lifts = G.lift(pairs, counts.counts[sl], counts.tokens[sl])
    tokens = int(counts.tokens[layer_index])
    support = max(5, int(0.001 * tokens))
    top = G.top_pairs(pairs, lifts, 0, TOP_PAIRS, support)
    groups = G.greedy_groups(pairs, lifts, 0, max_size=max(k, 2), min_support=support)
    lid = layer_id(trace, layer_index)
    return CoActivation(
        layer=lid,
        pairs=pairs[0],
        lift=lifts[0],
        tokens=tokens,
        top=tuple(G.PairStat(lid, p.a, p.b, p.count, p.lift) for p in top),
        groups=tuple(G.Group(lid, g.experts, g.mean_lift, g.min_pair_count) for g in groups),
        min_support=support,
    )


def pair_routing(trace: Trace, layer_index: int, phase: str = "all") -> Routing:
    """A two-layer :class:`Routing` (MoE-layer indices l and l+1) in arrival order."""
    L = len(trace.manifest.model.moe_layers)
    if not 0 <= layer_index < L - 1:
        raise AnalysisError(
            f"a transition starts at MoE-layer index 0..{L - 2}, got {layer_index}"
            if L > 1
            else f"{trace.path}: one MoE layer only, there are no transitions"
        )
    return routing_for_layers(trace, (layer_index, layer_index + 1), phase)


@dataclass(frozen=True)
class Transitions:
    """Expert at layer ``src`` -> experts at layer ``dst`` of the same token."""

    src: int
    dst: int
    counts: np.ndarray
    """(E, E) counts of (a at src, b at dst)."""
    recall: float | None
    """Recall@k of the fitted table on held-out requests (None: too few requests)."""
    baseline: float | None
    """Recall@k of the dst layer's k most used experts (the frequency baseline)."""
    test_tokens: int

    @property
    def conditional(self) -> np.ndarray:
        """P(b at dst | a at src), rows of unused experts zero."""
        rows = self.counts.sum(axis=1, keepdims=True).astype(np.float64)
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(rows > 0, self.counts / np.maximum(rows, 1), 0.0)


def transitions(trace: Trace, layer_index: int, phase: str = "all", seed: int = 0) -> Transitions:
    routing = pair_routing(trace, layer_index, phase)
    counts = T.transition_counts(routing)[0]
    scores = T.score_transitions(routing, top_n=routing.top_k, seed=seed)
    s = scores[0] if scores else None
    return Transitions(
        src=routing.moe_layers[0],
        dst=routing.moe_layers[1],
        counts=counts,
        recall=s.recall if s else None,
        baseline=s.baseline if s else None,
        test_tokens=s.test_tokens if s else 0,
    )


@dataclass(frozen=True)
class TransitionScores:
    """Predictive power of the transition table for every consecutive MoE-layer pair."""

    src: tuple[int, ...]
    dst: tuple[int, ...]
    recall: tuple[float, ...]
    baseline: tuple[float, ...]
    test_tokens: tuple[int, ...]

    def __post_init__(self) -> None:
        n = len(self.src)
        if not all(len(x) == n for x in (self.dst, self.recall, self.baseline, self.test_tokens)):
            raise AnalysisError("transition score columns must have equal lengths")


def all_transition_scores(trace: Trace, phase: str = "all", seed: int = 0) -> TransitionScores:
    """:func:`moetrace.tuner.mining.transitions.score_transitions` over the whole routing
    (loads every row's experts: about 20 + 2k bytes per activation row)."""
    routing = load_routing(trace, phase=phase_arg(phase))
    scores = T.score_transitions(routing, top_n=routing.top_k, seed=seed)
    layers = routing.moe_layers
    return TransitionScores(
        src=tuple(layers[s.layer] for s in scores),
        dst=tuple(layers[s.layer + 1] for s in scores),
        recall=tuple(s.recall for s in scores),
        baseline=tuple(s.baseline for s in scores),
        test_tokens=tuple(s.test_tokens for s in scores),
    )
