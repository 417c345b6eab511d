"""``record()``: load a model, run prompts through ``generate`` and write a routing trace."""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from moetrace.errors import ConfigError, ModelError, TraceWriteError
from moetrace.store.schema import SourceInfo
from moetrace.store.writer import TraceWriter
from moetrace.tracer.prompts import Prompt, load_prompts
from moetrace.tracer.recorder import RoutingRecorder, manifest_for

log = logging.getLogger(__name__)

DTYPES = {
    "auto": "auto",
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}


@dataclass(frozen=True)
class RecordConfig:
    """How ``record`` runs the prompts."""

    max_new_tokens: int = 32
    batch_size: int = 1
    device: str = "cpu"
    dtype: str = "auto"
    seed: int = 0
    speculative: bool = False
    resume: bool = False

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ConfigError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.dtype not in DTYPES:
            raise ConfigError(f"dtype must be one of {sorted(DTYPES)}, got {self.dtype!r}")
        try:
            torch.device(self.device)
        except (RuntimeError, TypeError):
            raise ConfigError(f"device {self.device!r} is not a torch device") from None


@dataclass(frozen=True)
class RecordResult:
    """What a ``record`` run did."""

    path: Path
    requests_recorded: int
    requests_skipped: int
    generated_tokens: int
    activations: int
    seconds: float
    interrupted: bool = False

    @property
    def tokens_per_second(self) -> float:
        return self.generated_tokens / self.seconds if self.seconds > 0 else 0.0


def resolve_dtype(dtype: str, device: str) -> Any:
    """The torch dtype to load with: ``auto`` keeps the checkpoint's dtype on accelerators
    and uses float32 on the CPU, where bfloat16/float16 matmuls are many times slower."""
    if dtype != "auto":
        return DTYPES[dtype]
    return torch.float32 if torch.device(device).type == "cpu" else "auto"


def load_model(
    path_or_id: str | os.PathLike[str], *, device: str = "cpu", dtype: str = "auto"
) -> tuple[Any, Any]:
    """A transformers model (causal LM, or seq2seq LM for encoder-decoder configs) and tokenizer."""
    from transformers import (
        AutoConfig,
        AutoModelForCausalLM,
        AutoModelForSeq2SeqLM,
        AutoTokenizer,
    )

    where = str(path_or_id)
    looks_local = os.path.sep in where or where.startswith(".") or Path(where).exists()
    if looks_local and not Path(where).is_dir():
        raise ModelError(f"model path {where} does not exist (or is not a directory)")
    try:
        config = AutoConfig.from_pretrained(where)
        auto = AutoModelForSeq2SeqLM if config.is_encoder_decoder else AutoModelForCausalLM
        model = auto.from_pretrained(where, dtype=resolve_dtype(dtype, device))
        tokenizer = AutoTokenizer.from_pretrained(where)
    except (OSError, ValueError, KeyError) as exc:
        raise ModelError(f"cannot load model {where}: {exc}") from None
    return model.to(device).eval(), tokenizer


def _prepare_out(out: Path, resume: bool) -> None:
    if out.exists() and not out.is_dir():
        raise TraceWriteError(f"{out} exists and is not a trace directory")
    if out.is_dir() and any(out.iterdir()) and not resume:
        raise TraceWriteError(
            f"{out} already holds a trace; pass --resume to add the missing requests to it"
        )


def _next_forward(out: Path) -> int:
    if not (out / "manifest.json").exists():
        return 0
    from moetrace.store.reader import open_trace

    trace = open_trace(out, validate=False)
    if trace.num_activations == 0:
        return 0
    top = trace.sql("SELECT max(forward) AS f FROM activations").column(0)[0].as_py()
    return int(top) + 1


def record(
    model: str | os.PathLike[str] | Any | None = None,
    prompts: str | os.PathLike[str] | Sequence[Prompt | str] | None = None,
    out: str | os.PathLike[str] = "trace",
    *,
    tokenizer: Any | None = None,
    config: RecordConfig | None = None,
    progress: bool = True,
) -> RecordResult:
    """Record the routing of ``prompts`` through ``model`` into the trace ``out``.

    ``model`` is a path / hub id, an already loaded transformers model (then pass
    ``tokenizer``), or None for the demo model shipped with moetrace; ``prompts`` a file
    (JSONL, text, Parquet), a list, or None for the demo prompts. Each batch is committed
    as it finishes, so an interrupted run keeps every finished request; with
    ``config.resume`` requests already in the trace are skipped.
    """
    cfg = config or RecordConfig()
    out = Path(out)
    _prepare_out(out, cfg.resume)
    torch.manual_seed(cfg.seed)
    if model is None or prompts is None:
        from moetrace.tracer import demo

        model = demo.demo_model_path() if model is None else model
        prompts = demo.demo_prompts_path() if prompts is None else prompts
    origin = f"moetrace record {model}" if isinstance(model, (str, os.PathLike)) else "record()"
    if isinstance(model, (str, os.PathLike)):
        model, tokenizer = load_model(model, device=cfg.device, dtype=cfg.dtype)
    elif tokenizer is None:
        raise ModelError("record(): pass tokenizer= together with a loaded model")
    items = _as_prompts(prompts)
    encdec = bool(getattr(model.config, "is_encoder_decoder", False))
    tokenizer.padding_side = "right" if encdec else "left"
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    source = SourceInfo(kind="recorded", origin=origin)
    writer = TraceWriter(out, manifest_for(model, speculative=cfg.speculative, source=source))
    done = writer.existing_request_ids
    todo = [p for p in items if p.id not in done]
    skipped = len(items) - len(todo)
    device = next(model.parameters()).device
    generated = 0
    interrupted = False
    start = time.perf_counter()
    bar = tqdm(total=len(todo), unit="req", file=sys.stderr, disable=not progress)
    try:
        with (
            writer,
            RoutingRecorder(
                model, writer, speculative=cfg.speculative, first_forward=_next_forward(out)
            ) as rec,
        ):
            for i in range(0, len(todo), cfg.batch_size):
                batch = todo[i : i + cfg.batch_size]
                enc = tokenizer([p.text for p in batch], return_tensors="pt", padding=True)
                ids = enc["input_ids"].to(device)
                mask = enc["attention_mask"].to(device)
                with torch.no_grad():
                    rec.generate(
                        [p.id for p in batch],
                        ids,
                        mask,
                        prompt_texts=[p.text for p in batch],
                        tags=[p.tags for p in batch],
                        max_new_tokens=cfg.max_new_tokens,
                        do_sample=False,
                        pad_token_id=tokenizer.pad_token_id,
                    )
                writer.flush()
                generated += rec.last_generated
                bar.update(len(batch))
                bar.set_postfix(tok_s=f"{generated / (time.perf_counter() - start):.1f}")
    except KeyboardInterrupt:
        interrupted = True
        log.warning("interrupted: every finished request is committed in %s", out)
    finally:
        bar.close()
    return RecordResult(
        path=out,
        requests_recorded=writer.requests_written,
        requests_skipped=skipped,
        generated_tokens=generated,
        activations=writer.rows_written,
        seconds=time.perf_counter() - start,
        interrupted=interrupted,
    )


def _as_prompts(prompts: str | os.PathLike[str] | Sequence[Prompt | str]) -> list[Prompt]:
    if isinstance(prompts, (str, os.PathLike)):
        return load_prompts(prompts)
    return [p if isinstance(p, Prompt) else Prompt(f"p{i}", str(p)) for i, p in enumerate(prompts)]
