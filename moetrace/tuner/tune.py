"""``moetrace tune``: search layouts, policies and prefetchers on a tune split of the
requests, then judge the chosen plan against baselines on the held-out validation split.

The tune split is cut once more (fit / select) so that fitted tables (pins, frequency
priors, transition tables, reference matrices) are never scored on the requests they were
fitted on; the chosen configuration is then refitted on the whole tune split.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from moetrace import __version__
from moetrace.errors import AnalysisError, ConfigError
from moetrace.progress import OnProgress, Progress
from moetrace.store.hardware import HardwareProfile, load_hardware
from moetrace.store.plan import (
    CacheLayout,
    EvictionConfig,
    PhaseOverride,
    Plan,
    PrefetchConfig,
    Provenance,
)
from moetrace.tuner.policy.events import Events
from moetrace.tuner.sim.engine import make_plan, simulate
from moetrace.tuner.sim.layouts import mrc_layout, pool_layout, uniform_layout
from moetrace.tuner.sim.metrics import SimResult
from moetrace.tuner.sim.trace import LoadedTraces, events_for, load_traces, parse_budget

log = logging.getLogger(__name__)

EVICTION_GRID: tuple[tuple[str, dict[str, float]], ...] = (
    ("lru", {}),
    ("lfu", {}),
    ("lfu_decay", {"decay": 0.998}),
    ("lfu_decay", {"decay": 0.9995}),
    ("pinned_lru", {"pin_fraction": 0.5}),
    ("pinned_lfu", {"pin_fraction": 0.5, "decay": 0.9995}),
    ("freq_lru", {"beta": 0.25}),
    ("freq_lru", {"beta": 1.0}),
    ("freq_lru", {"beta": 0.5, "pin_fraction": 0.25}),
    ("freq_lru", {"beta": 0.25, "pin_fraction": 0.5}),
    ("freq_lru", {"beta": 1.0, "pin_fraction": 0.5}),
    ("lrfu", {"alpha": 3.0, "decay": 0.999}),
    ("lrfu", {"alpha": 10.0, "decay": 0.998}),
    ("trans_lru", {"gamma": 10.0, "alpha": 3.0, "decay": 0.999}),
    ("trans_lru", {"gamma": 30.0, "alpha": 3.0, "decay": 0.999}),
)
PREFETCH_GRID: tuple[tuple[str, float], ...] = (
    ("transition", 1.0),
    ("transition", 2.0),
    ("learned", 2.0),
    ("activation_matrix", 2.0),
    ("similar_request", 2.0),
)
"""(prefetcher, experts fetched per layer as a multiple of top_k)."""


@dataclass(frozen=True)
class TuneConfig:
    """Options of ``moetrace tune``."""

    budget: str
    hardware: str | None = None
    seed: int = 0
    validation_fraction: float = 0.5
    order: str = "arrival"
    granularity: str = "pass"
    bytes_per_expert: int | None = None

    def __post_init__(self) -> None:
        if not 0.0 < self.validation_fraction < 1.0:
            raise ConfigError(
                f"validation fraction must be in (0, 1), got {self.validation_fraction}"
            )
        if self.bytes_per_expert is not None and self.bytes_per_expert <= 0:
            raise ConfigError(f"bytes_per_expert must be > 0, got {self.bytes_per_expert}")


@dataclass(frozen=True)
class TuneResult:
    """The chosen plan, the validation table (plan vs baselines) and the search log."""

    plan: Plan
    validation: list[dict[str, Any]]
    search: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0


def split_requests(n: int, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded split of request indices 0..n-1 into (tune, validation), both non-empty."""
    if n < 2:
        raise AnalysisError(f"tuning needs at least 2 requests to split, the traces have {n}")
    perm = np.random.default_rng(seed).permutation(n)
    n_val = min(n - 1, max(1, int(round(n * fraction))))
    return np.sort(perm[n_val:]), np.sort(perm[:n_val])


def _row(name: str, res: SimResult) -> dict[str, Any]:
    s = res.summary()
    return {
        "name": name,
        "hit_rate": s["hit_rate"],
        "stall_per_token_ms": s["stall_per_token_ms"],
        "tokens_per_s": s["tokens_per_s"],
        "prefetch_precision": s["prefetch_precision"],
        "prefetch_recall": s["prefetch_recall"],
        "bytes_moved": s["bytes_moved"],
    }


class _Search:
    """Scores candidate plans: tables fitted on ``fit``, scored on ``select``."""

    def __init__(
        self,
        loaded: LoadedTraces,
        fit: Events,
        select: Events,
        hw: HardwareProfile,
        bpe: int | None,
    ):
        self.loaded, self.fit, self.select, self.hw, self.bpe = loaded, fit, select, hw, bpe
        self.log: list[dict[str, Any]] = []
        self.progress: Progress | None = None

    def score(
        self,
        name: str,
        layout: CacheLayout,
        policy: str,
        params: dict[str, float],
        pf: PrefetchConfig,
        overrides: dict[str, PhaseOverride] | None = None,
    ) -> float:
        plan = make_plan(
            self.select, self.loaded.shape, layout, policy, params, pf,
            bytes_per_expert=self.bpe, fit_events=self.fit,
            phase_overrides=overrides or {},
        )  # fmt: skip
        res = simulate(self.select, plan, self.hw, bytes_per_expert=self.bpe)
        row = _row(name, res)
        self.log.append(row)
        if self.progress is not None:
            self.progress.update()
        log.info(
            "candidate %s: hit %.4f stall/token %.4f ms",
            name,
            row["hit_rate"],
            row["stall_per_token_ms"],
        )
        return float(row["stall_per_token_ms"])


def _best(options: Sequence[Any], score: Callable[[Any], float]) -> tuple[Any, float]:
    scored = [(score(o), i) for i, o in enumerate(options)]
    s, i = min(scored)
    return options[i], s


def tune(
    traces: Sequence[str | os.PathLike[str]],
    config: TuneConfig,
    *,
    progress: bool = True,
    on_progress: OnProgress | None = None,
) -> TuneResult:
    """Tune a plan on part of the traces' requests; validate it on the rest.

    ``progress``: a bar over the candidates scored when stderr is a terminal, else
    ``on_progress(done, total, elapsed)`` every few seconds (:mod:`moetrace.progress`).
    """
    t0 = time.perf_counter()
    hw = load_hardware(config.hardware)
    loaded = load_traces(traces, order=config.order)
    model = loaded.model
    L, E, k = len(model.moe_layers), model.num_experts, model.top_k
    bpe = config.bytes_per_expert or model.bytes_per_expert
    slots = parse_budget(config.budget, L, E, bpe)
    n_req = len(loaded.routing.request_ids)
    tune_idx, val_idx = split_requests(n_req, config.validation_fraction, config.seed)
    if len(tune_idx) >= 3:
        inner = np.random.default_rng(config.seed + 1).permutation(tune_idx)
        n_sel = max(1, len(inner) // 3)
        fit_idx, sel_idx = np.sort(inner[n_sel:]), np.sort(inner[:n_sel])
    else:
        fit_idx = sel_idx = tune_idx

    def ev(idx: np.ndarray) -> Events:
        return events_for(loaded, idx, order=config.order, granularity=config.granularity)

    tune_ev, val_ev, fit_ev, sel_ev = ev(tune_idx), ev(val_idx), ev(fit_idx), ev(sel_idx)
    search = _Search(loaded, fit_ev, sel_ev, hw, bpe)
    none = PrefetchConfig()
    n_pf = len(PREFETCH_GRID) + int(loaded.routing.speculative is not None)
    total = 3 + (len(EVICTION_GRID) - 1) + 3 + n_pf + 1
    search.progress = Progress(total, label="tune", unit="candidate", enabled=progress,
                               on_progress=on_progress)  # fmt: skip

    layouts = [uniform_layout(slots, L, E), mrc_layout(slots, fit_ev), pool_layout(slots, L, E)]

    def layout_name(lay: CacheLayout) -> str:
        return f"{lay.kind} {list(lay.capacities[:4])}..."

    layout, _ = _best(
        layouts, lambda lay: search.score(f"lru {layout_name(lay)}", lay, "lru", {}, none)
    )
    (policy, params), _ = _best(
        EVICTION_GRID[1:],
        lambda c: search.score(f"{c[0]} {c[1]} {layout.kind}", layout, c[0], dict(c[1]), none),
    )
    layout, base_stall = _best(
        layouts,
        lambda lay: search.score(
            f"{policy} {params} {layout_name(lay)}", lay, policy, dict(params), none
        ),
    )
    prefetches = [
        PrefetchConfig(name, lookahead=1, fetch=max(1, int(mult * k)))
        for name, mult in PREFETCH_GRID
    ]
    if loaded.routing.speculative is not None:
        prefetches.append(PrefetchConfig("speculative", lookahead=1, fetch=0))
    pf, pf_stall = _best(
        prefetches,
        lambda p: search.score(
            f"{policy} + {p.name} fetch={p.fetch}", layout, policy, dict(params), p
        ),
    )
    overrides: dict[str, PhaseOverride] = {}
    if pf_stall >= 0.99 * base_stall:  # a prefetcher must earn its link time and tables
        pf = none
    elif fit_ev.tokens_by_phase[0] > 0 and sel_ev.tokens_by_phase[0] > 0:
        more = {"prefill": PhaseOverride(prefetch_fetch=min(E, 4 * max(pf.fetch, 1)))}
        if (
            search.score(f"{pf.name} prefill fetch x4", layout, policy, dict(params), pf, more)
            < pf_stall
        ):
            overrides = more

    search.progress.update(total - search.progress.done)  # steps the search skipped
    search.progress.close()
    provenance = Provenance(
        traces=loaded.paths,
        seed=config.seed,
        validation_fraction=config.validation_fraction,
        tune_requests=tuple(loaded.routing.request_ids[i] for i in tune_idx),
        validation_requests=tuple(loaded.routing.request_ids[i] for i in val_idx),
        tool_version=__version__,
    )
    plan = make_plan(
        tune_ev, loaded.shape, layout, policy, dict(params), pf,
        bytes_per_expert=bpe, phase_overrides=overrides, provenance=provenance,
    )  # fmt: skip
    validation = validate(plan, tune_ev, val_ev, hw, bpe)
    expected = {
        "split": "validation",
        "granularity": config.granularity,
        "order": config.order,
        "hardware": hw.name,
        "rows": validation,
    }
    plan = replace(plan, expected=expected)
    return TuneResult(plan, validation, search.log, time.perf_counter() - t0)


def validate(
    plan: Plan, tune_ev: Events, val_ev: Events, hw: HardwareProfile, bpe: int | None
) -> list[dict[str, Any]]:
    """The plan and the baselines on the validation events (baselines' tables from tune)."""
    L, E = val_ev.num_layers, val_ev.num_experts
    uniform = uniform_layout(plan.layout.total_slots, L, E)
    k = plan.routing.top_k

    def base(policy: str, pf: PrefetchConfig | None = None) -> Plan:
        return make_plan(
            val_ev,
            plan.routing,
            uniform,
            policy,
            None,
            pf,
            bytes_per_expert=bpe,
            fit_events=tune_ev,
        )

    no_pf = replace(plan, prefetch=PrefetchConfig(), phase_overrides={})
    runs = [
        ("plan", plan),
        ("plan, no prefetch", no_pf),
        ("lru", base("lru")),
        ("lfu", base("lfu")),
        (
            "lru + activation_matrix (MoE-Infinity-style)",
            base("lru", PrefetchConfig("activation_matrix", fetch=2 * k)),
        ),
        ("belady (oracle bound, no prefetch)", base("belady")),
        ("belady + oracle prefetch (bound)", base("belady", PrefetchConfig("oracle", fetch=0))),
    ]
    if plan.layout != uniform:  # the bound for the plan's own layout, for transparency
        runs.append(
            ("belady on the plan's layout", replace(no_pf, eviction=EvictionConfig("belady")))
        )
    rows = [_row(name, simulate(val_ev, p, hw, bytes_per_expert=bpe)) for name, p in runs]
    lru, bel, mine = rows[2]["hit_rate"], rows[5]["hit_rate"], rows[1]["hit_rate"]
    # Belady is only a bound while every pass's experts fit (no streaming); a gap of
    # under half a point is noise.
    gap = None
    if bel is not None and lru is not None and bel - lru > 0.005:
        gap = (mine - lru) / (bel - lru)
    rows[1]["gap_closed_vs_lru_belady"] = gap
    if rows[2]["stall_per_token_ms"]:
        rows[0]["stall_vs_lru"] = rows[0]["stall_per_token_ms"] / rows[2]["stall_per_token_ms"]
    return rows
