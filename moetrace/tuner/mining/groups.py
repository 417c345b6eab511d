"""Within-layer group activation: co-activation pair counts, lift, strongest groups.

Two experts co-activate when the router picks both for the same token at the same layer.
Lift is ``P(a and b) / (P(a) P(b))`` over the layer's tokens: 1 is independence, larger
means the pair is picked together more often than chance (a group a plan can load as one).
"""

from __future__ import annotations

from dataclasses import dataclass

import numba
import numpy as np

from moetrace.errors import AnalysisError
from moetrace.store import schema as S
from moetrace.store.reader import Trace
from moetrace.tuner.mining.serial import Serializable


def _phase_filter(phase: str | None) -> str:
    if phase is None:
        return ""
    if phase not in S.PHASES:
        raise AnalysisError(f"phase must be one of {S.PHASES} or None, got {phase!r}")
    return f"WHERE phase = '{phase}'"


def pair_counts(trace: Trace, phase: str | None = None) -> np.ndarray:
    """(L, E, E) int64 symmetric counts of tokens that picked both experts (DuckDB).

    The diagonal is zero. With top-1 routing every count is zero.
    """
    m = trace.manifest
    num_layers, num_experts, k = len(m.model.moe_layers), m.model.num_experts, m.top_k
    out = np.zeros((num_layers, num_experts, num_experts), np.int64)
    if k < 2:
        return out
    pairs = " UNION ALL ".join(
        f"SELECT layer, least(e{i}, e{j}) AS a, greatest(e{i}, e{j}) AS b FROM t"
        for i in range(k)
        for j in range(i + 1, k)
    )
    cols = ", ".join(S.expert_columns(k))
    rows = trace.sql(
        f"""WITH t AS (SELECT layer, {cols} FROM activations_raw {_phase_filter(phase)})
            SELECT l.layer_index AS li, p.a, p.b, count(*) AS n
            FROM ({pairs}) p JOIN moe_layers l ON p.layer = l.layer
            WHERE p.a >= 0 AND p.a <> p.b GROUP BY ALL"""
    )
    li = rows.column("li").to_numpy().astype(np.int64)
    a = rows.column("a").to_numpy().astype(np.int64)
    b = rows.column("b").to_numpy().astype(np.int64)
    n = rows.column("n").to_numpy().astype(np.int64)
    np.add.at(out, (li, a, b), n)
    np.add.at(out, (li, b, a), n)
    return out


@numba.njit(cache=True, nogil=True)
def _count_pairs(layer: np.ndarray, experts: np.ndarray, out: np.ndarray) -> None:
    k = experts.shape[1]
    for i in range(experts.shape[0]):
        lay = layer[i]
        for r1 in range(k):
            a = experts[i, r1]
            if a < 0:
                continue
            for r2 in range(r1 + 1, k):
                b = experts[i, r2]
                if b >= 0 and b != a:
                    out[lay, a, b] += 1
                    out[lay, b, a] += 1


def pair_counts_from_routing(
    layer: np.ndarray, experts: np.ndarray, num_layers: int, num_experts: int
) -> np.ndarray:
    """Same as :func:`pair_counts` from routing arrays (numba; one pass, no Parquet read)."""
    out = np.zeros((num_layers, num_experts, num_experts), np.int64)
    _count_pairs(
        np.ascontiguousarray(layer, dtype=np.int16),
        np.ascontiguousarray(experts, dtype=np.int16),
        out,
    )
    return out


def lift(pairs: np.ndarray, freq: np.ndarray, tokens: np.ndarray) -> np.ndarray:
    """(L, E, E) lift over independence; NaN where an expert is never used."""
    n = tokens.astype(np.float64)[:, None, None]
    f = freq.astype(np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        out = pairs * n / (f[:, :, None] * f[:, None, :])
    out[~np.isfinite(out)] = np.nan
    return out


@dataclass(frozen=True)
class PairStat(Serializable):
    layer: int
    a: int
    b: int
    count: int
    lift: float


def top_pairs(
    pairs: np.ndarray, lifts: np.ndarray, layer: int, n: int, min_support: int
) -> list[PairStat]:
    """The ``n`` pairs of a layer with the highest lift among those seen ``min_support``+ times."""
    c = np.triu(pairs[layer], 1)
    a, b = np.nonzero(c >= max(min_support, 1))
    if a.size == 0:
        return []
    lf = lifts[layer, a, b]
    order = np.lexsort((-c[a, b], -np.nan_to_num(lf, nan=-1.0)))[:n]
    return [PairStat(layer, int(a[i]), int(b[i]), int(c[a[i], b[i]]), float(lf[i])) for i in order]


@dataclass(frozen=True)
class Group(Serializable):
    layer: int
    experts: tuple[int, ...]
    mean_lift: float
    min_pair_count: int


def greedy_groups(
    pairs: np.ndarray,
    lifts: np.ndarray,
    layer: int,
    *,
    max_size: int,
    min_lift: float = 1.5,
    min_support: int = 5,
) -> list[Group]:
    """Disjoint groups of a layer grown greedily from the highest-lift pairs.

    A pair (lift >= ``min_lift``, count >= ``min_support``) starts a group when both
    experts are free; a free expert joins a group (up to ``max_size``) when its mean lift
    to the members is >= ``min_lift`` and it co-occurred with each of them. Groups are
    returned strongest first. Two groups merge the same way when both fit in ``max_size``.
    """
    c, lf = pairs[layer], np.nan_to_num(lifts[layer], nan=0.0)
    a, b = np.nonzero(np.triu(c, 1) >= max(min_support, 1))
    order = np.argsort(-lf[a, b], kind="stable")
    member: dict[int, int] = {}
    groups: list[list[int]] = []
    for i in order:
        x, y = int(a[i]), int(b[i])
        if lf[x, y] < min_lift:
            break
        if x not in member and y not in member:
            member[x] = member[y] = len(groups)
            groups.append([x, y])
            continue
        gid_x, gid_y = member.get(x), member.get(y)
        if gid_x is not None and gid_x == gid_y:
            continue
        gx = groups[gid_x] if gid_x is not None else [x]
        gy = groups[gid_y] if gid_y is not None else [y]
        if len(gx) + len(gy) > max_size:
            continue
        cross = [(u, v) for u in gx for v in gy]
        if any(c[u, v] == 0 for u, v in cross) or np.mean([lf[u, v] for u, v in cross]) < min_lift:
            continue
        target = gid_x if gid_x is not None else gid_y
        assert target is not None
        source = gid_y if target == gid_x else gid_x
        groups[target] = gx + gy
        for u in groups[target]:
            member[u] = target
        if source is not None:
            groups[source] = []
    out = []
    for grp in groups:
        if len(grp) < 2:
            continue
        ii, jj = np.triu_indices(len(grp), 1)
        ga = np.array(grp)
        out.append(
            Group(
                layer=layer,
                experts=tuple(sorted(grp)),
                mean_lift=float(lf[ga[ii], ga[jj]].mean()),
                min_pair_count=int(c[ga[ii], ga[jj]].min()),
            )
        )
    out.sort(key=lambda g: -g.mean_lift)
    return out
