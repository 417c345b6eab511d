"""Dashboard benchmark: the uncached time of each page's aggregate on one trace.

    python benchmarks/dashboard_bench.py TRACE [--repeats 3] [--out bench-results/dashboard.json]

Every page computes its figures once per trace stamp (then Streamlit's cache serves
them); this measures that first computation, per data-layer call, with the calls
interleaved (A B C ... A B C ...) and the median and raw samples reported. It also
compares two ways to get one layer's co-activation pair counts: the dashboard's
per-layer query vs the mining function that counts every layer at once.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import duckdb
import numpy as np
import streamlit

import moetrace
from moetrace.dashboard.data import experts as X
from moetrace.dashboard.data import groups as G
from moetrace.dashboard.data import overview as O
from moetrace.dashboard.data import requests as Q
from moetrace.dashboard.data import reuse as R
from moetrace.dashboard.data.common import reopen
from moetrace.tuner.mining.groups import pair_counts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("trace")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default="bench-results/dashboard.json")
    args = ap.parse_args()
    trace = reopen(args.trace)
    L = len(trace.manifest.model.moe_layers)
    mid = L // 2
    first_request = str(Q.request_table(trace)[0]["request_id"])
    calls: dict[str, Callable[[], object]] = {
        "overview": lambda: O.overview(trace),
        "expert counts, all phases (Experts)": lambda: X.phase_counts(trace),
        "one layer reuse + LRU/LFU/Belady (Skew and reuse)": lambda: R.layer_reuse(trace, mid),
        "pair counts, one layer (Groups, dashboard)": lambda: G.layer_pair_counts(trace, mid),
        "pair counts, all layers (mining.pair_counts)": lambda: pair_counts(reopen(args.trace)),
        "transitions of one layer pair (Groups)": lambda: (
            G.transitions(trace, min(mid, L - 2)) if L > 1 else None
        ),
        "one request matrix (Requests)": lambda: Q.request_matrix(trace, first_request),
        "projection + clustering (Requests)": lambda: Q.projection(trace),
    }
    samples: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(args.repeats):
        for name, fn in calls.items():
            t0 = time.perf_counter()
            fn()
            samples[name].append(time.perf_counter() - t0)
    result = {
        "config": {
            "trace": str(Path(args.trace).resolve()),
            "activation_rows": trace.num_activations,
            "requests": trace.num_requests,
            "moe_layers": L,
            "experts": trace.manifest.model.num_experts,
            "top_k": trace.top_k,
            "repeats": args.repeats,
        },
        "versions": {
            "python": sys.version.split()[0],
            "platform": platform.platform(),
            "moetrace": moetrace.__version__,
            "duckdb": duckdb.__version__,
            "numpy": np.__version__,
            "streamlit": streamlit.__version__,
        },
        "median_s": {k: statistics.median(v) for k, v in samples.items()},
        "samples_s": samples,
    }
    for name, med in result["median_s"].items():
        spread = max(samples[name]) - min(samples[name])
        print(f"{name:55s} median {med:7.3f} s  (spread {spread:.3f} s)")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
