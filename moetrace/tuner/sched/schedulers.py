"""Request schedulers: which waiting requests join the running batch (a registry).

A scheduler sees what a server knows when a place in the batch is free: the requests
waiting (arrived, in arrival order), the ones running, each request's probe signature (the
experts its prompt picks at the first MoE layer, :func:`moetrace.tuner.sched.workload.
probe_signature`) and a decayed sum of the signatures it admitted last (what the cache
was filled with). The fairness bound is the base class's, so every scheduler keeps it:
no request is overtaken by more than ``max_overtakes`` later requests, and one waiting
longer than ``max_wait`` seconds (0: no limit) goes first.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from moetrace.errors import ConfigError
from moetrace.store.plan import ScheduleConfig
from moetrace.tuner.policy.events import Events
from moetrace.tuner.sched.workload import probe_signature


@dataclass
class QueueView:
    """The server's state when it admits requests."""

    now: float
    waiting: np.ndarray  # int64 request indices (arrival order), all arrived
    running: np.ndarray  # int64 request indices
    signature: np.ndarray  # (n, d) unit rows
    recent: np.ndarray  # (d,) decayed sum of the signatures admitted last
    arrival: np.ndarray  # (n,) seconds
    overtaken: np.ndarray  # int64 (n,) later requests admitted before each one


class Scheduler:
    """Base: the fairness bound; subclasses choose among the requests it allows."""

    name: ClassVar[str] = ""
    defaults: ClassVar[dict[str, float]] = {"max_overtakes": math.inf, "max_wait": 0.0}
    probe_layers: int = 1

    def __init__(self, params: Mapping[str, Any] | None = None):
        params = dict(params or {})
        unknown = sorted(set(params) - set(self.defaults))
        if unknown:
            raise ConfigError(
                f"scheduler {self.name!r} has no parameter {unknown[0]!r} "
                f"(it takes {', '.join(sorted(self.defaults))})"
            )
        self.params = {**self.defaults, **{k: float(v) for k, v in params.items()}}
        bad = [k for k, v in self.params.items() if not v >= 0]
        if bad:
            raise ConfigError(f"scheduler parameter {bad[0]} must be >= 0")

    def signature(self, events: Events, first_pass: np.ndarray) -> np.ndarray:
        """What this scheduler knows of each waiting request (rows of unit length): by
        default its probe, the first ``probe_layers`` MoE layers' routing of its prompt."""
        return probe_signature(events, first_pass, self.probe_layers)

    def pick(self, view: QueueView, free: int) -> list[int]:
        """Up to ``free`` waiting requests to admit now, in admission order."""
        waiting = [int(r) for r in view.waiting]
        if not waiting or free <= 0:
            return []
        limit, max_wait = self.params["max_overtakes"], self.params["max_wait"]
        slack = {r: limit - int(view.overtaken[r]) for r in waiting}
        chosen: list[int] = []
        while len(chosen) < free and waiting:
            due = [r for r in waiting if slack[r] <= 0]
            if max_wait > 0:
                due += [r for r in waiting if view.now - view.arrival[r] > max_wait]
            r = min(due) if due else self.choose(view, waiting, chosen)
            waiting.remove(r)
            chosen.append(r)
            for w in waiting:
                if w < r:
                    slack[w] -= 1
        return chosen

    def choose(self, view: QueueView, waiting: list[int], chosen: list[int]) -> int:
        """The next request to admit among ``waiting`` (arrival order), ``chosen`` already."""
        raise NotImplementedError


REGISTRY: dict[str, type[Scheduler]] = {}


def register_scheduler(cls: type[Scheduler]) -> type[Scheduler]:
    REGISTRY[cls.name] = cls
    return cls


def get_scheduler(
    config: ScheduleConfig | str, params: Mapping[str, Any] | None = None
) -> Scheduler:
    """The scheduler a plan's ``schedule`` section (or a name and parameters) names."""
    if isinstance(config, ScheduleConfig):
        name, params = config.scheduler, config.params
    else:
        name = config
    cls = REGISTRY.get(name)
    if cls is None:
        raise ConfigError(f"unknown scheduler {name!r} (known: {', '.join(sorted(REGISTRY))})")
    return cls(params)


@register_scheduler
class FirstComeFirstServed(Scheduler):
    """The oldest waiting request first (what servers do)."""

    name = "fcfs"

    def choose(self, view: QueueView, waiting: list[int], chosen: list[int]) -> int:
        return waiting[0]


@register_scheduler
class ExpertAffinity(Scheduler):
    """The waiting request whose probe signature is closest to the batch's (the running
    requests and those chosen so far), so that batch-mates share experts; with an empty
    batch, the closest to what was admitted last (the cache's content). Ties and a blank
    profile go to the oldest. Only the ``window`` oldest waiting requests are looked at.
    After CoServe's expert-affinity ordering; the probe and the bound are this project's."""

    name = "affinity"
    defaults: ClassVar[dict[str, float]] = {
        **Scheduler.defaults,
        "max_overtakes": 32.0,
        "window": 64.0,
        "probe_layers": 1.0,
    }

    def __init__(self, params: Mapping[str, Any] | None = None):
        super().__init__(params)
        self.window = max(1, int(self.params["window"]))
        self.probe_layers = max(1, int(self.params["probe_layers"]))

    def choose(self, view: QueueView, waiting: list[int], chosen: list[int]) -> int:
        cand = np.asarray(waiting[: self.window], np.int64)
        sig = view.signature
        profile = sig[view.running].sum(axis=0) + sig[chosen].sum(axis=0)
        if not profile.any():
            profile = view.recent
        if not profile.any():
            return int(cand[0])
        return int(cand[int(np.argmax(sig[cand] @ profile))])


def scheduler_names() -> tuple[str, ...]:
    return tuple(sorted(REGISTRY))
