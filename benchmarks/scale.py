"""analyze and tune at fleet scale: serial, a local pool and Ray, side by side.

A synthetic fleet trace (``benchmarks/fleet_trace.py``: fitted to the shared
DeepSeek-V2-Lite trace, >= 300M expert selections over several server folders) is
analyzed as one workload by fresh ``moetrace analyze`` processes with 1 worker, a pool of
2 and a local Ray cluster of 2, interleaved per round (A B C A B C ...). ``tune`` runs
the same way on a smaller fleet (``--tune-selections``; tuning replays every candidate
policy on the whole workload, so a fleet's day is tuned on a sample of it). Wall time
is measured around each process; peak memory is the largest sum of the proportional set
sizes (PSS: shared pages counted once) of the process and all its descendants (pool
workers, Ray's processes and object store), sampled from /proc every 0.2 s; the analyze
report's own section timings are kept too. From the measured throughput, a table of what a day of a fleet costs
on N cores. Printed and written as JSON: config, versions, medians, raw samples.

Usage:
    python benchmarks/scale.py --real /tmp/st/deepseek-v2-lite --work /tmp/fleet-bench \\
        --out benchmarks/results/scale.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

FLEET_DAY = {"servers": 100, "tokens_per_s": 1000, "moe_layers": 26, "top_k": 6}
VARIANTS = {"serial": ["--workers", "1"], "pool-2": ["--workers", "2"],
            "ray-2": ["--workers", "2", "--ray", "local"]}  # fmt: skip


def tree_pss(pid: int) -> int:
    """Proportional set size of ``pid`` and every descendant (Linux /proc): pages shared
    between them (a forked pool's copy-on-write pages, Ray's shared-memory object store)
    count once, split among the processes that map them; VmRSS where PSS is unreadable."""
    parent: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as fh:
                fields = fh.read().rsplit(")", 1)[1].split()
            parent[int(entry)] = int(fields[1])
        except (OSError, IndexError, ValueError):
            continue
    family, frontier = {pid}, [pid]
    while frontier:
        p = frontier.pop()
        for child, pp in parent.items():
            if pp == p and child not in family:
                family.add(child)
                frontier.append(child)
    total = 0
    for p in family:
        for name, key in ((f"/proc/{p}/smaps_rollup", "Pss:"), (f"/proc/{p}/status", "VmRSS:")):
            try:
                with open(name) as fh:
                    kb = next((int(x.split()[1]) for x in fh if x.startswith(key)), None)
            except OSError:
                kb = None
            if kb is not None:
                total += kb * 1024
                break
    return total


def measured(cmd: list[str]) -> dict[str, Any]:
    """Run ``cmd``; its wall seconds and the peak resident bytes of its process tree."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peak = [0]

    def sample() -> None:
        while proc.poll() is None:
            peak[0] = max(peak[0], tree_pss(proc.pid))
            time.sleep(0.2)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    out, err = proc.communicate()
    seconds = time.perf_counter() - t0
    th.join()
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{err[-3000:]}")
    return {"seconds": seconds, "peak_bytes": peak[0], "stdout_tail": out[-400:]}


def fleet(real: Path, out: Path, selections: float, servers: int, seed: int) -> Path:
    if not (out / "fleet_summary.json").exists():
        import fleet_trace

        fleet_trace.main(["--real", str(real), "--out", str(out), "--selections",
                          str(int(selections)), "--servers", str(servers), "--seed", str(seed)])  # fmt: skip
    return out


def versions() -> dict[str, str]:
    import duckdb
    import numba
    import numpy
    import pyarrow

    import moetrace

    out = {"python": platform.python_version(), "moetrace": moetrace.__version__,
           "numpy": numpy.__version__, "numba": numba.__version__,
           "pyarrow": pyarrow.__version__, "duckdb": duckdb.__version__}  # fmt: skip
    try:
        import ray

        out["ray"] = ray.__version__
    except ImportError:
        out["ray"] = "absent"
    return out


def median_spread(xs: list[float]) -> dict[str, float]:
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs)}


def day_table(per_core: float, parallel_share: float, cores: list[int]) -> list[dict]:
    """Hours for a day of the fleet on N cores: the measured single-core rate, the
    parallel share of the work scaling with N (Amdahl), the rest on one core."""
    day = (FLEET_DAY["servers"] * FLEET_DAY["tokens_per_s"] * 86_400
           * FLEET_DAY["moe_layers"] * FLEET_DAY["top_k"])  # fmt: skip
    one_core = day / per_core
    return [
        {"cores": n, "hours": one_core * ((1 - parallel_share) + parallel_share / n) / 3600}
        for n in cores
    ]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--real", required=True, help="the imported shared DeepSeek-V2-Lite trace")
    ap.add_argument("--work", required=True, help="folder for the generated fleets")
    ap.add_argument("--selections", type=float, default=300e6)
    ap.add_argument("--servers", type=int, default=4)
    ap.add_argument("--tune-selections", type=float, default=5e6)
    ap.add_argument("--budget", default="12.5%")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--tune-rounds", type=int, default=1)
    ap.add_argument("--skip-ray", action="store_true")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    work = Path(args.work)
    big = fleet(Path(args.real), work / "fleet", args.selections, args.servers, 0)
    small = fleet(Path(args.real), work / "fleet-tune", args.tune_selections, 2, 1)
    selections = json.loads((big / "fleet_summary.json").read_text())["selections"]
    tune_sel = json.loads((small / "fleet_summary.json").read_text())["selections"]
    variants = {k: v for k, v in VARIANTS.items() if not (args.skip_ray and "ray" in k)}
    moetrace = [sys.executable, "-m", "moetrace"]
    samples: dict[str, dict[str, list[dict]]] = {"analyze": {}, "tune": {}}
    for job, rounds in (("analyze", args.rounds), ("tune", args.tune_rounds)):
        for r in range(rounds):
            for name, extra in variants.items():
                report = work / f"report-{name}-{r}.json"
                if job == "analyze":
                    cmd = [*moetrace, "analyze", str(big / "server-*"), "--json", str(report),
                           *extra]  # fmt: skip
                else:
                    plan = work / f"plan-{name}-{r}.json"
                    cmd = [*moetrace, "tune", str(small / "server-*"), "--budget", args.budget,
                           "--granularity", "token", "--out", str(plan), *extra]  # fmt: skip
                run = measured(cmd)
                if job == "analyze":
                    run["timings"] = json.loads(report.read_text())["timings"]
                samples[job].setdefault(name, []).append(run)
                print(f"{job} {name} round {r}: {run['seconds']:.1f} s, "
                      f"peak {run['peak_bytes'] / 1e9:.2f} GB", flush=True)  # fmt: skip
    summary: dict[str, Any] = {}
    for job, n_sel in (("analyze", selections), ("tune", tune_sel)):
        summary[job] = {}
        for name, runs in samples[job].items():
            secs = [x["seconds"] for x in runs]
            summary[job][name] = {
                "seconds": median_spread(secs),
                "peak_gb": median_spread([x["peak_bytes"] / 1e9 for x in runs]),
                "selections_per_s": n_sel / statistics.median(secs),
            }
    tables = {}
    for job in ("analyze", "tune"):
        one = summary[job]["serial"]["seconds"]["median"]
        two = summary[job]["pool-2"]["seconds"]["median"]
        n_sel = selections if job == "analyze" else tune_sel
        share = min(1.0, max(0.0, 2 * (1 - two / one)))  # Amdahl with 2 workers
        tables[job] = {"per_core_selections_per_s": n_sel / one, "parallel_share": share,
                       "rows": day_table(n_sel / one, share, [1, 2, 16, 64, 256, 1024])}  # fmt: skip
    result = {
        "config": vars(args)
        | {
            "selections": selections,
            "tune_selections": tune_sel,
            "machine": f"{os.cpu_count()} CPUs",
            "fleet_day": FLEET_DAY,
        },  # fmt: skip
        "versions": versions(),
        "summary": summary,
        "fleet_day_tables": tables,
        "samples": {
            j: {
                n: [{k: v for k, v in x.items() if k != "stdout_tail"} for x in runs]
                for n, runs in s.items()
            }
            for j, s in samples.items()
        },  # fmt: skip
    }
    print(json.dumps(result["summary"], indent=2))
    print(json.dumps(tables, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
