"""Store benchmark: write rate and size, import time of the shared traces, DuckDB queries.

    python benchmarks/store_bench.py                      # full run (a few minutes)
    python benchmarks/store_bench.py --quick              # smoke run
    python benchmarks/store_bench.py --out results.json --shared ../shared/traces

Sections (alternatives are measured interleaved, A B C A B C ..., medians reported):

An *activation* is one expert selection (a request, token, MoE layer and one of its k
chosen experts), as in the issue ("the DeepSeek-V2-Lite folder, about 15M activations" is
2.45M token-layer rows x top-6); a *row* is one (request, token, MoE layer) with k experts.

* ``write``: activations/s (and rows/s) end to end through TraceWriter (buffering, Arrow construction,
  Parquet encoding, fsync + rename) and bytes per activation, for Zipf-skewed top-k
  routing (k=1/128, k=6/64, k=8/128) with fp16, fp32 and no gate weights, plus writer
  variants (compression, background threads) on the k=6 fp32 case;
* ``import``: time to import each shared folder with moetrace.store.importers.import_trace;
* ``duckdb``: co-activation (same token, same layer expert pairs) and layer l -> l+1
  transition counts over a synthetic top-6 trace of ``--duck-activations`` activations.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa

from moetrace.store import Manifest, ModelInfo, RequestRecord, TraceWriter, open_trace
from moetrace.store.sql import coactivation_sql, transitions_sql

REPO = Path(__file__).resolve().parent.parent
SHARED_FOLDERS = {
    "patterns-behind-chaos": "patterns-behind-chaos/llama4-maverick-17b-128e",
    "moe-beyond": "moe-beyond/deepseek-v2-lite-chat",
}


@dataclass(frozen=True)
class Shape:
    name: str
    top_k: int
    num_experts: int
    num_moe_layers: int


SHAPES = (
    Shape("k1-e128-l24 (Llama-4-Maverick-like)", 1, 128, 24),
    Shape("k6-e64-l26 (DeepSeek-V2-Lite-like)", 6, 64, 26),
    Shape("k8-e128-l48 (Qwen3-30B-A3B-like)", 8, 128, 48),
)
WEIGHTS = ("float16", "float32", None)
TOKENS_PER_REQUEST = 256


def manifest_for(shape: Shape, weights: str | None) -> Manifest:
    layers = tuple(range(1, shape.num_moe_layers + 1))
    return Manifest(
        model=ModelInfo(
            name=f"bench-{shape.top_k}-{shape.num_experts}",
            num_layers=shape.num_moe_layers + 1,
            moe_layers=layers,
            num_experts=shape.num_experts,
            top_k=shape.top_k,
        ),
        weight_dtype=weights or "float32",
    )


def zipf_routing(shape: Shape, rows: int, seed: int, s: float = 1.0) -> np.ndarray:
    """``(rows, k)`` expert ids, distinct per row, Zipf(s)-skewed, hot set varying by layer.

    Gumbel top-k over log-probabilities samples k experts without replacement. Rows are
    drawn from a pool (generation is not what is measured).
    """
    rng = np.random.default_rng(seed)
    e, k, layers = shape.num_experts, shape.top_k, shape.num_moe_layers
    logp = -s * np.log(np.arange(1, e + 1))
    pool = 4096
    out = np.empty((layers, pool, k), dtype=np.int16)
    for layer in range(layers):
        perm = rng.permutation(e)  # which experts are hot differs per layer
        g = logp[None, :] + rng.gumbel(size=(pool, e))
        top = (
            np.argpartition(-g, k - 1, axis=1)[:, :k] if k < e else np.tile(np.arange(e), (pool, 1))
        )
        out[layer] = perm[top]
    tokens = rows // layers + 1
    pick = rng.integers(0, pool, size=(tokens, layers))
    routed = out[np.arange(layers)[None, :], pick]  # (tokens, layers, k)
    return routed.reshape(-1, k)[:rows]


def gate_weights(rows: int, k: int, dtype: str, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    w = rng.random((rows, k), dtype=np.float32) + 0.05
    w /= w.sum(axis=1, keepdims=True)
    return w.astype(np.float16 if dtype == "float16" else np.float32)


@dataclass
class Workload:
    manifest: Manifest
    experts: np.ndarray
    weights: np.ndarray | None
    token: np.ndarray
    layer: np.ndarray
    per_request: int


def make_workload(shape: Shape, weights: str | None, rows: int, seed: int) -> Workload:
    layers = shape.num_moe_layers
    per_request = TOKENS_PER_REQUEST * layers
    rows = max(per_request, rows // per_request * per_request)
    experts = zipf_routing(shape, rows, seed)
    token = np.repeat(np.arange(TOKENS_PER_REQUEST, dtype=np.int32), layers)
    layer = np.tile(np.arange(1, layers + 1, dtype=np.int16), TOKENS_PER_REQUEST)
    w = gate_weights(rows, shape.top_k, weights, seed + 1) if weights else None
    return Workload(manifest_for(shape, weights), experts, w, token, layer, per_request)


def dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*.parquet") if f.name.startswith("part-"))


CPU_SECONDS: list[float] = []  # process CPU time of each write_once call


def write_once(work: Workload, path: Path, **writer_kwargs: object) -> tuple[float, int]:
    """Seconds to write the workload through TraceWriter (incl. close), and bytes on disk."""
    shutil.rmtree(path, ignore_errors=True)
    n = work.experts.shape[0]
    step = np.minimum(work.token, 1)  # token 0 is the prefill step; one token per step
    phase = step.astype(np.int8)
    t0 = time.perf_counter()
    c0 = time.process_time()
    with TraceWriter(path, work.manifest, **writer_kwargs) as w:  # type: ignore[arg-type]
        for r, start in enumerate(range(0, n, work.per_request)):
            sl = slice(start, start + work.per_request)
            w.write_request(
                RequestRecord(f"req-{r}", 1, TOKENS_PER_REQUEST - 1),
                token=work.token,
                step=step,
                phase=phase,
                forward=step,
                layer=work.layer,
                experts=work.experts[sl],
                weights=None if work.weights is None else work.weights[sl],
            )
    seconds = time.perf_counter() - t0
    CPU_SECONDS.append(time.process_time() - c0)
    return seconds, dir_bytes(path)


def summarize(samples: list[float]) -> dict[str, float]:
    return {
        "median": statistics.median(samples),
        "min": min(samples),
        "max": max(samples),
        "stdev": statistics.stdev(samples) if len(samples) > 1 else 0.0,
    }


def bench_write(args: argparse.Namespace, tmp: Path) -> dict[str, object]:
    cases: list[tuple[str, Workload, dict[str, object]]] = []
    for shape in SHAPES:
        for weights in WEIGHTS:
            work = make_workload(shape, weights, args.rows, seed=len(cases))
            cases.append((f"{shape.name} weights={weights or 'none'}", work, {}))
    k6 = make_workload(SHAPES[1], "float32", args.rows, seed=99)
    for label, kw in (
        ("threads=0 (encode in caller)", {"threads": 0}),
        ("compression=zstd", {"compression": "zstd"}),
        ("compression=snappy", {"compression": "snappy"}),
        ("part_rows=262144", {"part_rows": 1 << 18}),
    ):
        cases.append((f"{SHAPES[1].name} weights=float32 variant {label}", k6, kw))
    samples: dict[str, list[float]] = {c[0]: [] for c in cases}
    cpu: dict[str, list[float]] = {c[0]: [] for c in cases}
    sizes: dict[str, int] = {}
    for rep in range(args.reps):
        for label, work, kw in cases:  # interleaved: every case once per repetition
            seconds, size = write_once(work, tmp / "w", **kw)
            samples[label].append(work.experts.size / seconds)  # activations = rows x k
            cpu[label].append(CPU_SECONDS[-1])
            sizes[label] = size
        print(f"  write repetition {rep + 1}/{args.reps} done", flush=True)
    results = {}
    for label, work, kw in cases:
        rows, acts = work.experts.shape[0], work.experts.size
        results[label] = {
            "rows": rows,
            "activations": acts,
            "writer_kwargs": kw,
            "activations_per_s": summarize(samples[label]),
            "rows_per_s": summarize([x * rows / acts for x in samples[label]]),
            "bytes_per_activation": sizes[label] / acts,
            "bytes_per_row": sizes[label] / rows,
            "raw_activations_per_s": samples[label],
            "process_cpu_seconds": summarize(cpu[label]),
            "raw_process_cpu_seconds": cpu[label],
        }
        print(
            f"  {label:70s} {statistics.median(samples[label]) / 1e6:6.2f} M act/s "
            f"(min {min(samples[label]) / 1e6:.2f}, max {max(samples[label]) / 1e6:.2f})  "
            f"{sizes[label] / acts:5.1f} B/act  CPU {statistics.median(cpu[label]):.2f} s"
        )
    return results


def bench_import(args: argparse.Namespace, tmp: Path) -> dict[str, object]:
    try:
        from moetrace.store.importers import import_trace
    except ImportError as exc:
        print(f"  skipped: importers not available ({exc})")
        return {"skipped": f"importers not available: {exc}"}
    shared = Path(args.shared)
    results: dict[str, object] = {}
    for fmt, rel in SHARED_FOLDERS.items():
        src = shared / rel
        if not src.is_dir():
            print(f"  {fmt}: skipped ({src} absent)")
            results[fmt] = {"skipped": f"{src} absent"}
            continue
        times: list[float] = []
        facts: dict[str, object] = {}
        for _ in range(args.import_reps):
            out = tmp / f"import-{fmt}"
            shutil.rmtree(out, ignore_errors=True)
            t0 = time.perf_counter()
            import_trace(fmt, src, out, progress=False)
            times.append(time.perf_counter() - t0)
            trace = open_trace(out)
            facts = {
                "requests": trace.num_requests,
                "activations": trace.num_activations,
                "bytes": trace.size_bytes,
                "source_bytes": sum(f.stat().st_size for f in src.rglob("*") if f.is_file()),
            }
        results[fmt] = {"seconds": summarize(times), "raw_seconds": times, **facts}
        print(
            f"  {fmt:24s} {statistics.median(times):6.2f} s  {facts['requests']} requests, "
            f"{facts['activations']} activations, {facts['bytes'] / 1e6:.1f} MB "
            f"(source {facts['source_bytes'] / 1e6:.1f} MB)"
        )
    return results


def bench_duckdb(args: argparse.Namespace, tmp: Path) -> dict[str, object]:
    shape = SHAPES[1]
    path = tmp / "duck"
    work = make_workload(shape, "float32", args.duck_activations // shape.top_k, seed=7)
    write_once(work, path)
    trace = open_trace(path)
    rows = trace.num_activations
    queries = {
        "hot_experts": "SELECT layer, expert, count(*) AS n FROM activations_long "
        "WHERE expert >= 0 GROUP BY ALL",
        "coactivation": coactivation_sql(shape.top_k),
        "transitions": transitions_sql(shape.top_k),
    }
    con = trace._connection
    if args.duck_threads:
        con.execute(f"SET threads = {args.duck_threads}")
    samples: dict[str, list[float]] = {q: [] for q in queries}
    cpu: dict[str, list[float]] = {q: [] for q in queries}
    result_rows: dict[str, int] = {}
    for rep in range(args.duck_reps):
        for name, sql in queries.items():  # interleaved
            c0, t0 = time.process_time(), time.perf_counter()
            out = con.sql(sql).to_arrow_table()
            samples[name].append(time.perf_counter() - t0)
            cpu[name].append(time.process_time() - c0)
            result_rows[name] = out.num_rows
            if name == "coactivation":
                pairs = pa.compute.sum(out.column("n")).as_py()
        print(f"  duckdb repetition {rep + 1}/{args.duck_reps} done", flush=True)
    results: dict[str, object] = {
        "shape": asdict(shape),
        "activation_rows": rows,
        "activations": rows * shape.top_k,
        "coactivation_pairs_counted": pairs,
        "threads": con.execute("SELECT current_setting('threads')").fetchall()[0][0],
    }
    for name in queries:
        results[name] = {
            "seconds": summarize(samples[name]),
            "raw_seconds": samples[name],
            "cpu_seconds": summarize(cpu[name]),
            "raw_cpu_seconds": cpu[name],
            "result_rows": result_rows[name],
        }
        print(
            f"  {name:22s} over {rows * shape.top_k / 1e6:.1f}M activations ({rows / 1e6:.2f}M rows): "
            f"{statistics.median(samples[name]):6.2f} s "
            f"(min {min(samples[name]):.2f}, max {max(samples[name]):.2f}; "
            f"process CPU {statistics.median(cpu[name]):.2f} s)"
        )
    return results


def versions() -> dict[str, object]:
    import moetrace

    return {
        "python": sys.version.split()[0],
        "numpy": np.__version__,
        "pyarrow": pa.__version__,
        "duckdb": duckdb.__version__,
        "moetrace": getattr(moetrace, "__version__", "unknown"),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "load_average_at_start": os.getloadavg() if hasattr(os, "getloadavg") else None,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--out", default=str(REPO / "bench-results" / "store_bench.json"))
    p.add_argument("--shared", default=str(REPO.parent / "shared" / "traces"))
    p.add_argument("--rows", type=int, default=1_000_000, help="token-layer rows per write case")
    p.add_argument("--reps", type=int, default=5, help="interleaved repetitions of the writes")
    p.add_argument("--import-reps", type=int, default=3)
    p.add_argument("--duck-activations", type=int, default=10_000_000)
    p.add_argument("--duck-reps", type=int, default=3)
    p.add_argument("--duck-threads", type=int, default=0, help="DuckDB threads (0 = default)")
    p.add_argument("--sections", default="write,import,duckdb")
    p.add_argument("--tmp", default=None, help="scratch directory (default: system temp)")
    p.add_argument("--quick", action="store_true", help="tiny sizes, 2 repetitions")
    args = p.parse_args(argv)
    if args.quick:
        args.rows, args.reps, args.import_reps = 100_000, 2, 1
        args.duck_activations, args.duck_reps = 600_000, 2
    sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    report: dict[str, object] = {"config": vars(args).copy(), "versions": versions()}
    with tempfile.TemporaryDirectory(dir=args.tmp, prefix="store-bench-") as tmp_name:
        tmp = Path(tmp_name)
        for name, fn in (
            ("write", bench_write),
            ("import", bench_import),
            ("duckdb", bench_duckdb),
        ):
            if name in sections:
                print(f"[{name}]", flush=True)
                report[name] = fn(args, tmp)
    report["load_average_at_end"] = os.getloadavg() if hasattr(os, "getloadavg") else None
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
