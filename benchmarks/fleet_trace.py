"""A synthetic fleet trace built from the statistics of a real trace (documented generator).

``fit`` reads a real moetrace trace (e.g. the DeepSeek-V2-Lite import of
``moe-beyond/deepseek-v2-lite-chat/puffin-1-1000``) and keeps a small :class:`FleetModel`
(saved as JSON beside the output); ``generate`` samples any number of expert selections from
it, as one or several real moetrace traces (one per server of the fleet), through the
project's own :class:`~moetrace.store.writer.TraceWriter`.

The model and the choices behind it
-----------------------------------

Each token at MoE layer ``l`` selects a set ``S`` of ``k`` distinct experts, drawn as ``k``
successive draws *without replacement* from a log-linear (product) distribution over the
``E`` experts::

    m(e) ~ exp(theta[l, 0] * 1[e in S_prev])                    previous token, same layer
         * up(e) ** theta[l, 1],   up(e) = mean_{u in S_up} T[l][u, e]    layer l-1
         * topic[r][l][e] ** theta[l, 2]                        the request's topic

* ``S_prev``: the previous token's set at layer ``l`` in the same request (temporal reuse,
  the main source of LRU hits); ``S_up``: the same token's set at layer ``l - 1``. A missing
  one (first token of a request, layer 0) contributes a constant factor.
* ``T[l]``: the 64x64 first-order transition matrix from layer ``l - 1`` to ``l``: the
  co-occurrence counts ``C[l][u, e]`` (tokens with ``u`` at ``l - 1`` and ``e`` at ``l``) of
  the real trace, row-normalized; each expert of the set above votes with its row.
* ``topic[r]``: per-request topic drift. A synthetic request resamples one real request
  (uniformly) and takes its length and its per-layer expert histogram as its topic,
  smoothed with ``prior_tokens`` pseudo-tokens of the layer's popularity (so no expert has
  probability 0). The histograms are kept sparse in the JSON (the bulk of its ~7 MB).
* ``theta[l]``: three weights per layer, fitted by maximum likelihood (Newton's method) of
  the real selections, each selection treated as one draw from ``m`` (a multinomial logit);
  when fitting, a token's topic leaves the token itself out (its request's histogram minus
  its own set), otherwise a short request would predict itself. Products, not a mixture:
  an additive mixture fitted by EM put all weight on the transition term and lost the
  per-request working set (generated LRU hit rates ~0.22/0.34/0.57 at 8/16/32 experts per
  layer against the real 0.31/0.47/0.71); the product lets the topic and the previous
  token tilt the transition's proposal, and lands within ~0.01 of the real rates.
* The per-layer popularity (selection counts) is kept for the smoothing and for checks.
  Known gap: the product sharpens the transition term (``theta[l, 1]`` ~ 2), so the
  generated per-layer popularity drifts from the real one (total-variation distance ~0.21
  per layer, against ~0.02 between bootstrap resamples of the real requests). An optional
  per-expert logit ``bias`` (``fit(calibrate_iters=N)``, ``--calibrate N``) is fitted by
  iterative proportional fitting on sampled traffic; 4 rounds bring the distance to ~0.15
  but lower the LRU hit rates to ~0.27/0.42/0.66, so it is off by default (the brief is
  reuse, i.e. LRU, fidelity).
* Phases: every token is one prefill forward (phase ``prefill``, step 0, ``forward`` = the
  request's index in its server), like the real trace, which has no decode tokens to fit.
* Expert ids of a row are written sorted, as in the imported real trace (a set; no rank).

Sizes: ``selections`` is rounded up to whole tokens (``L * k`` selections each); the tokens
are split evenly over ``servers``, each server its own trace folder ``server-NN`` with request
ids ``sNN-rNNNNNNN`` (disjoint), the same manifest as the real trace (new source), and its own
random stream (``numpy.random.SeedSequence(seed).spawn(servers)``), so the output is a
deterministic function of ``(model, selections, seed, servers)``. With ``servers=1`` the trace
is written to ``out_dir`` itself.

Speed and memory: the sampler is a numba kernel run on batches of ~``batch_rows`` rows; the
writer encodes and commits parts in its background threads while the next batch is sampled
(the kernel releases the GIL), so memory is bounded by a batch plus the writer's parts in
flight.

Usage:
    python benchmarks/fleet_trace.py --real /tmp/st/deepseek-v2-lite --out /tmp/fleet \\
        --selections 300e6 --servers 4 --seed 0 [--compare 15e6] [--results FILE]

Prints and writes ``OUT/fleet_model.json`` (the fitted model) and ``OUT/fleet_summary.json``
(selections, rows, requests, seconds, peak RSS, versions and, with ``--compare N``, the LRU
hit rates of ``moetrace.tuner.analyze`` on the real trace and on an ``N``-selection generated
trace, side by side).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import resource
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numba
import numpy as np

from moetrace.store.arrays import Routing, load_routing
from moetrace.store.reader import open_trace
from moetrace.store.schema import Manifest, RequestRecord, SourceInfo
from moetrace.store.writer import DEFAULT_PART_ROWS, TraceWriter

MODEL_FILE = "fleet_model.json"
SUMMARY_FILE = "fleet_summary.json"
FEATURES = ("reuse", "log_up", "log_topic")
NEWTON_TOL = 2e-3
"""Newton's method stops once no weight moves more than this."""
FLOOR = 1e-6
"""Floor of the transition and topic probabilities before their log."""


# --------------------------------------------------------------------------- the model
@dataclass
class FleetModel:
    """Statistics of a real trace that :func:`generate` samples from (JSON-serializable)."""

    moe_layers: list[int]
    num_experts: int
    top_k: int
    popularity: list[list[int]]
    """``(L, E)`` selection counts per layer."""
    transitions: list[list[list[int]]]
    """``(L, E, E)`` co-occurrence counts layer ``l-1`` -> ``l`` (``[0]`` is all zeros)."""
    theta: list[list[float]]
    """``(L, 3)`` log-linear weights of the features (reuse, log_up, log_topic) per layer."""
    bias: list[list[float]]
    """``(L, E)`` per-expert logit offsets calibrated so the marginal popularity matches."""
    prior_tokens: float
    """Pseudo-tokens of layer popularity added to every request histogram (smoothing)."""
    request_lengths: list[int]
    """Tokens of each real request (resampled by :func:`generate`)."""
    request_histograms: list[list[list[int]]]
    """Per real request and layer, its expert counts as a flat ``[e, count, e, count...]``."""
    real_stats: dict[str, Any]
    """Checks of the real trace: per-layer mean overlap with the previous token, etc."""
    source: dict[str, Any]
    """Where the model was fitted from, and how."""

    @property
    def num_layers(self) -> int:
        return len(self.moe_layers)

    def save(self, path: str | os.PathLike[str]) -> None:
        Path(path).write_text(json.dumps(dataclasses.asdict(self), separators=(",", ":")) + "\n")

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> FleetModel:
        return cls(**json.loads(Path(path).read_text()))

    def arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """``(T, log_topics, theta, bias)`` as float64 arrays: ``T`` the row-normalized
        transitions, ``log_topics`` ``(R, L, E)`` the log of each real request's smoothed
        per-layer distribution."""
        counts = np.asarray(self.transitions, dtype=np.float64)
        rows = counts.sum(axis=2, keepdims=True)
        T = np.divide(counts, rows, out=np.zeros_like(counts), where=rows > 0)
        pop = np.asarray(self.popularity, dtype=np.float64)
        popn = pop / np.maximum(pop.sum(axis=1, keepdims=True), 1)
        L, E, k = self.num_layers, self.num_experts, self.top_k
        a = self.prior_tokens
        topics = np.empty((len(self.request_lengths), L, E))
        for r, (n, per_layer) in enumerate(
            zip(self.request_lengths, self.request_histograms, strict=True)
        ):
            topics[r] = a * k * popn
            for layer, flat in enumerate(per_layer):
                pairs = np.asarray(flat, dtype=np.int64).reshape(-1, 2)
                topics[r, layer, pairs[:, 0]] += pairs[:, 1]
            topics[r] /= k * (n + a)
        theta = np.ascontiguousarray(np.asarray(self.theta, dtype=np.float64))
        bias = np.ascontiguousarray(np.asarray(self.bias, dtype=np.float64))
        return np.ascontiguousarray(T), np.log(topics + FLOOR), theta, bias


# --------------------------------------------------------------------------- fitting
def _neighbours(routing: Routing) -> tuple[np.ndarray, np.ndarray]:
    """Per row, the row of the previous token at the same layer and request (``prev``) and
    the row of the same token at the previous layer (``up``); -1 where there is none."""
    req = routing.request.astype(np.int64)
    tok = routing.token.astype(np.int64)
    lay = routing.layer.astype(np.int64)
    n = routing.num_rows
    prev = np.full(n, -1, dtype=np.int64)
    up = np.full(n, -1, dtype=np.int64)
    order = np.lexsort((tok, lay, req))  # by request, layer, token
    same = (req[order][1:] == req[order][:-1]) & (lay[order][1:] == lay[order][:-1])
    prev[order[1:][same]] = order[:-1][same]
    order = np.lexsort((lay, tok, req))  # by request, token, layer
    same = (
        (req[order][1:] == req[order][:-1])
        & (tok[order][1:] == tok[order][:-1])
        & (lay[order][1:] == lay[order][:-1] + 1)
    )
    up[order[1:][same]] = order[:-1][same]
    return prev, up


@numba.njit(cache=True, nogil=True)
def _transition_counts(experts, layer, up, L, E):  # pragma: no cover - numba
    C = np.zeros((L, E, E), dtype=np.int64)
    k = experts.shape[1]
    for i in range(experts.shape[0]):
        j = up[i]
        if j < 0:
            continue
        for a in range(k):
            u = experts[j, a]
            if u < 0:
                continue
            for b in range(k):
                e = experts[i, b]
                if e >= 0:
                    C[layer[i], u, e] += 1
    return C


@numba.njit(cache=True, nogil=True)
def _features(lay, p_row, u_row, experts, T, log_topic, out):  # pragma: no cover
    """The three features of every expert for one row into ``out`` ``(E, 3)``: reuse
    (1 if the previous token chose it), log of the mean transition from the layer above,
    log of the request's topic distribution."""
    E = out.shape[0]
    k = experts.shape[1]
    for e in range(E):
        out[e, 0] = 0.0
        out[e, 1] = 0.0
        out[e, 2] = log_topic[e]
    if p_row >= 0:
        for a in range(k):
            if experts[p_row, a] >= 0:
                out[experts[p_row, a], 0] = 1.0
    if u_row >= 0:
        for e in range(E):
            out[e, 1] = 0.0
        for a in range(k):
            u = experts[u_row, a]
            if u >= 0:
                for e in range(E):
                    out[e, 1] += T[lay, u, e] / k
        for e in range(E):
            out[e, 1] = np.log(max(out[e, 1], FLOOR))


@numba.njit(cache=True, nogil=True)
def _newton_step(experts, layer, request, prev, up, T, hist, lengths, popn, alpha, theta):
    """Gradient and Hessian of the log-likelihood of the selections under the log-linear
    model, per layer; the topic feature leaves the row's own token out."""  # pragma: no cover
    n, k = experts.shape
    L, E = popn.shape
    F = 3
    grad = np.zeros((L, F))
    hess = np.zeros((L, F, F))
    f = np.empty((E, F))
    lt = np.empty(E)
    z = np.empty(E)
    own = np.empty(E)
    for i in range(n):
        lay = layer[i]
        r = request[i]
        own[:] = 0.0
        for b in range(k):
            if experts[i, b] >= 0:
                own[experts[i, b]] = 1.0
        for e in range(E):
            lt[e] = np.log(
                (hist[r, lay, e] - own[e] + alpha * k * popn[lay, e])
                / (k * (lengths[r] - 1.0 + alpha))
                + FLOOR
            )
        _features(lay, prev[i], up[i], experts, T, lt, f)
        zmax = -1e300
        for e in range(E):
            z[e] = theta[lay, 0] * f[e, 0] + theta[lay, 1] * f[e, 1] + theta[lay, 2] * f[e, 2]
            zmax = max(zmax, z[e])
        tot = 0.0
        for e in range(E):
            z[e] = np.exp(z[e] - zmax)
            tot += z[e]
        mean = np.zeros(F)
        for e in range(E):
            for a in range(F):
                mean[a] += z[e] / tot * f[e, a]
        for e in range(E):
            pe = z[e] / tot
            for a in range(F):
                for b in range(F):
                    hess[lay, a, b] -= k * pe * (f[e, a] - mean[a]) * (f[e, b] - mean[b])
        for b in range(k):
            e = experts[i, b]
            if e >= 0:
                for a in range(F):
                    grad[lay, a] += f[e, a] - mean[a]
    return grad, hess


def _overlap_stats(experts: np.ndarray, layer: np.ndarray, prev: np.ndarray, L: int) -> list:
    """Per layer, the mean number of a token's experts also used by the previous token."""
    has = prev >= 0
    a = np.sort(experts[has], axis=1)
    b = np.sort(experts[prev[has]], axis=1)
    same = (a[:, :, None] == b[:, None, :]).any(axis=2).sum(axis=1)
    return [float(x) for x in np.bincount(layer[has], weights=same, minlength=L) /
            np.maximum(np.bincount(layer[has], minlength=L), 1)]  # fmt: skip


def fit(
    routing: Routing,
    *,
    prior_tokens: float = 4.0,
    newton_iters: int = 8,
    calibrate_iters: int = 0,
) -> FleetModel:
    """Fit a :class:`FleetModel` to ``routing`` (see the module docstring)."""
    L, E, k = routing.num_layers, routing.num_experts, routing.top_k
    R = len(routing.request_ids)
    ex = routing.experts.astype(np.int64)
    lay = routing.layer.astype(np.int64)
    req = routing.request.astype(np.int64)
    valid = ex >= 0
    prev, up = _neighbours(routing)
    lay_k = np.broadcast_to(lay[:, None], ex.shape)[valid]
    req_k = np.broadcast_to(req[:, None], ex.shape)[valid]
    pop = np.bincount(lay_k * E + ex[valid], minlength=L * E).reshape(L, E)
    popn = pop / np.maximum(pop.sum(axis=1, keepdims=True), 1)
    counts = _transition_counts(ex, lay, up, L, E)
    T = counts / np.maximum(counts.sum(axis=2, keepdims=True), 1)
    hist = np.bincount((req_k * L + lay_k) * E + ex[valid], minlength=R * L * E)
    hist = hist.reshape(R, L, E).astype(np.float64)
    lengths = np.bincount(req, minlength=R) // L  # rows per request / layers = tokens
    theta = np.zeros((L, 3))
    theta[:, 1:] = 1.0
    for _ in range(newton_iters):
        moved = 0.0
        grad, hess = _newton_step(ex, lay, req, prev, up, T, hist, lengths.astype(np.float64),
                                  popn, float(prior_tokens), theta)  # fmt: skip
        for layer_ in range(L):
            free = [0, 2] if layer_ == 0 else [0, 1, 2]  # layer 0 has no layer above
            h = hess[layer_][np.ix_(free, free)] - 1e-9 * np.eye(len(free))
            step = np.linalg.solve(h, grad[layer_, free])
            theta[layer_, free] -= step
            moved = max(moved, float(np.abs(step).max()))
        if moved < NEWTON_TOL:
            break
    histograms = []
    for r in range(R):
        per_layer = []
        for layer_ in range(L):
            nz = np.flatnonzero(hist[r, layer_])
            per_layer.append(
                np.stack([nz, hist[r, layer_, nz].astype(np.int64)], 1).ravel().tolist()
            )
        histograms.append(per_layer)
    model = FleetModel(
        moe_layers=[int(x) for x in routing.moe_layers],
        num_experts=E,
        top_k=k,
        popularity=pop.tolist(),
        transitions=counts.tolist(),
        theta=np.round(theta, 6).tolist(),
        bias=np.zeros((L, E)).tolist(),
        prior_tokens=float(prior_tokens),
        request_lengths=lengths.tolist(),
        request_histograms=histograms,
        real_stats={
            "rows": routing.num_rows,
            "requests": R,
            "tokens": int(lengths.sum()),
            "prev_overlap": _overlap_stats(routing.experts, lay, prev, L),
        },
        source={
            "newton_iters": newton_iters,
            "features": list(FEATURES),
            "calibrate_iters": calibrate_iters,
        },  # fmt: skip
    )
    calibrate(model, popn, calibrate_iters, int(lengths.sum()))
    return model


def calibrate(model: FleetModel, target: np.ndarray, iters: int, tokens: int) -> None:
    """Fit ``model.bias`` so the generated per-layer popularity matches ``target``: sample
    about ``tokens`` tokens (at least 20k), then ``bias += log(target / generated)``
    (iterative proportional fitting, ``iters`` rounds; fixed seed, so deterministic)."""
    L, E = target.shape
    real_len = np.asarray(model.request_lengths, dtype=np.int64)
    rng = np.random.default_rng(12345)
    idx = rng.integers(0, real_len.size, 4 * real_len.size)
    take = int(np.searchsorted(np.cumsum(real_len[idx]), max(tokens, 20_000))) + 1
    idx = idx[:take]
    seeds = rng.integers(0, 2**32, idx.size, dtype=np.int64).astype(np.uint32)
    layers = np.asarray(model.moe_layers, dtype=np.int16)
    ids = {int(x): i for i, x in enumerate(model.moe_layers)}
    lay_index = np.zeros(int(layers.max()) + 1, dtype=np.int64)
    lay_index[list(ids)] = list(ids.values())
    for _ in range(iters):
        T, log_topics, theta, bias = model.arrays()
        _, layer, experts = _sample(real_len[idx], idx, T, log_topics, theta, bias, layers,
                                    model.top_k, seeds)  # fmt: skip
        lay = np.broadcast_to(lay_index[layer][:, None], experts.shape)
        got = np.bincount((lay * E + experts).ravel(), minlength=L * E).reshape(L, E)
        got = (got + 0.5) / (got + 0.5).sum(axis=1, keepdims=True)
        step = np.log(np.maximum(target, 1e-9) / got)
        model.bias = np.round(bias + np.clip(step, -2, 2), 6).tolist()


# --------------------------------------------------------------------------- sampling
@numba.njit(cache=True, nogil=True)
def _sample(
    lengths, topic_ids, T, log_topics, theta, bias, moe_layers, k, seeds
):  # pragma: no cover
    """Rows of the requests ``lengths`` (token-major, layers in order): token, layer id and
    sorted expert sets, sampled from the model (see the module docstring); request ``r``
    is drawn from its own random stream ``seeds[r]``."""
    L = T.shape[0]
    E = T.shape[1]
    n = 0
    for r in range(lengths.shape[0]):
        n += lengths[r] * L
    token = np.empty(n, dtype=np.int32)
    layer = np.empty(n, dtype=np.int16)
    experts = np.empty((n, k), dtype=np.int16)
    m = np.empty(E, dtype=np.float64)
    f = np.empty((E, 3), dtype=np.float64)
    chosen = np.empty(k, dtype=np.int64)
    row = 0
    for r in range(lengths.shape[0]):
        c = topic_ids[r]
        np.random.seed(seeds[r])
        for t in range(lengths[r]):
            for lay in range(L):
                p_row = row - L if t > 0 else -1
                u_row = row - 1 if lay > 0 else -1
                _features(lay, p_row, u_row, experts, T, log_topics[c, lay], f)
                zmax = -1e300
                for e in range(E):
                    m[e] = (
                        theta[lay, 0] * f[e, 0]
                        + theta[lay, 1] * f[e, 1]
                        + theta[lay, 2] * f[e, 2]
                        + bias[lay, e]
                    )
                    zmax = max(zmax, m[e])
                for e in range(E):
                    m[e] = np.exp(m[e] - zmax)
                total = 0.0
                for e in range(E):
                    total += m[e]
                for j in range(k):
                    x = np.random.random() * total
                    pick = -1
                    acc = 0.0
                    for e in range(E):
                        if m[e] > 0.0:
                            acc += m[e]
                            pick = e
                            if acc > x:
                                break
                    if pick < 0:  # numerically exhausted: take any expert not yet chosen
                        for e in range(E):
                            if m[e] >= 0.0:
                                pick = e
                                break
                    chosen[j] = pick
                    total -= m[pick]
                    m[pick] = -1.0  # excluded from later draws
                    if total < 0.0:
                        total = 0.0
                # insertion sort of the k chosen ids
                for j in range(1, k):
                    v = chosen[j]
                    i = j - 1
                    while i >= 0 and chosen[i] > v:
                        chosen[i + 1] = chosen[i]
                        i -= 1
                    chosen[i + 1] = v
                for j in range(k):
                    experts[row, j] = chosen[j]
                token[row] = t
                layer[row] = moe_layers[lay]
                row += 1
    return token, layer, experts


# --------------------------------------------------------------------------- writing
REQUEST_BLOCK = 4096
"""Requests are drawn in blocks of this many (a fixed stream: batching does not matter)."""


def fleet_manifest(real: Manifest, *, server: int, servers: int, seed: int) -> Manifest:
    """The real trace's manifest (same model and fingerprint) with a synthetic source."""
    return dataclasses.replace(
        real,
        source=SourceInfo(
            kind="synthetic",
            origin="benchmarks/fleet_trace.py",
            path=real.source.path,
            tool_version=_version(),
        ),
        tags={
            "name": f"fleet-{real.model.name}",
            "server": f"{server:02d}",
            "servers": str(servers),
            "seed": str(seed),
        },
    )


def _server_tokens(total: int, servers: int) -> list[int]:
    return [total // servers + (s < total % servers) for s in range(servers)]


def write_server(
    model: FleetModel,
    path: Path,
    manifest: Manifest,
    tokens: int,
    seed: np.random.SeedSequence,
    *,
    prefix: str,
    batch_rows: int = 1 << 21,
    part_rows: int = DEFAULT_PART_ROWS,
) -> dict[str, int]:
    """Write one server's trace of exactly ``tokens`` tokens; returns its counts."""
    L, k = model.num_layers, model.top_k
    T, log_topics, theta, bias = model.arrays()
    layers = np.asarray(model.moe_layers, dtype=np.int16)
    real_len = np.asarray(model.request_lengths, dtype=np.int64)
    rng = np.random.default_rng(seed)
    pool = np.empty((0, 2), dtype=np.int64)  # drawn, unwritten requests: (real index, seed)
    done = requests = 0
    with TraceWriter(path, manifest, part_rows=part_rows) as writer:
        while done < tokens:
            need = tokens - done
            target = min(need, max(batch_rows // L, 1))
            while int(real_len[pool[:, 0]].sum()) < target:
                block = np.stack(
                    [
                        rng.integers(0, real_len.size, REQUEST_BLOCK),
                        rng.integers(0, 2**32, REQUEST_BLOCK, dtype=np.int64),
                    ],
                    axis=1,
                )
                pool = np.concatenate([pool, block])
            cum = np.cumsum(real_len[pool[:, 0]])
            take = int(np.searchsorted(cum, target)) + 1
            batch, pool = pool[:take], pool[take:]
            lengths = real_len[batch[:, 0]].copy()
            if lengths.sum() > need:  # the server's last request is cut to its quota
                lengths[-1] -= int(lengths.sum()) - need
            topic_ids = batch[:, 0]
            token, layer, experts = _sample(
                lengths,
                topic_ids,
                T,
                log_topics,
                theta,
                bias,
                layers,
                k,
                batch[:, 1].astype(np.uint32),
            )
            at = 0
            for r in range(lengths.size):
                n = int(lengths[r]) * L
                writer.write_request(
                    RequestRecord(
                        f"{prefix}-r{requests:07d}",
                        prompt_tokens=int(lengths[r]),
                        tags={"like": str(int(topic_ids[r]))},
                    ),
                    token=token[at : at + n],
                    step=0,
                    phase=0,
                    forward=requests,
                    layer=layer[at : at + n],
                    experts=experts[at : at + n],
                )
                at += n
                requests += 1
            done += int(lengths.sum())
    return {"tokens": done, "rows": done * L, "selections": done * L * k, "requests": requests}


def generate(
    model: FleetModel,
    out_dir: str | os.PathLike[str],
    selections: int,
    seed: int = 0,
    servers: int = 1,
    *,
    manifest: Manifest,
    batch_rows: int = 1 << 21,
    part_rows: int = DEFAULT_PART_ROWS,
) -> dict[str, Any]:
    """Write at least ``selections`` expert selections (rounded up to whole tokens) as
    ``servers`` traces (``out_dir/server-NN``; ``out_dir`` itself when ``servers == 1``)
    with disjoint request ids; ``manifest`` is the real trace's. Returns the counts."""
    if servers < 1:
        raise ValueError(f"servers must be >= 1, got {servers}")
    out = Path(out_dir)
    per_token = model.num_layers * model.top_k
    total = -(-int(selections) // per_token)
    seeds = np.random.SeedSequence(seed).spawn(servers)
    result: dict[str, Any] = {"tokens": 0, "rows": 0, "selections": 0, "requests": 0}
    result["servers"] = []
    for s, tokens in enumerate(_server_tokens(total, servers)):
        path = out if servers == 1 else out / f"server-{s:02d}"
        t0 = time.perf_counter()
        counts = write_server(
            model,
            path,
            fleet_manifest(manifest, server=s, servers=servers, seed=seed),
            tokens,
            seeds[s],
            prefix=f"s{s:02d}",
            batch_rows=batch_rows,
            part_rows=part_rows,
        )
        for key, value in counts.items():
            result[key] += value
        result["servers"].append({"path": str(path), **counts,
                                  "seconds": round(time.perf_counter() - t0, 2)})  # fmt: skip
    return result


# --------------------------------------------------------------------------- checks and CLI
def _version() -> str:
    import moetrace

    return moetrace.__version__


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def trace_stats(path: str | os.PathLike[str], model: FleetModel) -> dict[str, Any]:
    """LRU/Belady hit rates (``moetrace.tuner.analyze``), per-layer overlap with the
    previous token and per-layer popularity of a trace."""
    from moetrace.tuner.analyze import AnalyzeConfig, analyze

    report = analyze(path, AnalyzeConfig(sections=()))
    routing = load_routing(open_trace(path))
    prev, _ = _neighbours(routing)
    lay = routing.layer.astype(np.int64)
    ex = routing.experts.astype(np.int64)
    pop = np.zeros((routing.num_layers, routing.num_experts))
    np.add.at(pop, (np.broadcast_to(lay[:, None], ex.shape), ex), 1.0)
    return {
        "rows": routing.num_rows,
        "requests": len(routing.request_ids),
        "cache_sizes": list(report.mrc.policy_sizes),
        "model_lru_at": [round(x, 4) for x in report.mrc.model_lru_at],
        "model_belady": [round(x, 4) for x in report.mrc.model_belady],
        "prev_overlap": _overlap_stats(routing.experts, lay, prev, routing.num_layers),
        "popularity": pop / pop.sum(axis=1, keepdims=True),
    }


def compare(real: Path, model: FleetModel, manifest: Manifest, selections: int, seed: int) -> dict:
    """Side by side: the real trace and a generated one of ``selections`` selections."""
    with tempfile.TemporaryDirectory(prefix="fleet-compare-") as tmp:
        generate(model, Path(tmp) / "t", selections, seed, manifest=manifest)
        gen = trace_stats(Path(tmp) / "t", model)
    ref = trace_stats(real, model)
    tv = 0.5 * np.abs(ref.pop("popularity") - gen.pop("popularity")).sum(axis=1)
    for side in (ref, gen):
        side["prev_overlap_mean"] = round(float(np.mean(side.pop("prev_overlap"))), 3)
    return {
        "real": ref,
        "generated": gen,
        "popularity_tv_distance_per_layer_mean": round(float(tv.mean()), 4),
    }


def _count(text: str) -> int:
    return int(float(text))


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--real", required=True, help="the real moetrace trace to fit")
    ap.add_argument("--out", required=True, help="output folder (must not hold a trace)")
    ap.add_argument("--selections", type=_count, default=300_000_000)
    ap.add_argument("--servers", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch-rows", type=_count, default=1 << 21)
    ap.add_argument("--part-rows", type=_count, default=DEFAULT_PART_ROWS)
    ap.add_argument("--compare", type=_count, default=0,
                    help="also compare LRU hit rates on a generated trace of this many "
                         "selections against the real trace (0: skip)")  # fmt: skip
    ap.add_argument("--calibrate", type=int, default=0,
                    help="rounds of per-expert bias calibration of the popularity (0: none)")  # fmt: skip
    ap.add_argument("--results", default=None, help="also write the summary JSON here")
    args = ap.parse_args(argv)
    out = Path(args.out)
    if (out / "manifest.json").exists() or any(out.glob("server-*")):
        ap.error(f"{out} already holds a trace; remove it first")
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    real = open_trace(args.real)
    model = fit(load_routing(real), calibrate_iters=args.calibrate)
    model.source["real"] = str(Path(args.real).resolve())
    model.save(out / MODEL_FILE)
    fit_s = time.perf_counter() - t0
    rss_fit = _peak_rss_mb()
    print(f"fit {model.real_stats['rows']} rows, {model.real_stats['requests']} requests in "
          f"{fit_s:.1f} s; theta (reuse, log_up, log_topic) e.g. layer 0 "
          f"{model.theta[0]}, layer 13 {model.theta[13]}", flush=True)  # fmt: skip
    t1 = time.perf_counter()
    result = generate(
        model,
        out,
        args.selections,
        args.seed,
        args.servers,
        manifest=real.manifest,
        batch_rows=args.batch_rows,
        part_rows=args.part_rows,
    )
    gen_s = time.perf_counter() - t1
    summary: dict[str, Any] = {
        "config": {k: v for k, v in vars(args).items()},
        "versions": {
            "moetrace": _version(),
            "python": platform.python_version(),
            "numpy": np.__version__,
            "numba": numba.__version__,
        },
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count()},
        "selections": result["selections"],
        "rows": result["rows"],
        "tokens": result["tokens"],
        "requests": result["requests"],
        "servers": result["servers"],
        "fit_seconds": round(fit_s, 2),
        "seconds": round(gen_s, 2),
        "selections_per_second": round(result["selections"] / gen_s),
        "peak_rss_mb_after_fit": round(rss_fit, 1),
        "peak_rss_mb": round(_peak_rss_mb(), 1),
        "bytes_on_disk": sum(p.stat().st_size for p in out.rglob("*.parquet")),
    }
    print(f"wrote {result['selections']:,} selections ({result['rows']:,} rows, "
          f"{result['requests']:,} requests, {args.servers} server(s)) in {gen_s:.1f} s, "
          f"peak RSS {summary['peak_rss_mb']:.0f} MB", flush=True)  # fmt: skip
    if args.compare:
        t2 = time.perf_counter()
        summary["lru_comparison"] = compare(
            Path(args.real), model, real.manifest, args.compare, args.seed
        )
        summary["compare_seconds"] = round(time.perf_counter() - t2, 2)
    text = json.dumps(summary, indent=1)
    print(text)
    (out / SUMMARY_FILE).write_text(text + "\n")
    if args.results:
        Path(args.results).write_text(text + "\n")
    return summary


if __name__ == "__main__":
    sys.exit(main() and 0)
