"""Cross-layer transitions: expert at MoE layer l -> experts at layer l+1, same token.

A transition table ``P(b at l+1 | a at l)`` is fitted on a train split of the requests
and scored on the held-out ones: the next layer's top-n experts are predicted by summing
the table rows of the token's current experts, and recall@n (share of the next layer's
actual experts among the n predicted) is compared with the frequency baseline (the next
layer's n most used experts in the train split).
"""

from __future__ import annotations

from dataclasses import dataclass

import numba
import numpy as np

from moetrace.store.arrays import Routing
from moetrace.tuner.mining.serial import Serializable

MAX_TEST_TOKENS = 200_000
"""Held-out tokens scored per layer pair at most (a seeded subsample beyond that)."""


def next_layer_index(routing: Routing) -> np.ndarray:
    """Row indices i whose row i+1 is the same token at the next MoE layer (arrival order)."""
    if routing.num_rows < 2:
        return np.zeros(0, np.int64)
    same = (
        (routing.request[1:] == routing.request[:-1])
        & (routing.step[1:] == routing.step[:-1])
        & (routing.token[1:] == routing.token[:-1])
        & (routing.layer[1:] == routing.layer[:-1] + 1)
    )
    return np.flatnonzero(same).astype(np.int64)


@numba.njit(cache=True, nogil=True)
def _count_pairs(
    starts: np.ndarray, layer: np.ndarray, experts: np.ndarray, out: np.ndarray
) -> None:
    k = experts.shape[1]
    for i in range(starts.shape[0]):
        s = starts[i]
        lay = layer[s]
        for r1 in range(k):
            a = experts[s, r1]
            if a < 0:
                continue
            for r2 in range(k):
                b = experts[s + 1, r2]
                if b >= 0:
                    out[lay, a, b] += 1


def transition_counts(
    routing: Routing, starts: np.ndarray | None = None, layer: int | None = None
) -> np.ndarray:
    """(L-1, E, E) int64 counts of (a at l, b at l+1) over the given pair starts.

    ``starts`` defaults to every consecutive-layer pair of the routing; with ``layer``
    only pairs starting at that MoE-layer index are counted (the result is still stacked).
    """
    num_layers, num_experts = routing.num_layers, routing.num_experts
    out = np.zeros((max(num_layers - 1, 0), num_experts, num_experts), np.int64)
    if starts is None:
        starts = next_layer_index(routing)
    if layer is not None:
        starts = starts[routing.layer[starts] == layer]
    if num_layers < 2 or starts.size == 0:
        return out
    _count_pairs(
        np.ascontiguousarray(starts, dtype=np.int64),
        np.ascontiguousarray(routing.layer, dtype=np.int16),
        np.ascontiguousarray(routing.experts, dtype=np.int16),
        out,
    )
    return out


def split_requests(num_requests: int, test_fraction: float, seed: int) -> np.ndarray:
    """Boolean test mask over request indices (seeded; at least one of each when >= 2)."""
    rng = np.random.default_rng(seed)
    test = rng.random(num_requests) < test_fraction
    if num_requests >= 2:
        if test.all():
            test[rng.integers(num_requests)] = False
        if not test.any():
            test[rng.integers(num_requests)] = True
    return test


def _recall(pred: np.ndarray, actual: np.ndarray) -> tuple[float, int]:
    """Summed per-token recall and number of scored tokens."""
    valid = actual >= 0
    hit = (pred[:, :, None] == actual[:, None, :]).any(axis=1) & valid
    n_valid = valid.sum(axis=1)
    ok = n_valid > 0
    return float((hit.sum(axis=1)[ok] / n_valid[ok]).sum()), int(ok.sum())


@dataclass(frozen=True)
class TransitionScore(Serializable):
    layer: int
    """MoE-layer index l of the pair (l, l+1)."""
    recall: float
    baseline: float
    test_tokens: int


def score_transitions(
    routing: Routing,
    *,
    top_n: int,
    test_fraction: float = 0.2,
    seed: int = 0,
    first_layer: int = 0,
) -> list[TransitionScore]:
    """Recall@top_n of the fitted transition table vs the frequency baseline, per pair.

    ``first_layer``: the model's MoE-layer index of the routing's layer 0 (when the
    routing holds a slice of the layers); it numbers the scores and seeds each pair's
    subsample, so a pair scores the same in a slice as in the whole routing."""
    starts = next_layer_index(routing)
    if starts.size == 0 or routing.num_layers < 2:
        return []
    test_req = split_requests(len(routing.request_ids), test_fraction, seed)
    is_test = test_req[routing.request[starts]]
    counts = transition_counts(routing, starts[~is_test]).astype(np.float64)
    top_n = min(top_n, routing.num_experts)
    out = []
    for layer in range(routing.num_layers - 1):
        t = counts[layer]
        base_freq = t.sum(axis=0)
        rows = t.sum(axis=1, keepdims=True)
        with np.errstate(divide="ignore", invalid="ignore"):
            cond = np.where(rows > 0, t / rows, base_freq / max(base_freq.sum(), 1.0))
        test_starts = starts[is_test & (routing.layer[starts] == layer)]
        if test_starts.size == 0:
            continue
        if test_starts.size > MAX_TEST_TOKENS:
            rng = np.random.default_rng([seed + 1, first_layer + layer])
            test_starts = np.sort(rng.choice(test_starts, MAX_TEST_TOKENS, replace=False))
        cur = routing.experts[test_starts].astype(np.int64)
        actual = routing.experts[test_starts + 1].astype(np.int64)
        tie = 1e-9 * base_freq / max(base_freq.max(), 1.0)
        scores = np.zeros((cur.shape[0], routing.num_experts)) + tie
        for r in range(cur.shape[1]):
            ok = cur[:, r] >= 0
            scores[ok] += cond[cur[ok, r]]
        pred = np.argpartition(-scores, top_n - 1, axis=1)[:, :top_n]
        base = np.broadcast_to(np.argsort(-base_freq, kind="stable")[:top_n], (cur.shape[0], top_n))
        s_pred, n = _recall(pred, actual)
        s_base, _ = _recall(base, actual)
        if n:
            out.append(TransitionScore(first_layer + layer, s_pred / n, s_base / n, n))
    return out
