"""Per-request views: the request list, one request's activation matrix and token-by-token
routing, and a 2-D projection (PCA) of all requests' normalized activation matrices."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from moetrace.dashboard.data.common import layer_id, query, unpivot_sql
from moetrace.errors import AnalysisError
from moetrace.store.reader import Trace
from moetrace.store.sql import connect, run_query
from moetrace.tuner.mining.requests import cluster_requests, normalize

MAX_PROJECTED = 2000
"""Requests projected at most (a seeded sample beyond that)."""
MAX_TOKENS_SHOWN = 512


def request_table(trace: Trace) -> list[dict[str, object]]:
    """One dict per request (id, arrival, token counts, tags), in arrival order."""
    rows = query(
        trace,
        """SELECT request_id, arrival, prompt_tokens, generated_tokens, tags
           FROM requests ORDER BY arrival, request_id""",
    ).to_pylist()
    for r in rows:
        r["tags"] = dict(r["tags"] or [])
    return rows


def _sql_str(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


def request_matrix(trace: Trace, request_id: str) -> np.ndarray:
    """(L, E) activation counts of one request."""
    m = trace.manifest
    L, E = len(m.model.moe_layers), m.model.num_experts
    where = f"request_id = {_sql_str(request_id)}"
    rows = query(
        trace,
        f"""SELECT l.layer_index AS li, u.e, count(*) AS n
            FROM ({unpivot_sql(m.top_k, where)}) u JOIN moe_layers l ON u.layer = l.layer
            GROUP BY ALL""",
    )
    if rows.num_rows == 0 and request_id not in {r["request_id"] for r in request_table(trace)}:
        raise AnalysisError(f"{trace.path}: no request {request_id!r}")
    out = np.zeros((L, E), np.int64)
    np.add.at(
        out,
        (
            rows.column("li").to_numpy().astype(np.int64),
            rows.column("e").to_numpy().astype(np.int64),
        ),
        rows.column("n").to_numpy().astype(np.int64),
    )
    return out


def token_routing(
    trace: Trace, request_id: str, layer_index: int, max_tokens: int = MAX_TOKENS_SHOWN
) -> list[dict[str, object]]:
    """Rows (position, phase, rank, expert, weight) of one request at one layer, the
    request's first ``max_tokens`` tokens in order (position 0 = first prompt token)."""
    k = trace.top_k
    lid = layer_id(trace, layer_index)
    ranks = " UNION ALL ".join(
        f"SELECT pos, phase, {i} AS rank, e{i} AS expert, w{i}::DOUBLE AS weight FROM t"
        for i in range(k)
    )
    return query(
        trace,
        f"""WITH t AS (
                SELECT row_number() OVER (ORDER BY step, token) - 1 AS pos, phase::VARCHAR AS phase,
                       {", ".join(f"e{i}, w{i}" for i in range(k))}
                FROM activations_raw
                WHERE request_id = {_sql_str(request_id)} AND layer = {lid}
                ORDER BY step, token LIMIT {int(max_tokens)})
            SELECT * FROM ({ranks}) WHERE expert >= 0 ORDER BY pos, rank""",
    ).to_pylist()


@dataclass(frozen=True)
class Projection:
    """Requests placed in 2-D by PCA of their per-layer normalized activation matrices."""

    request_ids: tuple[str, ...]
    xy: np.ndarray
    explained: tuple[float, float]
    """Share of variance explained by each of the two components."""
    clusters: np.ndarray | None
    """KMeans labels (count picked by silhouette), or None when clustering is impossible."""
    silhouette: float | None
    sampled_from: int


def projection(trace: Trace, seed: int = 0, max_requests: int = MAX_PROJECTED) -> Projection:
    m = trace.manifest
    L, E = len(m.model.moe_layers), m.model.num_experts
    ids = [r["request_id"] for r in request_table(trace)]
    if len(ids) < 3:
        raise AnalysisError(f"{trace.path}: {len(ids)} request(s); a projection needs at least 3")
    total = len(ids)
    if total > max_requests:
        rng = np.random.default_rng(seed)
        ids = [ids[i] for i in np.sort(rng.choice(total, max_requests, replace=False))]
    con = connect(trace)
    try:
        con.register("_chosen", pa.table({"request_id": ids, "rix": np.arange(len(ids))}))
        rows = run_query(
            con,
            f"""SELECT c.rix, l.layer_index AS li, u.e, count(*) AS n
                FROM ({unpivot_sql(m.top_k, "TRUE", "request_id, ")}) u
                JOIN _chosen c USING (request_id) JOIN moe_layers l ON u.layer = l.layer
                GROUP BY ALL""",
        )
    finally:
        con.close()
    mats = np.zeros((len(ids), L, E), np.float32)
    np.add.at(
        mats,
        (
            rows.column("rix").to_numpy().astype(np.int64),
            rows.column("li").to_numpy().astype(np.int64),
            rows.column("e").to_numpy().astype(np.int64),
        ),
        rows.column("n").to_numpy().astype(np.float32),
    )
    return project_matrices(tuple(ids), mats, total, seed)


def project_matrices(
    request_ids: tuple[str, ...], mats: np.ndarray, sampled_from: int, seed: int = 0
) -> Projection:
    """PCA (2 components) and KMeans of (R, L, E) per-request activation counts."""
    if len(request_ids) < 3:
        raise AnalysisError(f"{len(request_ids)} request(s); a projection needs at least 3")
    x = normalize(np.asarray(mats, np.float32))
    from sklearn.decomposition import PCA

    n_comp = min(2, x.shape[0], x.shape[1])
    pca = PCA(n_components=n_comp, random_state=seed)
    xy = pca.fit_transform(x)
    if xy.shape[1] < 2:
        xy = np.hstack([xy, np.zeros((xy.shape[0], 2 - xy.shape[1]))])
    ratios = list(pca.explained_variance_ratio_) + [0.0, 0.0]
    clus = cluster_requests(x, seed)
    return Projection(
        request_ids=tuple(request_ids),
        xy=xy.astype(np.float64),
        explained=(float(ratios[0]), float(ratios[1])),
        clusters=None if clus is None else clus.labels,
        silhouette=None if clus is None else clus.silhouette,
        sampled_from=sampled_from,
    )


MAX_COLOUR_VALUES = 10
"""Distinct values a tag may have to colour the projection (the category palette's size)."""


def colour_tags(
    tags: Sequence[Mapping[str, str]],
) -> tuple[list[str], dict[str, str]]:
    """Tag keys worth colouring requests by, and the others with why not: a key whose
    value is the same for every request says nothing; one with more values than the
    palette has colours repeats colours. A request without the key counts as "(none)"."""
    keys = sorted({k for t in tags for k in t})
    good: list[str] = []
    skipped: dict[str, str] = {}
    for key in keys:
        values = {t.get(key, "(none)") for t in tags}
        if len(values) < 2:
            skipped[key] = "the same for every request"
        elif len(values) > MAX_COLOUR_VALUES:
            skipped[key] = f"{len(values)} values"
        else:
            good.append(key)
    return good, skipped
