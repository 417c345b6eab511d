"""Benchmark ``moetrace analyze`` on the real reference traces: wall time and peak RSS.

Imports both folders of ../shared/traces (once, into --work), then runs a full analyze
of each trace in a fresh subprocess, interleaved (A B A B ...), ``--repeats`` times, after
one untimed warm-up per trace (numba JIT caching). Prints a summary and writes JSON with
the config, versions, medians and raw samples.

    python benchmarks/analyze_bench.py --shared ../shared/traces --out analyze_bench.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TRACES = {
    "deepseek-v2-lite": ("moe-beyond", "moe-beyond/deepseek-v2-lite-chat/puffin-1-1000"),
    "llama4-maverick": (
        "patterns-behind-chaos",
        "patterns-behind-chaos/llama4-maverick-17b-128e/mmlu-abstract_algebra",
    ),
}


def child(trace: str, seed: int) -> None:
    """Run one analyze and print its measurements as JSON (peak RSS of this process)."""
    from moetrace.tuner.analyze import AnalyzeConfig, analyze

    before = resource.getrusage(resource.RUSAGE_SELF)
    start = time.perf_counter()
    report = analyze(trace, AnalyzeConfig(seed=seed))
    wall = time.perf_counter() - start
    usage = resource.getrusage(resource.RUSAGE_SELF)
    cpu = usage.ru_utime + usage.ru_stime - before.ru_utime - before.ru_stime
    rss_mb = usage.ru_maxrss / 1024
    m = report.mrc
    print(
        json.dumps(
            {
                "wall_s": wall,
                "cpu_s": cpu,
                "load_avg_1m": os.getloadavg()[0],
                "peak_rss_mb": rss_mb,
                "timings": report.timings,
                "num_rows": report.num_rows,
                "num_accesses": report.num_accesses,
                "verdict": list(report.verdict.lines),
                "policy_sizes": list(m.policy_sizes),
                "lru": list(m.model_lru_at),
                "lfu": list(m.model_lfu),
                "belady": list(m.model_belady),
                "lru_size_for": m.lru_size_for,
                "belady_size_for": m.belady_size_for,
            }
        )
    )


def run_child(trace: Path, seed: int) -> dict:
    out = subprocess.run(
        [sys.executable, __file__, "--child", str(trace), "--seed", str(seed)],
        check=True,
        capture_output=True,
        text=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def versions() -> dict[str, str]:
    import duckdb
    import numba
    import numpy
    import pyarrow
    import sklearn

    import moetrace

    return {
        "python": platform.python_version(),
        "moetrace": moetrace.__version__,
        "numpy": numpy.__version__,
        "numba": numba.__version__,
        "duckdb": duckdb.__version__,
        "pyarrow": pyarrow.__version__,
        "scikit-learn": sklearn.__version__,
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shared", type=Path, default=REPO.parent / "shared" / "traces")
    ap.add_argument(
        "--work", type=Path, default=Path(tempfile.gettempdir()) / "moetrace-analyze-bench"
    )
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=Path("analyze_bench.json"))
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args.child, args.seed)
        return
    from moetrace.store.importers import import_trace

    traces: dict[str, Path] = {}
    for name, (fmt, rel) in TRACES.items():
        src, out = args.shared / rel, args.work / name
        if not src.is_dir():
            print(f"skip {name}: {src} not found")
            continue
        if not (out / "manifest.json").exists():
            t = time.perf_counter()
            import_trace(fmt, src, out, progress=False)
            print(f"imported {name} in {time.perf_counter() - t:.1f}s")
        traces[name] = out
    if not traces:
        sys.exit("no reference traces found; pass --shared")
    for path in traces.values():  # warm-up: numba cache, page cache
        run_child(path, args.seed)
    samples: dict[str, list[dict]] = {name: [] for name in traces}
    for _ in range(args.repeats):  # interleaved A B A B ...
        for name, path in traces.items():
            samples[name].append(run_child(path, args.seed))
    result = {
        "benchmark": "analyze",
        "config": {"repeats": args.repeats, "seed": args.seed, "shared": str(args.shared)},
        "versions": versions(),
        "traces": {},
    }
    for name, runs in samples.items():
        walls = [r["wall_s"] for r in runs]
        cpus = [r["cpu_s"] for r in runs]
        rss = [r["peak_rss_mb"] for r in runs]
        last = runs[-1]
        summary = {
            "median_wall_s": statistics.median(walls),
            "min_wall_s": min(walls),
            "max_wall_s": max(walls),
            "median_cpu_s": statistics.median(cpus),
            "median_peak_rss_mb": statistics.median(rss),
            "num_rows": last["num_rows"],
            "num_accesses": last["num_accesses"],
            "verdict": last["verdict"],
            "policy_sizes": last["policy_sizes"],
            "lru": last["lru"],
            "lfu": last["lfu"],
            "belady": last["belady"],
            "lru_size_for": last["lru_size_for"],
            "belady_size_for": last["belady_size_for"],
            "samples": runs,
        }
        result["traces"][name] = summary
        print(
            f"{name}: {last['num_accesses']} expert slots; analyze median {summary['median_wall_s']:.1f}s "
            f"(min {min(walls):.1f}, max {max(walls):.1f}; CPU {summary['median_cpu_s']:.1f}s), "
            f"peak RSS {summary['median_peak_rss_mb']:.0f} MB"
        )
        for line in last["verdict"]:
            print(f"  - {line}")
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
