"""Cache curves: one-pass LRU, Belady-MIN and LFU against straightforward references."""

from __future__ import annotations

import functools
import itertools
from collections import OrderedDict

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from moetrace.errors import AnalysisError
from moetrace.tuner.mining.mrc import lru_hit_curve, smallest_size
from moetrace.tuner.mining.replacement import TokenStream, smallest_size_reaching
from moetrace.tuner.mining.reuse import stack_distances, summarize

Tokens = list[list[int]]


def flatten(tokens: Tokens) -> tuple[np.ndarray, np.ndarray]:
    experts = np.array([e for s in tokens for e in s], dtype=np.int16)
    row = np.array([t for t, s in enumerate(tokens) for _ in s], dtype=np.int64)
    return experts, row


def ref_lru(tokens: Tokens, capacity: int) -> int:
    """LRU by simulation: hits are cached before the token; a miss evicts the least
    recently used expert that the token does not use; the token's experts become the
    most recent, rank 0 first."""
    cache: OrderedDict[int, None] = OrderedDict()  # least recent first
    hits = 0
    for s in tokens:
        hits += sum(e in cache for e in s)
        for e in s:
            if e not in cache:
                if len(cache) >= capacity:
                    victim = next(x for x in cache if x not in s)
                    del cache[victim]
                cache[e] = None
        for e in reversed(s):
            cache.move_to_end(e)
    return hits


def ref_lru_recency(tokens: Tokens, capacity: int) -> int:
    """The definition for any size: the cache is the ``capacity`` most recent experts."""
    recency: list[int] = []
    hits = 0
    for s in tokens:
        cached = set(recency[:capacity])
        hits += sum(e in cached for e in s)
        recency = list(s) + [x for x in recency if x not in s]
    return hits


def ref_policy(tokens: Tokens, capacity: int, belady: bool) -> int:
    """Belady-MIN (farthest next access) or perfect LFU (fewest uses, then least recent)."""
    experts, _ = flatten(tokens)
    pos = 0
    cache: set[int] = set()
    count: dict[int, int] = {}
    last: dict[int, int] = {}
    stamp = 0
    hits = 0
    for s in tokens:
        start = pos + len(s)
        for e in s:
            count[e] = count.get(e, 0) + 1

        def next_access(x: int, start: int = start) -> int:
            later = np.flatnonzero(experts[start:] == x)
            return start + int(later[0]) if later.size else len(experts)

        hits += sum(e in cache for e in s)
        for e in s:
            if e in cache:
                continue
            if len(cache) >= capacity:
                allowed = [x for x in cache if x not in s]
                if belady:
                    victim = max(allowed, key=next_access)
                else:
                    victim = min(allowed, key=lambda x: (count[x], last[x]))
                cache.remove(victim)
            cache.add(e)
        for e in reversed(s):  # rank 0 is the most recent
            stamp += 1
            last[e] = stamp
        pos = start
    return hits


def exhaustive_optimum(tokens: Tokens, capacity: int) -> int:
    """Most hits of any demand-loading policy (search over every cache state)."""

    @functools.cache
    def best(t: int, cache: frozenset[int]) -> int:
        if t == len(tokens):
            return 0
        s = frozenset(tokens[t])
        hits = len(cache & s)
        keep_from = sorted(cache - s)
        room = capacity - len(s)
        out = 0
        for keep in itertools.combinations(keep_from, min(room, len(keep_from))):
            out = max(out, best(t + 1, s | frozenset(keep)))
        return hits + out

    return best(0, frozenset())


@st.composite
def token_streams(draw: st.DrawFn, max_experts: int = 8, max_tokens: int = 40) -> tuple:
    num_experts = draw(st.integers(2, max_experts))
    k = draw(st.integers(1, min(3, num_experts)))
    perms = st.permutations(list(range(num_experts))).map(lambda p: list(p[:k]))
    tokens = draw(st.lists(perms, min_size=0, max_size=max_tokens))
    return tokens, num_experts, k


def lru_curve(tokens: Tokens, num_experts: int) -> np.ndarray:
    experts, row = flatten(tokens)
    sd, td = stack_distances(experts, row, num_experts)
    return summarize(sd, td, num_experts).stack_hist.cumsum()


@settings(max_examples=150, deadline=None)
@given(token_streams())
def test_one_pass_lru_equals_simulation_at_every_size(case: tuple) -> None:
    tokens, num_experts, k = case
    hits = lru_curve(tokens, num_experts)
    for c in range(1, num_experts + 1):
        assert hits[c - 1] == ref_lru_recency(tokens, c), c
        if c >= k:
            assert hits[c - 1] == ref_lru(tokens, c), c


@pytest.mark.parametrize("seed", range(4))
def test_one_pass_lru_on_longer_skewed_streams(seed: int) -> None:
    rng = np.random.default_rng(seed)
    num_experts, k = 16, 3
    p = 1.0 / np.arange(1, num_experts + 1)
    tokens = [list(rng.choice(num_experts, k, replace=False, p=p / p.sum())) for _ in range(400)]
    hits = lru_curve(tokens, num_experts)
    expected = [ref_lru(tokens, c) for c in range(k, num_experts + 1)]
    assert hits[k - 1 :].tolist() == expected
    assert 0 < hits[k - 1] < hits[-1]


@settings(max_examples=120, deadline=None)
@given(token_streams())
def test_belady_and_lfu_match_references_and_belady_dominates(case: tuple) -> None:
    tokens, num_experts, k = case
    experts, row = flatten(tokens)
    stream = TokenStream(experts, row, num_experts)
    hits = lru_curve(tokens, num_experts)
    for c in range(k, num_experts + 1):
        opt = stream.belady_hits(c)
        lfu = stream.lfu_hits(c)
        assert opt == ref_policy(tokens, c, belady=True)
        assert lfu == ref_policy(tokens, c, belady=False)
        assert opt >= hits[c - 1]
        assert opt >= lfu


@pytest.mark.parametrize("seed", range(6))
def test_belady_is_the_optimum(seed: int) -> None:
    rng = np.random.default_rng(seed)
    num_experts, k = 6, 2
    tokens = [list(rng.choice(num_experts, k, replace=False)) for _ in range(12)]
    experts, row = flatten(tokens)
    for c in (2, 3, 4):
        assert TokenStream(experts, row, num_experts).belady_hits(c) == exhaustive_optimum(
            tokens, c
        )


def test_policy_size_below_top_k_is_an_error() -> None:
    experts, row = flatten([[0, 1, 2], [3, 4, 5]])
    with pytest.raises(AnalysisError, match="cache size 2 is smaller than the 3 experts"):
        TokenStream(experts, row, 8).belady_hits(2)


def test_curve_helpers() -> None:
    hist = np.array([5, 3, 2, 0])
    curve = lru_hit_curve(hist, 20)
    np.testing.assert_allclose(curve, [0.25, 0.4, 0.5, 0.5])
    assert smallest_size(curve, 0.4) == 2
    assert smallest_size(curve, 0.6) is None
    assert lru_hit_curve(np.zeros(3, np.int64), 0).tolist() == [0.0, 0.0, 0.0]
    calls: list[int] = []

    def rate(c: int) -> float:
        calls.append(c)
        return c / 10

    assert smallest_size_reaching(rate, 1, 10, 0.75) == 8
    assert smallest_size_reaching(rate, 1, 10, 0.75, {4: 0.4, 9: 0.9}) == 8
    assert smallest_size_reaching(rate, 1, 10, 1.5) is None


def test_reuse_distances_in_tokens_and_distinct_experts() -> None:
    # expert 0 used at tokens 0 and 3; experts 1, 2 in between
    tokens = [[0], [1], [2], [0], [0]]
    experts, row = flatten(tokens)
    sd, td = stack_distances(experts, row, 4)
    assert sd.tolist() == [-1, -1, -1, 2, 0]
    assert td.tolist() == [-1, -1, -1, 3, 1]
    summ = summarize(sd, td, 4)
    assert summ.cold == 3
    assert summ.stack_hist.tolist() == [1, 0, 1, 0]
    assert summ.token_hist[:3].tolist() == [1, 1, 0]  # bins [1,2) and [2,4)


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.floats(0, 1), min_size=1, max_size=40),
    st.floats(0, 1),
    st.dictionaries(st.integers(1, 40), st.booleans(), max_size=4),
)
def test_size_search_equals_a_linear_scan(steps: list[float], target: float, hints: dict) -> None:
    curve = np.cumsum(steps) / max(sum(steps), 1e-9)  # monotone, sizes 1..n
    n = len(curve)
    known = {c: float(curve[c - 1]) for c in hints if c <= n}
    expected = next((c for c in range(1, n + 1) if curve[c - 1] >= target - 1e-12), None)
    assert smallest_size_reaching(lambda c: float(curve[c - 1]), 1, n, target, known) == expected
