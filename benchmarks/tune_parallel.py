"""`moetrace tune` serial against fanned out, side by side (A B A B ...).

Each run is a fresh `moetrace tune` process on the same trace and settings; the wall time
is measured around the process, and the written plans are compared (they must be equal
apart from their creation time). Printed and written as JSON: config, versions, medians,
raw samples.

Usage:
    python benchmarks/tune_parallel.py --traces ../shared/traces --repeats 2 \\
        --out benchmarks/results/tune_parallel.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from plan_quality import imported  # noqa: E402


def run_once(trace: Path, args: argparse.Namespace, variant: list[str], out: Path) -> float:
    cmd = [sys.executable, "-m", "moetrace", "tune", str(trace), "--budget", args.budget,
           "--granularity", args.granularity, "--out", str(out), *variant]  # fmt: skip
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, capture_output=True, text=True)
    return time.perf_counter() - t0


def plan_without_clock(path: Path) -> str:
    data = json.loads(path.read_text())
    data["provenance"].pop("created", None)
    return json.dumps(data, sort_keys=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument(
        "--traces", default=str(Path(__file__).resolve().parents[1].parent / "shared" / "traces")
    )
    ap.add_argument("--trace", default="deepseek-v2-lite")
    ap.add_argument("--granularity", default="token")
    ap.add_argument("--budget", default="12.5%")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--work", default=None)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    work = Path(args.work or tempfile.mkdtemp(prefix="moetrace-tunepar-"))
    trace = imported(args.trace, Path(args.traces), work)
    variants = {
        "serial": ["--workers", "1"],
        f"pool x{args.workers}": ["--workers", str(args.workers)],
    }
    samples: dict[str, list[float]] = {k: [] for k in variants}
    plans: dict[str, str] = {}
    for r in range(args.repeats):
        for name, extra in variants.items():
            out = work / f"plan-{name.replace(' ', '')}-{r}.json"
            secs = run_once(trace, args, extra, out)
            samples[name].append(secs)
            plans.setdefault(name, plan_without_clock(out))
            print(f"run {r} {name}: {secs:.1f} s", flush=True)
    med = {k: statistics.median(v) for k, v in samples.items()}
    names = list(variants)
    ratio = med[names[1]] / med[names[0]]
    same = len(set(plans.values())) == 1
    print(f"median serial {med[names[0]]:.1f} s, {names[1]} {med[names[1]]:.1f} s: "
          f"{ratio:.2f}x; plans identical: {same}")  # fmt: skip
    if args.out:
        import moetrace

        data = {
            "config": {k: v for k, v in vars(args).items() if k != "out"},
            "versions": {"moetrace": moetrace.__version__, "python": platform.python_version()},
            "machine": {"platform": platform.platform(), "cpus": os.cpu_count()},
            "median_s": med,
            "samples_s": samples,
            "ratio": ratio,
            "plans_identical": same,
        }
        Path(args.out).write_text(json.dumps(data, indent=1) + "\n")


if __name__ == "__main__":
    main()
