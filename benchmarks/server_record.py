"""Recording from a server: ``moetrace record --server`` against the fake vLLM / SGLang
servers of the tests (tests/tracer/fake_servers.py) run in their own process.

1. Speed: N prompts at concurrency C, end to end through the CLI (process start, model
   listing, requests, parsing, writing, commit), vLLM and SGLang interleaved
   (vllm, sglang, vllm, sglang, ...) so machine drift hits both alike.
2. Kill and resume: the recorder is killed (SIGKILL) about halfway, then rerun with
   ``--resume``; the trace must hold every request exactly once, each row equal to the
   routing the server sent.

The fake model has DeepSeek-V2-Lite's shape (27 layers, MoE layers 1..26, 64 experts,
top-6) and name, so its facts come from the known-models table. Prints a summary and
writes JSON (config, versions, medians, spread, raw samples).

    python benchmarks/server_record.py --out benchmarks/results/server_record.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import moetrace  # noqa: E402
from moetrace.store.reader import open_trace  # noqa: E402
from tests.tracer.fake_servers import FakeModel, FakeServer  # noqa: E402

MODEL = FakeModel(
    name="deepseek-ai/DeepSeek-V2-Lite-Chat",
    num_layers=27,
    moe_layers=tuple(range(1, 27)),
    num_experts=64,
    top_k=6,
)
SERVE = """
import sys, time
sys.path.insert(0, {root!r})
from tests.tracer.fake_servers import FakeModel, FakeServer
model = FakeModel(name={m.name!r}, num_layers={m.num_layers}, moe_layers={m.moe_layers!r},
                  num_experts={m.num_experts}, top_k={m.top_k})
with FakeServer(engine={engine!r}, model=model, latency={latency}) as srv:
    print(srv.url, flush=True)
    while True:
        time.sleep(3600)
"""


def serve(engine: str, latency: float) -> tuple[subprocess.Popen, str]:
    code = SERVE.format(root=str(ROOT), m=MODEL, engine=engine, latency=latency)
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    url = proc.stdout.readline().strip()  # type: ignore[union-attr]
    return proc, url


def write_prompts(path: Path, n: int, seed: int) -> list[dict]:
    rng = np.random.default_rng(seed)
    items = []
    for i in range(n):
        words = " ".join(f"w{x}" for x in rng.integers(0, 5000, int(rng.integers(16, 160))))
        items.append({"id": f"r{i}", "prompt": words})
    path.write_text("".join(json.dumps(x) + "\n" for x in items), encoding="utf-8")
    return items


def record_args(url: str, engine: str, prompts: Path, out: Path, args: argparse.Namespace):
    return [sys.executable, "-m", "moetrace", "record", "--server", url, "--engine", engine,
            "--prompts", str(prompts), "--out", str(out), "--max-new-tokens",
            str(args.new_tokens), "--concurrency", str(args.concurrency)]  # fmt: skip


def check(out: Path, items: list[dict], new_tokens: int) -> dict:
    """Every request once; each one's rows equal the routing the server sent."""
    trace = open_trace(out)
    ids = trace.requests().column("request_id").to_pylist()
    k = MODEL.top_k
    cols = ", ".join(f"e{i}" for i in range(k))
    acts = trace.sql(
        f"SELECT request_id, {cols} FROM activations_raw ORDER BY request_id, token, layer"
    )
    rid = np.asarray(acts.column("request_id").to_pylist())
    exp = np.stack([acts.column(f"e{i}").to_numpy() for i in range(k)], axis=1)
    starts = {r: i for i, r in reversed(list(enumerate(rid)))}
    fake = FakeServer(model=MODEL)
    bad = 0
    for item in items:
        pre, dec = fake.expected(item["prompt"], 0, new_tokens)
        want = np.concatenate([pre, dec]).reshape(-1, k)
        s = starts.get(item["id"])
        got = exp[s : s + len(want)] if s is not None else None
        bad += got is None or not np.array_equal(got, want)
    return {"requests": len(ids), "unique": len(set(ids)), "mismatched": bad}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--requests", type=int, default=1000)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--latency", type=float, default=0.0, help="server seconds per request")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/server_record.json"))
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="moetrace-server-bench-"))
    items = write_prompts(work / "prompts.jsonl", args.requests, seed=0)
    servers = {e: serve(e, args.latency) for e in ("vllm", "sglang")}
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    seconds: dict[str, list[float]] = {e: [] for e in servers}
    checks: dict[str, list[dict]] = {e: [] for e in servers}
    try:
        for rep in range(args.reps):
            for engine, (_, url) in servers.items():
                out = work / f"{engine}-{rep}"
                t0 = time.perf_counter()
                subprocess.run(record_args(url, engine, work / "prompts.jsonl", out, args),
                               env=env, check=True, capture_output=True)  # fmt: skip
                seconds[engine].append(time.perf_counter() - t0)
                checks[engine].append(check(out, items, args.new_tokens))
                shutil.rmtree(out)
        kills = {}
        for engine, (_, url) in servers.items():
            out = work / f"{engine}-killed"
            cmd = record_args(url, engine, work / "prompts.jsonl", out, args)
            proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL,
                                    stderr=subprocess.DEVNULL)  # fmt: skip
            time.sleep(statistics.median(seconds[engine]) / 2)
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            kept = len(open_trace(out).requests()) if (out / "manifest.json").exists() else 0
            t0 = time.perf_counter()
            done = subprocess.run([*cmd, "--resume"], env=env, capture_output=True, text=True)
            kills[engine] = {
                "committed_at_kill": kept,
                "resume_seconds": time.perf_counter() - t0,
                "resume_rc": done.returncode,
                "resume_stdout": done.stdout.strip(),
                **check(out, items, args.new_tokens),
            }
    finally:
        for proc, _ in servers.values():
            proc.kill()
        shutil.rmtree(work, ignore_errors=True)
    result = {
        "config": vars(args) | {"out": str(args.out), "model_shape": MODEL.__dict__},
        "versions": {
            "moetrace": moetrace.__version__,
            "numpy": np.__version__,
            "python": platform.python_version(),
            "cpus": os.cpu_count(),
        },
        "unit": "seconds to record all requests through the CLI (process start included)",
        "median": {e: statistics.median(v) for e, v in seconds.items()},
        "min_max": {e: [min(v), max(v)] for e, v in seconds.items()},
        "raw": seconds,
        "checks": checks,
        "kill_and_resume": kills,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    for e, v in seconds.items():
        print(f"{e}: {args.requests} requests at concurrency {args.concurrency}: median "
              f"{statistics.median(v):.1f} s (min {min(v):.1f}, max {max(v):.1f}, {len(v)} runs); "
              f"killed halfway: {kills[e]['committed_at_kill']} committed, after --resume "
              f"{kills[e]['unique']} unique of {kills[e]['requests']} rows-checked requests, "
              f"{kills[e]['mismatched']} mismatched")  # fmt: skip


if __name__ == "__main__":
    main()
