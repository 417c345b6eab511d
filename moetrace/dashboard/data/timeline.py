"""The cache timeline: what the simulator's replay of a plan did to every access of a
range of requests, lane by lane (one per MoE layer) over forward passes, and the same
from a runtime run's recorded timeline (``moetrace run --timeline-events N``).

Only the chosen requests are loaded (:func:`moetrace.store.arrays.load_routing` with a
request subset) and replayed by the simulator with recording on
(:func:`moetrace.tuner.sim.engine.simulate` ``record=True``); the chart rows are one per
(pass or bin of passes, lane, outcome) with a count, at most :data:`MAX_CELLS` pass x
lane cells.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from moetrace.errors import AnalysisError, ConfigError
from moetrace.store.arrays import load_routing
from moetrace.store.reader import Trace
from moetrace.tuner.policy.events import Events, build_events
from moetrace.tuner.sim.kernel import O_HIT, O_MISS, O_PF_HIT, O_STREAM
from moetrace.tuner.sim.timeline import RecordedTimeline, Timeline

MAX_CELLS = 5000
"""Pass x lane cells drawn at most; longer ranges are binned (several passes a cell)."""
MAX_DEFAULT_REQUESTS = 8
CATEGORIES = ("hit", "prefetch hit", "miss", "streamed", "wasted prefetch")
"""Chart categories: the per-access outcomes, and unused prefetches evicted (drawn at
the event that evicted them, on that event's lane)."""
_CODE_CATEGORY = {O_HIT: "hit", O_PF_HIT: "prefetch hit", O_MISS: "miss", O_STREAM: "streamed"}
STALL_LANE = "stall"


@dataclass(frozen=True)
class PlanChoice:
    """The plan the simulator replays: a plan file, or a named eviction policy with
    ``slots`` per layer (tables fitted on the replayed requests: in-sample)."""

    plan_path: str | None = None
    policy: str | None = None
    slots: int = 0

    def __post_init__(self) -> None:
        if (self.plan_path is None) == (self.policy is None):
            raise ConfigError("timeline: give exactly one of a plan file or a policy")
        if self.policy is not None and self.slots < 1:
            raise ConfigError(f"timeline: slots per layer must be >= 1, got {self.slots}")

    @property
    def label(self) -> str:
        if self.policy is not None:
            return f"{self.policy.upper()} at {self.slots} slots per layer"
        return f"plan {Path(str(self.plan_path)).stem}"


@dataclass(frozen=True)
class RangeChoice:
    """Requests ``first .. first + count - 1`` (arrival order); ``warm``: replay the
    earlier requests too, so the cache is warm when the range starts."""

    first: int
    count: int
    hardware: str
    warm: bool = False

    def __post_init__(self) -> None:
        if self.first < 0 or self.count < 1:
            raise ConfigError(f"timeline: bad request range ({self.first}, {self.count})")


@dataclass(frozen=True)
class RangeReplay:
    """The replay of a request range: its events and recorded timeline (shown events
    only), each pass's request and tokens, and where the range starts in the trace."""

    label: str
    moe_layers: tuple[int, ...]
    layer: np.ndarray  # (n,) MoE-layer index of each shown event
    phase: np.ndarray  # (n,)
    pass_of: np.ndarray  # (n,) pass index within the range
    ptr: np.ndarray
    experts: np.ndarray
    timeline: Timeline
    pass_request: tuple[str, ...]
    pass_tokens: tuple[str, ...]
    event_offset: int | None
    """Index in the whole trace's replay of the first shown event (None: unknown, the
    range was replayed cold and does not start at the first request)."""
    summary: dict[str, Any]
    """The simulator's summary of the whole replay (earlier requests too when warm)."""

    @property
    def num_passes(self) -> int:
        return len(self.pass_request)

    def hit_rate(self) -> float | None:
        c = self.timeline.counts()
        return c["hits"] / c["accesses"] if c["accesses"] else None


def default_count(passes: Sequence[int], num_layers: int, max_cells: int = MAX_CELLS) -> int:
    """How many requests from the first fit in ``max_cells`` pass x lane cells (at least
    one, at most :data:`MAX_DEFAULT_REQUESTS`); ``passes`` per request."""
    total, n = 0, 0
    for p in passes[:MAX_DEFAULT_REQUESTS]:
        total += max(int(p), 1) * num_layers
        if n and total > max_cells:
            break
        n += 1
    return max(n, 1)


def _plan(choice: PlanChoice, trace: Trace, ev: Events) -> Any:
    from moetrace.store.plan import CacheLayout, RoutingShape, load_plan
    from moetrace.tuner.sim.engine import make_plan

    model = trace.manifest.model
    if choice.plan_path is not None:
        plan = load_plan(choice.plan_path)
        plan.check_compatible(model)
        return plan
    L, E = ev.num_layers, ev.num_experts
    layout = CacheLayout("per_layer", tuple([min(choice.slots, E)] * L))
    return make_plan(
        ev, RoutingShape.of(model), layout, str(choice.policy),
        bytes_per_expert=model.bytes_per_expert,
    )  # fmt: skip


def _pass_labels(routing: Any, start_row: int) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """Request id and token positions of each pass from ``start_row`` on (passes cut at
    each (request, step), as :func:`build_events` cuts them in arrival order)."""
    req, step, tok = (
        routing.request[start_row:],
        routing.step[start_row:],
        routing.token[start_row:],
    )
    new = np.ones(req.shape[0], bool)
    new[1:] = (req[1:] != req[:-1]) | (step[1:] != step[:-1])
    starts = np.flatnonzero(new)
    lo = np.minimum.reduceat(tok, starts)
    hi = np.maximum.reduceat(tok, starts)
    ids = routing.request_ids
    requests = tuple(ids[int(r)] for r in req[starts])
    tokens = tuple(
        str(a) if a == b else f"{a}-{b}" for a, b in zip(lo.tolist(), hi.tolist(), strict=True)
    )
    return requests, tokens


def replay_range(
    trace: Trace, request_ids: Sequence[str], choice: PlanChoice, rng: RangeChoice
) -> RangeReplay:
    """Replay requests ``rng`` (of ``request_ids``, arrival order) under ``choice`` with
    the simulator recording, and keep the range's events."""
    from moetrace.store.hardware import load_hardware
    from moetrace.tuner.sim.engine import simulate

    if rng.first >= len(request_ids):
        raise AnalysisError(f"timeline: request {rng.first} of {len(request_ids)}")
    stop = min(rng.first + rng.count, len(request_ids))
    lo = 0 if rng.warm else rng.first
    routing = load_routing(trace, requests=list(request_ids[lo:stop]), order="arrival")
    ev = build_events(routing, order="arrival", granularity="pass")
    plan = _plan(choice, trace, ev)
    bpe = trace.manifest.model.bytes_per_expert
    res = simulate(ev, plan, load_hardware(rng.hardware), bytes_per_expert=bpe, record=True)
    assert res.timeline is not None
    first_ev = int(np.searchsorted(ev.request, rng.first - lo))
    first_pass = int(ev.pass_id[first_ev]) if first_ev < ev.num_events else 0
    first_row = int(np.searchsorted(routing.request, rng.first - lo))
    pass_request, pass_tokens = _pass_labels(routing, first_row)
    n = ev.num_events
    lo_a = int(ev.ptr[first_ev])
    return RangeReplay(
        label=choice.label,
        moe_layers=tuple(int(x) for x in routing.moe_layers),
        layer=ev.layer[first_ev:].astype(np.int64),
        phase=ev.phase[first_ev:].astype(np.int64),
        pass_of=(ev.pass_id[first_ev:] - first_pass).astype(np.int64),
        ptr=ev.ptr[first_ev:] - lo_a,
        experts=ev.experts[lo_a:].astype(np.int64),
        timeline=res.timeline.select(first_ev, n),
        pass_request=pass_request,
        pass_tokens=pass_tokens,
        event_offset=first_ev if (rng.warm or rng.first == 0) else None,
        summary=res.summary(),
    )


@dataclass(frozen=True)
class Lanes:
    """Events to draw as lanes: each one's lane (MoE-layer index), phase, pass, experts
    (CSR) and recorded outcomes."""

    layer: np.ndarray
    phase: np.ndarray
    pass_of: np.ndarray
    ptr: np.ndarray
    experts: np.ndarray
    timeline: Timeline


def sim_lanes(rr: RangeReplay, num_events: int | None = None) -> Lanes:
    """The range's events as lanes (the first ``num_events`` of them, default all)."""
    k = rr.layer.shape[0] if num_events is None else num_events
    return Lanes(
        rr.layer[:k], rr.phase[:k], rr.pass_of[:k], rr.ptr[: k + 1],
        rr.experts[: int(rr.ptr[k])], rr.timeline.select(0, k),
    )  # fmt: skip


@dataclass(frozen=True)
class RuntimeMatch:
    """The runtime's recorded events aligned with a range replay (by replay order)."""

    lanes: Lanes | None
    events: int
    """Shown events the runtime recorded."""
    routing_agrees: int
    """Of those, events whose layer and experts agree with the trace's."""
    note: str | None = None


def match_runtime(rr: RangeReplay, rec: RecordedTimeline, offset: int | None) -> RuntimeMatch:
    """The runtime events at the positions of the range's events (``offset``: the whole
    trace's index of the range's first event); the runtime must have run the trace's
    requests in the same order (``moetrace run --trace DIR --timeline-events N``)."""
    if offset is None:
        return RuntimeMatch(None, 0, 0, "the range's position in the run is unknown")
    if rec.moe_layers and tuple(rec.moe_layers) != rr.moe_layers:
        return RuntimeMatch(
            None, 0, 0, f"the run has MoE layers {list(rec.moe_layers)}, the trace "
            f"{list(rr.moe_layers)}",
        )  # fmt: skip
    n = rr.layer.shape[0]
    stop = min(offset + n, rec.timeline.num_events)
    if stop <= offset:
        return RuntimeMatch(
            None, 0, 0, f"the runtime recorded its first {rec.timeline.num_events} events; "
            f"this range starts at event {offset}",
        )  # fmt: skip
    tl = rec.timeline.select(offset, stop)
    k = stop - offset
    lo, hi = int(rec.timeline.ptr[offset]), int(rec.timeline.ptr[stop])
    experts = rec.experts[lo:hi]
    layer = rec.layer[offset:stop]
    agree = 0
    for j in range(k):
        same_layer = layer[j] == rr.layer[j]
        mine = rr.experts[rr.ptr[j] : rr.ptr[j + 1]]
        theirs = experts[tl.ptr[j] : tl.ptr[j + 1]]
        agree += int(same_layer and np.array_equal(mine, theirs))
    lanes = Lanes(layer, rec.phase[offset:stop], rr.pass_of[:k], tl.ptr, experts, tl)
    return RuntimeMatch(lanes, k, agree)


def lane_rows(
    lanes: Lanes,
    rr: RangeReplay,
    shown_layers: Sequence[int],
    phase: str = "all",
    max_cells: int = MAX_CELLS,
) -> pd.DataFrame:
    """Chart rows: one per (pass or bin of passes, lane, category) with a count, plus a
    row per pass (bin) on the :data:`STALL_LANE` with the summed stall. ``shown_layers``:
    MoE-layer indices; ``phase``: ``all`` or one phase's events only."""
    tl = lanes.timeline
    keep = np.isin(lanes.layer, np.asarray(list(shown_layers), np.int64))
    if phase != "all":
        keep &= lanes.phase == (0 if phase == "prefill" else 1)
    size = bin_size(rr, len(shown_layers), max_cells)
    ev_of = np.repeat(np.arange(lanes.layer.shape[0]), np.diff(lanes.ptr))
    acc = keep[ev_of]
    codes = np.array([_CODE_CATEGORY[c] for c in range(4)], dtype=object)
    ev = np.flatnonzero(keep)
    wasted = ev[tl.wasted[ev] > 0]
    parts = pd.DataFrame(
        {
            "x": np.concatenate([lanes.pass_of[ev_of[acc]], lanes.pass_of[wasted]]) // size,
            "lane": np.concatenate([lanes.layer[ev_of[acc]], lanes.layer[wasted]]),
            "category": np.concatenate(
                [codes[tl.outcome[acc].astype(np.int64)], np.full(wasted.shape[0], CATEGORIES[4])]
            ),
            "n": np.concatenate([np.ones(int(acc.sum()), np.int64), tl.wasted[wasted]]),
            "expert": np.concatenate([lanes.experts[acc], np.full(wasted.shape[0], -1)]),
        }
    )
    stall = (
        pd.DataFrame(
            {"x": lanes.pass_of[ev] // size, "lane": lanes.layer[ev], "stall_s": tl.stall_s[ev]}
        )
        .groupby(["x", "lane"], as_index=False)["stall_s"]
        .sum()
    )
    cells = parts.groupby(["x", "lane", "category"], as_index=False, sort=False).agg(
        count=("n", "sum"), experts=("expert", _expert_list if size == 1 else _nothing)
    )
    cells = cells.merge(stall, on=["x", "lane"], how="left")
    top = stall.groupby("x", as_index=False)["stall_s"].sum()
    top["lane"], top["category"], top["count"], top["experts"] = -1, None, 0, ""
    out = pd.concat([cells, top], ignore_index=True)
    x = out["x"].to_numpy(np.int64)
    p0, p1 = x * size, np.minimum((x + 1) * size, rr.num_passes) - 1
    labels = np.array([*(f"L{v}" for v in rr.moe_layers), STALL_LANE], dtype=object)
    out["lane"] = labels[out["lane"].to_numpy(np.int64)]
    out["request"] = [
        _span(rr.pass_request, a, b) for a, b in zip(p0.tolist(), p1.tolist(), strict=True)
    ]
    out["tokens"] = (
        [rr.pass_tokens[a] for a in p0.tolist()]
        if size == 1
        else [f"passes {a}-{b}" for a, b in zip(p0.tolist(), p1.tolist(), strict=True)]
    )
    out["x"], out["x2"] = p0.astype(float), (p1 + 1).astype(float)
    out["stall_ms"] = 1e3 * out.pop("stall_s").fillna(0.0)
    out.loc[out["category"] == CATEGORIES[4], "experts"] = ""
    cols = ["x", "x2", "lane", "category", "count", "request", "tokens", "experts", "stall_ms"]
    return out[cols]


def _expert_list(values: pd.Series) -> str:
    return ", ".join(str(v) for v in values.tolist())


def _nothing(values: pd.Series) -> str:
    return ""


def _span(requests: tuple[str, ...], p0: int, p1: int) -> str:
    a, b = requests[p0], requests[p1]
    return a if a == b else f"{a} .. {b}"


def bin_size(rr: RangeReplay, num_lanes: int, max_cells: int = MAX_CELLS) -> int:
    """Passes per drawn cell for ``num_lanes`` lanes."""
    return max(1, math.ceil(rr.num_passes * max(num_lanes, 1) / max_cells))


def hit_rate(lanes: Lanes) -> float | None:
    c = lanes.timeline.counts()
    return c["hits"] / c["accesses"] if c["accesses"] else None
