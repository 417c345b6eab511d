"""``moetrace demo``: the whole loop on the shipped demo model, in one call.

record (tracer) -> analyze (mining) -> tune (simulator search, validation split) ->
run the plan in the offloading runtime, traced -> replay that run's own trace through the
simulator with the same plan and compare measured with simulated hit rates.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from moetrace.errors import ConfigError
from moetrace.progress import OnProgress, Progress

log = logging.getLogger(__name__)

RUN_PROMPTS = {"quick": 4, "full": 12}


@dataclass(frozen=True)
class DemoConfig:
    """What ``run_demo`` does; ``quick`` shrinks every stage to finish in under a minute."""

    out: Path = Path("moetrace-demo")
    quick: bool = False
    budget: str = "25%"
    hardware: str = "pcie4-x16"
    seed: int = 0
    prompts: int | None = None
    """How many of the shipped prompts to record (default: 96 quick, all otherwise)."""
    max_new_tokens: int | None = None
    """Tokens generated per prompt (default: 16 quick, 32 otherwise)."""
    batch_size: int = 8

    def __post_init__(self) -> None:
        object.__setattr__(self, "out", Path(self.out))
        if self.prompts is not None and self.prompts < 4:
            raise ConfigError(f"the demo needs at least 4 prompts, got {self.prompts}")
        if self.max_new_tokens is not None and self.max_new_tokens < 1:
            raise ConfigError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {self.batch_size}")

    @property
    def num_prompts(self) -> int | None:
        return self.prompts if self.prompts is not None else (96 if self.quick else None)

    @property
    def new_tokens(self) -> int:
        return self.max_new_tokens or (16 if self.quick else 32)


@dataclass(frozen=True)
class RuntimeCheck:
    """One run of a plan in the offloading runtime, next to the simulator's replay of
    that run's own trace under the same plan."""

    label: str
    trace: Path
    tokens: int
    tokens_per_s: float
    accesses: int
    measured_hit_rate: float
    simulated_hit_rate: float | None

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "trace": str(self.trace)}


@dataclass(frozen=True)
class DemoReport:
    """Everything the demo produced, with the paths of its files."""

    out: Path
    trace: Path
    plan: Path
    analysis: Path
    requests: int
    tokens: int
    activations: int
    verdict: tuple[str, ...]
    validation: list[dict[str, Any]]
    runtime_prompts: int
    runtime: tuple[RuntimeCheck, ...]
    seconds: dict[str, float] = field(default_factory=dict)
    splits: list[dict[str, Any]] = field(default_factory=list)
    fallback: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "out": str(self.out),
            "trace": str(self.trace),
            "plan": str(self.plan),
            "analysis": str(self.analysis),
            "requests": self.requests,
            "tokens": self.tokens,
            "activations": self.activations,
            "verdict": list(self.verdict),
            "validation": self.validation,
            "splits": self.splits,
            "fallback": self.fallback,
            "runtime_prompts": self.runtime_prompts,
            "runtime": [r.to_dict() for r in self.runtime],
            "seconds": self.seconds,
        }

    @property
    def dashboard_command(self) -> str:
        return f"moetrace dashboard {self.trace} --plan {self.plan}"


class _Stages:
    """Progress over the demo's stages plus per-stage wall times."""

    def __init__(self, names: list[str], progress: bool, on_progress: OnProgress | None) -> None:
        self.bar = Progress(len(names), label="demo", unit="stage", enabled=progress,
                            on_progress=on_progress, interval=0)  # fmt: skip
        self.seconds: dict[str, float] = {}
        self._t = time.perf_counter()

    def start(self, name: str) -> None:
        self._t = time.perf_counter()

    def done(self, name: str) -> None:
        self.seconds[name] = round(time.perf_counter() - self._t, 2)
        log.info("demo: %s done in %.1fs", name, self.seconds[name])
        self.bar.update(1, stage=name)

    def close(self) -> None:
        self.bar.close()


def _pick_prompts(n: int | None) -> list[Any]:
    """The shipped prompts; ``n`` of them alternating between domains when asked."""
    from moetrace.tracer.demo import demo_prompts_path
    from moetrace.tracer.prompts import load_prompts

    prompts = load_prompts(demo_prompts_path())
    if n is None or n >= len(prompts):
        return prompts
    by_domain: dict[str, list[Any]] = {}
    for p in prompts:
        by_domain.setdefault(dict(p.tags).get("domain", ""), []).append(p)
    picked: list[Any] = []
    groups = list(by_domain.values())
    i = 0
    while len(picked) < n:
        group = groups[i % len(groups)]
        j = i // len(groups)
        if j < len(group):
            picked.append(group[j])
        i += 1
    return picked


def run_demo(
    config: DemoConfig, *, progress: bool = True, on_progress: OnProgress | None = None
) -> DemoReport:
    """Run the whole loop into ``config.out`` (which must not hold an earlier demo)."""
    from moetrace.runtime.session import generate, open_engine
    from moetrace.store.plan import save_plan
    from moetrace.store.reader import open_trace
    from moetrace.tracer.record import RecordConfig, record
    from moetrace.tuner.analyze import AnalyzeConfig, analyze
    from moetrace.tuner.sim.trace import SimulateRequest, simulate_trace
    from moetrace.tuner.tune import TuneConfig, tune, without_prefetch

    out = config.out
    trace_dir = out / "trace"
    plan_path, analysis_path = out / "plan.json", out / "analysis.json"
    for existing in (trace_dir, plan_path):
        if existing.exists():
            raise ConfigError(f"{existing} exists: give the demo a new --out directory")
    out.mkdir(parents=True, exist_ok=True)

    stages = _Stages(["record", "analyze", "tune", "runtime"], progress, on_progress)
    try:
        stages.start("record")
        prompts = _pick_prompts(config.num_prompts)
        rec = record(
            None,
            prompts,
            trace_dir,
            config=RecordConfig(
                max_new_tokens=config.new_tokens, batch_size=config.batch_size, seed=config.seed
            ),
            progress=progress,
        )
        stages.done("record")

        stages.start("analyze")
        report = analyze(trace_dir, AnalyzeConfig(seed=config.seed))
        report.save(analysis_path)
        stages.done("analyze")

        stages.start("tune")
        tuned = tune(
            [trace_dir],
            TuneConfig(
                budget=config.budget,
                hardware=config.hardware,
                seed=config.seed,
                splits=("time", "tag:domain"),  # the demo prompts carry a domain tag
            ),
        )
        save_plan(tuned.plan, plan_path)
        stages.done("tune")

        stages.start("runtime")
        val_ids = set(tuned.plan.provenance.validation_requests)
        held_out = [p for p in prompts if p.id in val_ids] or prompts
        run_prompts = held_out[: RUN_PROMPTS["quick" if config.quick else "full"]]
        texts = [p.text for p in run_prompts]
        # The plan as tuned, and the same plan without prefetching: the latter has no
        # timing effects, so the runtime's hits must equal the simulator's exactly.
        no_prefetch = without_prefetch(tuned.plan)
        no_pf_path = out / "plan-no-prefetch.json"
        save_plan(no_prefetch, no_pf_path)
        runs: list[RuntimeCheck] = []
        for label, path, run_dir in (
            ("plan", plan_path, out / "runtime-trace"),
            ("plan without prefetch", no_pf_path, out / "runtime-trace-no-prefetch"),
        ):
            engine, tokenizer = open_engine(None, path)
            try:
                gen = generate(engine, tokenizer, texts, config.new_tokens, trace_dir=run_dir)
                stats = engine.stats.summary()
            finally:
                engine.close()
            _, sim = simulate_trace(
                run_dir, SimulateRequest(plan=str(path), hardware=config.hardware)
            )
            runs.append(
                RuntimeCheck(
                    label=label,
                    trace=run_dir,
                    tokens=gen.new_tokens,
                    tokens_per_s=gen.tokens_per_second,
                    accesses=int(stats["accesses"]),
                    measured_hit_rate=float(stats["hit_rate"]),
                    simulated_hit_rate=sim.summary()["hit_rate"],
                )
            )
        stages.done("runtime")
    finally:
        stages.close()

    trace = open_trace(trace_dir)
    result = DemoReport(
        out=out,
        trace=trace_dir,
        plan=plan_path,
        analysis=analysis_path,
        requests=trace.num_requests,
        tokens=rec.generated_tokens,
        activations=trace.num_activations,
        verdict=tuple(report.verdict.lines),
        validation=tuned.validation,
        runtime_prompts=len(run_prompts),
        runtime=tuple(runs),
        seconds=stages.seconds,
        splits=tuned.splits,
        fallback=tuned.fallback,
    )
    (out / "demo-report.json").write_text(json.dumps(result.to_dict(), indent=1) + "\n")
    return result
