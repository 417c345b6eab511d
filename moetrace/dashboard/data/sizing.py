"""The sizing grid a plan file carries (``expected.sizing``, written by ``moetrace tune
--sweep``; the object ``moetrace size --out`` writes): modeled tokens/s for each device
and host-RAM size, as a chart table, the RAM sizes in order, the Pareto frontier, and the
smallest sizes that reach a target (recomputed with the tuner's own function).

Sizes are the file's: megabytes of 10^6 bytes, shown as GB of 10^9 bytes."""

from __future__ import annotations

import statistics
from collections.abc import Mapping, Sequence
from typing import Any

import pandas as pd

ALL_IN_RAM = "all in RAM"
"""The ``ram_tier`` of a point whose RAM holds every expert (no disk tier)."""
EVERY_EXPERT = "every expert in RAM"


def number(value: Any) -> float | None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    return float(value) if ok else None


def rate(value: Any) -> str:
    """Tokens per second, three significant digits below 1,000 (a 9.7 vs 7.9 tok/s
    difference shows): 9.6968 -> '9.7/s', 2398.77 -> '2,399/s'."""
    from moetrace.dashboard import numbers as N

    v = number(value)
    if v is None or v != v or abs(v) >= 1000:
        return N.per_s(v)
    return f"{v:.3g}/s"


def gb(mb: float | None) -> str:
    """Megabytes (10^6 B) as gigabytes (10^9 B), three significant digits: 19629 -> '19.6 GB'."""
    return "—" if mb is None else f"{mb / 1e3:.3g} GB"


def sizing_info(plan: Any) -> dict[str, Any] | None:
    """The plan's ``expected.sizing`` when it has points, else None."""
    info = dict(plan.expected).get("sizing")
    if not isinstance(info, Mapping) or not valid_points(info.get("points")):
        return None
    return dict(info)


def valid_points(points: Any) -> list[dict[str, Any]]:
    """The grid points with device MB, RAM MB and tokens/s all numbers."""
    if not isinstance(points, list):
        return []
    keys = ("device_mb", "ram_mb", "tokens_per_s")
    return [
        dict(p)
        for p in points
        if isinstance(p, Mapping) and all(number(p.get(k)) is not None for k in keys)
    ]


def _every_expert_slots(info: Mapping[str, Any]) -> int | None:
    model = info.get("model")
    if not isinstance(model, Mapping):
        return None
    layers, experts = model.get("moe_layers"), model.get("experts")
    if isinstance(layers, int) and isinstance(experts, int):
        return layers * experts
    return None


def is_all_in_ram(point: Mapping[str, Any], info: Mapping[str, Any]) -> bool:
    """Whether the point's RAM holds every expert (its tier says so, or its RAM slots
    reach layers x experts)."""
    if point.get("ram_tier") == ALL_IN_RAM:
        return True
    every, slots = _every_expert_slots(info), point.get("ram_slots")
    return every is not None and isinstance(slots, int) and slots >= every


def ram_label(point: Mapping[str, Any], info: Mapping[str, Any]) -> str:
    """The legend entry of the point's RAM size (GB; the every-expert size named)."""
    size = f"{float(point['ram_mb']) / 1e3:.3g}"
    return f"{EVERY_EXPERT} ({size})" if is_all_in_ram(point, info) else size


def point_key(p: Mapping[str, Any]) -> tuple[float, float]:
    return (float(p["device_mb"]), float(p["ram_mb"]))


def ram_order(info: Mapping[str, Any]) -> list[str]:
    """The RAM sizes of the grid (legend entries), smallest first."""
    pts = sorted(valid_points(info.get("points")), key=lambda p: float(p["ram_mb"]))
    return list(dict.fromkeys(ram_label(p, info) for p in pts))


def frontier_keys(info: Mapping[str, Any]) -> set[tuple[float, float]]:
    """(device MB, RAM MB) of the file's Pareto-frontier points."""
    return {point_key(p) for p in valid_points(info.get("frontier"))}


def sizing_frame(info: Mapping[str, Any]) -> pd.DataFrame:
    """One row per grid point: device GB, tokens/s, RAM size (legend), frontier flag and
    the texts of the tooltip."""
    from moetrace.dashboard import numbers as N

    front = frontier_keys(info)
    rows = []
    for p in valid_points(info.get("points")):
        tiers = p.get("tiers") if isinstance(p.get("tiers"), Mapping) else {}
        tier = str(p.get("ram_tier") or N.MISSING)
        ram_hit = (tiers.get(tier) or {}).get("ram_hit_rate") if tier in tiers else None
        rows.append({
            "device_gb": float(p["device_mb"]) / 1e3,
            "tokens_per_s": float(p["tokens_per_s"]),
            "ram": ram_label(p, info),
            "ram_gb": float(p["ram_mb"]) / 1e3,
            "frontier": point_key(p) in front,
            "device_text": f"{gb(float(p['device_mb']))} ({N.plain(p.get('device_slots'))} slots)",
            "ram_text": f"{gb(float(p['ram_mb']))} ({N.plain(p.get('ram_slots'))} slots)",
            "tps_text": rate(p["tokens_per_s"]),
            "device_hit": N.pct(number(p.get("device_hit_rate"))),
            "ram_hit": N.pct(number(ram_hit)) if not is_all_in_ram(p, info) else "100% (no disk)",
            "tier": tier,
        })  # fmt: skip
    return pd.DataFrame(rows)


def default_target(info: Mapping[str, Any]) -> float:
    """The file's target tokens/s, else the median modeled tokens/s of the grid."""
    target = number(info.get("target_tps"))
    if target is not None and target > 0:
        return target
    values = [float(p["tokens_per_s"]) for p in valid_points(info.get("points"))]
    return float(statistics.median(values)) if values else 1.0


def smallest_sizes(
    points: Sequence[Mapping[str, Any]], target: float
) -> tuple[list[dict[str, Any]] | None, str | None]:
    """For each device size, the smallest RAM reaching ``target`` tokens/s (the tuner's
    :func:`moetrace.tuner.sizing.smallest`), or None and why it is not available."""
    try:
        from moetrace.tuner.sizing import smallest
    except ImportError as exc:
        return None, f"the sizing module of the tuner is not available ({exc})"
    return [dict(p) for p in smallest([dict(p) for p in points], float(target))], None


def smallest_frame(rows: Sequence[Mapping[str, Any]], info: Mapping[str, Any]) -> pd.DataFrame:
    """The sizes that reach a target, formatted (one row per device size)."""
    from moetrace.dashboard import numbers as N

    return pd.DataFrame(
        {
            "device": [gb(float(p["device_mb"])) for p in rows],
            "RAM": [
                f"{gb(float(p['ram_mb']))}"
                + (f" ({EVERY_EXPERT})" if is_all_in_ram(p, info) else "")
                for p in rows
            ],
            "tokens/s (modeled)": [rate(p["tokens_per_s"]) for p in rows],
            "device slots": [N.plain(p.get("device_slots")) for p in rows],
            "RAM slots": [N.plain(p.get("ram_slots")) for p in rows],
            "RAM tier": [str(p.get("ram_tier") or N.MISSING) for p in rows],
        }
    )
