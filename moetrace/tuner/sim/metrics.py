"""Simulation results: per layer and phase counters, and the summary metrics."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from moetrace.tuner.sim import kernel as K

if TYPE_CHECKING:
    from moetrace.tuner.sim.timeline import Timeline


def _ratio(a: float, b: float) -> float | None:
    return float(a / b) if b > 0 else None


@dataclass(frozen=True)
class SimResult:
    """What one replay measured. ``stats`` is (NUM_STATS, L, 2 phases), see kernel.S_*."""

    label: str
    stats: np.ndarray
    tokens_by_phase: np.ndarray
    total_seconds: float
    warmup_bytes: float
    bytes_per_expert: int
    bytes_per_expert_assumed: bool
    moe_layers: tuple[int, ...]
    drift: dict[str, Any] | None = None
    """The drift detector's report (see policy.cache.drift_report), if the plan has one."""
    timeline: Timeline | None = None
    """Per access and per event outcomes, when the replay recorded them (``record=True``)."""
    warmup_disk_bytes: float = 0.0
    """Bytes read from disk before the replay: the experts pinned in RAM (RAM tier)."""
    ram: dict[str, Any] | None = None
    """The RAM tier's slots, pinned experts and drift report; None without a RAM tier."""

    def _sum(self, row: int, phase: int | None = None) -> float:
        s = self.stats[row]
        return float(s.sum() if phase is None else s[:, phase].sum())

    def _metrics(self, phase: int | None) -> dict[str, Any]:
        acc = self._sum(K.S_ACCESS, phase)
        hit = self._sum(K.S_HIT, phase)
        served = self._sum(K.S_PF_SERVED, phase)
        used = self._sum(K.S_PF_USED, phase)
        issued = self._sum(K.S_PF_ISSUED, phase)
        tokens = float(self.tokens_by_phase.sum() if phase is None else self.tokens_by_phase[phase])
        stall = self._sum(K.S_STALL, phase)
        return {
            "accesses": int(acc),
            "hit_rate": _ratio(hit, acc),
            "streamed": int(self._sum(K.S_STREAM, phase)),
            "prefetch_issued": int(issued),
            "prefetch_precision": _ratio(used, issued),
            "prefetch_recall": _ratio(served, served + acc - hit),
            "bytes_moved": int(self._sum(K.S_BYTES_DEMAND, phase) + self._sum(K.S_BYTES_PF, phase)),
            "tokens": int(tokens),
            "stall_s": stall,
            "stall_per_token_ms": None if tokens == 0 else 1e3 * stall / tokens,
        } | (self._ram_metrics(phase) if self.ram is not None else {})

    def _ram_metrics(self, phase: int | None) -> dict[str, Any]:
        acc = self._sum(K.S_RAM_ACCESS, phase)
        return {
            "ram_accesses": int(acc),
            "ram_hit_rate": _ratio(self._sum(K.S_RAM_HIT, phase), acc),
            "ram_prefetch_issued": int(self._sum(K.S_RAM_PF_ISSUED, phase)),
            "disk_bytes": int(self._sum(K.S_BYTES_DISK, phase)),
        }

    def summary(self) -> dict[str, Any]:
        out = self._metrics(None)
        out["tokens_per_s"] = _ratio(float(self.tokens_by_phase.sum()), self.total_seconds)
        out["total_s"] = self.total_seconds
        out["warmup_bytes"] = int(self.warmup_bytes)
        if self.ram is not None:
            out["warmup_disk_bytes"] = int(self.warmup_disk_bytes)
            out["ram"] = {k: v for k, v in self.ram.items() if k != "drift"}
            if self.ram["drift"].get("enabled"):
                out["ram"]["drift"] = dict(self.ram["drift"])
        out["bytes_per_expert"] = self.bytes_per_expert
        out["bytes_per_expert_assumed"] = self.bytes_per_expert_assumed
        if self.drift is not None and self.drift.get("enabled"):
            out["drift"] = dict(self.drift)
        for ph, name in enumerate(("prefill", "decode")):
            if self.tokens_by_phase[ph] > 0:
                out[name] = self._metrics(ph)
        return out

    def layer_hit_rates(self) -> tuple[np.ndarray, np.ndarray]:
        """(L, 3) hit rates (columns: all phases, prefill, decode; NaN without accesses)
        and the (L, 3) accesses they are over."""
        acc, hit = self.stats[K.S_ACCESS], self.stats[K.S_HIT]
        acc3 = np.column_stack([acc.sum(axis=1), acc])
        hit3 = np.column_stack([hit.sum(axis=1), hit])
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(acc3 > 0, hit3 / np.maximum(acc3, 1), np.nan), acc3

    def per_layer(self) -> list[dict[str, Any]]:
        rows = []
        for i, layer in enumerate(self.moe_layers):
            for ph, name in enumerate(("prefill", "decode")):
                acc = float(self.stats[K.S_ACCESS, i, ph])
                if acc == 0:
                    continue
                hit = float(self.stats[K.S_HIT, i, ph])
                served = float(self.stats[K.S_PF_SERVED, i, ph])
                used = float(self.stats[K.S_PF_USED, i, ph])
                issued = float(self.stats[K.S_PF_ISSUED, i, ph])
                rows.append(
                    {
                        "layer": layer,
                        "phase": name,
                        "accesses": int(acc),
                        "hit_rate": hit / acc,
                        "prefetch_precision": _ratio(used, issued),
                        "prefetch_recall": _ratio(served, served + acc - hit),
                        "bytes_moved": int(
                            self.stats[K.S_BYTES_DEMAND, i, ph] + self.stats[K.S_BYTES_PF, i, ph]
                        ),
                        "stall_s": float(self.stats[K.S_STALL, i, ph]),
                    }
                )
        return rows

    def to_json(self) -> dict[str, Any]:
        return {"label": self.label, "summary": self.summary(), "per_layer": self.per_layer()}
