"""Dense numpy views of a trace's routing, in replay order, for mining and simulation.

Only the narrow integer columns are materialized (about 2 bytes per expert slot plus
~16 bytes per row), so a 15M-activation trace fits in a few hundred MB.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from moetrace.errors import AnalysisError, CountTraceError, TraceFormatError
from moetrace.store import schema as S
from moetrace.store.reader import Trace
from moetrace.store.sql import connect

ORDERS = ("arrival", "forward")
"""``arrival``: requests one after another in arrival order (each request's steps in
order); ``forward``: as recorded, by global forward-pass index (batched interleaving)."""


@dataclass(frozen=True)
class Routing:
    """Rows of a trace in replay order, one per (request, token, MoE layer).

    ``request`` indexes :attr:`request_ids` (arrival order); ``layer`` is the position in
    :attr:`moe_layers` (0..L-1), not the model layer id; ``experts`` is ``(n, k)``.
    """

    request_ids: tuple[str, ...]
    moe_layers: tuple[int, ...]
    num_experts: int
    top_k: int
    request: np.ndarray  # int32
    token: np.ndarray  # int32
    step: np.ndarray  # int32
    phase: np.ndarray  # int8: 0 prefill, 1 decode
    forward: np.ndarray  # int64
    layer: np.ndarray  # int16, 0..L-1
    experts: np.ndarray  # int16 (n, k), -1 = dropped
    speculative: np.ndarray | None = None  # int16 (n, k), -1 = none

    @property
    def num_rows(self) -> int:
        return int(self.request.shape[0])

    @property
    def num_layers(self) -> int:
        return len(self.moe_layers)

    def select(self, mask: np.ndarray) -> Routing:
        """The rows where ``mask`` is true (same request/layer numbering)."""
        return Routing(
            request_ids=self.request_ids,
            moe_layers=self.moe_layers,
            num_experts=self.num_experts,
            top_k=self.top_k,
            request=self.request[mask],
            token=self.token[mask],
            step=self.step[mask],
            phase=self.phase[mask],
            forward=self.forward[mask],
            layer=self.layer[mask],
            experts=self.experts[mask],
            speculative=None if self.speculative is None else self.speculative[mask],
        )


def _out_of_range(ids: np.ndarray, num_experts: int) -> bool:
    """Whether ``ids`` holds a value outside ``[-1, num_experts)`` (vectorised min/max)."""
    return bool(ids.size) and (int(ids.min()) < S.DROPPED_EXPERT or int(ids.max()) >= num_experts)


def require_routing(trace: Trace) -> None:
    """Raise :class:`CountTraceError` (one line) when ``trace`` holds counts only."""
    if not trace.is_count_trace:
        return
    origin = trace.manifest.source.origin
    raise CountTraceError(
        f"{trace.path} holds per-expert counts only"
        + (f" (imported from {origin})" if origin else "")
        + "; the simulator replays token-level routing: record with "
        "`moetrace record --server` or import per-token dumps (sglang-dump)"
    )


def load_routing(
    trace: Trace,
    *,
    phase: str | None = None,
    requests: Sequence[str] | None = None,
    order: str = "arrival",
    layers: Sequence[int] | None = None,
) -> Routing:
    """Load routing rows of a trace, optionally one phase, a subset of requests and a
    subset of MoE layers (``layers``: MoE-layer indices, renumbered 0..n-1 in the given
    order; the other layers are never read). A count trace (per-expert counts only) has
    no routing: :class:`CountTraceError` (every simulator, tuner and replay load comes
    through here)."""
    require_routing(trace)
    if order not in ORDERS:
        raise AnalysisError(f"order must be one of {ORDERS}, got {order!r}")
    if phase is not None and phase not in S.PHASES:
        raise AnalysisError(f"phase must be one of {S.PHASES} or None, got {phase!r}")
    m = trace.manifest
    k = m.top_k
    con = connect(trace)
    req = con.sql("SELECT request_id FROM requests ORDER BY arrival, request_id").to_arrow_table()
    all_ids = req.column(0).to_pylist()
    if requests is None:
        wanted = all_ids
    else:
        subset = set(requests)
        unknown = sorted(subset.difference(all_ids))
        if unknown:
            raise AnalysisError(
                f"{trace.path}: request(s) {unknown[:5]} are not in the trace "
                f"({len(all_ids)} requests)"
            )
        wanted = [r for r in all_ids if r in subset]
    con.register(
        "_req_index",
        pa.table(
            {
                "request_id": pa.array(wanted, pa.string()),
                "rix": pa.array(range(len(wanted)), pa.int32()),
            }
        ),
    )
    all_layers = m.model.moe_layers
    chosen = list(range(len(all_layers))) if layers is None else [int(i) for i in layers]
    bad = [i for i in chosen if not 0 <= i < len(all_layers)]
    if bad:
        raise AnalysisError(f"MoE layer indices {bad} out of range [0, {len(all_layers)})")
    layer_ids = tuple(all_layers[i] for i in chosen)
    con.register(
        "_layer_index",
        pa.table(
            {
                "layer": pa.array(layer_ids, pa.int16()),
                "lix": pa.array(range(len(layer_ids)), pa.int16()),
            }
        ),
    )
    where = f"WHERE a.phase = '{phase}'" if phase else ""
    sort = (
        "r.rix, a.step, a.token, l.lix"
        if order == "arrival"
        else "a.forward, r.rix, a.token, l.lix"
    )
    spec = "".join(f", a.s{i}" for i in range(k)) if m.speculative else ""
    query = f"""
        SELECT r.rix::INTEGER AS rix, a.token, a.step, (a.phase = 'decode')::TINYINT AS ph,
               a.forward, l.lix::SMALLINT AS lix, {", ".join(f"a.e{i}" for i in range(k))}{spec}
        FROM activations_raw a
        JOIN _req_index r USING (request_id)
        JOIN _layer_index l ON a.layer = l.layer
        {where}
        ORDER BY {sort}
    """
    tbl = con.sql(query).to_arrow_table()

    def col(name: str, dtype: type) -> np.ndarray:
        return tbl.column(name).to_numpy().astype(dtype, copy=False)

    experts = np.empty((tbl.num_rows, k), dtype=np.int16)
    for i in range(k):
        experts[:, i] = col(f"e{i}", np.int16)
    speculative = None
    if m.speculative:
        speculative = np.empty((tbl.num_rows, k), dtype=np.int16)
        for i in range(k):
            speculative[:, i] = tbl.column(f"s{i}").fill_null(-1).to_numpy().astype(np.int16)
    con.close()
    num_experts = m.model.num_experts
    if _out_of_range(experts, num_experts) or (
        speculative is not None and _out_of_range(speculative, num_experts)
    ):
        trace.check_expert_ids()  # raises naming the part (the trace may be opened unvalidated)
        raise TraceFormatError(
            f"{trace.path}: expert ids outside [{S.DROPPED_EXPERT}, {num_experts}) for the "
            f"manifest's num_experts={num_experts} (the manifest and the data disagree)"
        )
    return Routing(
        request_ids=tuple(wanted),
        moe_layers=layer_ids,
        num_experts=m.model.num_experts,
        top_k=k,
        request=col("rix", np.int32),
        token=col("token", np.int32),
        step=col("step", np.int32),
        phase=col("ph", np.int8),
        forward=col("forward", np.int64),
        layer=col("lix", np.int16),
        experts=experts,
        speculative=speculative,
    )
