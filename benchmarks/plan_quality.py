"""Plan quality and simulator speed on the shared reference traces.

For each trace and cache size (12.5%, 25%, 50% of the experts per layer) this tunes a plan
and reports, on every validation split (the random half, and the drift splits of
``--split-by``, default ``time``: early requests tune, late ones validate): hit rate without
prefetch and modeled stall per token with prefetch (PCIe 4.0 x16 profile) for LRU, LFU,
the peers' released policies, kNN prefetch after the MoE-Infinity paper, the tuned plan and
the Belady/oracle bounds, and any fallback the tuner took. It also measures replay speed
(expert accesses per second) per policy, interleaving policies (A B A B ...).

    python benchmarks/plan_quality.py --traces ../shared/traces --out plan_quality.json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

TRACES = {
    "llama4-maverick": (
        "patterns-behind-chaos",
        "patterns-behind-chaos/llama4-maverick-17b-128e/mmlu-abstract_algebra",
        "pass",
    ),
    "deepseek-v2-lite": ("moe-beyond", "moe-beyond/deepseek-v2-lite-chat/puffin-1-1000", "token"),
}


def imported(name: str, traces: Path, work: Path) -> Path:
    from moetrace.store.importers import import_trace

    fmt, rel, _ = TRACES[name]
    out = work / name
    if not (out / "manifest.json").exists():
        import_trace(fmt, traces / rel, out, progress=False)
    return out


def speed(path: Path, granularity: str, repeats: int) -> dict:
    from moetrace.store.hardware import load_hardware
    from moetrace.tuner.sim import make_plan, simulate, uniform_layout
    from moetrace.tuner.sim.trace import events_for, load_traces

    loaded = load_traces([path])
    ev = events_for(loaded, granularity=granularity)
    L, E = ev.num_layers, ev.num_experts
    layout = uniform_layout(L * E // 4, L, E)
    hw = load_hardware("pcie4-x16")
    policies = ["lru", "lfu", "fifo", "pinned_lru", "freq_lru", "arc", "wtinylfu", "lecar", "belady"]
    plans = {p: make_plan(ev, loaded.shape, layout, p) for p in policies}
    for p in policies:
        simulate(ev, plans[p], hw)  # compile / warm
    samples: dict[str, list[float]] = {p: [] for p in policies}
    for _ in range(repeats):
        for p in policies:  # interleaved: A B C ... A B C ...
            t = time.perf_counter()
            simulate(ev, plans[p], hw)
            samples[p].append(ev.num_accesses / (time.perf_counter() - t))
    return {
        "accesses": ev.num_accesses,
        "events": ev.num_events,
        "median_accesses_per_s": {p: statistics.median(s) for p, s in samples.items()},
        "min_accesses_per_s": {p: min(s) for p, s in samples.items()},
        "samples": samples,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--traces",
        type=Path,
        default=Path(__file__).resolve().parents[1].parent / "shared" / "traces",
    )
    ap.add_argument(
        "--work", type=Path, help="Where imported traces are kept (default: a temp dir)."
    )
    ap.add_argument("--out", type=Path, default=Path("plan_quality.json"))
    ap.add_argument("--fractions", default="0.125,0.25,0.5")
    ap.add_argument("--only", choices=sorted(TRACES), action="append")
    ap.add_argument("--speed-repeats", type=int, default=5)
    ap.add_argument(
        "--split-by",
        action="append",
        default=None,
        help="drift splits besides the random one (repeatable; default: time)",
    )
    ap.add_argument(
        "--judge-by",
        action="append",
        default=None,
        help="splits the plan is judged on, not chosen on (repeatable; default: shift)",
    )
    args = ap.parse_args()
    args.split_by = args.split_by or ["time"]
    args.judge_by = args.judge_by if args.judge_by is not None else ["shift"]
    if not args.traces.is_dir():
        print(f"reference traces not found at {args.traces}", file=sys.stderr)
        return 1
    import numba

    import moetrace
    from moetrace.tuner.tune import TuneConfig, tune

    work = args.work or Path(tempfile.mkdtemp(prefix="moetrace-bench-"))
    fractions = [float(f) for f in args.fractions.split(",")]
    report: dict = {
        "config": {
            "traces": str(args.traces),
            "fractions": fractions,
            "hardware": "pcie4-x16",
            "validation_fraction": 0.5,
            "splits": ["random", *args.split_by],
            "judged_only": args.judge_by,
            "seed": 0,
        },
        "versions": {
            "moetrace": moetrace.__version__,
            "python": platform.python_version(),
            "numpy": np.__version__,
            "numba": numba.__version__,
            "machine": platform.machine(),
            "cpus": __import__("os").cpu_count(),
        },
        "results": {},
    }
    for name in args.only or list(TRACES):
        path = imported(name, args.traces, work)
        granularity = TRACES[name][2]
        report["results"][name] = {"granularity": granularity, "budgets": {}}
        for frac in fractions:
            t = time.perf_counter()
            res = tune(
                [path],
                TuneConfig(
                    budget=f"{100 * frac}%",
                    granularity=granularity,
                    hardware="pcie4-x16",
                    seed=0,
                    splits=tuple(args.split_by),
                    judge=tuple(args.judge_by),
                ),
                progress=False,
            )
            rows = {r["name"]: r for r in res.validation}
            p = res.plan
            entry = {
                "chosen": {
                    "layout": p.layout.kind,
                    "eviction": p.eviction.policy,
                    "params": dict(p.eviction.params),
                    "prefetch": p.prefetch.name,
                    "fetch": p.prefetch.fetch,
                },
                "tune_seconds": time.perf_counter() - t,
                "rows": rows,
                "splits": res.splits,
                "fallback": res.fallback,
            }
            report["results"][name]["budgets"][str(frac)] = entry
            print(
                f"\n== {name} ({granularity}), cache {100 * frac:g}% of experts: {entry['chosen']} ({entry['tune_seconds']:.0f}s)"
            )
            for r in res.validation:
                print(
                    f"  {r['name']:<46} hit {r['hit_rate']:.4f}  stall/token {r['stall_per_token_ms']:.3f} ms"
                )
            gap = rows["plan, no prefetch"].get("gap_closed_vs_lru_belady")
            ratio = rows["plan"].get("stall_vs_lru")
            print(
                f"  gap LRU->Belady closed (no prefetch): {'-' if gap is None else f'{100 * gap:.1f}%'}; stall vs LRU: {ratio:.2f}x"
            )
            for sp in res.splits:
                r = {x["name"]: x for x in sp["rows"]}
                g = r["plan, no prefetch"].get("gap_closed_vs_lru_belady")
                print(
                    f"  split {sp['name'] + (' (judged)' if sp.get('judged_only') else ''):<22} plan {r['plan, no prefetch']['hit_rate']:.4f}  "
                    f"lru {r['lru']['hit_rate']:.4f}  belady "
                    f"{r['belady (oracle bound, no prefetch)']['hit_rate']:.4f}  gap closed "
                    f"{'-' if g is None else f'{100 * g:.1f}%'}  stall vs LRU "
                    f"{r['plan']['stall_vs_lru']:.2f}x"
                )
            if res.fallback:
                print(f"  fallback: {res.fallback}")
        report["results"][name]["speed"] = sp = speed(path, granularity, args.speed_repeats)
        print(
            f"  speed ({sp['accesses']} accesses): "
            + ", ".join(f"{k} {v / 1e6:.1f}M/s" for k, v in sp["median_accesses_per_s"].items())
        )
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
