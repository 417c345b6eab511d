"""Measured speed-up of a plan where misses cost real I/O: the trace replay end to end.

For one imported trace (e.g. the shared DeepSeek-V2-Lite one): build the replay store at
``--scale`` of the trace's bytes per expert, measure this machine's profile on it
(``moetrace profile --model STORE``), tune a plan at ``--budget`` with that profile and
expert size (token granularity), then replay the last ``--requests`` of the plan's
held-out requests (random split, seed 0) through the engine: plan, LRU on demand and all
resident, interleaved, next to the simulator's figures (``moetrace bench --replay``).
Prints the table and writes JSON (config, versions, profile, tune summary, replay).

    python benchmarks/runtime_replay.py --trace /tmp/ds --store /tmp/ds-store-025 \\
        --scale 0.25 --budget 25% --out benchmarks/results/runtime_replay.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from moetrace.runtime.profile import profile_store
from moetrace.runtime.replay import ReplayConfig, format_replay, run_replay
from moetrace.runtime.skeleton import SkeletonShape, build_store
from moetrace.store.plan import save_plan
from moetrace.tuner.sim.trace import load_traces
from moetrace.tuner.tune import TuneConfig, split_requests, tune


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--trace", required=True, help="an imported moetrace trace")
    ap.add_argument("--store", required=True, help="replay store folder (built or reused)")
    ap.add_argument("--scale", type=float, default=0.25)
    ap.add_argument("--budget", default="25%")
    ap.add_argument("--requests", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=200)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--plan", default=None, help="a plan to replay instead of tuning one")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/runtime_replay.json"))
    args = ap.parse_args()
    loaded = load_traces([args.trace])
    shape = SkeletonShape.for_trace(loaded.model, args.scale)
    build_store(shape, args.store)
    hw = profile_store(args.store)
    work = args.out.parent / (args.out.stem + "-work")
    work.mkdir(parents=True, exist_ok=True)
    hw_path = work / "profile.json"
    hw_path.write_text(json.dumps(hw.to_json(), indent=1) + "\n")
    t0 = time.perf_counter()
    if args.plan is not None:
        return _replay_only(args)
    tuned = tune(
        [args.trace],
        TuneConfig(
            args.budget,
            hardware=str(hw_path),
            granularity="token",
            bytes_per_expert=shape.bytes_per_expert,
        ),  # fmt: skip
        progress=False,
    )
    tune_s = time.perf_counter() - t0
    plan_path = save_plan(tuned.plan, work / "plan.json")
    _, held_out = split_requests(len(loaded.routing.request_ids), 0.5, 0)
    cfg = ReplayConfig(
        args.trace, str(plan_path), args.store, scale=args.scale, requests=args.requests,
        max_tokens=args.max_tokens, repeats=args.repeats, only=tuple(int(i) for i in held_out),
    )  # fmt: skip
    data = run_replay(cfg)
    p = tuned.plan
    data["tune"] = {
        "seconds": tune_s,
        "profile": hw.to_json(),
        "plan": {
            "layout": p.layout.kind,
            "eviction": p.eviction.policy,
            "prefetch": p.prefetch.name,
            "slots": p.layout.total_slots,
        },
        "validation": tuned.validation[:3],
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
    print(f"plan: {p.layout.kind} {p.eviction.policy} + {p.prefetch.name}, tuned in {tune_s:.0f} s")
    print(format_replay(data))


def _replay_only(args: argparse.Namespace) -> None:
    """Replay a given plan (tuned before, e.g. by an earlier run of this script)."""
    loaded = load_traces([args.trace])
    _, held_out = split_requests(len(loaded.routing.request_ids), 0.5, 0)
    cfg = ReplayConfig(
        args.trace, args.plan, args.store, scale=args.scale, requests=args.requests,
        max_tokens=args.max_tokens, repeats=args.repeats, only=tuple(int(i) for i in held_out),
    )  # fmt: skip
    data = run_replay(cfg)
    data["tune"] = {"plan_file": args.plan}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
    print(format_replay(data))


if __name__ == "__main__":
    main()
