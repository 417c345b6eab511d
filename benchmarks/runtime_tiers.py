"""Three tiers measured: a tuned RAM placement vs RAM as plain LRU over disk, end to end.

For one imported trace (the shared DeepSeek-V2-Lite one by default): build the replay
store at ``--scale`` of the trace's expert size (experts on disk, read with O_DIRECT),
measure this machine's profile on it (the store read as the disk link, a copy of an
expert into a device slot as the RAM -> device link, the layer's compute through the
engine), tune a plan at ``--budget`` (device) and ``--ram-budget`` (RAM) with that profile
at token granularity, then, for each validation split (``random``, ``time``), replay the
last ``--requests`` of that split's held-out requests through the engine: the plan and
``ram_lru`` (the same device plan over RAM as plain LRU at the same RAM slots),
interleaved (A B A B), next to the simulator's figures for the same events. For the time
split the plan's tables and RAM placement are refitted on that split's tune requests (as
``moetrace tune`` does when it judges a split). Prints the tables and writes JSON
(config, versions, profile, tune summary, per split: measured medians and raw samples,
modeled figures, errors, each tier's measured memory peak and limit).

    python benchmarks/runtime_tiers.py --trace /tmp/st/deepseek-v2-lite \\
        --store /tmp/ds-store-025 --scale 0.25 --out benchmarks/results/runtime_tiers.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from moetrace.runtime.copyrate import measure_copy
from moetrace.runtime.expert_store import StoreIndex
from moetrace.runtime.profile import profile_store
from moetrace.runtime.replay import ReplayConfig, format_replay, run_replay
from moetrace.runtime.skeleton import SkeletonShape, build_store
from moetrace.store.plan import Plan, PrefetchConfig, save_plan
from moetrace.tuner.placement import candidates, with_prefetch
from moetrace.tuner.sim.engine import make_plan
from moetrace.tuner.sim.trace import events_for, load_traces
from moetrace.tuner.splits import make_splits
from moetrace.tuner.tune import TuneConfig, tune


def refit(plan: Plan, loaded: Any, tune_idx: np.ndarray, bpe: int, hw: Any) -> Plan:
    """``plan``'s configuration refitted on the requests ``tune_idx``: device tables and
    pins, prefetch tables and the RAM placement."""
    fit = events_for(loaded, tune_idx, granularity="token")
    pf = dataclasses.replace(plan.prefetch, tables={})
    device = make_plan(fit, plan.routing, plan.layout, plan.eviction.policy,
                       dict(plan.eviction.params), PrefetchConfig(pf.name, pf.lookahead,
                       pf.fetch, dict(pf.params)), bytes_per_expert=bpe,
                       adaptation=plan.adaptation, phase_overrides=plan.phase_overrides)  # fmt: skip
    info = plan.expected["placement"]
    chosen = {p.name: p for p in candidates(plan)}
    for p in list(chosen.values()):
        chosen[with_prefetch(p, plan).name] = with_prefetch(p, plan)
    place = chosen[info["written"]]
    assert plan.ram is not None
    tier = place.tier(device, fit, plan.ram.slots, hw, bpe, plan.ram.adaptation)
    return dataclasses.replace(device, ram=tier)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--trace", default="/tmp/st/deepseek-v2-lite")
    ap.add_argument("--store", default="/tmp/ds-store-025")
    ap.add_argument("--scale", type=float, default=0.25)
    ap.add_argument("--budget", default="12.5%")
    ap.add_argument("--ram-budget", default="25%")
    ap.add_argument("--requests", type=int, default=4)
    ap.add_argument("--max-tokens", type=int, default=150)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--splits", default="random,time")
    ap.add_argument("--plan", default=None, help="a plan to replay instead of tuning one")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/runtime_tiers.json"))
    args = ap.parse_args()
    loaded = load_traces([args.trace])
    shape = SkeletonShape.for_trace(loaded.model, args.scale)
    bpe = shape.bytes_per_expert
    build_store(shape, args.store)
    index = StoreIndex.load(Path(args.store))
    hw = profile_store(args.store)
    hw = measure_copy(index.params, index.top_k, copies=12).apply(hw)
    work = args.out.parent / (args.out.stem + "-work")
    work.mkdir(parents=True, exist_ok=True)
    hw_path = work / "profile.json"
    hw_path.write_text(json.dumps(hw.to_json(), indent=1) + "\n")
    print(f"profile: {json.dumps(hw.to_json())}")
    t0 = time.perf_counter()
    if args.plan is None:
        tuned = tune([args.trace], TuneConfig(args.budget, hardware=str(hw_path),
                     granularity="token", bytes_per_expert=bpe, ram_budget=args.ram_budget,
                     queue=None), progress=False)  # fmt: skip
        plan = tuned.plan
        plan_path = save_plan(plan, work / "plan.json")
    else:
        plan_path = Path(args.plan)
        from moetrace.store.plan import load_plan

        plan = load_plan(plan_path)
    tune_s = time.perf_counter() - t0
    out: dict[str, Any] = {
        "tune": {
            "seconds": tune_s, "plan_file": str(plan_path), "profile": hw.to_json(),
            "device": {"slots": plan.layout.total_slots, "layout": plan.layout.kind,
                       "eviction": plan.eviction.policy, "prefetch": plan.prefetch.name},
            "ram": {"slots": plan.ram.slots if plan.ram else None,
                    "placement": plan.expected.get("placement", {}).get("written")},
            "placement_splits": plan.expected.get("placement", {}).get("splits"),
        },
        "splits": {},
    }  # fmt: skip
    names = args.splits.split(",")
    splits = make_splits(names, loaded.routing.request_ids, paths=loaded.paths, seed=0)
    for sp in splits:
        p_path = plan_path
        if sp.name != "random":
            p_path = save_plan(refit(plan, loaded, sp.tune, bpe, hw), work / f"plan-{sp.name}.json")
        cfg = ReplayConfig(
            args.trace, str(p_path), args.store, scale=args.scale, requests=args.requests,
            max_tokens=args.max_tokens, repeats=args.repeats, tier="ram",
            variants=("plan", "lru"), only=tuple(int(i) for i in sp.validation),
        )  # fmt: skip
        data = run_replay(cfg)
        out["splits"][sp.name] = data
        print(f"[{sp.name}] {len(sp.validation)} held-out requests, replaying the last "
              f"{args.requests}")  # fmt: skip
        print(format_replay(data))
        rows = data["variants"]
        for v, r in rows.items():
            m = r["model"]["tokens_per_second"]
            print(f"  {v}: measured {r['tokens_per_second']['median']:.3f} tok/s, model "
                  f"{m:.3f} ({r['tokens_per_second']['median'] / m - 1:+.1%}); RAM peak "
                  f"{r['ram']['peak_bytes'] / 2**20:.0f} of {r['ram']['limit_bytes'] / 2**20:.0f}"
                  f" MiB")  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1, sort_keys=True) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
