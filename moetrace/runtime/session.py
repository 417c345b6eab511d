"""One-call entry points for the CLI: open a model under a plan, generate, parse budgets."""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from moetrace.devices import check_device
from moetrace.errors import ModelError
from moetrace.runtime.engine import OffloadEngine
from moetrace.runtime.expert_store import is_store
from moetrace.store.plan import Plan, load_plan


def resolve_model(model: str | os.PathLike[str] | None) -> Path:
    """The model folder (or expert store) to run; the demo model when ``model`` is None."""
    if model is None:
        from moetrace.tracer.demo import demo_model_path

        return demo_model_path()
    path = Path(model)
    if not path.is_dir():
        raise ModelError(f"{path}: not a model folder or expert store")
    return path


def open_engine(
    model: str | os.PathLike[str] | None,
    plan: str | os.PathLike[str] | Plan | None,
    *,
    budget_bytes: int | str | None = None,
    device: str = "cpu",
    dtype: str | None = None,
    **kw: Any,
) -> tuple[OffloadEngine, Any]:
    """An engine for a model folder (experts in host memory) or an expert store (on disk),
    plus the tokenizer found beside it (None when there is none).

    ``dtype`` (``"float32"``, ``"bfloat16"``...) defaults as in ``moetrace record``
    (float32 on the CPU, the checkpoint's dtype elsewhere), so a plan tuned on a recorded
    trace fits its experts.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from moetrace.tracer.record import resolve_dtype

    check_device(device)
    path = resolve_model(model)
    the_plan = load_plan(plan) if isinstance(plan, (str, os.PathLike)) else plan
    if is_store(path):
        engine = OffloadEngine.from_store(
            str(path), the_plan, device=device, budget_bytes=budget_bytes, **kw
        )
    else:
        try:
            kwargs = {"dtype": resolve_dtype(dtype or "auto", device)}
            hf = AutoModelForCausalLM.from_pretrained(path, **kwargs).eval()
        except (OSError, ValueError) as exc:
            raise ModelError(f"{path}: cannot load model ({exc})") from None
        engine = OffloadEngine.from_model(
            hf, the_plan, device=device, budget_bytes=budget_bytes, **kw
        )
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError, TypeError):
        tokenizer = None
    return engine, tokenizer


@dataclass(frozen=True)
class Generation:
    """Texts generated for prompts, with wall time and generated token count."""

    texts: tuple[str, ...]
    new_tokens: int
    seconds: float

    @property
    def tokens_per_second(self) -> float:
        return self.new_tokens / self.seconds if self.seconds > 0 else 0.0


@contextlib.contextmanager
def recording(engine: OffloadEngine, trace_dir: str | os.PathLike[str] | None) -> Iterator[Any]:
    """A tracer recording the engine's model into ``trace_dir`` (with the speculative
    columns when the plan prefetches speculatively), or None without a folder."""
    if trace_dir is None:
        yield None
        return
    from moetrace.tracer.recorder import RoutingRecorder

    speculative = engine.plan.prefetch.name == "speculative"
    with RoutingRecorder(engine.model, trace_dir, speculative=speculative) as recorder:
        yield recorder


def generate(
    engine: OffloadEngine,
    tokenizer: Any,
    prompts: Sequence[str],
    max_new_tokens: int = 32,
    *,
    trace_dir: str | os.PathLike[str] | None = None,
) -> Generation:
    """Greedy generation of each prompt in turn (batch 1).

    With ``trace_dir`` the run's own routing is recorded there with the tracer (request
    ids ``run-0``, ``run-1``...), so it can be replayed through the simulator; with the
    speculative columns when the plan prefetches speculatively.
    """
    if tokenizer is None:
        raise ModelError("the model has no tokenizer; cannot run text prompts")
    with recording(engine, trace_dir) as recorder:
        texts, new, t0 = [], 0, time.perf_counter()
        for i, prompt in enumerate(prompts):
            enc = tokenizer(prompt, return_tensors="pt").to(engine.device)
            with torch.no_grad():
                if recorder is not None:
                    out = recorder.generate(
                        [f"run-{i}"],
                        enc["input_ids"],
                        enc.get("attention_mask"),
                        prompt_texts=[prompt],
                        max_new_tokens=max_new_tokens,
                        do_sample=False,
                    )
                else:
                    out = engine.model.generate(
                        **enc,
                        max_new_tokens=max_new_tokens,
                        do_sample=False,
                        pad_token_id=tokenizer.pad_token_id or 0,
                    )
            gen = out[0, enc["input_ids"].shape[1] :]
            new += int(gen.shape[0])
            texts.append(tokenizer.decode(gen, skip_special_tokens=True))
    return Generation(tuple(texts), new, time.perf_counter() - t0)
