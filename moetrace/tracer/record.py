"""``record()``: load a model, run prompts through ``generate`` and write a routing trace."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from moetrace.devices import check_device
from moetrace.errors import ConfigError, ModelError, PromptsError, TraceWriteError
from moetrace.progress import OnProgress, Progress, default_interval
from moetrace.store.location import require_local
from moetrace.store.schema import MANIFEST_NAME, Manifest, SourceInfo
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


def prepare_out(out: Path, resume: bool) -> None:
    """Refuse an OUT that is a file, or that holds a trace when not resuming."""
    if out.exists() and not out.is_dir():
        raise TraceWriteError(f"{out} exists and is not a trace directory")
    if out.is_dir() and any(out.iterdir()) and not resume:
        raise TraceWriteError(
            f"{out} already holds a trace; pass --resume to add the missing requests to it"
        )


SETTINGS_TAG_PREFIX = "record."
"""Manifest tags ``record.<name>`` hold the generation settings a trace was recorded with."""


def generation_settings(cfg: RecordConfig, model: Any) -> dict[str, str]:
    """The settings that shape what ``record`` writes, as manifest tag values.

    ``batch_size`` is one of them: it decides which requests share a forward pass (the
    ``forward`` column) and, through padding, the numerics of each pass. ``seed`` only
    matters when sampling, and ``record`` decodes greedily.
    """
    dtype = next((p.dtype for p in model.parameters()), torch.float32)
    return {
        "max_new_tokens": str(cfg.max_new_tokens),
        "batch_size": str(cfg.batch_size),
        "decoding": "greedy",
        "seed": str(cfg.seed),
        "dtype": str(dtype).removeprefix("torch."),
        "speculative": str(cfg.speculative).lower(),
    }


def check_resume_settings(out: Path, manifest: Manifest, settings: Mapping[str, str]) -> None:
    """Refuse (ConfigError) to add to a trace recorded with other generation settings.

    A trace written before the settings were stored is only checked for what its
    manifest says (speculative); the rest is logged as unchecked.
    """
    n = len(SETTINGS_TAG_PREFIX)
    old = {k[n:]: v for k, v in manifest.tags.items() if k.startswith(SETTINGS_TAG_PREFIX)}
    old.setdefault("speculative", str(manifest.speculative).lower())
    unknown = [k for k in settings if k not in old]
    if unknown:
        log.warning(
            "%s does not record the %s it was recorded with; resuming without checking them",
            out,
            ", ".join(unknown),
        )
    ignored = {"seed"} if old.get("decoding") == settings.get("decoding") == "greedy" else set()
    diffs = [
        f"{k}: {old[k]} in the trace, {v} now"
        for k, v in settings.items()
        if k in old and k not in ignored and old[k] != v
    ]
    if diffs:
        raise ConfigError(
            f"{out}: cannot resume with other generation settings than the trace was "
            f"recorded with ({'; '.join(diffs)}); use the trace's settings or a new output "
            "directory"
        )


def max_positions(config: Any) -> int | None:
    """``max_position_embeddings`` of the model's config or its text config, if any."""
    configs = [config]
    if hasattr(config, "get_text_config"):
        configs.append(config.get_text_config())
    for c in configs:
        value = getattr(c, "max_position_embeddings", None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def check_prompt_lengths(
    prompts: Sequence[Prompt], tokenizer: Any, model_config: Any, max_new_tokens: int
) -> None:
    """Refuse prompts that tokenize to nothing or do not fit the model's positions.

    Decoder-only models need prompt tokens + ``max_new_tokens`` <= max positions;
    encoder-decoder models prompt tokens <= max positions and ``max_new_tokens`` <= max
    positions (the decoder's). Raises PromptsError naming the first bad prompt's file:line
    and id, ConfigError when ``max_new_tokens`` alone does not fit.
    """
    limit = max_positions(model_config)
    encdec = bool(getattr(model_config, "is_encoder_decoder", False))
    if limit is not None and (max_new_tokens > limit if encdec else max_new_tokens >= limit):
        raise ConfigError(
            f"max_new_tokens {max_new_tokens} does not fit the model's {limit} positions "
            "(max_position_embeddings) with any prompt"
        )
    if not prompts:
        return
    counts = [len(ids) for ids in tokenizer([p.text for p in prompts])["input_ids"]]
    empty = [p for p, n in zip(prompts, counts, strict=True) if n == 0]
    if empty:
        raise PromptsError(f"{empty[0].describe()}: the prompt tokenizes to 0 tokens")
    if limit is None:
        log.debug("the model's config has no max_position_embeddings; prompt lengths unchecked")
        return
    extra = 0 if encdec else max_new_tokens
    long = [(p, n) for p, n in zip(prompts, counts, strict=True) if n + extra > limit]
    if long:
        p, n = long[0]
        need = (
            f"{n} prompt tokens"
            if encdec
            else f"{n} prompt tokens + max_new_tokens {max_new_tokens} = {n + max_new_tokens}"
        )
        more = f" ({len(long) - 1} more prompt(s) too long)" if len(long) > 1 else ""
        raise PromptsError(
            f"{p.describe()}: {need} exceeds the model's {limit} positions "
            f"(max_position_embeddings){more}"
        )


def next_forward(out: Path) -> int:
    """The ``forward`` number the next pass written into the trace at OUT gets."""
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
    on_progress: OnProgress | None = None,
) -> RecordResult:
    """Record the routing of ``prompts`` through ``model`` into the trace ``out``.

    ``model`` is a path / hub id, an already loaded transformers model (then pass
    ``tokenizer``), or None for the demo model shipped with moetrace; ``prompts`` a file
    (JSONL, text, Parquet), a list, or None for the demo prompts. Each batch is committed
    as it finishes, so an interrupted run keeps every finished request; with
    ``config.resume`` requests already in the trace are skipped.

    Everything is checked before the trace is touched: prompts (none empty, each fits
    the model's positions with ``max_new_tokens``) and, on resume, that the trace was
    recorded with the same generation settings (stored in its manifest tags
    ``record.*``).

    ``progress``: a tqdm bar when stderr is a terminal, else ``on_progress(done, total,
    elapsed)`` every few seconds (see :mod:`moetrace.progress`; without it an INFO log line).
    """
    cfg = config or RecordConfig()
    require_local(out, "record a trace")
    out = Path(out)
    prepare_out(out, cfg.resume)
    existing = existing_manifest(out) if cfg.resume else None
    interval = default_interval() if progress else 0.0  # a bad setting fails before writing
    torch.manual_seed(cfg.seed)
    if model is None or prompts is None:
        from moetrace.tracer import demo

        model = demo.demo_model_path() if model is None else model
        prompts = demo.demo_prompts_path() if prompts is None else prompts
    items = as_prompts(prompts)  # a bad prompts file fails before the model loads
    check_device(cfg.device)
    origin = f"moetrace record {model}" if isinstance(model, (str, os.PathLike)) else "record()"
    if isinstance(model, (str, os.PathLike)):
        model, tokenizer = load_model(model, device=cfg.device, dtype=cfg.dtype)
    elif tokenizer is None:
        raise ModelError("record(): pass tokenizer= together with a loaded model")
    encdec = bool(getattr(model.config, "is_encoder_decoder", False))
    tokenizer.padding_side = "right" if encdec else "left"
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    check_prompt_lengths(items, tokenizer, model.config, cfg.max_new_tokens)
    settings = generation_settings(cfg, model)
    if existing is not None:
        check_resume_settings(out, existing, settings)
    source = SourceInfo(kind="recorded", origin=origin)
    tags = {SETTINGS_TAG_PREFIX + k: v for k, v in settings.items()}
    manifest = manifest_for(model, speculative=cfg.speculative, source=source, tags=tags)
    writer = TraceWriter(out, manifest)
    done = writer.existing_request_ids
    todo = [p for p in items if p.id not in done]
    skipped = len(items) - len(todo)
    device = next(model.parameters()).device
    generated = 0
    interrupted = False
    start = time.perf_counter()
    bar = Progress(
        len(todo),
        label="record",
        unit="requests",
        enabled=progress,
        on_progress=on_progress,
        interval=interval,
    )
    try:
        with (
            writer,
            RoutingRecorder(
                model, writer, speculative=cfg.speculative, first_forward=next_forward(out)
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
                bar.update(len(batch), tok_s=f"{generated / (time.perf_counter() - start):.1f}")
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


def existing_manifest(out: Path) -> Manifest | None:
    """The manifest of the trace at OUT, or None when there is none yet."""
    if not (out / MANIFEST_NAME).is_file():
        return None
    from moetrace.store.reader import read_manifest

    return read_manifest(out)


def as_prompts(prompts: str | os.PathLike[str] | Sequence[Prompt | str]) -> list[Prompt]:
    """Prompts from a file (see :func:`load_prompts`) or a list of prompts or strings."""
    if isinstance(prompts, (str, os.PathLike)):
        return load_prompts(prompts)
    return [
        p if isinstance(p, Prompt) else Prompt(f"p{i}", str(p), where=f"prompts[{i}]")
        for i, p in enumerate(prompts)
    ]
