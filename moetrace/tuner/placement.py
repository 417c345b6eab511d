"""Where experts live in host RAM: the RAM tier of a three-tier plan, chosen from traces.

Under a device cache, host RAM does not see the model's routing: it sees what the device
misses (its demand misses and its prefetches). So placements are fitted on that stream,
replayed through the device plan on the tune split, not on raw activation counts:

- ``lru``: RAM as plain LRU over disk (the baseline every placement is judged against);
- ``pin misses F``: the fraction F of RAM slots pinned with the experts the device misses
  most (one pool, across layers), LRU for the rest;
- ``frequency (after Remoe)``: every RAM slot pinned with the experts activated most
  often (Remoe's placement by activation frequency, without its latency model);
- adaptive online policies over RAM (``arc``, ``wtinylfu``, ``lecar``, ``lfu_decay``);
- the best of those with a RAM prefetcher (transition table, one layer further ahead
  than the device's prefetcher, reading disk -> RAM only).

A candidate is fitted on each search split's fit requests and scored by the modeled stall
per token on its select requests (minimax regret over the splits, as the device search);
every candidate but ``lru`` carries a drift detector that switches the RAM cache to LRU
(pins released) when it trails a shadow LRU. The choice is then judged on every split's
validation requests against ``lru`` at the same RAM slots; it is written only if it is
not slower there on any split, else the next candidates by regret are judged (at most
:data:`MAX_TRIES` in all) and, when every one loses somewhere, the plan keeps RAM as LRU
and says why.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from moetrace.store.hardware import HardwareProfile
from moetrace.store.plan import (
    Adaptation,
    CacheLayout,
    EvictionConfig,
    Plan,
    PrefetchConfig,
    RamTier,
)
from moetrace.tuner.parallel import Fanout, shared
from moetrace.tuner.policy.events import Events
from moetrace.tuner.policy.prefetch import get_prefetcher
from moetrace.tuner.sim import kernel as K
from moetrace.tuner.sim.engine import simulate

log = logging.getLogger(__name__)

PIN_FRACTIONS = (0.5, 0.75, 1.0)
ADAPTIVE = ("arc", "wtinylfu", "lecar", "lfu_decay")
BASELINE = "lru"
MAX_TRIES = 4
"""Placements judged on every split before RAM as LRU is written."""


def ram_layout(num_layers: int, slots: int) -> CacheLayout:
    """One pool of ``slots`` RAM slots shared by every layer (no slot: a per-layer layout
    of zeros, every read from disk goes through the staging area)."""
    if slots <= 0:
        return CacheLayout("per_layer", (0,) * num_layers)
    return CacheLayout("pool", (0,) * num_layers, pool_slots=slots)


def ram_tier(
    num_layers: int,
    slots: int,
    policy: str = "lru",
    pinned: tuple[tuple[int, ...], ...] = (),
    prefetch: PrefetchConfig | None = None,
    bytes_per_expert: int | None = None,
    top_k: int = 1,
) -> RamTier:
    """A RAM tier of ``slots`` experts under ``policy`` with ``pinned`` placement."""
    return RamTier(
        slots=slots,
        layout=ram_layout(num_layers, slots),
        eviction=EvictionConfig(policy, pinned=pinned),
        prefetch=prefetch or PrefetchConfig(),
        bytes=None if bytes_per_expert is None else slots * bytes_per_expert,
        worst_case_bytes=None if bytes_per_expert is None else (slots + top_k) * bytes_per_expert,
    )


def device_misses(events: Events, plan: Plan, hw: HardwareProfile, bpe: int | None) -> np.ndarray:
    """(L, E) how often ``plan``'s device cache misses each expert on ``events`` (demand
    misses and streamed loads): the stream a RAM tier under it sees."""
    res = simulate(events, replace(plan, ram=None), hw, bytes_per_expert=bpe, record=True)
    assert res.timeline is not None
    miss = (res.timeline.outcome == K.O_MISS) | (res.timeline.outcome == K.O_STREAM)
    layer = np.repeat(events.layer.astype(np.int64), np.diff(events.ptr))
    counts = np.zeros((events.num_layers, events.num_experts))
    np.add.at(counts, (layer[miss], events.experts[miss].astype(np.int64)), 1.0)
    return counts


def activations(events: Events) -> np.ndarray:
    """(L, E) how often each expert is used on ``events``."""
    layer = np.repeat(events.layer.astype(np.int64), np.diff(events.ptr))
    counts = np.zeros((events.num_layers, events.num_experts))
    np.add.at(counts, (layer, events.experts.astype(np.int64)), 1.0)
    return counts


def top_experts(counts: np.ndarray, n: int) -> tuple[tuple[int, ...], ...]:
    """The ``n`` (layer, expert) with the highest counts (ties: lower layer, then expert),
    as pinned rows per layer; experts never counted are not pinned."""
    L, E = counts.shape
    flat = counts.reshape(-1)
    order = np.lexsort((np.arange(L * E), -flat))[: max(n, 0)]
    order = order[flat[order] > 0]
    rows: list[list[int]] = [[] for _ in range(L)]
    for key in sorted(order.tolist()):
        rows[key // E].append(key % E)
    return tuple(tuple(r) for r in rows)


@dataclass(frozen=True)
class Placement:
    """A RAM-tier configuration the search chooses, refitted on each split."""

    name: str
    policy: str = "lru"
    pin: str | None = None
    """Pins from ``misses`` (the device's misses) or ``activations``; None: no pins."""
    pin_fraction: float = 0.0
    prefetch: PrefetchConfig = field(default_factory=PrefetchConfig)

    def tier(
        self,
        plan: Plan,
        fit: Events,
        slots: int,
        hw: HardwareProfile,
        bpe: int | None,
        adaptation: Adaptation | None = None,
        misses: np.ndarray | None = None,
    ) -> RamTier:
        """The tier for the device ``plan``, fitted on the events ``fit``; every placement
        but ``lru`` gets ``adaptation`` (the RAM cache's drift detector). ``misses``:
        :func:`device_misses` of ``plan`` on ``fit`` when the caller has them."""
        L, E = fit.num_layers, fit.num_experts
        pinned: tuple[tuple[int, ...], ...] = ()
        if self.pin is not None and slots > 0:
            if self.pin == "misses":
                counts = misses if misses is not None else device_misses(fit, plan, hw, bpe)
            else:
                counts = activations(fit)
            pinned = top_experts(counts, int(self.pin_fraction * slots))
        pf = self.prefetch
        if pf.name != "none":
            pf = get_prefetcher(pf, L, E).fit(fit)
        tier = ram_tier(L, slots, self.policy, pinned, pf, bpe, plan.routing.top_k)
        if adaptation is not None and self.name != BASELINE:
            tier = replace(tier, adaptation=adaptation)
        return tier


def candidates(plan: Plan) -> list[Placement]:
    """The placements the search tries under the device ``plan``."""
    out = [Placement(BASELINE)]
    out += [Placement(f"pin misses {f:g}", "lru", "misses", f) for f in PIN_FRACTIONS]
    out.append(Placement("frequency (after Remoe)", "lru", "activations", 1.0))
    out += [Placement(p, p) for p in ADAPTIVE]
    return out


def with_prefetch(p: Placement, plan: Plan) -> Placement:
    """``p`` with a RAM prefetcher one layer beyond the device's lookahead."""
    ahead = plan.prefetch.lookahead + 1 if plan.prefetch.name != "none" else 2
    pf = PrefetchConfig("transition", lookahead=ahead, fetch=2 * plan.routing.top_k)
    return replace(p, name=f"{p.name} + RAM prefetch", prefetch=pf)


def _row(name: str, plan: Plan, ev: Any, hw: HardwareProfile, bpe: int | None) -> dict[str, Any]:
    """A task: replay the events ``ev`` stands for under the three-tier ``plan``."""
    s = simulate(shared(ev), plan, hw, bytes_per_expert=bpe).summary()
    return {
        "name": name,
        "stall_per_token_ms": s["stall_per_token_ms"],
        "tokens_per_s": s["tokens_per_s"],
        "hit_rate": s["hit_rate"],
        "ram_hit_rate": s["ram_hit_rate"],
        "disk_bytes": s["disk_bytes"],
        "bytes_moved": s["bytes_moved"],
        "pinned_in_ram": sum(len(r) for r in plan.ram.eviction.pinned) if plan.ram else 0,
    }


def _score(
    options: Sequence[Placement],
    plan: Plan,
    fit: Events,
    ev: Any,
    slots: int,
    hw: HardwareProfile,
    bpe: int | None,
    fanout: Fanout,
    adaptation: Adaptation,
    misses: np.ndarray | None,
) -> tuple[list[dict[str, Any]], list[RamTier]]:
    """The rows of ``options``' tiers fitted on ``fit`` and replayed on ``ev``, and the
    tiers."""
    tiers = [p.tier(plan, fit, slots, hw, bpe, adaptation, misses) for p in options]
    runs = [
        (p.name, replace(plan, ram=t), ev, hw, bpe) for p, t in zip(options, tiers, strict=True)
    ]
    return fanout.map(_row, runs), tiers


def ram_drift_window(events: Events, misses: np.ndarray) -> int:
    """RAM accesses per drift-detector window: about 64 tokens' worth of the device's
    ``misses`` on ``events`` (:func:`device_misses`; at least 512). The RAM sees a
    fraction of the device's accesses, so the device's window (128 tokens of accesses)
    would leave a pinned RAM placement that the traffic has drifted away from in place
    for hundreds of tokens."""
    tokens = max(float(events.tokens_by_phase.sum()), 1.0)
    return max(512, int(64 * misses.sum() / tokens))


def tune_placement(
    search: Sequence[tuple[str, Plan, Events, Events]],
    judge: Sequence[tuple[str, Plan, Events, Events]],
    slots: int,
    hw: HardwareProfile,
    bpe: int | None,
    *,
    adaptation: Adaptation | None = None,
    fanout: Fanout | None = None,
    tolerance: float = 0.0,
) -> tuple[RamTier, dict[str, Any]]:
    """Choose the RAM tier of ``slots`` experts under the device plans.

    ``search``: per split (name, the device plan fitted on its fit part, its fit events,
    its select events): candidates are fitted on fit and scored on select, and chosen by
    minimax regret of the stall per token over these splits (as the device search).
    ``judge``: per split (name, the device plan fitted on its tune part, its tune events,
    its validation events): the choice, refitted on tune, against ``lru`` on validation.
    Every candidate but ``lru`` carries ``adaptation`` (the RAM cache's drift detector;
    a window of 0 there is sized by :func:`ram_drift_window`).
    Returns the tier for the first judged split's plan and the report written to the
    plan's ``expected.placement``: candidates, the choice, per split the chosen tier's and
    ``lru``'s rows, and the fallback to ``lru`` (with its reason) if the choice is slower
    than ``lru`` by more than ``tolerance`` on some split's validation requests."""
    fan = fanout or Fanout(1)
    plan0 = search[0][1]
    # each split's device misses, replayed once (the pinned candidates and the window)
    search_misses = [device_misses(fit, plan, hw, bpe) for _, plan, fit, _ in search]
    judge_misses: dict[str, np.ndarray] = {}
    adapt = adaptation or Adaptation()
    if adapt.window == 0 and adaptation is not None:  # sized on the RAM's own stream
        adapt = replace(adapt, window=ram_drift_window(search[0][2], search_misses[0]))

    def score(options: Sequence[Placement]) -> list[list[dict[str, Any]]]:
        per = []
        for (name, plan, fit, sel), misses in zip(search, search_misses, strict=True):
            h = fan.share(f"placement:select:{name}", sel)
            per.append(_score(options, plan, fit, h, slots, hw, bpe, fan, adapt, misses)[0])
        return per

    opts = candidates(plan0)
    per = score(opts)
    stall = np.asarray([[r["stall_per_token_ms"] or 0.0 for r in rows] for rows in per])
    regret = (stall / np.maximum(stall.min(axis=1, keepdims=True), 1e-12)).max(axis=0)
    best = min(range(len(opts)), key=lambda i: (float(regret[i]), i))
    chosen = opts[best]
    pf = with_prefetch(chosen, plan0)
    pf_rows = score([pf])
    pf_regret = max(rows[0]["stall_per_token_ms"] / max(stall[j].min(), 1e-12)
                    for j, rows in enumerate(pf_rows))  # fmt: skip
    if pf_regret < regret[best]:
        chosen = pf
    rows = [{**per[0][i], "regret": float(regret[i])} for i in range(len(opts))]
    rows.append({**pf_rows[0][0], "regret": float(pf_regret)})
    log.info("placement: %r (regret %.3f)", chosen.name, min(pf_regret, regret[best]))
    # the choice first, then the next by regret, until one is not slower than LRU on
    # any judged split (the dashboard and `tune` show the first one's loss)
    ranked = [chosen] + [opts[i] for i in np.argsort(regret, kind="stable")
                         if opts[i] is not chosen and opts[i].name != BASELINE]  # fmt: skip
    fallback, written, judged, tier = None, None, [], None
    lru_rows: dict[str, dict[str, Any]] = {}
    for cand in ranked[:MAX_TRIES] + [Placement(BASELINE)]:
        rows_c, tiers_c, why = [], [], None
        for name, plan, tune_ev, val_ev in judge:
            h = fan.share(f"placement:validation:{name}", val_ev)
            todo = (
                [cand] if name in lru_rows or cand.name == BASELINE else [cand, Placement(BASELINE)]
            )
            if cand.pin == "misses" and name not in judge_misses:
                judge_misses[name] = device_misses(tune_ev, plan, hw, bpe)
            got, tiers = _score(todo, plan, tune_ev, h, slots, hw, bpe, fan, adapt,
                                judge_misses.get(name))  # fmt: skip
            lru_rows.setdefault(name, got[-1])
            mine, lru = got[0], lru_rows[name]
            ratio = _ratio(mine, lru)
            rows_c.append({"name": name, "placement": mine, "lru": lru, "stall_vs_lru": ratio})
            tiers_c.append(tiers[0])
            if why is None and ratio is not None and ratio > 1.0 + tolerance:
                why = f"split {name}: stall {ratio:.3f}x RAM as LRU"
        if not judged:
            judged = rows_c  # the choice's own rows, shown even when it lost
        if why is None or cand.name == BASELINE:
            written, tier = cand, tiers_c[0]
            if cand is not chosen and cand.name != BASELINE:
                judged = rows_c
            break
        if fallback is None:
            fallback = {"from": chosen.name, "to": None, "reason": why, "tried": []}
        fallback["tried"].append({"name": cand.name, "reason": why})
        log.warning("placement %r is slower than RAM as LRU on %s; trying the next", cand.name,
                    why)  # fmt: skip
    assert written is not None and tier is not None
    if fallback is not None:
        fallback["to"] = written.name
    report = {
        "slots": slots,
        "hardware": hw.name,
        "searched_on": [name for name, *_ in search],
        "candidates": rows,
        "chosen": chosen.name,
        "written": written.name,
        "splits": judged,
        "fallback": fallback,
    }
    return tier, report


def _ratio(mine: dict[str, Any], lru: dict[str, Any]) -> float | None:
    a, b = mine["stall_per_token_ms"], lru["stall_per_token_ms"]
    if a is None or b is None:
        return None
    return a / b if b > 0 else (1.0 if a == 0 else float("inf"))
