"""A small fixture trace with planted structure (hot experts, a co-activated pair, a
layer-to-layer transition, two request tags) and a plan for it, for the dashboard tests.

:func:`dashboard_server` runs ``moetrace dashboard`` in a subprocess for the browser tests.

Also runnable: ``python tests/dashboard/dashkit.py OUT_DIR`` writes ``OUT_DIR/trace`` and
``OUT_DIR/plan.json`` (used by the browser test's server subprocess).
"""

from __future__ import annotations

import json
import queue
import re
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from moetrace.store import Manifest, ModelInfo, RequestRecord, SourceInfo, TraceWriter

START_TIMEOUT_S = 90


@contextmanager
def dashboard_server(args: list[str]) -> Iterator[tuple[str, Path]]:
    """``moetrace dashboard ARGS --no-browser`` in a subprocess: its URL and server log
    once it has printed both (the test fails after :data:`START_TIMEOUT_S` without them);
    stopped (terminated, killed if it lingers) on leaving."""
    import pytest

    cmd = [sys.executable, "-m", "moetrace.cli", "dashboard", *args, "--no-browser"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: [lines.put(x) for x in proc.stdout], daemon=True).start()  # type: ignore[union-attr]
    try:
        seen: list[str] = []
        url, log_path = None, None
        while url is None or log_path is None:
            try:
                line = lines.get(timeout=START_TIMEOUT_S)
            except queue.Empty:
                pytest.fail(
                    f"no URL and log from moetrace dashboard in {START_TIMEOUT_S} s: {seen}"
                )
            seen.append(line)
            m = re.search(r"(http://\S+)", line)
            url = url or (m.group(1) if m else None)
            m = re.search(r"server log (\S+)", line)
            log_path = log_path or (Path(m.group(1)) if m else None)
        yield url, log_path
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


MOE_LAYERS = (1, 2, 3)
NUM_EXPERTS = 8
TOP_K = 2
NUM_REQUESTS = 12


def _route(rng: np.random.Generator, hot: np.ndarray, n: int) -> np.ndarray:
    """(n, L, k) experts: layer 0 from the hot distribution; expert 0 brings 1 along;
    layer l+1 mostly follows layer l shifted by one."""
    L, k = len(MOE_LAYERS), TOP_K
    out = np.zeros((n, L, k), np.int16)
    for t in range(n):
        first = int(rng.choice(NUM_EXPERTS, p=hot))
        second = 1 if first == 0 else int(rng.choice([e for e in range(NUM_EXPERTS) if e != first]))
        out[t, 0] = (first, second)
        for layer in range(1, L):
            prev = out[t, layer - 1]
            if rng.random() < 0.8:
                nxt = (prev + 1) % NUM_EXPERTS
            else:
                nxt = rng.choice(NUM_EXPERTS, size=k, replace=False)
            out[t, layer] = nxt
    return out


def write_fixture_trace(path: Path, *, seed: int = 0, num_requests: int = NUM_REQUESTS) -> Path:
    rng = np.random.default_rng(seed)
    manifest = Manifest(
        model=ModelInfo(
            name="fixture-moe",
            num_layers=4,
            moe_layers=MOE_LAYERS,
            num_experts=NUM_EXPERTS,
            top_k=TOP_K,
            architecture="FixtureMoeForCausalLM",
            bytes_per_expert=1 << 20,
        ),
        source=SourceInfo(kind="synthetic", origin="tests/dashboard/dashkit.py"),
        tags={"workload": "fixture"},
    )
    hot = {
        "code": np.array([0.4, 0.05, 0.2, 0.1, 0.1, 0.05, 0.05, 0.05]),
        "prose": np.array([0.05, 0.05, 0.05, 0.05, 0.1, 0.2, 0.1, 0.4]),
    }
    with TraceWriter(path, manifest, threads=0) as w:
        for r in range(num_requests):
            topic = "code" if r % 2 == 0 else "prose"
            prompt, gen = 6 + r % 4, 5 + r % 3
            routing = _route(rng, hot[topic], prompt + gen)
            L = len(MOE_LAYERS)
            n_tok = prompt + gen
            token = np.repeat(np.arange(n_tok), L)
            step = np.repeat(np.r_[np.zeros(prompt, int), np.arange(1, gen + 1)], L)
            phase = np.repeat(np.r_[np.zeros(prompt, int), np.ones(gen, int)], L)
            forward = step + 100 * r
            layer = np.tile(np.array(MOE_LAYERS), n_tok)
            experts = routing.reshape(n_tok * L, TOP_K)
            weights = np.tile(np.array([[0.7, 0.3]], np.float32), (n_tok * L, 1))
            w.write_request(
                RequestRecord(
                    f"req-{r:02d}",
                    prompt_tokens=prompt,
                    generated_tokens=gen,
                    prompt_text=f"{topic} prompt number {r}",
                    tags={"topic": topic},
                ),
                token=token,
                step=step,
                phase=phase,
                forward=forward,
                layer=layer,
                experts=experts,
                weights=weights,
            )
    return path


def write_fixture_plan(
    path: Path, trace_path: Path, *, pinned_first: int = 0, slots: int = 4
) -> Path:
    """A per-layer plan for the fixture trace pinning expert ``pinned_first`` (+1) per layer,
    its transition prefetcher fitted on the trace as ``moetrace tune`` fits it (so the
    simulator can replay it: the Timeline and the per-layer diamonds)."""
    from moetrace.store import open_trace
    from moetrace.store.plan import (
        Budget,
        CacheLayout,
        EvictionConfig,
        Plan,
        PrefetchConfig,
        RoutingShape,
        save_plan,
    )
    from moetrace.tuner.policy.events import build_events
    from moetrace.tuner.policy.prefetch import get_prefetcher
    from moetrace.tuner.sim.trace import load_traces

    model = open_trace(trace_path).manifest.model
    L = len(model.moe_layers)
    plan = Plan(
        routing=RoutingShape.of(model),
        budget=Budget(slots=slots * L, bytes_per_expert=model.bytes_per_expert),
        layout=CacheLayout("per_layer", tuple([slots] * L)),
        eviction=EvictionConfig(
            "lru",
            pinned=tuple(
                ((pinned_first + i) % NUM_EXPERTS, (pinned_first + i + 1) % NUM_EXPERTS)
                for i in range(L)
            ),
        ),
        prefetch=get_prefetcher(
            PrefetchConfig("transition", lookahead=1, fetch=2), L, model.num_experts
        ).fit(build_events(load_traces([trace_path]).routing)),
        worst_case_bytes=slots * L * (1 << 20),
        expected={
            "split": "validation",
            "hardware": "pcie4-x16",
            "rows": [
                {"name": "plan", "hit_rate": 0.6 + 0.05 * pinned_first, "stall_per_token_ms": 2.0},
                {"name": "lru", "hit_rate": 0.5, "stall_per_token_ms": 3.0},
                {"name": "belady (oracle bound)", "hit_rate": 0.8, "stall_per_token_ms": 1.0},
            ],
        },
    )
    return save_plan(plan, path)


def write_fixture_stats(path: Path) -> Path:
    per_layer = [
        {
            "layer": lid,
            "prefill": {"accesses": 100.0, "hits": 60.0 + 5 * i},
            "decode": {"accesses": 50.0, "hits": 35.0},
        }
        for i, lid in enumerate(MOE_LAYERS)
    ]
    data = {
        "total": {"accesses": 450.0, "hits": 300.0, "hit_rate": 0.667, "stall_s": 0.12},
        "tokens": {"prefill": 96, "decode": 72},
        "per_layer": per_layer,
    }
    path.write_text(json.dumps(data), encoding="utf-8")
    return path


def write_fixture(out: Path) -> dict[str, Path]:
    out.mkdir(parents=True, exist_ok=True)
    trace = write_fixture_trace(out / "trace")
    return {
        "trace": trace,
        "trace2": write_fixture_trace(out / "trace2", seed=1, num_requests=6),
        "plan": write_fixture_plan(out / "plan-a.json", trace),
        "plan2": write_fixture_plan(out / "plan-b.json", trace, pinned_first=2, slots=3),
        "stats": write_fixture_stats(out / "runtime-stats.json"),
    }


if __name__ == "__main__":
    paths = write_fixture(Path(sys.argv[1]))
    sys.stdout.write(json.dumps({k: str(v) for k, v in paths.items()}) + "\n")


def write_simulable_plan(
    path: Path,
    trace_path: Path,
    *,
    prefetch: bool,
    rows: list[dict[str, object]],
    slots: int = 4,
    splits: list[dict[str, object]] | None = None,
) -> Path:
    """A plan with fitted tables (so the simulator can replay it per layer): LRU with
    pinned experts 0, 1 per layer, a transition prefetcher when ``prefetch``; ``rows``
    (and optionally ``splits``) become its ``expected`` section as written."""
    from moetrace.store import open_trace
    from moetrace.store.arrays import load_routing
    from moetrace.store.plan import CacheLayout, PrefetchConfig, RoutingShape, save_plan
    from moetrace.tuner.policy.events import build_events
    from moetrace.tuner.sim.engine import make_plan

    trace = open_trace(trace_path)
    model = trace.manifest.model
    L = len(model.moe_layers)
    events = build_events(load_routing(trace))
    pf = PrefetchConfig("transition", lookahead=1, fetch=2) if prefetch else None
    plan = make_plan(
        events,
        RoutingShape.of(model),
        CacheLayout("per_layer", tuple([slots] * L)),
        "pinned_lru",
        {"pin_fraction": 0.5},
        pf,
        bytes_per_expert=model.bytes_per_expert,
    )
    expected: dict[str, object] = {"split": "validation", "hardware": "pcie4-x16", "rows": rows}
    if splits is not None:
        expected["splits"] = splits
    from dataclasses import replace

    return save_plan(replace(plan, expected=expected), path)
