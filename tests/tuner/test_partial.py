"""Reuse partials of shards merge to the single pass exactly (any split, any grouping)."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from moetrace.tuner.mining.partial import (
    distance_quantiles,
    merge,
    merge_all,
    stream_partial,
)
from moetrace.tuner.mining.reuse import QUANTILES, stack_distances, summarize


def _stream(seed: int, tokens: int, E: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    hot = rng.permutation(E)[: max(k, E // 3)]
    rows, experts = [], []
    for t in range(tokens):
        pool = hot if rng.random() < 0.7 else np.arange(E)
        chosen = rng.choice(pool, size=min(k, pool.size), replace=False)
        chosen = chosen[rng.random(chosen.size) > 0.1]  # dropped slots: fewer accesses
        experts.extend(chosen)
        rows.extend([t] * chosen.size)
    return np.asarray(experts, np.int16), np.asarray(rows, np.int64)


def _same(a, b) -> None:  # type: ignore[no-untyped-def]
    assert a.tokens == b.tokens and a.accesses == b.accesses
    for name in ("stack_hist", "first_experts", "first_depth", "stack", "first_token",
                 "last_token", "distances", "distance_counts"):  # fmt: skip
        assert np.array_equal(getattr(a, name), getattr(b, name)), name


@settings(max_examples=60, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    tokens=st.integers(1, 120),
    E=st.integers(2, 24),
    k=st.integers(1, 6),
    cuts=st.lists(st.integers(1, 119), max_size=6),
    tree=st.booleans(),
)
def test_any_split_merges_to_the_single_pass(seed, tokens, E, k, cuts, tree) -> None:  # type: ignore[no-untyped-def]
    experts, rows = _stream(seed, tokens, E, k)
    cuts = [c for c in cuts if c < tokens]
    whole = stream_partial(experts, rows, E, tokens=tokens)
    parts = []
    bounds = [0, *sorted(set(cuts)), tokens]
    for lo, hi in zip(bounds[:-1], bounds[1:], strict=True):
        sel = (rows >= lo) & (rows < hi)
        parts.append(stream_partial(experts[sel], rows[sel] - lo, E, tokens=hi - lo))
    if tree and len(parts) > 2:  # associativity: (p0 p1) (p2 ...)
        merged = merge(merge(parts[0], parts[1]), merge_all(parts[2:]))
    else:
        merged = merge_all(parts)
    _same(merged, whole)
    # and the single pass is the reuse module's own definition
    sd, td = stack_distances(experts, rows, E)
    summ = summarize(sd, td, E)
    assert np.array_equal(whole.stack_hist, summ.stack_hist)
    assert whole.cold == summ.cold
    assert np.array_equal(whole.token_hist(), summ.token_hist)
    q = distance_quantiles(whole.distances, whole.distance_counts, QUANTILES)
    assert np.allclose(q, summ.token_quantiles, equal_nan=True)


def test_a_wrong_merge_is_caught() -> None:
    """Merging shards out of order gives another histogram (the check can fail)."""
    experts, rows = _stream(3, 80, 12, 3)
    sel = rows < 40
    a = stream_partial(experts[sel], rows[sel], 12, tokens=40)
    b = stream_partial(experts[~sel], rows[~sel] - 40, 12, tokens=40)
    whole = stream_partial(experts, rows, 12, tokens=80)
    assert np.array_equal(merge(a, b).stack_hist, whole.stack_hist)
    assert not np.array_equal(merge(b, a).stack_hist, whole.stack_hist)
