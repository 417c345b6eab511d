"""Reuse distances of a layer stream cut into shards, merged exactly (an LRU-stack monoid).

A shard is a run of consecutive tokens of one layer's access stream (the requests of a
range of the replay order). Its :class:`StreamPartial` holds what the whole stream's
reuse statistics need from it: the stack-distance histogram of its reuses *within* the
shard, every first use in the shard with the number of distinct experts used before it
in the shard, the shard's final LRU stack, each expert's first and last token, and the
exact token distances of its internal reuses. :func:`merge` of the partials of two
consecutive shards (in replay order) is the partial of their concatenation, so any
split of the stream, merged left to right (or as a tree: the merge is associative),
gives the single pass's histogram, cold count and token distances exactly
(:mod:`moetrace.tuner.mining.reuse` defines them; tests compare random splits).

A first use in shard B of an expert that shard A used has its stack distance
resolved at the merge: the d distinct experts B used before it sit on top of A's
stack, so its depth is d plus its position in A's stack with those d removed; its token
distance is the tokens after its last use in A plus its first token in B. Memory per
partial is O(E) plus the distinct token distances seen.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from moetrace.tuner.mining.reuse import TOKEN_BINS, stack_distances


@dataclass(frozen=True)
class StreamPartial:
    """The mergeable reuse summary of one shard of a layer's access stream."""

    num_experts: int
    tokens: int
    """Tokens (rows) of the shard, used or not by any expert."""
    accesses: int
    stack_hist: np.ndarray
    """int64 (E,): resolved reuses by stack distance."""
    first_experts: np.ndarray
    """int16: experts whose first use in the shard is unresolved (cold so far), in
    first-use order."""
    first_depth: np.ndarray
    """int64: distinct experts used in the shard before each of those first uses."""
    stack: np.ndarray
    """int16: the shard's experts by recency after its last token (most recent first)."""
    first_token: np.ndarray
    """int64 (E,): token of each expert's first use in the shard (-1: unused)."""
    last_token: np.ndarray
    """int64 (E,): token of each expert's last use in the shard (-1: unused)."""
    distances: np.ndarray
    """int64: distinct token distances of resolved reuses (sorted)."""
    distance_counts: np.ndarray
    """int64: how many reuses had each distance."""

    @property
    def cold(self) -> int:
        return int(self.first_experts.shape[0])

    def token_hist(self) -> np.ndarray:
        """Token distances in the log2 bins of :func:`~moetrace.tuner.mining.reuse.summarize`."""
        bins = np.minimum(np.floor(np.log2(self.distances)).astype(np.int64), TOKEN_BINS - 1)
        return np.bincount(bins, weights=self.distance_counts, minlength=TOKEN_BINS).astype(
            np.int64
        )


def _counted(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    d, c = np.unique(values, return_counts=True)
    return d.astype(np.int64), c.astype(np.int64)


def _add_counts(
    d1: np.ndarray, c1: np.ndarray, d2: np.ndarray, c2: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    d = np.concatenate([d1, d2])
    c = np.concatenate([c1, c2])
    keys, inv = np.unique(d, return_inverse=True)
    return keys, np.bincount(inv, weights=c, minlength=keys.size).astype(np.int64)


def stream_partial(
    experts: np.ndarray, row: np.ndarray, num_experts: int, tokens: int | None = None
) -> StreamPartial:
    """The partial of one shard: ``experts`` of each access, ``row`` its token (0-based
    within the shard), ``tokens`` the shard's token count (default: last row + 1)."""
    experts = np.ascontiguousarray(experts, dtype=np.int16)
    row = np.ascontiguousarray(row, dtype=np.int64)
    E = int(num_experts)
    n_tok = int(tokens) if tokens is not None else (int(row[-1]) + 1 if row.size else 0)
    sd, td = stack_distances(experts, row, E)
    reused = sd >= 0
    first = np.flatnonzero(~reused)
    first_rows = row[first]
    depth = np.searchsorted(first_rows, first_rows, side="left").astype(np.int64)
    first_token = np.full(E, -1, np.int64)
    last_token = np.full(E, -1, np.int64)
    last_index = np.full(E, -1, np.int64)
    first_token[experts[first]] = first_rows
    idx = np.arange(experts.shape[0], dtype=np.int64)
    last_token[experts] = row  # later accesses overwrite earlier ones
    last_index[experts] = idx
    used = np.flatnonzero(last_token >= 0)
    # most recent token first; within a token, the lower rank (earlier access) on top
    order = np.lexsort((last_index[used], -last_token[used]))
    d, c = _counted(td[reused])
    return StreamPartial(
        num_experts=E,
        tokens=n_tok,
        accesses=int(experts.shape[0]),
        stack_hist=np.bincount(sd[reused], minlength=E).astype(np.int64),
        first_experts=experts[first].copy(),
        first_depth=depth,
        stack=used[order].astype(np.int16),
        first_token=first_token,
        last_token=last_token,
        distances=d,
        distance_counts=c,
    )


def merge(a: StreamPartial, b: StreamPartial) -> StreamPartial:
    """The partial of shard ``a`` followed by shard ``b``."""
    E = a.num_experts
    in_a = a.last_token >= 0
    hist = a.stack_hist + b.stack_hist
    resolved_d: list[int] = []
    firsts, depths = list(a.first_experts), list(a.first_depth)
    a_stack = [int(x) for x in a.stack]
    a_set = set(a_stack)
    b_order = [int(x) for x in b.first_experts]
    for e, d in zip(b_order, b.first_depth, strict=True):
        above = set(b_order[:d])  # b's experts used before this first use, on top
        if in_a[e]:
            pos = int(d)
            for x in a_stack:
                if x == e:
                    break
                if x not in above:
                    pos += 1
            hist[pos] += 1
            resolved_d.append(int(a.tokens - a.last_token[e] + b.first_token[e]))
        else:
            firsts.append(e)
            depths.append(len(a_set) + len(above - a_set))
    d, c = _add_counts(a.distances, a.distance_counts, b.distances, b.distance_counts)
    if resolved_d:
        d, c = _add_counts(d, c, *_counted(np.asarray(resolved_d, np.int64)))
    b_set = {int(x) for x in b.stack}
    stack = [int(x) for x in b.stack] + [x for x in a_stack if x not in b_set]
    in_b = b.last_token >= 0
    first_token = np.where(in_a, a.first_token, np.where(in_b, b.first_token + a.tokens, -1))
    last_token = np.where(in_b, b.last_token + a.tokens, a.last_token)
    return StreamPartial(
        num_experts=E,
        tokens=a.tokens + b.tokens,
        accesses=a.accesses + b.accesses,
        stack_hist=hist,
        first_experts=np.asarray(firsts, np.int16),
        first_depth=np.asarray(depths, np.int64),
        stack=np.asarray(stack, np.int16),
        first_token=first_token.astype(np.int64),
        last_token=last_token.astype(np.int64),
        distances=d,
        distance_counts=c,
    )


def merge_all(parts: list[StreamPartial]) -> StreamPartial:
    """Left-to-right merge of consecutive shards' partials."""
    out = parts[0]
    for p in parts[1:]:
        out = merge(out, p)
    return out


def distance_quantiles(
    distances: np.ndarray, counts: np.ndarray, quantiles: tuple[float, ...]
) -> tuple[float, ...]:
    """``np.quantile`` (linear) of the values ``distances`` repeated ``counts`` times."""
    total = int(counts.sum())
    if total == 0:
        return tuple(float("nan") for _ in quantiles)
    cum = np.cumsum(counts)
    out = []
    for q in quantiles:
        pos = q * (total - 1)
        lo, hi = int(np.floor(pos)), int(np.ceil(pos))
        v_lo = distances[np.searchsorted(cum, lo, side="right")]
        v_hi = distances[np.searchsorted(cum, hi, side="right")]
        out.append(float(v_lo + (v_hi - v_lo) * (pos - lo)))
    return tuple(out)
