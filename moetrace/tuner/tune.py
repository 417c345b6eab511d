"""``moetrace tune``: search layouts, policies and prefetchers on a tune split of the
requests, then judge the chosen plan against baselines on the held-out validation split.

The tune split is cut once more (fit / select) so that fitted tables (pins, frequency
priors, transition tables, reference matrices) are never scored on the requests they were
fitted on; the chosen configuration is then refitted on the whole tune split.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from moetrace import __version__
from moetrace.errors import ConfigError
from moetrace.progress import OnProgress, Progress
from moetrace.store.hardware import HardwareProfile, load_hardware
from moetrace.store.plan import (
    Adaptation,
    CacheLayout,
    EvictionConfig,
    PhaseOverride,
    Plan,
    PrefetchConfig,
    Provenance,
    RamTier,
)
from moetrace.tuner.parallel import Fanout, default_workers, shared
from moetrace.tuner.placement import ram_tier, tune_placement
from moetrace.tuner.policy.events import Events
from moetrace.tuner.sched.arrivals import recorded_arrivals
from moetrace.tuner.sched.search import (
    P99_LIMIT,
    QueueSettings,
    choose_schedule,
    judge_schedule,
    loses_to_fcfs,
    schedule_name,
)
from moetrace.tuner.sim.engine import make_plan, simulate
from moetrace.tuner.sim.layouts import mrc_layout, pool_layout, uniform_layout
from moetrace.tuner.sim.metrics import SimResult
from moetrace.tuner.sim.trace import LoadedTraces, events_for, load_traces, parse_budget
from moetrace.tuner.splits import Split, make_splits, shift_events

log = logging.getLogger(__name__)

TOLERANCE = 0.005
"""The most a written plan may lose to LRU on a validation split: hit rate (absolute) and
stall per token (relative)."""

EVICTION_GRID: tuple[tuple[str, dict[str, float]], ...] = (
    ("lru", {}),
    ("lfu", {}),
    ("lfu_decay", {"decay": 0.998}),
    ("lfu_decay", {"decay": 0.9995}),
    ("pinned_lru", {"pin_fraction": 0.5}),
    ("pinned_lfu", {"pin_fraction": 0.5, "decay": 0.9995}),
    ("pinned_lru", {"pin_fraction": 0.5, "repin": 256}),
    ("pinned_lfu", {"pin_fraction": 0.5, "decay": 0.9995, "repin": 256}),
    ("pinned_lfu", {"pin_fraction": 0.25, "decay": 0.9995, "repin": 256}),
    ("freq_lru", {"beta": 0.25}),
    ("freq_lru", {"beta": 1.0}),
    ("freq_lru", {"beta": 0.5, "pin_fraction": 0.25}),
    ("freq_lru", {"beta": 0.25, "pin_fraction": 0.5}),
    ("freq_lru", {"beta": 1.0, "pin_fraction": 0.5}),
    ("freq_lru", {"beta": 1.0, "pin_fraction": 0.5, "repin": 256}),
    ("freq_lru", {"beta": 0.25, "pin_fraction": 0.25, "repin": 256}),
    ("lrfu", {"alpha": 3.0, "decay": 0.999}),
    ("lrfu", {"alpha": 10.0, "decay": 0.998}),
    ("trans_lru", {"gamma": 10.0, "alpha": 3.0, "decay": 0.999}),
    ("trans_lru", {"gamma": 10.0, "alpha": 3.0, "decay": 0.999, "repin": 256}),
    ("arc", {}),
    ("wtinylfu", {}),
    ("lecar", {}),
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

FALLBACKS = ("lru", "arc", "wtinylfu", "lecar")
PLAN_LAYOUT_BOUND = "belady on the plan's layout"
"""Online policies a plan's drift detector may switch to (the search's best of them)."""
DRIFT_MARGIN = 0.02
DRIFT_HALFLIFE = 8.0
"""The detector switches when the plan trails the shadow LRU by more than DRIFT_MARGIN
as a mean over windows with a half-life of DRIFT_HALFLIFE windows (policy/drift.py)."""


def drift_window(num_layers: int, top_k: int) -> int:
    """Accesses per drift-detector window: about 128 tokens' worth (128 x layers x top_k),
    at least 2048. Shorter windows see single requests: DeepSeek windows of 21 tokens
    switched plans that were 3 points ahead of LRU on average (policy/drift.py)."""
    return max(2048, 128 * num_layers * top_k)


@dataclass(frozen=True)
class TuneConfig:
    """Options of ``moetrace tune``.

    ``splits``: the validation splits besides the random one (always first; the written
    plan's tables are fitted on its tune part): ``time``, ``tag:KEY``, ``source``,
    ``shift`` (see :mod:`moetrace.tuner.splits`). Candidates are chosen by minimax regret
    over these splits. ``judge``: splits the plan is only judged on (not chosen on), e.g.
    the ``shift`` stress test. The plan written is never worse than LRU on any split
    (chosen or judged) by more than ``tolerance`` (hit rate without prefetch, and
    relative stall per token). The plan's schedule (:mod:`moetrace.tuner.sched`) is
    chosen under ``queue`` on the random split's tune part, judged against FCFS on every
    split, and FCFS is written where it loses (more bytes, or p99 latency over the limit).
    """

    budget: str
    hardware: str | None = None
    seed: int = 0
    validation_fraction: float = 0.5
    order: str = "arrival"
    granularity: str = "pass"
    bytes_per_expert: int | None = None
    splits: tuple[str, ...] = ("time",)
    tolerance: float = TOLERANCE
    judge: tuple[str, ...] = ()
    queue: QueueSettings | None = field(default_factory=QueueSettings)
    """How the queue is modeled for the schedule search (None: no search, FCFS)."""
    workers: int | None = None
    """Processes for the replays (None: one per CPU this process may use; 1: serial)."""
    ray: str | None = None
    """Run the replays on this Ray cluster instead (``auto``, ``ray://host:port``, or
    ``local`` for a new local cluster of ``workers`` CPUs)."""
    sweep: bool = False
    """Also write the sizing frontier (:mod:`moetrace.tuner.sizing`, default grid) for
    the traces and hardware in ``expected.sizing``."""
    ram_budget: str | None = None
    """Host RAM for experts over a disk store (the budget syntax of ``budget``): the plan
    gets a RAM tier whose placement is chosen (:mod:`moetrace.tuner.placement`); None:
    every expert is in host RAM (two tiers)."""

    def __post_init__(self) -> None:
        if not 0.0 < self.validation_fraction < 1.0:
            raise ConfigError(
                f"validation fraction must be in (0, 1), got {self.validation_fraction}"
            )
        if self.bytes_per_expert is not None and self.bytes_per_expert <= 0:
            raise ConfigError(f"bytes_per_expert must be > 0, got {self.bytes_per_expert}")
        if not 0.0 <= self.tolerance < 1.0:
            raise ConfigError(f"tolerance must be in [0, 1), got {self.tolerance}")
        if self.workers is not None and self.workers < 1:
            raise ConfigError(f"workers must be >= 1, got {self.workers}")
        object.__setattr__(self, "splits", tuple(self.splits))
        object.__setattr__(self, "judge", tuple(self.judge))


@dataclass(frozen=True)
class TuneResult:
    """The chosen plan, the validation table (plan vs baselines) on the random split, the
    same table on every split, the fallback taken (if any) and the search log."""

    plan: Plan
    validation: list[dict[str, Any]]
    search: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0
    splits: list[dict[str, Any]] = field(default_factory=list)
    fallback: dict[str, Any] | None = None


def split_requests(n: int, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded split of request indices 0..n-1 into (tune, validation), both non-empty."""
    ids = [str(i) for i in range(n)]
    sp = make_splits(["random"], ids, fraction=fraction, seed=seed)[0]
    return sp.tune, sp.validation


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
        # the drift detector's switch (demand access), None if it did not switch
        "drift_switch_at": (s.get("drift") or {}).get("switched_at_access"),
    }


@dataclass(frozen=True)
class _Candidate:
    """A plan configuration: what the search chooses, refitted on each split."""

    name: str
    layout: CacheLayout
    policy: str
    params: dict[str, float]
    prefetch: PrefetchConfig
    overrides: dict[str, PhaseOverride] = field(default_factory=dict)
    adaptation: Adaptation = field(default_factory=Adaptation)

    def plan(self, ev: Events, shape: Any, bpe: int | None, fit: Events, **kw: Any) -> Plan:
        return make_plan(
            ev, shape, self.layout, self.policy, dict(self.params), self.prefetch,
            bytes_per_expert=bpe, fit_events=fit, phase_overrides=self.overrides,
            adaptation=self.adaptation, **kw,
        )  # fmt: skip


class _Search:
    """Scores candidates on every split: tables fitted on the split's ``fit`` requests,
    scored on its ``select`` requests, as stall per token relative to uniform LRU there
    (one number per split; :func:`_best` chooses among them). The replays of a batch of
    candidates are fanned out (:class:`moetrace.tuner.parallel.Fanout`)."""

    def __init__(
        self,
        loaded: LoadedTraces,
        splits: Sequence[tuple[str, Events, Events]],
        hw: HardwareProfile,
        bpe: int | None,
        slots: int,
        fanout: Fanout,
        ram: RamTier | None = None,
    ):
        self.loaded, self.splits, self.hw, self.bpe = loaded, splits, hw, bpe
        self.fanout, self.ram = fanout, ram
        self.handles = [(fanout.share(f"search:{i}:fit", fit), fanout.share(f"search:{i}:sel", sel))
                        for i, (_, fit, sel) in enumerate(splits)]  # fmt: skip
        self.log: list[dict[str, Any]] = []
        self.progress: Progress | None = None
        L, E = len(loaded.model.moe_layers), loaded.model.num_experts
        lru = _Candidate("lru", uniform_layout(slots, L, E), "lru", {}, PrefetchConfig())
        self.lru = self._rows([lru])[0]

    def _rows(self, cands: Sequence[_Candidate]) -> list[list[dict[str, Any]]]:
        """Per candidate, its row on each split (replays fanned out)."""
        tasks = [(c, fit, sel, self.loaded.shape, self.hw, self.bpe, self.ram)
                 for c in cands for fit, sel in self.handles]  # fmt: skip
        rows = self.fanout.map(_candidate_row, tasks)
        n = len(self.handles)
        return [rows[i * n : (i + 1) * n] for i in range(len(cands))]

    def score_all(self, cands: Sequence[_Candidate]) -> list[np.ndarray]:
        out = []
        for c, rows in zip(cands, self._rows(cands), strict=True):
            rels = []
            for (name, _, _), row, lru in zip(self.splits, rows, self.lru, strict=True):
                base = lru["stall_per_token_ms"]
                rel = row["stall_per_token_ms"] / base if base else row["stall_per_token_ms"] + 1.0
                rels.append(rel)
                self.log.append({**row, "split": name, "stall_vs_lru": rel})
                log.info("candidate %s on %s: hit %.4f stall %.3fx LRU", c.name, name,
                         row["hit_rate"], rel)  # fmt: skip
            if self.progress is not None:
                self.progress.update()
            out.append(np.asarray(rels, dtype=np.float64))
        return out

    def score(self, c: _Candidate) -> np.ndarray:
        return self.score_all([c])[0]


def _candidate_row(
    c: _Candidate,
    fit: Any,
    sel: Any,
    shape: Any,
    hw: HardwareProfile,
    bpe: int | None,
    ram: RamTier | None = None,
) -> dict[str, Any]:
    """A task: fit ``c`` on the events ``fit`` stands for, replay those ``sel`` stands for
    (over the RAM tier ``ram``, if any)."""
    fit_ev, sel_ev = shared(fit), shared(sel)
    plan = replace(c.plan(sel_ev, shape, bpe, fit_ev), ram=ram)
    return _row(c.name, simulate(sel_ev, plan, hw, bytes_per_expert=bpe))


def _plan_row(
    name: str, plan: Plan, ev: Any, hw: HardwareProfile, bpe: int | None
) -> dict[str, Any]:
    """A task: replay the events ``ev`` stands for under ``plan``."""
    return _row(name, simulate(shared(ev), plan, hw, bytes_per_expert=bpe))


def _best(
    options: Sequence[Any],
    score: Callable[[list[Any]], list[np.ndarray]],
    tolerance: float = TOLERANCE,
) -> tuple[Any, np.ndarray]:
    """The option with the least **regret**: on each split, its stall relative to the best
    option's there; an option's regret is its worst split's (minimax regret). Options that
    lose to LRU by more than ``tolerance`` on some split come last. Ties: the first.
    ``score`` scores all options at once (their replays run side by side)."""
    scores = np.stack(score(list(options)))
    regret = (scores / np.maximum(scores.min(axis=0), 1e-12)).max(axis=1)
    loses = (scores > 1.0 + tolerance).any(axis=1)
    i = min(range(len(options)), key=lambda j: (bool(loses[j]), float(regret[j]), j))
    return options[i], scores[i]


def _search(
    search: _Search, slots: int, L: int, E: int, k: int, fit_all: Events, speculative: bool
) -> _Candidate:
    """Layout, then eviction, then layout again, then prefetch: each by minimax regret over
    the splits (see :func:`_best`). Every candidate carries the drift detector; its
    fallback is the online policy that scores best on the plan's own layout (the eviction
    step's, or, if the layout changed after it, scored again on the final one: LRU on a
    pool is not LRU on per-layer slots); where every online policy on that layout loses
    to uniform LRU, the plan gets no detector."""
    none = PrefetchConfig()
    layouts = [uniform_layout(slots, L, E), mrc_layout(slots, fit_all), pool_layout(slots, L, E)]
    adapt = Adaptation("lru", drift_window(L, k), DRIFT_MARGIN, DRIFT_HALFLIFE)

    def lname(lay: CacheLayout) -> str:
        return f"{lay.kind} {list(lay.capacities[:4])}..."

    first, lru_score = _best(
        layouts,
        lambda lays: search.score_all(
            [
                _Candidate(f"lru {lname(lay)}", lay, "lru", {}, none, adaptation=adapt)
                for lay in lays
            ]
        ),
    )
    layout = first
    online = {"lru": lru_score}

    def score_policies(cs: list[tuple[str, dict[str, float]]]) -> list[np.ndarray]:
        scores = search.score_all([
            _Candidate(f"{n} {p} {layout.kind}", layout, n, dict(p), none, adaptation=adapt)
            for n, p in cs
        ])  # fmt: skip
        for (n, p), sc in zip(cs, scores, strict=True):
            if n in FALLBACKS and not p:
                online[n] = sc
        return scores

    (policy, params), _ = _best(EVICTION_GRID[1:], score_policies)
    adapt = replace(adapt, fallback=min(online, key=lambda n: (float(online[n].max()), n)))
    layout, base = _best(
        layouts,
        lambda lays: search.score_all(
            [
                _Candidate(
                    f"{policy} {params} {lname(lay)}",
                    lay,
                    policy,
                    dict(params),
                    none,
                    adaptation=adapt,
                )
                for lay in lays
            ]
        ),  # fmt: skip
    )
    best = _Candidate(f"{policy} {params} {layout.kind}", layout, policy, dict(params), none,
                      adaptation=adapt)  # fmt: skip
    if layout != first:
        names = list(FALLBACKS)
        online = dict(zip(names, search.score_all(
            [_Candidate(f"{n} {lname(layout)} (fallback)", layout, n, {}, none) for n in names]
        ), strict=True))  # fmt: skip
        fallback = min(online, key=lambda n: (float(online[n].max()), n))
        if online[fallback].max() > 1.0 + TOLERANCE:
            # every online policy on this layout loses to uniform LRU: switching to one
            # cannot help (DeepSeek 12.5%, pool: 0.26 after a switch vs LRU 0.31), so the
            # plan runs without a detector and the guard judges it as it is
            best = replace(best, adaptation=Adaptation())
            base = search.score(best)
        elif fallback != adapt.fallback:
            best = replace(best, adaptation=replace(adapt, fallback=fallback))
            base = search.score(best)
    prefetches = [
        PrefetchConfig(name, lookahead=1, fetch=max(1, int(mult * k)))
        for name, mult in PREFETCH_GRID
    ]
    if speculative:
        prefetches.append(PrefetchConfig("speculative", lookahead=1, fetch=0))
    with_pf = [replace(best, name=f"{best.name} + {p.name} fetch={p.fetch}", prefetch=p)
               for p in prefetches]  # fmt: skip
    cand, pf_score = _best(with_pf, search.score_all)
    ratio = pf_score / np.maximum(base, 1e-12)
    if ratio.mean() >= 0.99 or ratio.max() > 1.0:  # a prefetcher must earn its link time
        return best
    if not all(f.tokens_by_phase[0] > 0 and s.tokens_by_phase[0] > 0 for _, f, s in search.splits):
        return cand  # no prefill on some split: a prefill override cannot be judged there
    more = {"prefill": PhaseOverride(prefetch_fetch=min(E, 4 * max(cand.prefetch.fetch, 1)))}
    boosted = replace(cand, name=f"{cand.name}, prefill fetch x4", overrides=more)
    if (search.score(boosted) < pf_score).all():
        return boosted
    return cand


def _fallbacks(chosen: _Candidate, slots: int, L: int, E: int) -> list[_Candidate]:
    """What to write instead when the chosen plan loses to LRU on a validation split:
    the same without prefetch, LRU on its layout (with, then without its prefetcher), and
    finally uniform LRU itself (the baseline, which cannot lose to itself)."""
    none = PrefetchConfig()
    out = [chosen]
    if chosen.prefetch.name != "none":
        out.append(replace(chosen, name=f"{chosen.name} without prefetch", prefetch=none,
                           overrides={}))  # fmt: skip
    lru = replace(chosen, policy="lru", params={}, overrides={})
    if chosen.prefetch.name != "none":
        out.append(replace(lru, name=f"lru {chosen.layout.kind} + {chosen.prefetch.name}"))
    out.append(replace(lru, name=f"lru {chosen.layout.kind}", prefetch=none))
    out.append(_Candidate("lru uniform", uniform_layout(slots, L, E), "lru", {}, none))
    # (uniform LRU needs no drift detector: it is what the detector compares with)
    seen: set[tuple[Any, ...]] = set()
    unique = []
    for c in out:
        key = (c.layout, c.policy, str(sorted(c.params.items())), str(c.prefetch), str(c.overrides))
        if key not in seen:
            seen.add(key)
            unique.append(c)
    return unique


def _loses(rows: list[dict[str, Any]], tolerance: float) -> str | None:
    """Why the plan's rows lose to LRU on this split (None when they do not)."""
    plan, no_pf, lru = rows[0], rows[1], rows[2]
    if no_pf["hit_rate"] < lru["hit_rate"] - tolerance:
        return f"hit rate {no_pf['hit_rate']:.3f} < LRU {lru['hit_rate']:.3f}"
    base = lru["stall_per_token_ms"]
    if base and plan["stall_per_token_ms"] > base * (1.0 + tolerance) + 1e-12:
        return f"stall {plan['stall_per_token_ms'] / base:.3f}x LRU"
    return None


def tune(
    traces: Sequence[str | os.PathLike[str]],
    config: TuneConfig,
    *,
    progress: bool = True,
    on_progress: OnProgress | None = None,
) -> TuneResult:
    """Tune a plan on part of the traces' requests; validate it on the rest, on every split.

    ``progress``: a bar over the candidates scored when stderr is a terminal, else
    ``on_progress(done, total, elapsed)`` every few seconds (:mod:`moetrace.progress`).
    """
    workers = config.workers or default_workers()
    with Fanout(workers, config.ray) as fanout:
        return _tune(traces, config, fanout, progress, on_progress)


def _tune(
    traces: Sequence[str | os.PathLike[str]],
    config: TuneConfig,
    fanout: Fanout,
    progress: bool,
    on_progress: OnProgress | None,
) -> TuneResult:
    t0 = time.perf_counter()
    hw = load_hardware(config.hardware)
    if config.ram_budget is not None and not hw.has_disk_link:
        raise ConfigError(
            f"--ram-budget needs a hardware profile with a disk link; {hw.name!r} has none "
            "(measure one with `moetrace profile`)"
        )
    loaded = load_traces(traces, order=config.order)
    model = loaded.model
    L, E, k = len(model.moe_layers), model.num_experts, model.top_k
    bpe = config.bytes_per_expert or model.bytes_per_expert
    slots = parse_budget(config.budget, L, E, bpe)
    chosen_on = list(dict.fromkeys(("random", *config.splits)))
    splits = make_splits(
        (*chosen_on, *(j for j in config.judge if j not in chosen_on)),
        loaded.routing.request_ids,
        paths=loaded.paths,
        fraction=config.validation_fraction,
        seed=config.seed,
    )

    cache: dict[tuple[int, ...], Events] = {}

    def ev(idx: np.ndarray) -> Events:
        key = tuple(int(i) for i in idx)
        if key not in cache:
            cache[key] = events_for(loaded, idx, order=config.order,
                                    granularity=config.granularity)  # fmt: skip
        return cache[key]

    def shifted(sp: Split, idx: np.ndarray) -> Events:
        e = ev(idx)
        return e if sp.shift is None else shift_events(e, sp.shift)

    primary = splits[0]
    judged_only = {n for n in config.judge if n not in chosen_on}
    search_splits = [
        sp
        for sp in splits
        if sp.name not in judged_only and sp.name.split("=")[0] not in judged_only
    ]
    base_ram = None  # three tiers: the device is chosen over RAM as plain LRU over disk
    if config.ram_budget is not None:
        ram_slots = parse_budget(config.ram_budget, L, E, bpe)
        base_ram = ram_tier(L, ram_slots, "lru", bytes_per_expert=bpe, top_k=k)
    search = _Search(loaded, [(sp.name, ev(sp.fit), shifted(sp, sp.select))
                              for sp in search_splits], hw, bpe, slots, fanout,
                     base_ram)  # fmt: skip
    n_pf = len(PREFETCH_GRID) + int(loaded.routing.speculative is not None)
    total = 3 + (len(EVICTION_GRID) - 1) + 3 + n_pf + 1
    search.progress = Progress(total, label="tune", unit="candidate", enabled=progress,
                               on_progress=on_progress)  # fmt: skip
    chosen = _search(search, slots, L, E, k, ev(primary.fit),
                     loaded.routing.speculative is not None)  # fmt: skip
    search.progress.update(total - search.progress.done)  # steps the search skipped
    search.progress.close()

    baselines: dict[str, list[dict[str, Any]]] = {}
    fallback = None
    for cand in _fallbacks(chosen, slots, L, E):
        per_split, plans = [], []
        for sp in splits:
            plan_s = cand.plan(ev(sp.tune), loaded.shape, bpe, ev(sp.tune))
            plans.append(plan_s)
            rows = validate(plan_s, ev(sp.tune), shifted(sp, sp.validation), hw, bpe,
                            baselines=baselines.get(sp.name), fanout=fanout,
                            key=f"validation:{sp.name}", ram=base_ram)  # fmt: skip
            baselines[sp.name] = [r for r in rows[2:] if r["name"] != PLAN_LAYOUT_BOUND]
            per_split.append({"name": sp.name, "tune_requests": len(sp.tune),
                              "validation_requests": len(sp.validation),
                              "judged_only": sp not in search_splits, "rows": rows})  # fmt: skip
        losing = [(s["name"], why) for s in per_split
                  if (why := _loses(s["rows"], config.tolerance)) is not None]  # fmt: skip
        if not losing:
            break
        name, why = losing[0]
        fallback = {"from": chosen.name, "to": None, "reason": f"split {name}: {why}"}
        log.warning("plan %r loses to LRU on split %s (%s); trying the next fallback",
                    cand.name, name, why)  # fmt: skip
    assert not losing, "uniform LRU cannot lose to itself"
    if fallback is not None:
        fallback["to"] = cand.name

    provenance = Provenance(
        traces=loaded.paths,
        seed=config.seed,
        validation_fraction=config.validation_fraction,
        tune_requests=tuple(loaded.routing.request_ids[i] for i in primary.tune),
        validation_requests=tuple(loaded.routing.request_ids[i] for i in primary.validation),
        tool_version=__version__,
    )
    plan = replace(plans[0], provenance=provenance)  # the random split's fit, judged above
    validation = per_split[0]["rows"]
    expected = {
        "split": "validation",
        "granularity": config.granularity,
        "order": config.order,
        "hardware": hw.name,
        "rows": validation,
        "splits": per_split,
        "tolerance": config.tolerance,
        "fallback": fallback,
    }
    if base_ram is not None:
        searched = [(sp.name, cand.plan(ev(sp.select), loaded.shape, bpe, ev(sp.fit)),
                     ev(sp.fit), shifted(sp, sp.select)) for sp in search_splits]  # fmt: skip
        judged = [(sp.name, p, ev(sp.tune), shifted(sp, sp.validation))
                  for sp, p in zip(splits, plans, strict=True)]  # fmt: skip
        adapt = Adaptation("lru", 0, DRIFT_MARGIN, DRIFT_HALFLIFE)  # window: RAM's own
        tier, expected["placement"] = tune_placement(
            searched, judged, base_ram.slots, hw, bpe, adaptation=adapt, fanout=fanout,
            tolerance=config.tolerance,
        )  # fmt: skip
        plan = replace(plan, ram=tier)
    if config.queue is not None:
        if config.order != "arrival":
            log.warning("the schedule search needs order 'arrival'; the plan keeps FCFS")
        else:
            recorded = recorded_arrivals(loaded.paths, loaded.routing.request_ids)
            queued = [(sp, p, fanout.share(f"tune:{sp.name}", ev(sp.tune)),
                          fanout.share(f"validation:{sp.name}", shifted(sp, sp.validation)))
                         for sp, p in zip(splits, plans, strict=True)]  # fmt: skip
            plan, expected["schedule"] = _tune_schedule(plan, queued, hw, bpe, config,
                                                        recorded, fanout)  # fmt: skip
    if config.sweep:
        from moetrace.tuner.sizing import SizingConfig, size

        expected["sizing"] = size(traces, SizingConfig(
            hardware=config.hardware, granularity=config.granularity,
            bytes_per_expert=config.bytes_per_expert, workers=config.workers,
        ))  # fmt: skip
    plan = replace(plan, expected=expected)
    return TuneResult(plan, validation, search.log, time.perf_counter() - t0, per_split,
                      fallback)  # fmt: skip


def _tune_schedule(
    plan: Plan,
    per_split: list[tuple[Split, Plan, Any, Any]],
    hw: HardwareProfile,
    bpe: int | None,
    config: TuneConfig,
    recorded: np.ndarray | None,
    fanout: Fanout,
) -> tuple[Plan, dict[str, Any]]:
    """Choose the schedule on the first split's tune part; judge it against FCFS on every
    split's validation part under that split's plan; FCFS when it loses on any."""
    q = config.queue
    assert q is not None
    chosen, search = choose_schedule(plan, per_split[0][2], hw, q, bpe, recorded, fanout)
    fallback = None
    for attempt in (chosen, q.config("fcfs", {})):
        splits = []
        for sp, p, _, val in per_split:
            rows = judge_schedule(replace(p, schedule=attempt), val, hw, q, bpe, recorded, fanout)
            splits.append({"name": sp.name, "validation_requests": len(sp.validation),
                           "rows": rows})  # fmt: skip
        losing = [(s["name"], why) for s in splits
                  if (why := loses_to_fcfs(s["rows"], config.tolerance)) is not None]  # fmt: skip
        if not losing or attempt.scheduler == "fcfs":
            break
        name = schedule_name(attempt.scheduler, dict(attempt.params))
        fallback = {"from": name, "to": "fcfs", "reason": f"split {losing[0][0]}: {losing[0][1]}"}
        log.warning("schedule %r loses to FCFS on split %s (%s); the plan keeps FCFS",
                    name, *losing[0])  # fmt: skip
    info = {"settings": dataclasses.asdict(q), "p99_limit": P99_LIMIT, "search": search,
            "splits": splits, "fallback": fallback}  # fmt: skip
    return replace(plan, schedule=attempt), info


def without_prefetch(plan: Plan) -> Plan:
    """``plan`` with its prefetcher (and phase overrides) removed, and its ``expected``
    rows describing that plan: on every split, the row named ``plan`` becomes the tuned
    plan's ``plan, no prefetch`` row (readers such as the dashboard take the ``plan`` row
    as the file's own figures)."""

    def fix(rows: Any) -> Any:
        if not isinstance(rows, list):
            return rows
        by = {r.get("name"): r for r in rows if isinstance(r, dict)}
        if "plan, no prefetch" not in by:
            return rows
        own = {**by["plan, no prefetch"], "name": "plan", "stall_vs_lru": None}
        base = by.get("lru", {}).get("stall_per_token_ms")
        if base:
            own["stall_vs_lru"] = own["stall_per_token_ms"] / base
        return [own if isinstance(r, dict) and r.get("name") == "plan" else r for r in rows]

    expected = dict(plan.expected)
    expected["rows"] = fix(expected.get("rows"))
    if isinstance(expected.get("splits"), list):
        expected["splits"] = [
            {**sp, "rows": fix(sp.get("rows"))} if isinstance(sp, dict) else sp
            for sp in expected["splits"]
        ]
    return replace(plan, prefetch=PrefetchConfig(), phase_overrides={}, expected=expected)


def validate(
    plan: Plan,
    tune_ev: Events,
    val_ev: Events,
    hw: HardwareProfile,
    bpe: int | None,
    *,
    baselines: list[dict[str, Any]] | None = None,
    fanout: Fanout | None = None,
    key: str = "validation",
    ram: RamTier | None = None,
) -> list[dict[str, Any]]:
    """The plan and the baselines on the validation events (baselines' tables from tune).

    ``baselines`` (the rows after the plan's two, from an earlier call on the same events)
    are reused instead of replayed again. ``ram``: the RAM tier every run replays over
    (three tiers; the plan's own is replaced). ``fanout``: where the replays run (default: in
    this process); ``key`` names the validation events shared with its workers.
    """
    L, E = val_ev.num_layers, val_ev.num_experts
    uniform = uniform_layout(plan.layout.total_slots, L, E)
    k = plan.routing.top_k

    def base(policy: str, pf: PrefetchConfig | None = None, layout: CacheLayout = uniform) -> Plan:
        return make_plan(val_ev, plan.routing, layout, policy, None, pf,
                         bytes_per_expert=bpe, fit_events=tune_ev)  # fmt: skip

    no_pf = replace(plan, prefetch=PrefetchConfig(), phase_overrides={})
    runs = [("plan", plan), ("plan, no prefetch", no_pf)]
    if baselines is None:
        runs += [
            ("lru", base("lru")),
            ("lfu", base("lfu")),
            ("MoE-Infinity as released (pool LFU)",
             base("lfu", layout=pool_layout(plan.layout.total_slots, L, E))),
            ("lru + kNN prefetch (after MoE-Infinity paper)",
             base("lru", PrefetchConfig("activation_matrix", fetch=2 * k))),
            ("belady (oracle bound, no prefetch)", base("belady")),
            ("belady + oracle prefetch (bound)", base("belady", PrefetchConfig("oracle", fetch=0))),
            ("arc (after Megiddo & Modha)", base("arc")),
            ("W-TinyLFU (after Caffeine)", base("wtinylfu")),
            ("LeCaR (after Vietri et al.)", base("lecar")),
        ]  # fmt: skip
    if plan.layout != uniform:  # the bound for the plan's own layout, for transparency
        bound = replace(no_pf, eviction=EvictionConfig("belady"), adaptation=Adaptation())
        runs.append((PLAN_LAYOUT_BOUND, bound))
    handle = val_ev if fanout is None else fanout.share(key, val_ev)
    rows = (fanout or Fanout(1)).map(_plan_row, [(name, replace(p, ram=ram), handle, hw, bpe)
                                                 for name, p in runs])  # fmt: skip
    extra = rows.pop() if plan.layout != uniform else None
    if baselines is None:
        # mixtral-offloading's released cache is per-layer LRU with the current layer's
        # experts protected: exactly the "lru" row's replay, named for the peer
        mixtral = {**rows[2], "name": "mixtral-offloading as released (per-layer LRU)"}
        baselines = [dict(r) for r in rows[2:4]] + [mixtral] + [dict(r) for r in rows[4:]]
    rows = rows[:2] + [dict(r) for r in baselines]
    if extra is not None:
        rows.append(extra)
    names = [r["name"] for r in rows]
    lru = rows[2]["hit_rate"]
    bel = rows[names.index("belady (oracle bound, no prefetch)")]["hit_rate"]
    mine = rows[1]["hit_rate"]
    # Belady is only a bound while every pass's experts fit (no streaming); a gap of
    # under half a point is noise.
    gap = None
    if bel is not None and lru is not None and bel - lru > 0.005:
        gap = (mine - lru) / (bel - lru)
    rows[1]["gap_closed_vs_lru_belady"] = gap
    rows[0]["stall_vs_lru"] = None
    if rows[2]["stall_per_token_ms"]:
        rows[0]["stall_vs_lru"] = rows[0]["stall_per_token_ms"] / rows[2]["stall_per_token_ms"]
    return rows
