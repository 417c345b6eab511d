"""The per-trace aggregates of the dashboard in one numpy pass over the Parquet parts.

One streaming read of the narrow columns (``request_id``, ``phase``, ``layer``,
``e0..e{k-1}``, dictionary-encoded strings kept as indices) yields, with ``np.bincount``:
per phase the (L, E) expert counts and (L,) token-layer rows, and the (L, E) activation
matrix of every request (of a seeded sample when the trace has too many requests for
:data:`MATRIX_CELLS`). Experts, Skew and reuse, Groups, Plans and Requests all start from
it; the dashboard keeps it in the on-disk cache (:mod:`moetrace.dashboard.diskcache`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from moetrace.dashboard.data.experts import PhaseCounts
from moetrace.errors import AnalysisError
from moetrace.store import schema as S
from moetrace.store.reader import Trace

MAX_REQUESTS = 2000
"""Requests whose matrices are kept at most (the projection's sample)."""
MATRIX_CELLS = 8_000_000
"""Cap on requests x layers x experts counted (int64 x 2 phases: 128 MB while counting)."""
BATCH_ROWS = 1 << 20


@dataclass(frozen=True)
class TraceSummary:
    """Counts of one trace: per phase (of :data:`moetrace.store.schema.PHASES`) and per
    (sampled) request, layers indexed 0..L-1 in the order of ``moe_layers``."""

    moe_layers: tuple[int, ...]
    num_experts: int
    counts: np.ndarray
    """(P, L, E) int64 activation counts per phase."""
    tokens: np.ndarray
    """(P, L) int64 token-layer rows per phase (dropped slots included)."""
    request_ids: tuple[str, ...]
    """Requests with a matrix, in arrival order (all, or a seeded sample)."""
    request_counts: np.ndarray
    """(R, L, E) int32 activation counts of each request in ``request_ids``, all phases."""
    sampled_from: int
    """Requests in the trace."""

    def __post_init__(self) -> None:
        P, L, E = len(S.PHASES), len(self.moe_layers), self.num_experts
        if self.counts.shape != (P, L, E) or self.tokens.shape != (P, L):
            raise AnalysisError(
                f"summary counts {self.counts.shape} / tokens {self.tokens.shape} do not "
                f"match ({P}, {L}, {E})"
            )
        if self.request_counts.shape != (len(self.request_ids), L, E):
            raise AnalysisError(
                f"request_counts {self.request_counts.shape} do not match "
                f"{len(self.request_ids)} requests x ({L}, {E})"
            )

    @property
    def sampled(self) -> bool:
        return len(self.request_ids) < self.sampled_from

    def phase_counts(self) -> PhaseCounts:
        return PhaseCounts(
            self.moe_layers,
            {p: self.counts[i] for i, p in enumerate(S.PHASES)},
            {p: self.tokens[i] for i, p in enumerate(S.PHASES)},
        )

    def request_matrix(self, request_id: str) -> np.ndarray | None:
        """(L, E) int64 counts of one request, or None when it is not in the sample."""
        try:
            i = self.request_ids.index(request_id)
        except ValueError:
            return None
        return self.request_counts[i].astype(np.int64)

    def to_arrays(self) -> dict[str, np.ndarray]:
        return {
            "moe_layers": np.asarray(self.moe_layers, np.int64),
            "num_experts": np.asarray(self.num_experts, np.int64),
            "counts": self.counts,
            "tokens": self.tokens,
            "request_ids": np.asarray(self.request_ids, dtype=np.str_),
            "request_counts": self.request_counts,
            "sampled_from": np.asarray(self.sampled_from, np.int64),
        }

    @classmethod
    def from_arrays(cls, a: dict[str, np.ndarray]) -> TraceSummary:
        return cls(
            moe_layers=tuple(int(x) for x in a["moe_layers"]),
            num_experts=int(a["num_experts"]),
            counts=a["counts"].astype(np.int64),
            tokens=a["tokens"].astype(np.int64),
            request_ids=tuple(str(x) for x in a["request_ids"]),
            request_counts=a["request_counts"].astype(np.int32),
            sampled_from=int(a["sampled_from"]),
        )


def sample_requests(ids: list[str], limit: int, seed: int = 0) -> list[str]:
    """``ids`` when at most ``limit``, else a seeded sample of ``limit`` kept in order."""
    if len(ids) <= limit:
        return list(ids)
    pick = np.sort(np.random.default_rng(seed).choice(len(ids), limit, replace=False))
    return [ids[i] for i in pick]


def _indices(col: pa.ChunkedArray | pa.Array, lookup: dict[str, int]) -> np.ndarray:
    """Map a (dictionary-encoded) string column to ``lookup`` values (-1 when absent)."""
    arr = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    if not pa.types.is_dictionary(arr.type):
        arr = arr.dictionary_encode()
    table = np.array([lookup.get(v, -1) for v in arr.dictionary.to_pylist()] + [-1], np.int64)
    idx = arr.indices.to_numpy(zero_copy_only=False).astype(np.int64)
    return table[idx]


def trace_summary(trace: Trace, seed: int = 0) -> TraceSummary:
    """Compute the :class:`TraceSummary` in one streaming pass (see the module docstring)."""
    m = trace.manifest
    layers = tuple(int(x) for x in m.model.moe_layers)
    L, E, k, P = len(layers), m.model.num_experts, m.top_k, len(S.PHASES)
    req = trace.requests()
    all_ids = [str(x) for x in req.column("request_id").to_pylist()]
    limit = max(1, min(MAX_REQUESTS, MATRIX_CELLS // max(L * E, 1)))
    chosen = sample_requests(all_ids, limit, seed)
    slot = {rid: i for i, rid in enumerate(chosen)}
    R = len(chosen)
    layer_ix = np.full(max(layers) + 1, -1, np.int64)
    layer_ix[list(layers)] = np.arange(L)
    phase_ix = {p: i for i, p in enumerate(S.PHASES)}
    # one bincount per batch over (request slot or "other", phase, layer, expert)
    cells = (R + 1) * P * L * E
    full = np.zeros(cells, np.int64)
    tokens = np.zeros(P * L, np.int64)
    cols = ["request_id", "phase", "layer", *(f"e{i}" for i in range(k))]
    for batch in trace.iter_activations(cols, batch_size=BATCH_ROWS):
        lid = batch.column("layer").to_numpy(zero_copy_only=False).astype(np.int64)
        bad = (lid < 0) | (lid >= layer_ix.size)
        li = np.where(bad, -1, layer_ix[np.where(bad, 0, lid)])
        if (li < 0).any():
            raise AnalysisError(
                f"{trace.path}: layer {lid[li < 0][0]} is not one of the MoE layers {layers}"
            )
        ph = _indices(batch.column("phase"), phase_ix)
        if (ph < 0).any():
            raise AnalysisError(f"{trace.path}: an activations part has an unknown phase")
        rs = _indices(batch.column("request_id"), slot)
        pl = ph * L + li
        tokens += np.bincount(pl, minlength=P * L)
        base = (((np.where(rs < 0, R, rs) * P * L) + pl) * E).astype(np.intp)
        code = np.empty((lid.size, k), np.intp)
        for i in range(k):
            e = batch.column(f"e{i}").to_numpy(zero_copy_only=False)
            code[:, i] = np.nan_to_num(e, nan=-1) if e.dtype.kind == "f" else e
        valid = code >= 0
        code += base[:, None]
        code = code.ravel() if valid.all() else code[valid]
        full += np.bincount(code, minlength=cells)
    full = full.reshape(R + 1, P, L, E)
    counts = full.sum(axis=0)
    req_counts = full[:R].sum(axis=1)
    return TraceSummary(
        moe_layers=layers,
        num_experts=E,
        counts=counts,
        tokens=tokens.reshape(P, L),
        request_ids=tuple(chosen),
        request_counts=req_counts.astype(np.int32),
        sampled_from=len(all_ids),
    )
