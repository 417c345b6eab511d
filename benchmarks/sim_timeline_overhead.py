"""Cost of the simulator's outcome recording (the Timeline page): the same replay with
``record=False`` and ``record=True``, interleaved (off, on, off, on, ...) in one process.

A synthetic trace (``write_synthetic_trace``) replayed token by token under LFU with the
transition prefetcher at 25% of the experts. Prints a summary and writes JSON (config,
versions, medians, spread, raw samples).

    python benchmarks/sim_timeline_overhead.py --out benchmarks/results/sim_timeline_overhead.json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numba
import numpy as np

import moetrace
from moetrace.store.hardware import load_hardware
from moetrace.store.plan import PrefetchConfig, RoutingShape
from moetrace.tuner.policy.events import build_events
from moetrace.tuner.sim.engine import make_plan, simulate
from moetrace.tuner.sim.layouts import uniform_layout
from moetrace.tuner.sim.synthetic import write_synthetic_trace
from moetrace.tuner.sim.trace import load_traces


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--requests", type=int, default=400)
    ap.add_argument("--decode-tokens", type=int, default=200)
    ap.add_argument("--layers", type=int, default=24)
    ap.add_argument("--experts", type=int, default=64)
    ap.add_argument(
        "--out", type=Path, default=Path("benchmarks/results/sim_timeline_overhead.json")
    )
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        trace = Path(tmp) / "t"
        write_synthetic_trace(trace, num_layers=args.layers, num_experts=args.experts,
                              requests=args.requests, decode_tokens=args.decode_tokens)  # fmt: skip
        loaded = load_traces([trace])
    events = build_events(loaded.routing, granularity="token")
    L, E = args.layers, args.experts
    plan = make_plan(events, RoutingShape.of(loaded.model), uniform_layout(L * E // 4, L, E),
                     "lfu", prefetch=PrefetchConfig("transition", fetch=2))  # fmt: skip
    hw = load_hardware(None)
    for record in (False, True):  # compile and warm
        simulate(events, plan, hw, record=record)
    samples: dict[str, list[float]] = {"off": [], "on": []}
    for _ in range(args.reps):
        for name, record in (("off", False), ("on", True)):
            t0 = time.perf_counter()
            simulate(events, plan, hw, record=record)
            samples[name].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in samples.items()}
    ratio = [b / a for a, b in zip(samples["off"], samples["on"], strict=True)]
    result = {
        "config": vars(args)
        | {
            "out": str(args.out),
            "events": events.num_events,
            "accesses": events.num_accesses,
        },  # fmt: skip
        "versions": {
            "moetrace": moetrace.__version__,
            "numba": numba.__version__,
            "numpy": np.__version__,
            "python": platform.python_version(),
        },  # fmt: skip
        "unit": "seconds per simulate() call",
        "median": med,
        "min_max": {k: [min(v), max(v)] for k, v in samples.items()},
        "on_over_off_median": statistics.median(ratio),
        "on_over_off_min_max": [min(ratio), max(ratio)],
        "raw": samples,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"{events.num_events:,} events, {events.num_accesses:,} accesses: recording off "
          f"{med['off']:.3f} s, on {med['on']:.3f} s; on/off {statistics.median(ratio):.3f} "
          f"(min {min(ratio):.3f}, max {max(ratio):.3f}) over {args.reps} interleaved pairs")  # fmt: skip


if __name__ == "__main__":
    main()
