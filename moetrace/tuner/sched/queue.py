"""The queue model: requests arrive, wait, and run in batches under a scheduler.

A server runs at most ``batch_size`` requests together, one forward pass (a *step*) at a
time: each running request contributes its next pass (its prefill, then one decode token
per step). ``continuous`` batching admits waiting requests whenever a place is free;
``static`` batching admits a new batch only when the last one has finished.

The schedule is decided as the replay goes: each step's events (at each MoE layer, the
union of its requests' experts) are replayed through the simulator's kernel and cache
(:class:`moetrace.tuner.sim.engine.Replay`, the same code as every replay), and the
scheduler admits requests at the device's time after the last step, so it sees exactly
the requests that have arrived. Latency per request: queueing, then prefill and decode
with their stalls. An idle device waits for the next arrival while the link goes on.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from moetrace.errors import ConfigError
from moetrace.store.hardware import HardwareProfile
from moetrace.store.plan import Plan, ScheduleConfig
from moetrace.tuner.policy.events import Events
from moetrace.tuner.sched.arrivals import arrival_times
from moetrace.tuner.sched.schedulers import QueueView, Scheduler, get_scheduler
from moetrace.tuner.sched.workload import step_events, workload
from moetrace.tuner.sim.engine import Replay
from moetrace.tuner.sim.metrics import SimResult

RECENT_DECAY = 0.5
"""Weight of the earlier admissions in the scheduler's view of the cache's content, per
admitted request."""


@dataclass(frozen=True)
class Schedule:
    """Which pass runs in which step, and when each request was admitted."""

    step_of_pass: np.ndarray  # int64 (n_pass,)
    order: np.ndarray  # int64 request indices in admission order
    batches: tuple[tuple[int, ...], ...]  # requests admitted together, in order
    num_steps: int


class Admissions:
    """The waiting side of a server: who waits, who was overtaken how often, what was
    admitted last. The simulator's queue and the runtime's batch runner both admit
    through :meth:`admit`, so they take the same decisions."""

    def __init__(self, scheduler: Scheduler, signature: np.ndarray, arrival: np.ndarray):
        self.scheduler = scheduler
        self.signature = signature
        self.arrival = arrival
        self.overtaken = np.zeros(len(arrival), np.int64)
        self.recent = np.zeros(signature.shape[1])
        self.waiting: list[int] = []
        self.order: list[int] = []
        self.batches: list[tuple[int, ...]] = []

    def admit(self, now: float, running: Sequence[int], free: int) -> list[int]:
        """Up to ``free`` waiting requests to run now, chosen by the scheduler."""
        if free <= 0 or not self.waiting:
            return []
        view = QueueView(now, np.asarray(self.waiting, np.int64), np.asarray(running, np.int64),
                         self.signature, self.recent, self.arrival, self.overtaken)  # fmt: skip
        picked = self.scheduler.pick(view, free)
        if not picked or len(set(picked)) != len(picked) or not set(picked) <= set(self.waiting):
            raise ConfigError(
                f"scheduler {self.scheduler.name!r} picked {picked} of {self.waiting}"
            )
        for r in picked:
            self.waiting.remove(r)
            self.recent = RECENT_DECAY * self.recent + self.signature[r]
        later = np.sort(np.asarray(picked))
        if self.waiting:
            wa = np.asarray(self.waiting)
            self.overtaken[wa] += len(later) - np.searchsorted(later, wa, side="right")
        self.order += picked
        self.batches.append(tuple(picked))
        return picked


@dataclass(frozen=True)
class QueueResult:
    """A scheduled replay: the simulator's counters and each request's modeled times."""

    sim: SimResult
    schedule: Schedule
    config: ScheduleConfig
    arrivals: str
    arrival: np.ndarray  # seconds, per request (arrival order)
    start: np.ndarray  # when its first pass started
    finish: np.ndarray  # when its last pass ended
    max_overtaken: int = 0  # the most later requests admitted before one request

    @property
    def latency(self) -> np.ndarray:
        return self.finish - self.arrival

    @property
    def wait(self) -> np.ndarray:
        return self.start - self.arrival

    def summary(self) -> dict[str, Any]:
        s = self.sim.summary()
        lat, makespan = self.latency, float(self.finish.max() - self.arrival.min())
        return {
            "scheduler": self.config.scheduler,
            "params": dict(self.config.params),
            "batch_size": self.config.batch_size,
            "batching": self.config.batching,
            "arrivals": self.arrivals,
            "requests": len(lat),
            "steps": self.schedule.num_steps,
            "hit_rate": s["hit_rate"],
            "bytes_moved": s["bytes_moved"],
            "stall_per_token_ms": s["stall_per_token_ms"],
            "tokens_per_s": s["tokens"] / makespan if makespan > 0 else 0.0,
            "mean_latency_s": float(lat.mean()),
            "p50_latency_s": float(np.percentile(lat, 50)),
            "p99_latency_s": float(np.percentile(lat, 99)),
            "max_latency_s": float(lat.max()),
            "mean_wait_s": float(self.wait.mean()),
            "mean_waiting": float(self.wait.sum() / makespan) if makespan > 0 else 0.0,
            "max_overtaken": self.max_overtaken,
        }


def simulate_queue(
    events: Events,
    plan: Plan,
    hardware: HardwareProfile,
    *,
    schedule: ScheduleConfig | None = None,
    arrival_rate: float | None = None,
    recorded_arrivals: np.ndarray | None = None,
    seed: int = 0,
    bytes_per_expert: int | None = None,
    label: str = "",
) -> QueueResult:
    """Replay ``events`` (per request, arrival order) as a served queue under ``schedule``
    (default: the plan's) and ``plan``'s cache. Arrivals: a Poisson process at
    ``arrival_rate``, else ``recorded_arrivals`` (seconds, indexed by the events' request
    index) when given, else a backlog (every request waiting at 0)."""
    cfg = schedule or plan.schedule
    scheduler = get_scheduler(cfg)
    w = workload(events, scheduler.signature)
    rec = None if recorded_arrivals is None else np.asarray(recorded_arrivals)[w.request]
    arrival, kind = arrival_times(w.num_requests, arrival_rate, seed, rec)
    replay = Replay(plan, hardware, events.num_layers, events.num_experts,
                    bytes_per_expert=bytes_per_expert)  # fmt: skip
    n, B = w.num_requests, cfg.batch_size
    static = cfg.batching == "static"
    step_of_pass = np.full(int(w.pass_ptr[-1]), -1, np.int64)
    start, finish = np.zeros(n), np.zeros(n)
    adm = Admissions(scheduler, w.signature, arrival)
    running: list[list[int]] = []  # [request, next pass]
    nxt = step = 0
    while nxt < n or adm.waiting or running:
        now = replay.now
        while nxt < n and arrival[nxt] <= now:
            adm.waiting.append(nxt)
            nxt += 1
        free = (B if not running else 0) if static else B - len(running)
        for r in adm.admit(now, [r for r, _ in running], free):
            running.append([r, int(w.pass_ptr[r])])
            start[r] = now
        if not running:
            replay.wait_until(float(arrival[nxt]))
            continue
        # until a request finishes, nothing can be admitted when the batch is full, the
        # batching static or nobody left to come: replay those steps in one call
        quiet = static or len(running) == B or (nxt >= n and not adm.waiting)
        steps = min(int(w.pass_ptr[r + 1]) - p for r, p in running) if quiet else 1
        grid = np.asarray([p for _, p in running], np.int64)[None, :] + np.arange(steps)[:, None]
        replay.run(step_events(events, grid))
        step_of_pass[grid] = step + np.arange(steps)[:, None]
        step += steps
        for item in list(running):
            item[1] += steps
            if item[1] == w.pass_ptr[item[0] + 1]:
                running.remove(item)
                finish[item[0]] = replay.now
    sched = Schedule(step_of_pass, np.asarray(adm.order, np.int64), tuple(adm.batches), step)
    sim = replay.result(events.tokens_by_phase, label or cfg.scheduler)
    return QueueResult(sim, sched, cfg, kind, arrival, start, finish,
                       _max_overtaken(sched.order))  # fmt: skip


def _max_overtaken(order: np.ndarray) -> int:
    """The most later-arriving requests admitted before any request."""
    worst = 0
    for pos, r in enumerate(order.tolist()):
        worst = max(worst, int((order[:pos] > r).sum()))
    return worst
