"""Tokens/s of a plan vs all experts resident vs LRU on demand at the same budget.

Runs are interleaved (plan, resident, lru, plan, resident, lru, ...) so drift on a shared
machine hits every variant alike; the result keeps every raw sample.
"""

from __future__ import annotations

import os
import platform
import statistics
from dataclasses import dataclass, field
from typing import Any

import torch
import transformers

from moetrace import __version__
from moetrace.errors import ConfigError
from moetrace.runtime.session import generate, open_engine
from moetrace.store.plan import load_plan

VARIANTS = ("plan", "all_resident", "lru")


@dataclass(frozen=True)
class BenchConfig:
    """What to benchmark."""

    model: str | None
    plan: str
    prompts: tuple[str, ...]
    repeats: int = 3
    max_new_tokens: int = 16
    budget_bytes: int | str | None = None
    device: str = "cpu"

    def __post_init__(self) -> None:
        if self.repeats < 1:
            raise ConfigError(f"repeats must be >= 1, got {self.repeats}")
        if self.max_new_tokens < 1:
            raise ConfigError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if not self.prompts:
            raise ConfigError("bench needs at least one prompt")


@dataclass(frozen=True)
class BenchResult:
    config: BenchConfig
    samples: dict[str, list[float]] = field(default_factory=dict)
    hit_rate: dict[str, float] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        med = {k: statistics.median(v) for k, v in self.samples.items()}
        spread = {k: [min(v), max(v)] for k, v in self.samples.items()}
        return {
            "config": {**self.config.__dict__, "prompts": list(self.config.prompts)},
            "versions": {
                "moetrace": __version__,
                "torch": torch.__version__,
                "transformers": transformers.__version__,
                "python": platform.python_version(),
                "machine": platform.machine(),
                "cpus": os.cpu_count(),
            },
            "unit": "generated tokens per second",
            "median": med,
            "min_max": spread,
            "raw": self.samples,
            "hit_rate": self.hit_rate,
        }


def run_bench(config: BenchConfig) -> BenchResult:
    plan = load_plan(config.plan)
    budget = config.budget_bytes
    if budget is None and plan.budget.bytes_per_expert:
        budget = (plan.layout.total_slots + plan.routing.top_k) * plan.budget.bytes_per_expert
    samples: dict[str, list[float]] = {v: [] for v in VARIANTS}
    hits: dict[str, float] = {}
    for _ in range(config.repeats):
        for variant in VARIANTS:
            tps, hit = _one(config, variant, plan, budget)
            samples[variant].append(tps)
            hits[variant] = hit
    return BenchResult(config, samples, hits)


def _one(config: BenchConfig, variant: str, plan: Any, budget: int | None) -> tuple[float, float]:
    if variant == "plan":
        engine, tok = open_engine(config.model, plan, budget_bytes=budget, device=config.device)
    elif variant == "all_resident":
        engine, tok = open_engine(config.model, None, device=config.device)
    else:  # LRU on demand, one pool at the same budget
        engine, tok = open_engine(config.model, None, budget_bytes=budget, device=config.device)
    try:
        gen = generate(engine, tok, list(config.prompts), config.max_new_tokens)
        return gen.tokens_per_second, engine.stats.summary()["hit_rate"]
    finally:
        engine.close()
