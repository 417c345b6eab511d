"""Choose a plan's schedule: schedulers scored under the queue model on the tune split,
judged against first come, first served on every validation split."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from moetrace.errors import ConfigError
from moetrace.store.hardware import HardwareProfile
from moetrace.store.plan import Plan, ScheduleConfig
from moetrace.tuner.parallel import Fanout, shared
from moetrace.tuner.policy.events import Events
from moetrace.tuner.sched.queue import simulate_queue

log = logging.getLogger(__name__)

SCHEDULE_GRID: tuple[tuple[str, dict[str, float]], ...] = (
    ("fcfs", {}),
    ("affinity", {"max_overtakes": 8}),
    ("affinity", {"max_overtakes": 32}),
    ("affinity", {"max_overtakes": 128, "window": 256}),
)
P99_LIMIT = 1.2
"""A scheduler is chosen only if its p99 modeled latency is at most this times FCFS's."""


@dataclass(frozen=True)
class QueueSettings:
    """How the queue is modeled while tuning: batch size, batching, arrivals."""

    batch_size: int = 1
    batching: str = "continuous"
    arrival_rate: float | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        self.config("fcfs", {})  # batch size and batching checked as the plan checks them
        if self.arrival_rate is not None and not self.arrival_rate > 0:
            raise ConfigError(f"arrival rate must be > 0 requests/s, got {self.arrival_rate}")

    def config(self, scheduler: str, params: dict[str, float]) -> ScheduleConfig:
        return ScheduleConfig(scheduler, self.batch_size, self.batching, params)


def schedule_row(name: str, result: Any) -> dict[str, Any]:
    s = result.summary()
    keys = ("hit_rate", "bytes_moved", "stall_per_token_ms", "tokens_per_s", "mean_latency_s",
            "p99_latency_s", "mean_wait_s", "mean_waiting", "max_overtaken", "arrivals")  # fmt: skip
    return {"name": name, "scheduler": s["scheduler"], "params": s["params"],
            **{k: s[k] for k in keys}}  # fmt: skip


def schedule_name(scheduler: str, params: dict[str, float]) -> str:
    return scheduler + "".join(f" {k}={v:g}" for k, v in sorted(params.items()))


def run_rows(
    plan: Plan,
    events: Any,
    hw: HardwareProfile,
    q: QueueSettings,
    grid: Sequence[tuple[str, dict[str, float]]],
    bpe: int | None,
    recorded: np.ndarray | None = None,
    fanout: Fanout | None = None,
) -> list[dict[str, Any]]:
    """One row per scheduler of ``grid`` on ``events`` (or a handle ``fanout`` shared
    them under) under ``plan``'s cache (``recorded``: arrival seconds by request index,
    used without an arrival rate); the replays fanned out."""
    tasks = [(schedule_name(s, p), plan, events, hw, q.config(s, p), q, bpe, recorded)
             for s, p in grid]  # fmt: skip
    return (fanout or Fanout(1)).map(_queue_row, tasks)


def _queue_row(
    name: str,
    plan: Plan,
    events: Any,
    hw: HardwareProfile,
    config: ScheduleConfig,
    q: QueueSettings,
    bpe: int | None,
    recorded: np.ndarray | None,
) -> dict[str, Any]:
    """A task: one scheduler's queue replay, as a row."""
    result = simulate_queue(shared(events), plan, hw, schedule=config,
                            arrival_rate=q.arrival_rate, seed=q.seed, bytes_per_expert=bpe,
                            recorded_arrivals=recorded)  # fmt: skip
    return schedule_row(name, result)


def choose_schedule(
    plan: Plan,
    tune_ev: Events,
    hw: HardwareProfile,
    q: QueueSettings,
    bpe: int | None,
    recorded: np.ndarray | None = None,
    fanout: Fanout | None = None,
) -> tuple[ScheduleConfig, list[dict[str, Any]]]:
    """The scheduler of the grid moving the fewest bytes on the tune split with p99
    latency within :data:`P99_LIMIT` of FCFS's (FCFS when none is)."""
    rows = run_rows(plan, tune_ev, hw, q, SCHEDULE_GRID, bpe, recorded, fanout)
    fcfs = rows[0]
    ok = [
        (r["bytes_moved"], i)
        for i, r in enumerate(rows)
        if r["p99_latency_s"] <= P99_LIMIT * fcfs["p99_latency_s"] + 1e-12
    ]
    best = min(ok)[1]
    s, p = SCHEDULE_GRID[best]
    return q.config(s, p), rows


def judge_schedule(
    plan: Plan,
    val_ev: Events,
    hw: HardwareProfile,
    q: QueueSettings,
    bpe: int | None,
    recorded: np.ndarray | None = None,
    fanout: Fanout | None = None,
) -> list[dict[str, Any]]:
    """The plan's schedule and FCFS on a validation split (rows ``schedule``, ``fcfs``)."""
    sc = plan.schedule
    grid = [(sc.scheduler, dict(sc.params)), ("fcfs", {})]
    if sc.scheduler == "fcfs" and not sc.params:
        grid = grid[1:]  # the same replay twice
    rows = run_rows(plan, val_ev, hw, replace(q, batch_size=sc.batch_size,
                                              batching=sc.batching), grid, bpe, recorded, fanout)  # fmt: skip
    rows = [{**rows[0], "name": "schedule"}, {**rows[-1], "name": "fcfs"}]
    return rows


def loses_to_fcfs(rows: list[dict[str, Any]], tolerance: float) -> str | None:
    """Why the schedule loses to FCFS on a split (more bytes, or p99 over the limit)."""
    mine, fcfs = rows[0], rows[1]
    if mine["bytes_moved"] > fcfs["bytes_moved"] * (1 + tolerance):
        return f"moves {mine['bytes_moved'] / fcfs['bytes_moved'] - 1:+.1%} bytes vs FCFS"
    if mine["p99_latency_s"] > P99_LIMIT * fcfs["p99_latency_s"] * (1 + tolerance):
        return f"p99 latency {mine['p99_latency_s'] / fcfs['p99_latency_s']:.2f}x FCFS's"
    return None
