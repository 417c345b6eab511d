"""Request-level expert activation matrices (as in MoE-Infinity), clustering, predictors.

A request's activation matrix counts, for each MoE layer and expert, the tokens of the
request routed there. Matrices are normalized per layer (each layer row sums to 1) and
flattened before clustering (scikit-learn KMeans, the number of clusters picked by
silhouette) and nearest-neighbour search (cosine).

Prediction protocol (``score_predictors``): requests in arrival order; the last
``test_fraction`` are scored, the rest train. For a test request the first
``min(prefix_tokens, T // 2)`` of its T tokens are the known prefix; the rest are the
target. A predictor names, per layer, C experts to keep resident; its recall@C is the
share of the target's activations (all layers) that fall on them. Predictors:

``frequency``  the C experts most used per layer by train requests (the baseline)
``prefix``     the C experts most used per layer by the request's own prefix
``cluster``    the C top experts of the nearest KMeans centroid (fitted on train) to the
               request's normalized prefix matrix
``nearest``    the C top experts of the earlier request whose whole matrix is most
               cosine-similar to the request's prefix matrix
``prompt``     the same with similarity = TF-IDF cosine of prompt text and tags (Remoe's
               similar-prompt search); only when prompts or tags are present
Ties are broken towards the baseline's order.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from moetrace.store.arrays import Routing
from moetrace.tuner.mining.serial import Serializable

PREDICTORS = ("frequency", "prefix", "cluster", "nearest", "prompt")


def token_ordinals(routing: Routing) -> np.ndarray:
    """Per row, the 0-based index of its token within its request (arrival order rows)."""
    n = routing.num_rows
    if n == 0:
        return np.zeros(0, np.int64)
    new = np.ones(n, bool)
    new[1:] = (
        (routing.request[1:] != routing.request[:-1])
        | (routing.step[1:] != routing.step[:-1])
        | (routing.token[1:] != routing.token[:-1])
    )
    glob = np.cumsum(new) - 1
    first = np.ones(n, bool)
    first[1:] = routing.request[1:] != routing.request[:-1]
    start = np.zeros(len(routing.request_ids), np.int64)
    start[routing.request[first]] = glob[first]
    return glob - start[routing.request]


def activation_matrices(
    routing: Routing, rows: np.ndarray | None = None, num_requests: int | None = None
) -> np.ndarray:
    """(R, L, E) float32 activation counts per request (optionally over some rows only)."""
    num_requests = len(routing.request_ids) if num_requests is None else num_requests
    L, E, k = routing.num_layers, routing.num_experts, routing.top_k
    req = routing.request if rows is None else routing.request[rows]
    lay = routing.layer if rows is None else routing.layer[rows]
    ex = routing.experts if rows is None else routing.experts[rows]
    base = (req.astype(np.int64) * L + lay.astype(np.int64)) * E
    out = np.zeros(num_requests * L * E, np.float64)
    for r in range(k):
        ok = ex[:, r] >= 0
        out += np.bincount(base[ok] + ex[ok, r], minlength=out.size)
    return out.reshape(num_requests, L, E).astype(np.float32)


def normalize(mats: np.ndarray) -> np.ndarray:
    """Per-layer normalized, flattened matrices (R, L*E); empty layers stay zero."""
    s = mats.sum(axis=2, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        norm = np.where(s > 0, mats / s, 0.0)
    return norm.reshape(mats.shape[0], -1).astype(np.float32)


@dataclass(frozen=True)
class Clustering:
    labels: np.ndarray
    n_clusters: int
    silhouette: float
    centroids: np.ndarray


def cluster_requests(
    x: np.ndarray, seed: int, max_clusters: int = 8, max_dims: int = 32
) -> Clustering | None:
    """KMeans on rows of ``x`` with the cluster count (2..max) of best silhouette.

    Rows are first projected on their ``max_dims`` principal components (seeded
    randomized PCA) when wider; centroids are returned in the original space (member
    means).
    """
    from sklearn.cluster import KMeans
    from sklearn.decomposition import PCA
    from sklearn.metrics import silhouette_score
    from threadpoolctl import threadpool_limits

    x = np.asarray(x, dtype=np.float64)
    n = x.shape[0]
    if n < 3 or np.unique(x, axis=0).shape[0] < 2:
        return None
    best: tuple[np.ndarray, int, float] | None = None
    # One BLAS/OpenMP thread: the matrices are small and contended threads are far slower.
    with threadpool_limits(limits=1):
        z = x
        if x.shape[1] > max_dims and n > max_dims:
            z = PCA(
                n_components=max_dims, svd_solver="randomized", random_state=seed
            ).fit_transform(x)
        for c in range(2, min(max_clusters, n - 1) + 1):
            labels = KMeans(n_clusters=c, n_init=3, random_state=seed).fit(z).labels_
            if np.unique(labels).size < 2:
                continue
            sil = float(silhouette_score(z, labels, sample_size=min(n, 2000), random_state=seed))
            if best is None or sil > best[2]:
                best = (labels.astype(np.int64), c, sil)
    if best is None:
        return None
    labels, c, sil = best
    centroids = np.stack(
        [
            x[labels == i].mean(axis=0) if (labels == i).any() else np.zeros(x.shape[1])
            for i in range(c)
        ]
    )
    return Clustering(labels, c, sil, centroids)


def _cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    na = np.linalg.norm(a, axis=1, keepdims=True)
    nb = np.linalg.norm(b, axis=1, keepdims=True)
    return (a / np.maximum(na, 1e-12)) @ (b / np.maximum(nb, 1e-12)).T


def prompt_similarity(texts: Sequence[str | None]) -> np.ndarray | None:
    """(R, R) TF-IDF cosine similarity of prompt documents, or None when none has text."""
    from sklearn.feature_extraction.text import TfidfVectorizer

    docs = [t or "" for t in texts]
    if sum(1 for d in docs if d.strip()) < 2:
        return None
    try:
        tfidf = TfidfVectorizer(token_pattern=r"(?u)\b[\w=:.-]+\b").fit_transform(docs)
    except ValueError:  # empty vocabulary
        return None
    return (tfidf @ tfidf.T).toarray()


@dataclass(frozen=True)
class PredictorScores(Serializable):
    sizes: tuple[int, ...]
    recall: dict[str, tuple[float, ...]]
    """Mean recall@C over test requests, per predictor, one per size."""
    recall_per_layer: dict[str, tuple[float, ...]]
    """Recall per layer at ``sizes[len(sizes) // 2]``, per predictor."""
    test_requests: int
    train_requests: int
    prefix_tokens: int


def _recall_at(scores: np.ndarray, target: np.ndarray, sizes: Sequence[int]) -> np.ndarray:
    """Target activations on the top-C experts of ``scores``: (len(sizes), T, L)."""
    order = np.argsort(-scores, axis=2, kind="stable")
    sorted_target = np.take_along_axis(target, order, axis=2)
    cum = np.cumsum(sorted_target, axis=2)
    return np.stack([cum[:, :, c - 1] for c in sizes])


def score_predictors(
    routing: Routing,
    sizes: Sequence[int],
    *,
    seed: int = 0,
    test_fraction: float = 0.3,
    prefix_tokens: int = 16,
    prompts: Sequence[str | None] | None = None,
    clustering_max: int = 8,
) -> PredictorScores | None:
    """Score the request-level predictors (see module docstring); None with < 2 requests."""
    R = len(routing.request_ids)
    if R < 2 or routing.num_rows == 0:
        return None
    ordinal = token_ordinals(routing)
    ntok = np.zeros(R, np.int64)
    np.maximum.at(ntok, routing.request, ordinal + 1)
    prefix_len = np.minimum(prefix_tokens, ntok // 2)
    in_prefix = ordinal < prefix_len[routing.request]
    full = activation_matrices(routing)
    pre = activation_matrices(routing, np.flatnonzero(in_prefix))
    later = full - pre
    n_test = max(1, int(round(R * test_fraction)))
    n_test = min(n_test, R - 1)
    test = np.arange(R - n_test, R)
    test = test[(prefix_len[test] > 0) & (later[test].sum(axis=(1, 2)) > 0)]
    if test.size == 0:
        return None
    train = np.arange(R - n_test)
    L, E = routing.num_layers, routing.num_experts
    glob = full[train].sum(axis=0)
    tie = 1e-6 * glob / np.maximum(glob.sum(axis=1, keepdims=True), 1.0)
    nfull = normalize(full)
    npre = normalize(pre)
    preds: dict[str, np.ndarray] = {
        "frequency": np.broadcast_to(glob, (test.size, L, E)),
        "prefix": pre[test] + tie,
    }
    clus = cluster_requests(nfull[train], seed, clustering_max)
    if clus is not None:
        d = ((npre[test][:, None, :] - clus.centroids[None, :, :]) ** 2).sum(axis=2)
        preds["cluster"] = clus.centroids[d.argmin(axis=1)].reshape(-1, L, E) + tie
    sim = _cosine(npre[test], nfull)
    neighbours = []
    for i, r in enumerate(test):
        neighbours.append(int(np.argmax(sim[i, :r])))
    preds["nearest"] = nfull[neighbours].reshape(-1, L, E) + tie
    if prompts is not None:
        psim = prompt_similarity(prompts)
        if psim is not None:
            near = [int(np.argmax(psim[r, :r])) for r in test]
            preds["prompt"] = nfull[near].reshape(-1, L, E) + tie
    target = later[test]
    total = target.sum(axis=(1, 2))
    total_layer = target.sum(axis=2)
    mid = len(sizes) // 2
    recall, per_layer = {}, {}
    for name in PREDICTORS:
        if name not in preds:
            continue
        hits = _recall_at(np.asarray(preds[name], dtype=np.float64), target, sizes)
        recall[name] = tuple(float((hits[s].sum(axis=1) / total).mean()) for s in range(len(sizes)))
        with np.errstate(divide="ignore", invalid="ignore"):
            layer_rec = hits[mid].sum(axis=0) / total_layer.sum(axis=0)
        per_layer[name] = tuple(float(x) for x in layer_rec)
    return PredictorScores(
        sizes=tuple(int(s) for s in sizes),
        recall=recall,
        recall_per_layer=per_layer,
        test_requests=int(test.size),
        train_requests=int(train.size),
        prefix_tokens=int(prefix_tokens),
    )
