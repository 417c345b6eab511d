"""Plans and runtime statistics for the dashboard: load each file on its own (a broken
file is reported, the others still shown), pinned experts as a layers x experts mask,
the cache layout and the expected metrics flattened to a table."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from moetrace.errors import MoetraceError, PlanError
from moetrace.store.schema import Manifest


@dataclass(frozen=True)
class LoadedPlan:
    """A plan file: the plan, or the error that stopped it loading."""

    path: str
    plan: Any | None = None
    """A :class:`moetrace.store.plan.Plan` when loaded."""
    error: str | None = None
    mismatch: str | None = None
    """Why the plan is not for the selected trace's model (None: it is)."""

    @property
    def name(self) -> str:
        return Path(self.path).stem


def plan_module_available() -> str | None:
    """None when :mod:`moetrace.store.plan` is importable, else why not."""
    try:
        import moetrace.store.plan  # noqa: F401
    except ImportError as exc:
        return f"the plan format module is not available ({exc})"
    return None


def load_plans(paths: tuple[str, ...], manifest: Manifest | None = None) -> tuple[LoadedPlan, ...]:
    missing = plan_module_available()
    if missing:
        return tuple(LoadedPlan(p, error=missing) for p in paths)
    from moetrace.store.plan import load_plan

    out = []
    for p in paths:
        try:
            plan = load_plan(p)
        except MoetraceError as exc:
            out.append(LoadedPlan(p, error=str(exc)))
            continue
        mismatch = None
        if manifest is not None:
            try:
                plan.check_compatible(manifest)
            except PlanError as exc:
                mismatch = str(exc)
        out.append(LoadedPlan(p, plan=plan, mismatch=mismatch))
    return tuple(out)


def pinned_mask(plan: Any) -> np.ndarray:
    """(L, E) bool: True where the plan pins the expert."""
    L, E = plan.routing.num_layers, plan.routing.num_experts
    mask = np.zeros((L, E), bool)
    for i, row in enumerate(plan.eviction.pinned):
        mask[i, list(row)] = True
    return mask


def flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    """Nested JSON -> ``{"a.b.c": scalar}``; lists of scalars are kept as text."""
    out: dict[str, Any] = {}
    if isinstance(value, Mapping):
        for k, v in value.items():
            out.update(flatten(v, f"{prefix}.{k}" if prefix else str(k)))
    elif isinstance(value, (list, tuple)):
        if all(not isinstance(v, (Mapping, list, tuple)) for v in value) and len(value) <= 16:
            out[prefix] = ", ".join(str(v) for v in value)
        else:
            out[prefix] = f"[{len(value)} items]"
    else:
        out[prefix] = value
    return out


def expected_rows(plan: Any) -> list[dict[str, Any]]:
    """``expected.rows`` as written by ``moetrace tune``: one dict per simulated run on the
    validation split (``name`` = "plan", "lru", "belady (oracle bound, ...)", ...)."""
    rows = dict(plan.expected).get("rows")
    if not isinstance(rows, list):
        return []
    return [dict(r) for r in rows if isinstance(r, Mapping) and "name" in r]


def _plan_row(plan: Any) -> Mapping[str, Any]:
    for row in expected_rows(plan):
        if row["name"] == "plan":
            return row
    exp = dict(plan.expected)
    for candidate in (exp.get("plan"), exp.get("metrics"), exp.get("summary"), exp):
        if isinstance(candidate, Mapping) and "hit_rate" in candidate:
            return candidate
    return {}


def expected_metric(plan: Any, name: str) -> float | None:
    """A metric of the plan itself from ``expected`` (its validation run), if recorded."""
    v = _plan_row(plan).get(name)
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None


def expected_hit_rate(plan: Any) -> float | None:
    """The plan's own expected hit rate (validation split), if recorded."""
    return expected_metric(plan, "hit_rate")


def plan_facts(plan: Any) -> dict[str, Any]:
    """The plan's headline facts (one column of the comparison table)."""
    caps = plan.layout.capacities
    return {
        "budget slots": plan.budget.slots,
        "layout": plan.layout.kind,
        "pool slots": plan.layout.pool_slots,
        "slots per layer (min..max)": f"{min(caps)}..{max(caps)}",
        "pinned experts": plan.num_pinned,
        "eviction policy": plan.eviction.policy,
        "eviction params": json.dumps(dict(plan.eviction.params), sort_keys=True),
        "prefetcher": plan.prefetch.name,
        "prefetch lookahead (layers)": plan.prefetch.lookahead,
        "prefetch fetch (experts)": plan.prefetch.fetch,
        "phase overrides": ", ".join(sorted(plan.phase_overrides)) or "none",
        "worst case (MiB)": None
        if plan.worst_case_bytes is None
        else round(plan.worst_case_bytes / 2**20, 1),
        "expected hit rate": expected_hit_rate(plan),
        "expected stall per token (ms)": expected_metric(plan, "stall_per_token_ms"),
        "expected tokens/s": expected_metric(plan, "tokens_per_s"),
    }


@dataclass(frozen=True)
class LoadedStats:
    """A runtime statistics JSON file, or the error reading it."""

    path: str
    data: Mapping[str, Any] | None = None
    error: str | None = None

    @property
    def name(self) -> str:
        return Path(self.path).stem


def load_stats(paths: tuple[str, ...]) -> tuple[LoadedStats, ...]:
    out = []
    for p in paths:
        try:
            data = json.loads(Path(p).read_text(encoding="utf-8"))
        except OSError as exc:
            out.append(LoadedStats(p, error=f"{p}: cannot read runtime stats ({exc.strerror})"))
            continue
        except json.JSONDecodeError as exc:
            out.append(LoadedStats(p, error=f"{p}: not valid JSON (line {exc.lineno}: {exc.msg})"))
            continue
        if not isinstance(data, dict):
            out.append(LoadedStats(p, error=f"{p}: runtime stats must be a JSON object"))
            continue
        out.append(LoadedStats(p, data=data))
    return tuple(out)


def stats_per_layer(data: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Rows (layer, phase, hit rate, accesses) from a runtime stats ``per_layer`` list."""
    rows = []
    per_layer = data.get("per_layer")
    if not isinstance(per_layer, list):
        return rows
    for entry in per_layer:
        if not isinstance(entry, Mapping) or "layer" not in entry:
            continue
        for phase, c in entry.items():
            if not isinstance(c, Mapping):
                continue
            acc = c.get("accesses") or 0
            if acc:
                rows.append(
                    {
                        "layer": int(entry["layer"]),
                        "phase": phase,
                        "accesses": float(acc),
                        "hit_rate": float(c.get("hits", 0.0)) / float(acc),
                    }
                )
    return rows


def path_mtime(path: str | os.PathLike[str]) -> float:
    try:
        return Path(path).stat().st_mtime
    except OSError:
        return 0.0
