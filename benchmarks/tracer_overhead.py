"""Tracer overhead: generate() tokens/s with tracing off vs on (and speculative), interleaved.

Runs off, on, on+speculative, off, on, ... (``--reps`` rounds) for batch sizes 1 and 8, on
the demo model (when shipped) and on a mid-size random config (qwen3_moe, hidden 1024,
8 layers, 32 experts, top-4). Greedy decoding with a fixed number of new tokens, so every
run does the same work. Prints a summary and writes JSON (config, versions, medians,
spread, raw samples).

    python benchmarks/tracer_overhead.py --out benchmarks/results/tracer_overhead.json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import transformers

import moetrace
from moetrace.store.writer import TraceWriter
from moetrace.tracer.recorder import RoutingRecorder, manifest_for

MODES = ("off", "on", "speculative")


class TimedRecorder(RoutingRecorder):
    """A RoutingRecorder summing the wall time of its hooks and its host-side drain.

    ``bookkeeping_seconds`` is the rest of its own work around ``model.generate``:
    ``set_batch`` and ``end_request`` (beginning requests and handing rows to the writer)
    without the drain they trigger.
    """

    hook_seconds = 0.0
    drain_seconds = 0.0
    bookkeeping_seconds = 0.0

    def _outer(self, fn: Any, *a: Any) -> Any:
        t0, drained = time.perf_counter(), self.drain_seconds
        try:
            return fn(*a)
        finally:
            spent = time.perf_counter() - t0
            self.bookkeeping_seconds += spent - (self.drain_seconds - drained)

    def set_batch(self, request_ids: Any) -> None:
        self._outer(super().set_batch, request_ids)

    def end_request(self, record: Any) -> None:
        self._outer(super().end_request, record)

    def _timed(self, fn: Any) -> Any:
        def wrapper(*a: Any, **kw: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                self.hook_seconds += time.perf_counter() - t0

        return wrapper

    def _stack_pre(self, si: int, stack: Any) -> Any:
        return self._timed(super()._stack_pre(si, stack))

    def _sink(self, local: int) -> Any:
        return self._timed(super()._sink(local))

    def _spec_hook(self, local: int, nxt: Any, next_layer: Any) -> Any:
        return self._timed(super()._spec_hook(local, nxt, next_layer))

    def _stack_post(self, mod: Any, args: Any, out: Any) -> None:
        t0 = time.perf_counter()
        try:
            super()._stack_post(mod, args, out)
        finally:
            self.hook_seconds += time.perf_counter() - t0

    def _drain(self) -> None:  # the deferred host-side work counts too
        t0 = time.perf_counter()
        try:
            super()._drain()
        finally:
            spent = time.perf_counter() - t0
            self.hook_seconds += spent
            self.drain_seconds += spent


def mid_size_model() -> Any:
    config = transformers.Qwen3MoeConfig(
        vocab_size=8192,
        hidden_size=1024,
        intermediate_size=2048,
        moe_intermediate_size=512,
        num_hidden_layers=8,
        num_attention_heads=16,
        num_key_value_heads=4,
        head_dim=64,
        num_experts=32,
        num_experts_per_tok=4,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=2,
    )
    torch.manual_seed(0)
    return transformers.Qwen3MoeForCausalLM(config).eval()


def demo_model() -> Any | None:
    try:
        from moetrace.tracer import demo

        model, _ = demo.load_demo_model()
        return model.eval()
    except Exception as exc:  # the demo model may not be shipped yet
        print(f"demo model skipped: {type(exc).__name__}: {exc}")
        return None


def one_run(
    model: Any, ids: torch.Tensor, new_tokens: int, rec: RoutingRecorder | None, tag: str
) -> tuple[float, float, float]:
    kwargs = dict(
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        do_sample=False,
        pad_token_id=0,
    )
    mask = torch.ones_like(ids)
    t0 = time.perf_counter()
    with torch.no_grad():
        if rec is None:
            model.generate(input_ids=ids, attention_mask=mask, **kwargs)
        else:
            rec.generate([f"{tag}-{i}" for i in range(ids.shape[0])], ids, mask, **kwargs)
    seconds = time.perf_counter() - t0
    hooks = rec.hook_seconds if rec is not None else 0.0
    rest = rec.bookkeeping_seconds if rec is not None else 0.0
    return ids.shape[0] * new_tokens / seconds, hooks / seconds, (hooks + rest) / seconds


def bench_model(name: str, model: Any, args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    out: dict[str, Any] = {}
    vocab = model.config.vocab_size
    for batch in args.batch_sizes:
        gen = torch.Generator().manual_seed(batch)
        ids = torch.randint(3, vocab, (batch, args.prompt_len), generator=gen)
        writers = {
            m: TraceWriter(
                tmp / f"{name}-b{batch}-{m}", manifest_for(model, speculative=m == "speculative")
            )
            for m in MODES[1:]
        }
        one_run(model, ids, 2, None, "warm")  # warm-up
        samples: dict[str, list[float]] = {m: [] for m in MODES}
        hook_share: dict[str, list[float]] = {m: [] for m in MODES[1:]}
        recorder_share: dict[str, list[float]] = {m: [] for m in MODES[1:]}
        for rep in range(args.reps):
            for mode in MODES:
                if mode == "off":
                    samples[mode].append(one_run(model, ids, args.new_tokens, None, "")[0])
                    continue
                spec = mode == "speculative"
                with TimedRecorder(model, writers[mode], speculative=spec) as rec:
                    tps, share, total = one_run(model, ids, args.new_tokens, rec, f"r{rep}")
                samples[mode].append(tps)
                hook_share[mode].append(share)
                recorder_share[mode].append(total)
        for w in writers.values():
            w.close()
        med = {m: statistics.median(v) for m, v in samples.items()}
        # per-round paired overhead (on vs the off run of the same round)
        paired = {
            m: [1 - on / off for on, off in zip(samples[m], samples["off"], strict=True)]
            for m in MODES[1:]
        }
        out[f"batch{batch}"] = {
            "tokens_per_s_median": med,
            "tokens_per_s_raw": samples,
            "overhead_median": {m: 1 - med[m] / med["off"] for m in MODES[1:]},
            "overhead_paired_median": {m: statistics.median(v) for m, v in paired.items()},
            "hook_time_share_median": {m: statistics.median(v) for m, v in hook_share.items()},
            "hook_time_share_raw": hook_share,
            "hook_time_share_iqr": {
                m: [float(np.percentile(v, 25)), float(np.percentile(v, 75))]
                for m, v in hook_share.items()
            },
            "recorder_time_share_median": {
                m: statistics.median(v) for m, v in recorder_share.items()
            },
            "recorder_time_share_raw": recorder_share,
            "overhead_paired_iqr": {
                m: [float(np.percentile(v, 25)), float(np.percentile(v, 75))]
                for m, v in paired.items()
            },
        }
        r = out[f"batch{batch}"]
        print(
            f"{name:10s} batch {batch}: off {med['off']:.1f} tok/s, "
            f"on {med['on']:.1f} ({100 * r['overhead_paired_median']['on']:+.2f}% "
            f"IQR {100 * r['overhead_paired_iqr']['on'][0]:+.2f}..{100 * r['overhead_paired_iqr']['on'][1]:+.2f}), "
            f"speculative {med['speculative']:.1f} "
            f"({100 * r['overhead_paired_median']['speculative']:+.2f}%); time inside hooks: "
            f"on {100 * r['hook_time_share_median']['on']:.2f}%, "
            f"speculative {100 * r['hook_time_share_median']['speculative']:.2f}%; "
            f"with set_batch/end_request: on {100 * r['recorder_time_share_median']['on']:.2f}%"
        )
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="benchmarks/results/tracer_overhead.json")
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--models", nargs="+", default=["demo", "mid"])
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    results: dict[str, Any] = {
        "config": vars(args),
        "versions": {
            "moetrace": moetrace.__version__,
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "python": platform.python_version(),
            "machine": platform.machine(),
            "processor": platform.processor(),
        },
        "models": {},
    }
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            model = demo_model() if name == "demo" else mid_size_model()
            if model is None:
                results["models"][name] = {"skipped": "demo model not available"}
                continue
            results["models"][name] = bench_model(name, model, args, Path(tmp))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
