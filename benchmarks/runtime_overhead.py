"""Engine overhead: the plain model vs the offloading engine with every expert resident.

Greedy generation of the same prompts with a fixed number of new tokens, interleaved
(plain, engine, plain, engine, ...) on two copies of the demo model (one plain, one
attached to an engine with every expert resident), so machine drift hits both alike.
Prints a summary and writes JSON (config, versions, medians, spread, raw samples).

    python benchmarks/runtime_overhead.py --out benchmarks/results/runtime_overhead.json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch
import transformers

import moetrace
from moetrace.runtime import OffloadEngine
from moetrace.tracer.demo import load_demo_model
from moetrace.tracer.prompts import load_prompts


def _generate(model: torch.nn.Module, tok: object, prompts: list[str], new: int) -> float:
    n, t0 = 0, time.perf_counter()
    for p in prompts:
        enc = tok(p, return_tensors="pt")  # type: ignore[operator]
        with torch.no_grad():
            out = model.generate(**enc, max_new_tokens=new, min_new_tokens=new, do_sample=False)
        n += out.shape[1] - enc["input_ids"].shape[1]
    return n / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--prompts", type=int, default=6)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/runtime_overhead.json"))
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from moetrace.tracer.demo import demo_prompts_path

    prompts = [p.text for p in load_prompts(demo_prompts_path())][: args.prompts]
    plain, tok = load_demo_model(device="cpu")
    offloaded, _ = load_demo_model(device="cpu")
    engine = OffloadEngine.from_model(offloaded.eval(), None)  # every expert resident
    models = {"plain": plain.eval(), "engine_all_resident": offloaded}
    for m in models.values():
        _generate(m, tok, prompts[:1], 4)  # warm-up
    samples: dict[str, list[float]] = {k: [] for k in models}
    for _ in range(args.reps):
        for name, m in models.items():
            samples[name].append(_generate(m, tok, prompts, args.new_tokens))
    engine.close()
    med = {k: statistics.median(v) for k, v in samples.items()}
    ratio = [e / p for p, e in zip(samples["plain"], samples["engine_all_resident"], strict=True)]
    result = {
        "config": vars(args) | {"out": str(args.out), "model": "demo", "device": "cpu"},
        "versions": {
            "moetrace": moetrace.__version__,
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "python": platform.python_version(),
            "threads": torch.get_num_threads(),
        },
        "unit": "generated tokens per second",
        "median": med,
        "min_max": {k: [min(v), max(v)] for k, v in samples.items()},
        "engine_over_plain_median": statistics.median(ratio),
        "engine_over_plain_min_max": [min(ratio), max(ratio)],
        "raw": samples,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(
        f"plain {med['plain']:.1f} tok/s, engine (all resident) "
        f"{med['engine_all_resident']:.1f} tok/s: ratio {statistics.median(ratio):.3f} "
        f"(min {min(ratio):.3f}, max {max(ratio):.3f}) over {args.reps} interleaved pairs"
    )


if __name__ == "__main__":
    main()
