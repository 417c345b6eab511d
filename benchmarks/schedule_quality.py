"""Expert-aware scheduling against first come, first served on the shared traces.

For each trace, cache (LRU at 12.5% of the experts by default) and batch size, every
scheduler replays the same requests through the queue model (modeled, so deterministic:
no interleaving needed) under two arrival processes: a backlog (every request waiting at
0) and a Poisson process faster than FCFS serves (a queue that builds up). Printed and
written as JSON: bytes moved and p99 latency relative to FCFS, hit rate, mean waiting
requests (Little's law), the most overtakes, and the replay's wall time.

Rows named for what they are:
- ``fcfs``: first come, first served (what servers do).
- ``affinity``: the shipped scheduler (probe of the first MoE layer's router; the bound).
- ``affinity, probe all layers``: the same with the whole prefill's routing as the probe
  (what a server that prefilled before scheduling would know; the runtime cannot probe
  that deep without loading experts): an upper bound for deeper probes.
- ``affinity, oracle signature``: the request's whole run's experts (prefill and decode):
  an upper bound for any signature with this greedy grouping; no server knows it.

Usage:
    python benchmarks/schedule_quality.py --traces ../shared/traces --out schedule.json
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from plan_quality import TRACES, imported  # noqa: E402


def _oracle_class() -> type:
    from moetrace.tuner.sched.schedulers import ExpertAffinity, register_scheduler

    class OracleAffinity(ExpertAffinity):
        """Affinity on the request's whole-run expert profile (an upper bound)."""

        name = "oracle_affinity"
        defaults: ClassVar[dict[str, float]] = dict(ExpertAffinity.defaults)

        def signature(self, events: Any, first_pass: np.ndarray) -> np.ndarray:
            L, E = events.num_layers, events.num_experts
            reqs = events.request[events.pass_event[first_pass, 0]]
            pos = np.searchsorted(reqs, events.request)
            sig = np.zeros((len(first_pass), L * E))
            ev_of = np.repeat(np.arange(events.num_events), np.diff(events.ptr))
            col = events.layer[ev_of].astype(np.int64) * E + events.experts
            np.add.at(sig, (pos[ev_of], col), events.counts)
            return sig / np.maximum(np.linalg.norm(sig, axis=1, keepdims=True), 1e-12)

    register_scheduler(OracleAffinity)
    return OracleAffinity


def schedulers(L: int) -> list[tuple[str, str, dict[str, float]]]:
    return [
        ("fcfs", "fcfs", {}),
        ("affinity", "affinity", {}),
        ("affinity, max_overtakes=8", "affinity", {"max_overtakes": 8}),
        ("affinity, window 256, max_overtakes=128", "affinity",
         {"window": 256, "max_overtakes": 128}),
        ("affinity, probe all layers (bound)", "affinity", {"probe_layers": L}),
        ("affinity, oracle signature (bound)", "oracle_affinity", {}),
    ]  # fmt: skip


def run(args: argparse.Namespace) -> dict[str, Any]:
    from moetrace.store.hardware import load_hardware
    from moetrace.store.plan import ScheduleConfig
    from moetrace.tuner.sched import simulate_queue
    from moetrace.tuner.sim import make_plan, uniform_layout
    from moetrace.tuner.sim.trace import events_for, load_traces

    _oracle_class()
    hw = load_hardware(args.hardware)
    work = Path(args.work or tempfile.mkdtemp(prefix="moetrace-sched-"))
    results = []
    for name in args.trace:
        _, _, default_gran = TRACES[name]
        path = imported(name, Path(args.traces), work)
        loaded = load_traces([path])
        for gran in args.granularity or [default_gran]:
            ev = events_for(loaded, granularity=gran)
            L, E = ev.num_layers, ev.num_experts
            slots = int(round(L * E * args.budget_pct / 100))
            plan = make_plan(ev, loaded.shape, uniform_layout(slots, L, E), args.policy)
            for B in args.batch:
                fcfs_backlog = simulate_queue(ev, plan, hw, schedule=ScheduleConfig("fcfs", B))
                s0 = fcfs_backlog.summary()
                rate = args.overload * s0["requests"] / max(float(fcfs_backlog.finish.max()), 1e-9)
                for arrivals, r in (("backlog", None), (f"poisson x{args.overload:g}", rate)):
                    rows = []
                    for label, sched, params in schedulers(L):
                        cfg = ScheduleConfig(sched, B, "continuous", params)
                        t0 = time.perf_counter()
                        q = simulate_queue(
                            ev, plan, hw, schedule=cfg, arrival_rate=r, seed=args.seed
                        )
                        wall = time.perf_counter() - t0
                        s = q.summary()
                        rows.append({"name": label, "wall_s": wall, "steps": s["steps"],
                                     **{k: s[k] for k in ("hit_rate", "bytes_moved",
                                        "mean_latency_s", "p99_latency_s", "mean_waiting",
                                        "max_overtaken", "arrivals")}})  # fmt: skip
                    base = rows[0]
                    for row in rows:
                        row["bytes_vs_fcfs"] = row["bytes_moved"] / base["bytes_moved"]
                        row["p99_vs_fcfs"] = row["p99_latency_s"] / base["p99_latency_s"]
                        row["mean_latency_vs_fcfs"] = row["mean_latency_s"] / base["mean_latency_s"]
                    res = {"trace": name, "granularity": gran, "batch_size": B,
                           "arrivals": arrivals, "rate_per_s": r, "requests": s0["requests"],
                           "cache_slots": slots, "policy": args.policy, "rows": rows}  # fmt: skip
                    results.append(res)
                    print_block(res)
    return {
        "config": {k: v for k, v in vars(args).items() if k not in ("out",)},
        "versions": versions(),
        "machine": {"platform": platform.platform(), "python": platform.python_version()},
        "results": results,
    }


def versions() -> dict[str, str]:
    import numba

    import moetrace

    return {"moetrace": moetrace.__version__, "numpy": np.__version__, "numba": numba.__version__}


def print_block(res: dict[str, Any]) -> None:
    print(f"\n{res['trace']} ({res['granularity']}), {res['requests']} requests, "
          f"{res['policy']} {res['cache_slots']} slots, batch {res['batch_size']}, "
          f"{res['arrivals']}" + (f" ({res['rate_per_s']:.3g}/s)" if res["rate_per_s"] else ""))  # fmt: skip
    print(f"  {'scheduler':<42} {'bytes/FCFS':>10} {'p99/FCFS':>9} {'mean/FCFS':>9} {'hit':>6} "
          f"{'waiting':>8} {'overtaken':>9} {'wall s':>7}")  # fmt: skip
    for r in res["rows"]:
        print(f"  {r['name']:<42} {r['bytes_vs_fcfs']:>10.3f} {r['p99_vs_fcfs']:>9.3f} "
              f"{r['mean_latency_vs_fcfs']:>9.3f} {r['hit_rate']:>6.3f} {r['mean_waiting']:>8.1f} "
              f"{r['max_overtaken']:>9} {r['wall_s']:>7.2f}")  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument(
        "--traces", default=str(Path(__file__).resolve().parents[1].parent / "shared" / "traces")
    )
    ap.add_argument("--trace", nargs="+", default=list(TRACES), choices=list(TRACES))
    ap.add_argument("--granularity", nargs="*", choices=["pass", "token"])
    ap.add_argument("--batch", nargs="+", type=int, default=[4, 8, 16])
    ap.add_argument("--budget-pct", type=float, default=12.5)
    ap.add_argument("--policy", default="lru")
    ap.add_argument("--hardware", default="pcie4-x16")
    ap.add_argument(
        "--overload",
        type=float,
        default=1.25,
        help="Poisson rate as a multiple of FCFS's backlog throughput.",
    )
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--work", default=None, help="Folder for the imported traces (reused).")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if not Path(args.traces).is_dir():
        sys.exit(f"no shared traces at {args.traces}")
    data = run(args)
    if args.out:
        Path(args.out).write_text(json.dumps(data, indent=1) + "\n")
        print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
