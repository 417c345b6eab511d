"""Dashboard benchmark: the time to first open each page's aggregates, before and after
the one-pass summary, the request sample and the on-disk cache.

    python benchmarks/dashboard_bench.py TRACE [--repeats 3] [--out benchmarks/results/dashboard_bench.json]
    python benchmarks/dashboard_bench.py --synthetic /tmp/t30 [--repeats 3]   # builds it first

``--synthetic DIR`` writes (once; reused when DIR holds a trace) a 30M-activation trace:
600 requests x 520 tokens (100 prompt, 420 generated) x 24 MoE layers, 64 experts,
top-4 (7.49M token-layer rows), Zipf expert popularity with a per-request bias and 40%
token-to-token stickiness. Per page and repetition it measures, interleaved:

- ``before``: the data-layer calls the pages made before (DuckDB expert counts, the full
  reuse replay of one layer, DuckDB per-request matrices for the projection);
- ``after, cold``: what a fresh dashboard session computes on first open of that page
  alone (the one-pass summary included, an empty on-disk cache);
- ``after, warm disk``: the same with the on-disk cache filled (a later session).

With ``--apptest``, the pages are also opened for real (Streamlit's AppTest, charts
included), one after another as a user would, in a fresh process with an empty on-disk
cache (so imports and the one-pass summary count on the first page that needs them); with
``--baseline-src OLD_CHECKOUT`` the same is timed for an older checkout, interleaved.

Printed and written as JSON (config, versions, medians, raw samples).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

# moetrace is imported inside the functions: ``--apptest-one`` may first point the import
# at an older checkout (``--baseline-src``) to time the pages before a change.

Page = dict[str, Callable[[], object]]
APP_PAGES = ("overview", "experts", "reuse", "groups", "requests", "plans", "timeline")


def build_synthetic(
    path: Path,
    *,
    requests: int = 600,
    prompt: int = 100,
    decode: int = 420,
    layers: int = 24,
    experts: int = 64,
    top_k: int = 4,
    stickiness: float = 0.4,
    seed: int = 0,
) -> Path:
    """Write the synthetic trace described in the module docstring (vectorized)."""
    from moetrace.store import Manifest, ModelInfo, RequestRecord, SourceInfo, TraceWriter

    rng = np.random.default_rng(seed)
    L, E, k, T = layers, experts, top_k, prompt + decode
    base = 1.0 / np.arange(1, E + 1) ** 1.1
    manifest = Manifest(
        model=ModelInfo("synthetic-30m", L, tuple(range(L)), E, k, bytes_per_expert=1 << 20),
        source=SourceInfo(kind="synthetic", origin="benchmarks/dashboard_bench.py"),
    )
    tok = np.arange(T, dtype=np.int32)
    step = np.where(tok < prompt, 0, tok - prompt + 1).astype(np.int32)
    with TraceWriter(path, manifest) as w:
        for r in range(requests):
            pop = np.stack([rng.permutation(base) for _ in range(L)]) * rng.gamma(2.0, size=(L, E))
            logp = np.log(pop / pop.sum(axis=1, keepdims=True))
            gumbel = logp[None] - np.log(-np.log(rng.random((T, L, E))))
            ex = np.argpartition(-gumbel, k, axis=2)[:, :, :k].astype(np.int16)
            sticky = rng.random((T, L)) < stickiness
            sticky[0] = False
            src = np.maximum.accumulate(np.where(sticky, 0, np.arange(T)[:, None]), axis=0)
            ex = ex[src, np.arange(L)[None, :]]
            w.write_request(
                RequestRecord(
                    f"r{r}",
                    prompt_tokens=prompt,
                    generated_tokens=decode,
                    tags={"topic": ("code", "prose", "math")[r % 3]},
                ),
                token=np.repeat(tok, L),
                step=np.repeat(step, L),
                phase=np.repeat((step > 0).astype(np.int8), L),
                forward=np.repeat(r * (decode + 1) + step, L).astype(np.int64),
                layer=np.tile(np.arange(L, dtype=np.int32), T),
                experts=ex.reshape(T * L, k),
            )
    return path


def pages(path: str, mid: int, first_request: str) -> dict[str, tuple[Page, Page]]:
    """Per page: (before calls, after calls)."""
    from moetrace.dashboard import persisted
    from moetrace.dashboard.data import experts as X
    from moetrace.dashboard.data import groups as G
    from moetrace.dashboard.data import overview as O
    from moetrace.dashboard.data import requests as Q
    from moetrace.dashboard.data import reuse as R
    from moetrace.dashboard.data.common import reopen

    t = reopen(path)
    pair_layer = max(0, min(mid, len(t.manifest.model.moe_layers) - 2))
    return {
        "Overview": (
            {"overview": lambda: O.overview(t)},
            {"overview": lambda: O.overview(t)},
        ),
        "Experts": (
            {"expert counts": lambda: X.phase_counts(t)},
            {"summary": lambda: persisted.summary(path)},
        ),
        "Skew and reuse (one layer)": (
            {
                "expert counts": lambda: X.phase_counts(t),
                "reuse, every request": lambda: R.layer_reuse(t, mid, max_tokens=None),
            },
            {
                "summary": lambda: persisted.summary(path),
                "reuse, sampled": lambda: persisted.layer_reuse(path, mid, "all"),
            },
        ),
        "Groups (one layer, one pair)": (
            {
                "expert counts": lambda: X.phase_counts(t),
                "pair counts": lambda: G.layer_pair_counts(t, mid),
                "transitions": lambda: G.transitions(t, pair_layer),
            },
            {
                "summary": lambda: persisted.summary(path),
                "pair counts": lambda: persisted.layer_pair_counts(path, mid, "all"),
                "transitions": lambda: persisted.transitions(path, pair_layer, "all"),
            },
        ),
        "Requests (matrix + projection)": (
            {
                "request table": lambda: Q.request_table(t),
                "request matrix": lambda: Q.request_matrix(t, first_request),
                "projection": lambda: Q.projection(t),
            },
            {
                "request table": lambda: Q.request_table(t),
                "request matrix": lambda: persisted.request_matrix(path, first_request),
                "projection": lambda: persisted.projection(path),
            },
        ),
    }


def timed(calls: Page) -> tuple[float, dict[str, float]]:
    parts = {}
    for name, fn in calls.items():
        t0 = time.perf_counter()
        fn()
        parts[name] = time.perf_counter() - t0
    return sum(parts.values()), parts


def apptest_session(
    trace: str, baseline_src: str | None, plans: list[str], only: str | None = None
) -> None:
    """A fresh dashboard session in this process: open every page in turn (AppTest, charts
    included, an empty on-disk cache) and print each page's first-open seconds as JSON.
    ``baseline_src``: import moetrace from that (older) checkout instead."""
    if baseline_src:
        sys.meta_path[:] = [f for f in sys.meta_path if "editable" not in repr(f).lower()]
        sys.path.insert(0, baseline_src)
    from streamlit.testing.v1 import AppTest

    import moetrace
    from moetrace.dashboard.inputs import ENV_VAR
    from moetrace.dashboard.launch import APP

    if baseline_src and not moetrace.__file__.startswith(baseline_src):
        raise SystemExit(f"baseline import failed: {moetrace.__file__}")
    os.environ[ENV_VAR] = json.dumps({"traces": [trace], "plans": plans})
    seconds, problems = {}, {}
    at = AppTest.from_file(str(APP), default_timeout=300)
    for page in APP_PAGES if only is None else (only,):
        if not (Path(APP).parent / "views" / f"{page}.py").is_file():
            continue  # a page the (baseline) checkout does not have
        if page != "overview":
            at.switch_page(f"views/{page}.py")
        t0 = time.perf_counter()
        at.run()
        seconds[page] = time.perf_counter() - t0
        bad = [str(e.value) for e in at.exception] + [str(e.value) for e in at.error]
        if bad:
            problems[page] = bad
    print(json.dumps({"seconds": seconds, "problems": problems}))


def apptest_alone(trace: str, repeats: int, plans: list[str]) -> dict[str, object]:
    """Each page opened alone, as the first page of a fresh process with an empty disk
    cache (the worst first open: nothing warmed by the pages before it)."""
    import subprocess

    samples: dict[str, list[float]] = {p: [] for p in APP_PAGES}
    problems: dict[str, object] = {}
    with tempfile.TemporaryDirectory(prefix="moetrace-bench-alone-") as tmp:
        for rep in range(repeats):
            for page in APP_PAGES:
                env = dict(os.environ)
                env["MOETRACE_CACHE_DIR"] = str(Path(tmp) / f"{rep}-{page}")
                cmd = [sys.executable, __file__, trace, "--apptest-session", "--only", page]
                cmd += [a for p in plans for a in ("--plan", p)]
                out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
                got = json.loads(out.stdout.strip().splitlines()[-1])
                samples[page].extend(got["seconds"].values())
                if got["problems"]:
                    problems[page] = got["problems"]
    return {
        "median_s": {p: statistics.median(x) for p, x in samples.items()},
        "samples_s": samples,
        "problems": problems,
    }


def apptest_pages(
    trace: str, repeats: int, baseline_src: str | None, plans: list[str]
) -> dict[str, object]:
    """:func:`apptest_session` in fresh processes, alternating the baseline checkout and
    this one (B A B A ...)."""
    import subprocess

    versions: dict[str, str | None] = {"this checkout": None}
    if baseline_src:
        versions = {"baseline": baseline_src, "this checkout": None}
    samples: dict[str, dict[str, list[float]]] = {v: {p: [] for p in APP_PAGES} for v in versions}
    problems: dict[str, object] = {}
    with tempfile.TemporaryDirectory(prefix="moetrace-bench-app-") as tmp:
        for rep in range(repeats):
            for version, src in versions.items():
                env = dict(os.environ)
                env["MOETRACE_CACHE_DIR"] = str(Path(tmp) / f"{rep}-{version}")
                cmd = [sys.executable, __file__, trace, "--apptest-session"]
                cmd += [a for p in plans for a in ("--plan", p)]
                if src:
                    cmd += ["--baseline-src", src]
                out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
                got = json.loads(out.stdout.strip().splitlines()[-1])
                for page, sec in got["seconds"].items():
                    samples[version][page].append(sec)
                if got["problems"]:
                    problems[version] = got["problems"]
    samples = {v: {p: x for p, x in d.items() if x} for v, d in samples.items()}
    return {
        "median_s": {
            v: {p: statistics.median(x) for p, x in d.items()} for v, d in samples.items()
        },
        "samples_s": samples,
        "problems": problems,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("trace", nargs="?")
    ap.add_argument("--synthetic", help="build (or reuse) the 30M-activation trace here")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default="benchmarks/results/dashboard_bench.json")
    ap.add_argument(
        "--apptest", action="store_true", help="also time each page's first open (AppTest)"
    )
    ap.add_argument("--baseline-src", help="an older checkout to time the pages against")
    ap.add_argument("--apptest-session", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--plan", action="append", default=[], help="a plan file to load too")
    ap.add_argument(
        "--alone",
        action="store_true",
        help="also open each page alone as the first page of a fresh session (AppTest)",
    )
    ap.add_argument("--only", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.apptest_session:
        apptest_session(args.trace, args.baseline_src, args.plan, args.only)
        return
    import duckdb
    import streamlit

    import moetrace
    from moetrace.dashboard import diskcache
    from moetrace.dashboard.data import requests as Q
    from moetrace.dashboard.data import reuse as R
    from moetrace.dashboard.data.common import reopen

    build_s = None
    if args.synthetic:
        path = Path(args.synthetic)
        if not (path / "manifest.json").is_file():
            t0 = time.perf_counter()
            build_synthetic(path)
            build_s = time.perf_counter() - t0
            print(f"built {path} in {build_s:.1f} s")
    elif args.trace:
        path = Path(args.trace)
    else:
        ap.error("give TRACE or --synthetic DIR")
    trace = reopen(path)
    L = len(trace.manifest.model.moe_layers)
    first_request = str(Q.request_table(trace)[0]["request_id"])
    page_calls = pages(str(path), L // 2, first_request)
    modes = ("before", "after, cold", "after, warm disk")
    samples: dict[str, dict[str, list[float]]] = {p: {m: [] for m in modes} for p in page_calls}
    breakdown: dict[str, dict[str, list[dict[str, float]]]] = {
        p: {m: [] for m in modes} for p in page_calls
    }
    with tempfile.TemporaryDirectory(prefix="moetrace-bench-cache-") as tmp:
        for rep in range(args.repeats):
            for page, (before, after) in page_calls.items():
                cache_dir = Path(tmp) / f"{rep}-{page.split()[0]}"
                os.environ[diskcache.ENV_VAR] = str(cache_dir)  # empty: a fresh session
                for mode, calls in zip(modes, (before, after, after), strict=True):
                    total, parts = timed(calls)
                    samples[page][mode].append(total)
                    breakdown[page][mode].append(parts)
    medians = {p: {m: statistics.median(v) for m, v in d.items()} for p, d in samples.items()}
    app = (
        apptest_pages(str(path), args.repeats, args.baseline_src, args.plan)
        if args.apptest
        else None
    )
    alone = apptest_alone(str(path), args.repeats, args.plan) if args.alone else None
    result = {
        "config": {
            "trace": str(path.resolve()),
            "synthetic": bool(args.synthetic),
            "build_s": build_s,
            "activation_rows": trace.num_activations,
            "activations": trace.num_activations * trace.top_k,
            "requests": trace.num_requests,
            "moe_layers": L,
            "experts": trace.manifest.model.num_experts,
            "top_k": trace.top_k,
            "repeats": args.repeats,
            "plans": args.plan,
            "reuse_sample_tokens": R.REUSE_SAMPLE_TOKENS,
            "cpu_count": os.cpu_count(),
            "load_avg_at_end": os.getloadavg(),
        },
        "versions": {
            "python": sys.version.split()[0],
            "platform": platform.platform(),
            "moetrace": moetrace.__version__,
            "duckdb": duckdb.__version__,
            "numpy": np.__version__,
            "streamlit": streamlit.__version__,
        },
        "median_s": medians,
        "samples_s": samples,
        "breakdown_s": breakdown,
        "apptest_first_open": app,
        "apptest_alone": alone,
    }
    print(f"{'page':32s} " + "  ".join(f"{m:>22s}" for m in modes))
    for page, d in samples.items():
        cells = [f"{medians[page][m]:7.3f} s ({min(v):.2f}-{max(v):.2f})" for m, v in d.items()]
        print(f"{page:32s} " + "  ".join(f"{c:>22s}" for c in cells))
    if app is not None:
        print("\nfirst open of each page, fresh process, pages in turn, empty disk cache:")
        for version, d in app["samples_s"].items():  # type: ignore[union-attr]
            cells = [
                f"{p} {statistics.median(v):.2f} s ({min(v):.2f}-{max(v):.2f})"
                for p, v in d.items()
            ]
            print(f"  {version:14s} " + ", ".join(cells))
        if app["problems"]:
            print(f"  problems: {app['problems']}")
    if alone is not None:
        print("\neach page alone, first page of a fresh process, empty disk cache:")
        cells = [
            f"{p} {statistics.median(v):.2f} s ({min(v):.2f}-{max(v):.2f})"
            for p, v in alone["samples_s"].items()  # type: ignore[union-attr]
        ]
        print("  " + ", ".join(cells))
        if alone["problems"]:
            print(f"  problems: {alone['problems']}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
