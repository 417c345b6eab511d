"""Modeled: the tuned RAM placement vs RAM as plain LRU over disk, on the shared traces.

For each shared trace (Llama-4-Maverick, DeepSeek-V2-Lite; ``../shared/traces``, imported
on the fly) and each hardware profile: ``moetrace tune --budget B --ram-budget R`` (the
random and time splits chosen on, ``shift`` judged only), then per split the placement
written and RAM as LRU at the same RAM slots on that split's held-out requests
(``expected.placement``). The replays are deterministic (no spread). Prints a table and
writes JSON (config, versions, per trace/profile/split rows).

    python benchmarks/ram_placement.py --out benchmarks/results/ram_placement.json
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path
from typing import Any

from moetrace import __version__
from moetrace.tuner.tune import TuneConfig, tune

sys.path.insert(0, str(Path(__file__).parent))
from plan_quality import TRACES, imported  # noqa: E402  (the shared traces' importer)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--budget", default="12.5%")
    ap.add_argument("--ram-budget", default="25%")
    ap.add_argument("--hardware", default="pcie4-x16,pcie5-x16,h100-pcie")
    ap.add_argument("--granularity", default="pass", choices=("pass", "token"))
    ap.add_argument("--workers", type=int, default=None, help="processes (default: CPUs)")
    ap.add_argument("--traces", type=Path, default=Path("../shared/traces"))
    ap.add_argument("--work", type=Path, default=Path("/tmp/st"))
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/ram_placement.json"))
    args = ap.parse_args()
    traces = {name: imported(name, args.traces, args.work) for name in TRACES}
    out: dict[str, Any] = {
        "config": {k: str(v) for k, v in vars(args).items()},
        "versions": {
            "moetrace": __version__,
            "python": platform.python_version(),
            "machine": platform.machine(),
        },  # fmt: skip
        "runs": [],
    }
    print(f"{'trace':<18} {'hardware':<10} {'split':<7} {'placement':<34} {'tok/s':>7} "
          f"{'RAM LRU':>7} {'ratio':>6} {'RAM hit':>7} {'LRU hit':>7}")  # fmt: skip
    for name, path in traces.items():
        for hw in args.hardware.split(","):
            t0 = time.perf_counter()
            cfg = TuneConfig(args.budget, hardware=hw, granularity=args.granularity,
                             ram_budget=args.ram_budget, judge=("shift",), queue=None,
                             workers=args.workers)  # fmt: skip
            plan = tune([str(path)], cfg, progress=False).plan
            info = plan.expected["placement"]
            run = {"trace": name, "hardware": hw, "seconds": time.perf_counter() - t0,
                   "written": info["written"], "chosen": info["chosen"],
                   "fallback": info["fallback"], "splits": info["splits"],
                   "candidates": info["candidates"]}  # fmt: skip
            out["runs"].append(run)
            for sp in info["splits"]:
                a, b = sp["placement"], sp["lru"]
                print(f"{name[:18]:<18} {hw:<10} {sp['name']:<7} {a['name'][:34]:<34} "
                      f"{a['tokens_per_s']:7.2f} {b['tokens_per_s']:7.2f} "
                      f"{a['tokens_per_s'] / b['tokens_per_s']:6.3f} {a['ram_hit_rate']:7.3f} "
                      f"{b['ram_hit_rate']:7.3f}")  # fmt: skip
            if info["fallback"]:
                print(f"  written: {info['written']} ({info['fallback']['reason']})")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
