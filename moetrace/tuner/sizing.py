"""Sizing: modeled tokens/s over a grid of device and host-RAM budgets (``moetrace size``).

"What is the smallest GPU and RAM that give N tok/s for this traffic?" For each device
budget the device runs plain LRU (per-layer, evenly split: what a user runs before
tuning); for each RAM budget below every expert, RAM over disk runs both as plain LRU
and with the placement of :mod:`moetrace.tuner.placement` pinned on the device's misses
(with its drift detector), and the faster of the two is the point's figure. Placements
are fitted on the early half of the requests (arrival order) and every point is replayed
on the late half: sizing is for the traffic that comes next, not the traffic it was
fitted on. A RAM budget of 100% is every expert in host RAM (no disk tier).

Memory is each tier's worst case: its slots plus ``top_k`` staging experts (device), the
RAM slots plus ``top_k`` staging (RAM), or every expert (RAM at 100%).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from moetrace.errors import ConfigError
from moetrace.store.hardware import HardwareProfile, load_hardware
from moetrace.store.plan import Adaptation, Plan
from moetrace.tuner.parallel import Fanout, default_workers, shared
from moetrace.tuner.placement import Placement, device_misses, ram_drift_window
from moetrace.tuner.sim.engine import DEFAULT_BYTES_PER_EXPERT, make_plan, simulate
from moetrace.tuner.sim.layouts import uniform_layout
from moetrace.tuner.sim.trace import events_for, load_traces, parse_budget

log = logging.getLogger(__name__)

DEVICE_BUDGETS = ("2.5%", "5%", "10%", "15%", "20%", "30%", "50%")
RAM_BUDGETS = ("10%", "25%", "50%", "75%", "100%")
PINNED = Placement("pin misses 0.75", "lru", "misses", 0.75)


@dataclass(frozen=True)
class SizingConfig:
    """Options of ``moetrace size``: the budgets of the grid (the syntax of ``--budget``),
    the hardware profile (needs a disk link for RAM budgets under 100%), the replay
    granularity, how many of the trace's last requests to size on (None: all), and the
    tokens/s to find the smallest sizes for."""

    device_budgets: tuple[str, ...] = DEVICE_BUDGETS
    ram_budgets: tuple[str, ...] = RAM_BUDGETS
    hardware: str | None = None
    granularity: str = "token"
    bytes_per_expert: int | None = None
    max_requests: int | None = None
    target_tps: float | None = None
    workers: int | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "device_budgets", tuple(self.device_budgets))
        object.__setattr__(self, "ram_budgets", tuple(self.ram_budgets))
        if not self.device_budgets or not self.ram_budgets:
            raise ConfigError("sizing needs at least one device budget and one RAM budget")
        if self.granularity not in ("pass", "token"):
            raise ConfigError(f"granularity must be pass or token, got {self.granularity!r}")
        if self.max_requests is not None and self.max_requests < 2:
            raise ConfigError(f"max_requests must be >= 2, got {self.max_requests}")
        if self.target_tps is not None and not self.target_tps > 0:
            raise ConfigError(f"target tokens/s must be > 0, got {self.target_tps}")
        if self.bytes_per_expert is not None and self.bytes_per_expert <= 0:
            raise ConfigError(f"bytes_per_expert must be > 0, got {self.bytes_per_expert}")


def _point(
    plan: Plan, ram: Any, ev: Any, hw: HardwareProfile, bpe: int
) -> tuple[float, float | None, float | None]:
    """A task: (tokens/s, device hit rate, RAM hit rate) of ``plan`` with tier ``ram``."""
    s = simulate(shared(ev), replace(plan, ram=ram), hw, bytes_per_expert=bpe).summary()
    return float(s["tokens_per_s"] or 0.0), s["hit_rate"], s.get("ram_hit_rate")


def size(traces: Sequence[str | os.PathLike[str]], config: SizingConfig) -> dict[str, Any]:
    """The sizing grid and its frontier for ``traces`` (JSON-ready; see the module)."""
    hw = load_hardware(config.hardware)
    loaded = load_traces(traces)
    model = loaded.model
    L, E, k = len(model.moe_layers), model.num_experts, model.top_k
    bpe = int(config.bytes_per_expert or model.bytes_per_expert or DEFAULT_BYTES_PER_EXPERT)
    n = len(loaded.routing.request_ids)
    idx = np.arange(n)
    if config.max_requests is not None:
        idx = idx[-config.max_requests :]
    if len(idx) < 2:
        raise ConfigError(f"sizing needs at least 2 requests, the traces have {len(idx)}")
    half = len(idx) // 2
    fit = events_for(loaded, idx[:half], granularity=config.granularity)
    ev = events_for(loaded, idx[half:], granularity=config.granularity)
    dev_slots = sorted({parse_budget(b, L, E, bpe) for b in config.device_budgets})
    ram_slots = sorted({min(parse_budget(b, L, E, bpe), L * E) for b in config.ram_budgets})
    if any(r < L * E for r in ram_slots) and not hw.has_disk_link:
        raise ConfigError(
            f"RAM budgets under every expert need a hardware profile with a disk link; "
            f"{hw.name!r} has none (measure one with `moetrace profile`)"
        )
    runs, keys = [], []
    with Fanout(config.workers or default_workers()) as fan:
        handle = fan.share("sizing:events", ev)
        for d in dev_slots:
            plan = make_plan(ev, loaded.shape, uniform_layout(d, L, E), "lru",
                             bytes_per_expert=bpe, fit_events=fit)  # fmt: skip
            misses = device_misses(fit, plan, hw, bpe)  # once per device size
            window = ram_drift_window(fit, misses) if hw.has_disk_link else 0
            adapt = Adaptation("lru", window)
            for r in ram_slots:
                if r >= L * E:
                    tiers = {"all in RAM": None}
                else:
                    tiers = {p.name: p.tier(plan, fit, r, hw, bpe, adapt, misses)
                             for p in (Placement("lru"), PINNED)}  # fmt: skip
                for name, tier in tiers.items():
                    runs.append((plan, tier, handle, hw, bpe))
                    keys.append((d, r, name))
        got = fan.map(_point, runs)
    points: dict[tuple[int, int], dict[str, Any]] = {}
    for (d, r, name), (tps, hit, ram_hit) in zip(keys, got, strict=True):
        p = points.setdefault((d, r), {
            "device_slots": d, "ram_slots": r,
            "device_mb": (d + k) * bpe / 1e6,
            "ram_mb": (r + k) * bpe / 1e6 if r < L * E else L * E * bpe / 1e6,
            "device_hit_rate": hit, "tiers": {},
        })  # fmt: skip
        p["tiers"][name] = {"tokens_per_s": tps, "ram_hit_rate": ram_hit}
    rows = []
    for p in points.values():
        best = max(p["tiers"], key=lambda t: p["tiers"][t]["tokens_per_s"])
        rows.append({**p, "tokens_per_s": p["tiers"][best]["tokens_per_s"], "ram_tier": best})
    rows.sort(key=lambda r: (r["device_slots"], r["ram_slots"]))
    return {
        "traces": list(loaded.paths),
        "model": {
            "name": model.name,
            "moe_layers": L,
            "experts": E,
            "top_k": k,
            "bytes_per_expert": bpe,
        },  # fmt: skip
        "hardware": hw.to_json(),
        "granularity": config.granularity,
        "fitted_on_requests": int(half),
        "replayed_requests": int(len(idx) - half),
        "tokens": int(ev.tokens_by_phase.sum()),
        "points": rows,
        "frontier": frontier(rows),
        "target_tps": config.target_tps,
        "smallest": None if config.target_tps is None else smallest(rows, config.target_tps),
    }


def frontier(points: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The Pareto frontier: points no other point beats on device MB, RAM MB and tokens/s
    at once (at most as much memory of both kinds and at least as fast, one strictly)."""

    def key(p: dict[str, Any]) -> tuple[float, float, float]:
        return (p["device_mb"], p["ram_mb"], -p["tokens_per_s"])

    def beats(q: dict[str, Any], p: dict[str, Any]) -> bool:
        a, b = key(q), key(p)
        return a != b and all(x <= y for x, y in zip(a, b, strict=True))

    return [p for p in points if not any(beats(q, p) for q in points)]


def smallest(points: Sequence[dict[str, Any]], target_tps: float) -> list[dict[str, Any]]:
    """For each device size, the smallest RAM that reaches ``target_tps`` (the sizes
    that give it: none when no point of the grid does)."""
    out = []
    for d in sorted({p["device_mb"] for p in points}):
        ok = [p for p in points if p["device_mb"] == d and p["tokens_per_s"] >= target_tps]
        if ok:
            best = min(ok, key=lambda p: p["ram_mb"])
            if not out or best["ram_mb"] < out[-1]["ram_mb"]:
                out.append(best)
    return out


def format_sizing(data: dict[str, Any]) -> str:
    """The grid as a table of tokens/s (rows: device MB; columns: RAM MB), then the
    smallest sizes for the target."""
    pts = data["points"]
    devs = sorted({p["device_mb"] for p in pts})
    rams = sorted({p["ram_mb"] for p in pts})
    by = {(p["device_mb"], p["ram_mb"]): p for p in pts}
    m = data["model"]
    lines = [
        f"{data['tokens']} tokens replayed ({data['granularity']}), {m['moe_layers']} MoE "
        f"layers x {m['experts']} experts of {m['bytes_per_expert'] / 1e6:.1f} MB, hardware "
        f"{data['hardware']['name']}; modeled tokens/s (* = pinned placement beats RAM LRU):",
        f"{'device GB':>10} | " + " ".join(f"{f'RAM {r / 1e3:.1f}':>11}" for r in rams),
    ]
    for d in devs:
        cells = []
        for r in rams:
            p = by.get((d, r))
            mark = "*" if p is not None and p["ram_tier"] == PINNED.name else " "
            cell = "-" if p is None else f"{p['tokens_per_s']:.1f}"
            cells.append(f"{cell:>10}{mark}")
        lines.append(f"{d / 1e3:>10.1f} | " + " ".join(cells))
    if data["target_tps"] is not None:
        got = data["smallest"]
        if not got:
            lines.append(f"no size of the grid gives {data['target_tps']:g} tok/s")
        for p in got:
            lines.append(
                f"{data['target_tps']:g} tok/s: device {p['device_mb'] / 1e3:.1f} GB + RAM "
                f"{p['ram_mb'] / 1e3:.1f} GB ({p['tokens_per_s']:.1f} tok/s, RAM {p['ram_tier']})"
            )
    return "\n".join(lines)
