"""Hit rate vs cache size of every MoE layer at once (small multiples), and the slots each
layer needs for 80% / 90% hits under LRU and Belady-MIN.

One routing load of a seeded request sample (smaller than one layer's replay on the Skew
and reuse page, :data:`ALL_LAYERS_SAMPLE_TOKENS`), then per layer the curves of
:func:`moetrace.dashboard.data.reuse.stream_curves` (LRU exact at every size, LFU and
Belady at a grid) on a thread pool (the numba kernels release the GIL). The slots for a
target are exact: LRU's from its curve, Belady's by
:func:`moetrace.tuner.mining.replacement.smallest_size_reaching` (a few more runs).
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from moetrace.dashboard.data.common import routing_for_layers
from moetrace.dashboard.data.reuse import policy_sizes, sample_requests, stream_curves
from moetrace.store.reader import Trace
from moetrace.tuner.mining.curves import TARGETS, default_workers
from moetrace.tuner.mining.mrc import smallest_size
from moetrace.tuner.mining.replacement import TokenStream, smallest_size_reaching
from moetrace.tuner.mining.streams import layer_rows, layer_stream

ALL_LAYERS_SAMPLE_TOKENS = 16_384
"""Tokens replayed at most for the all-layer curves: beyond, a seeded sample of whole
requests (every layer replays the same requests)."""
ALL_LAYERS_POINTS = 6
"""Cache sizes at which LFU and Belady are simulated per layer (LRU: every size)."""


@dataclass(frozen=True)
class LayerCurves:
    """Curves of every MoE layer; slots arrays hold 0 where a target is never reached."""

    layers: tuple[int, ...]
    """Model layer ids."""
    accesses: np.ndarray
    """(L,) accesses replayed per layer."""
    lru: np.ndarray
    """(L, E) LRU hit rate at sizes 1..E."""
    sizes: tuple[int, ...]
    lfu: np.ndarray
    """(L, S) at :attr:`sizes`."""
    belady: np.ndarray
    targets: tuple[float, ...]
    lru_slots: np.ndarray
    """(L, T) smallest LRU cache reaching each target (0: none does)."""
    belady_slots: np.ndarray
    requests_used: int
    requests_total: int

    @property
    def sampled(self) -> bool:
        return self.requests_used < self.requests_total

    def to_arrays(self) -> dict[str, np.ndarray]:
        out = {
            f: np.asarray(getattr(self, f))
            for f in ("layers", "sizes", "targets", "requests_used", "requests_total")
        }
        for f in ("accesses", "lru", "lfu", "belady", "lru_slots", "belady_slots"):
            out[f] = getattr(self, f)
        return out

    @classmethod
    def from_arrays(cls, a: dict[str, np.ndarray]) -> LayerCurves:
        return cls(
            layers=tuple(int(x) for x in a["layers"]),
            accesses=a["accesses"],
            lru=a["lru"],
            sizes=tuple(int(x) for x in a["sizes"]),
            lfu=a["lfu"],
            belady=a["belady"],
            targets=tuple(float(x) for x in a["targets"]),
            lru_slots=a["lru_slots"],
            belady_slots=a["belady_slots"],
            requests_used=int(a["requests_used"]),
            requests_total=int(a["requests_total"]),
        )


def layer_curves(
    trace: Trace,
    phase: str = "all",
    max_tokens: int | None = ALL_LAYERS_SAMPLE_TOKENS,
    seed: int = 0,
    workers: int | None = None,
) -> LayerCurves:
    """Every layer's curves on one seeded sample of whole requests (None: all of them)."""
    model = trace.manifest.model
    E, k, L = model.num_experts, trace.top_k, len(model.moe_layers)
    chosen, used, total = sample_requests(trace, phase, max_tokens, seed)
    routing = routing_for_layers(trace, tuple(range(L)), phase, chosen)
    rows = layer_rows(routing) if routing.num_rows else [np.zeros(0, np.int64)] * L
    sizes = policy_sizes(E, k, ALL_LAYERS_POINTS)

    def one(layer: int) -> tuple[int, np.ndarray, np.ndarray, np.ndarray, list[int], list[int]]:
        st = layer_stream(routing, layer, rows[layer])
        n = st.num_accesses
        if n == 0:
            S = len(sizes)
            return 0, np.zeros(E), np.zeros(S), np.zeros(S), [0] * len(TARGETS), [0] * len(TARGETS)
        _, lru, _, lfu, bel = stream_curves(st.experts, st.row, E, k, ALL_LAYERS_POINTS)
        ts = TokenStream(st.experts, st.row, E)
        known = {c: float(r) for c, r in zip(sizes, bel, strict=True)}
        lo = max(k, ts.widest)
        bel_slots = [
            smallest_size_reaching(lambda c: ts.belady_hits(c) / n, lo, E, t, known) or 0
            for t in TARGETS
        ]
        return n, lru, lfu, bel, [smallest_size(lru, t) or 0 for t in TARGETS], bel_slots

    with ThreadPoolExecutor(max_workers=workers or default_workers()) as pool:
        res = list(pool.map(one, range(L)))
    return LayerCurves(
        layers=tuple(int(x) for x in model.moe_layers),
        accesses=np.array([r[0] for r in res], np.int64),
        lru=np.array([r[1] for r in res], np.float64).reshape(L, E),
        sizes=sizes,
        lfu=np.array([r[2] for r in res], np.float64).reshape(L, len(sizes)),
        belady=np.array([r[3] for r in res], np.float64).reshape(L, len(sizes)),
        targets=tuple(float(t) for t in TARGETS),
        lru_slots=np.array([r[4] for r in res], np.int64).reshape(L, len(TARGETS)),
        belady_slots=np.array([r[5] for r in res], np.int64).reshape(L, len(TARGETS)),
        requests_used=used,
        requests_total=total,
    )
