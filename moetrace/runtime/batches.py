"""Run waiting prompts in the order and batches of a plan's schedule.

Every prompt is waiting when the run starts. Each prompt is probed once
(:meth:`OffloadEngine.probe`: the first MoE layer's router on the prompt, no expert
loaded), then batches are admitted through the same :class:`moetrace.tuner.sched.queue.
Admissions` as the simulator's queue model and run with ``generate`` on a left-padded
batch until all their rows finish (static batching; a plan tuned for continuous batching
is run that way too, which the log says).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from moetrace.errors import ModelError, RuntimeEngineError
from moetrace.runtime.engine import OffloadEngine
from moetrace.runtime.session import recording
from moetrace.store.plan import ScheduleConfig
from moetrace.tuner.sched.queue import Admissions
from moetrace.tuner.sched.schedulers import get_scheduler

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BatchedGeneration:
    """Texts (in prompt order), totals, and what happened to each request and batch."""

    texts: tuple[str, ...]
    new_tokens: int
    seconds: float
    requests: tuple[dict[str, Any], ...]
    batches: tuple[dict[str, Any], ...]
    schedule: ScheduleConfig

    @property
    def tokens_per_second(self) -> float:
        return self.new_tokens / self.seconds if self.seconds > 0 else 0.0

    def to_json(self) -> dict[str, Any]:
        s = self.schedule
        return {
            "schedule": {
                "scheduler": s.scheduler,
                "params": dict(s.params),
                "batch_size": s.batch_size,
                "batching": "static",
            },  # fmt: skip
            "seconds": self.seconds,
            "new_tokens": self.new_tokens,
            "requests": list(self.requests),
            "batches": list(self.batches),
        }


def unit_rows(counts: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length (zero rows stay zero), as the simulator's signatures."""
    counts = np.asarray(counts, np.float64)
    norm = np.linalg.norm(counts, axis=1, keepdims=True)
    return np.divide(counts, norm, out=np.zeros_like(counts), where=norm > 0)


def generate_scheduled(
    engine: OffloadEngine,
    tokenizer: Any,
    prompts: Sequence[str],
    max_new_tokens: int = 32,
    *,
    schedule: ScheduleConfig | None = None,
    trace_dir: str | os.PathLike[str] | None = None,
) -> BatchedGeneration:
    """Greedy generation of ``prompts`` in batches of ``schedule`` (default: the plan's).
    With ``trace_dir`` the run's routing is recorded (request ``run-<prompt index>``)."""
    if tokenizer is None:
        raise ModelError("the model has no tokenizer; cannot run text prompts")
    sched = schedule or engine.plan.schedule
    scheduler = get_scheduler(sched)
    if scheduler.probe_layers != 1:
        raise RuntimeEngineError(
            f"the runtime probes the first MoE layer only; the schedule asks for "
            f"probe_layers={scheduler.probe_layers}"
        )
    if sched.batching != "static":
        log.info("running batches of up to %d statically (the plan says %s)",
                 sched.batch_size, sched.batching)  # fmt: skip
    dev = engine.device
    counts = []
    for p in prompts:
        enc = tokenizer(p, return_tensors="pt").to(dev)
        counts.append(engine.probe(enc["input_ids"], enc.get("attention_mask")))
    adm = Admissions(scheduler, unit_rows(np.asarray(counts)), np.zeros(len(prompts)))
    adm.waiting = list(range(len(prompts)))
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    texts: list[str] = [""] * len(prompts)
    requests: list[dict[str, Any]] = [{} for _ in prompts]
    batches: list[dict[str, Any]] = []
    new_total = 0
    t0 = time.perf_counter()
    try:
        with recording(engine, trace_dir) as recorder:
            while adm.waiting:
                start = time.perf_counter() - t0
                batch = adm.admit(start, [], sched.batch_size)
                before = engine.stats.summary()
                enc = tokenizer([prompts[i] for i in batch], return_tensors="pt",
                                padding=True).to(dev)  # fmt: skip
                kw = {"max_new_tokens": max_new_tokens, "do_sample": False,
                      "pad_token_id": tokenizer.pad_token_id}  # fmt: skip
                with torch.no_grad():
                    if recorder is not None:
                        out = recorder.generate([f"run-{i}" for i in batch], enc["input_ids"],
                                                enc.get("attention_mask"),
                                                prompt_texts=[prompts[i] for i in batch], **kw)  # fmt: skip
                    else:
                        out = engine.model.generate(**enc, **kw)
                end = time.perf_counter() - t0
                after = engine.stats.summary()
                width = enc["input_ids"].shape[1]
                for row, i in enumerate(batch):
                    gen = _generated(out[row, width:], tokenizer)
                    texts[i] = tokenizer.decode(gen, skip_special_tokens=True)
                    new_total += int(gen.shape[0])
                    requests[i] = {"prompt": i, "batch": len(batches), "start_s": start,
                                   "end_s": end, "new_tokens": int(gen.shape[0])}  # fmt: skip
                acc = after["accesses"] - before["accesses"]
                hits = after["hits"] - before["hits"]
                batches.append({"requests": list(batch), "start_s": start, "end_s": end,
                                "accesses": int(acc), "hit_rate": hits / acc if acc else 0.0,
                                "misses": int(after["misses"] - before["misses"])})  # fmt: skip
    finally:
        tokenizer.padding_side = side
    seconds = time.perf_counter() - t0
    return BatchedGeneration(tuple(texts), new_total, seconds, tuple(requests), tuple(batches),
                             sched)  # fmt: skip


def _generated(row: torch.Tensor, tokenizer: Any) -> torch.Tensor:
    """A batch row's new tokens up to and including its first end-of-sequence (the rest
    is padding)."""
    eos = tokenizer.eos_token_id
    if eos is None:
        return row
    hit = (row == eos).nonzero()
    return row[: int(hit[0, 0]) + 1] if len(hit) else row
