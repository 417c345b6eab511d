"""Time ``moetrace import`` on the reference traces (JSON and CSV importers).

Usage: python benchmarks/import_bench.py [TRACES_DIR] [--repeats N] [--out FILE]

Runs the two imports alternately (A B A B ...) into fresh directories and prints and
writes JSON with the config, versions, medians and raw samples.
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

import duckdb
import numpy as np
import pyarrow as pa

import moetrace
from moetrace.store.importers import import_trace

CASES = {
    "patterns-behind-chaos": "patterns-behind-chaos/llama4-maverick-17b-128e/mmlu-abstract_algebra",
    "moe-beyond": "moe-beyond/deepseek-v2-lite-chat/puffin-1-1000",
}


def main() -> None:
    default = Path(__file__).resolve().parents[2] / "shared" / "traces"
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("traces", nargs="?", type=Path, default=default)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", type=Path, default=Path("import_bench.json"))
    args = ap.parse_args()
    samples: dict[str, list[float]] = {k: [] for k in CASES}
    facts: dict[str, dict[str, int]] = {}
    for _ in range(args.repeats):
        for fmt, rel in CASES.items():  # interleaved: A B A B ...
            with tempfile.TemporaryDirectory() as tmp:
                t0 = time.perf_counter()
                res = import_trace(fmt, args.traces / rel, Path(tmp) / "t", progress=False)
                samples[fmt].append(time.perf_counter() - t0)
                facts[fmt] = {
                    "requests": res.requests_imported,
                    "tokens": res.prefill_tokens + res.decode_tokens,
                    "activations": res.activations,
                }
    report = {
        "benchmark": "import",
        "config": {"traces": str(args.traces), "repeats": args.repeats, "cases": CASES},
        "versions": {
            "moetrace": moetrace.__version__,
            "python": platform.python_version(),
            "numpy": np.__version__,
            "pyarrow": pa.__version__,
            "duckdb": duckdb.__version__,
            "machine": platform.machine(),
        },
        "facts": facts,
        "median_s": {k: statistics.median(v) for k, v in samples.items()},
        "samples_s": samples,
    }
    for fmt, med in report["median_s"].items():
        spread = (min(samples[fmt]), max(samples[fmt]))
        print(f"{fmt}: median {med:.2f} s (min {spread[0]:.2f}, max {spread[1]:.2f}) {facts[fmt]}")
    args.out.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
