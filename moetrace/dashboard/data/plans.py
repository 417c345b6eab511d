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


PLAN_ROW = "plan"
NO_PREFETCH_ROW = "plan, no prefetch"
LRU_ROW = "lru"


def has_prefetch(plan: Any) -> bool:
    """Whether the plan fetches experts ahead (its prefetcher or a phase override)."""
    if plan.prefetch.name != "none":
        return True
    return any(bool(o.prefetch_fetch) for o in dict(plan.phase_overrides).values())


def row_prefetches(row: Mapping[str, Any]) -> bool:
    """Whether a validation row's run issued prefetches (precision is null without any)."""
    rec = row.get("prefetch_recall")
    return row.get("prefetch_precision") is not None or (isinstance(rec, (int, float)) and rec > 0)


@dataclass(frozen=True)
class SplitRuns:
    """One validation split of ``expected``: its runs, and the row of this plan."""

    name: str
    rows: tuple[dict[str, Any], ...]
    plan_row: dict[str, Any] | None
    """The row that describes this plan file (None: none of the rows does)."""
    note: str | None = None
    """Why the row named "plan" was replaced or rejected."""
    tune_requests: int | None = None
    validation_requests: int | None = None

    def row(self, name: str) -> dict[str, Any] | None:
        return next((r for r in self.rows if r.get("name") == name), None)


def match_plan_row(
    plan: Any, rows: list[dict[str, Any]]
) -> tuple[dict[str, Any] | None, str | None]:
    """The row describing ``plan`` among a split's rows, and a note when the row named
    "plan" does not (its run prefetched but the plan does not: a file that carries another
    plan's rows). Then the "plan, no prefetch" row, the same plan with its prefetcher
    removed, is this plan's when it exists; else no row matches."""
    by = {r.get("name"): r for r in rows}
    row = by.get(PLAN_ROW)
    if row is None:
        return None, None
    if has_prefetch(plan) or not row_prefetches(row):
        return row, None
    own = by.get(NO_PREFETCH_ROW)
    if own is not None and not row_prefetches(own):
        return {**own, "name": PLAN_ROW}, (
            "The file's 'plan' row describes a plan with a prefetcher; this plan has none, "
            "so its figures are the file's 'plan, no prefetch' row."
        )
    return None, (
        "The file's 'plan' row describes a run with prefetching, but this plan has no "
        "prefetcher: no row of the file describes this plan, so no expected figures are shown."
    )


def _rows(value: Any) -> list[dict[str, Any]]:
    if not isinstance(value, list):
        return []
    return [dict(r) for r in value if isinstance(r, Mapping) and "name" in r]


def _count(value: Any) -> int | None:
    return int(value) if isinstance(value, int) and not isinstance(value, bool) else None


def expected_splits(plan: Any) -> list[SplitRuns]:
    """Every validation split the plan file carries (``expected.splits``; else the single
    ``expected.rows`` split), each with the row that describes this plan."""
    exp = dict(plan.expected)
    raw = exp.get("splits")
    entries = [sp for sp in raw if isinstance(sp, Mapping)] if isinstance(raw, list) else []
    if not entries:
        entries = [{"name": str(exp.get("split", "validation")), "rows": exp.get("rows")}]
    out = []
    for sp in entries:
        rows = _rows(sp.get("rows"))
        if not rows:
            continue
        own, note = match_plan_row(plan, rows)
        shown = [r for r in rows if r["name"] != PLAN_ROW]
        out.append(
            SplitRuns(
                name=str(sp.get("name", "validation")),
                rows=tuple(([own] if own else []) + shown),
                plan_row=own,
                note=note,
                tune_requests=_count(sp.get("tune_requests")),
                validation_requests=_count(sp.get("validation_requests")),
            )
        )
    return out


def _plan_row(plan: Any) -> Mapping[str, Any]:
    splits = expected_splits(plan)
    if splits:
        return splits[0].plan_row or {}
    exp = dict(plan.expected)
    for candidate in (exp.get("plan"), exp.get("metrics"), exp.get("summary"), exp):
        if isinstance(candidate, Mapping) and "hit_rate" in candidate:
            return candidate
    return {}


def expected_metric(plan: Any, name: str) -> float | None:
    """A metric of the plan itself from ``expected`` (its validation run), if recorded and
    if a row describes this plan (see :func:`match_plan_row`)."""
    v = _plan_row(plan).get(name)
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None


def expected_hit_rate(plan: Any) -> float | None:
    """The plan's own expected hit rate (validation split), if recorded."""
    return expected_metric(plan, "hit_rate")


def pin_coverage(plan: Any, counts: np.ndarray) -> np.ndarray:
    """(L,) share of each layer's activations (``counts`` (L, E)) that go to the plan's
    pinned experts; NaN for a layer without activations."""
    c = np.asarray(counts, np.float64)
    total = c.sum(axis=1)
    pinned = (c * pinned_mask(plan)).sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(total > 0, pinned / np.maximum(total, 1), np.nan)


def plan_facts(plan: Any) -> dict[str, str]:
    """The plan's headline facts as text (one column of the comparison table)."""
    from moetrace.dashboard import numbers as N

    caps = plan.layout.capacities
    bpe = plan.budget.bytes_per_expert
    facts = {
        "budget slots": str(plan.budget.slots),
        "budget": N.nbytes(plan.budget.bytes or (bpe * plan.budget.slots if bpe else None)),
        "layout": plan.layout.kind,
        "pool slots": N.plain(plan.layout.pool_slots),
        "slots per layer (min..max)": f"{min(caps)}..{max(caps)}",
        "pinned experts": str(plan.num_pinned),
        "eviction policy": plan.eviction.policy,
        "eviction params": ", ".join(
            f"{k}={N.plain(v)}" for k, v in sorted(dict(plan.eviction.params).items())
        )
        or N.MISSING,
        "prefetcher": plan.prefetch.name,
        "prefetch lookahead (layers)": str(plan.prefetch.lookahead),
        "prefetch fetch (experts)": str(plan.prefetch.fetch),
        "phase overrides": ", ".join(sorted(plan.phase_overrides)) or "none",
        "worst case memory": N.nbytes(plan.worst_case_bytes),
        "expected hit rate": N.pct(expected_hit_rate(plan)),
        "expected stall per token": N.ms(expected_metric(plan, "stall_per_token_ms")),
        "expected tokens/s": N.per_s(expected_metric(plan, "tokens_per_s")),
    }
    return {**facts, **ram_facts(plan)}


def drift_window(window: int) -> str:
    """A RAM drift detector's window: 'off' at 0, else the RAM accesses per window."""
    from moetrace.dashboard import numbers as N

    return "off" if not window else f"{N.plain(window)} RAM accesses"


def ram_facts(plan: Any) -> dict[str, str]:
    """The host-RAM tier's facts as text (none for a plan with every expert in RAM)."""
    from moetrace.dashboard import numbers as N

    ram = getattr(plan, "ram", None)
    if ram is None:
        return {}
    bpe = plan.budget.bytes_per_expert
    every = plan.routing.num_layers * plan.routing.num_experts
    pf = ram.prefetch
    return {
        "RAM tier slots": str(ram.slots),
        "RAM tier": N.nbytes(ram.bytes or (bpe * ram.slots if bpe else None)),
        "RAM layout": ram.layout.kind
        + (f" ({ram.layout.pool_slots} slots)" if ram.layout.kind == "pool" else ""),
        "RAM eviction policy": ram.eviction.policy,
        "experts pinned in RAM": str(sum(len(r) for r in ram.eviction.pinned)),
        "RAM prefetcher": pf.name
        if pf.name == "none"
        else f"{pf.name} ({pf.fetch} experts, {pf.lookahead} layers ahead)",
        "RAM drift window": drift_window(ram.adaptation.window),
        "worst case memory, RAM tier": N.nbytes(ram.worst_case_bytes),
        "disk store (every expert)": N.nbytes(bpe * every if bpe else None),
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


def _num(value: Any) -> float:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else 0.0


def stats_per_layer(data: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Rows (layer, phase, accesses, hit rate, stall in ms, bytes moved) from a runtime
    stats ``per_layer`` list (``moetrace run --stats-json``)."""
    rows: list[dict[str, Any]] = []
    per_layer = data.get("per_layer")
    if not isinstance(per_layer, list):
        return rows
    for entry in per_layer:
        if not isinstance(entry, Mapping) or "layer" not in entry:
            continue
        for phase, c in entry.items():
            if not isinstance(c, Mapping):
                continue
            acc = _num(c.get("accesses"))
            if acc:
                rows.append(
                    {
                        "layer": int(entry["layer"]),
                        "phase": phase,
                        "accesses": acc,
                        "hit_rate": _num(c.get("hits")) / acc,
                        "stall_ms": 1e3 * _num(c.get("stall_s")),
                        "bytes": _num(c.get("bytes_demand")) + _num(c.get("bytes_prefetch")),
                    }
                )
    return rows


def stats_metrics(data: Mapping[str, Any]) -> dict[str, float | None]:
    """Headline figures of a runtime stats file: hit rate, stall per generated or prompt
    token (ms), bytes moved, tokens, tokens/s (only when the file records it, or its
    wall time); None where the file does not say."""
    total = data.get("total")
    total = total if isinstance(total, Mapping) else {}
    tok = data.get("tokens")
    tokens = sum(_num(v) for v in tok.values()) if isinstance(tok, Mapping) else 0.0
    acc = _num(total.get("accesses"))
    hit = total.get("hit_rate")
    hit_rate = float(hit) if isinstance(hit, (int, float)) else None
    if hit_rate is None and acc:
        hit_rate = _num(total.get("hits")) / acc
    tps = next(
        (
            float(d[k])
            for d in (data, total)
            for k in ("tokens_per_s", "tokens_per_second")
            if isinstance(d.get(k), (int, float))
        ),
        None,
    )
    wall = next(
        (float(data[k]) for k in ("seconds", "wall_s") if isinstance(data.get(k), (int, float))),
        None,
    )
    if tps is None and wall and tokens:
        tps = tokens / wall
    stall = total.get("stall_s")
    return {
        "hit_rate": hit_rate,
        "stall_per_token_ms": 1e3 * float(stall) / tokens
        if isinstance(stall, (int, float)) and tokens
        else None,
        "bytes": _num(total.get("bytes_demand")) + _num(total.get("bytes_prefetch"))
        if ("bytes_demand" in total or "bytes_prefetch" in total)
        else None,
        "tokens": tokens or None,
        "tokens_per_s": tps,
    }


def path_mtime(path: str | os.PathLike[str]) -> float:
    try:
        return Path(path).stat().st_mtime
    except OSError:
        return 0.0
