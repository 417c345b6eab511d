"""The model facts of a server recording, and how the server's layer axis maps onto them.

A server answers with routing but names only its model. The facts (layers, MoE layers,
experts, top-k, bytes per expert) come from the first of:

1. ``--config DIR``: the model's ``config.json`` (with the files transformers needs to
   build it); the model is built on the ``meta`` device (nothing allocated) and its MoE
   blocks found as local recording finds them, so the facts are exact;
2. the known-models table (:mod:`moetrace.store.importers.known_models`), by the served
   model's name;
3. the flags (``--num-experts`` required; ``--num-layers``, ``--top-k``) and the first
   answer: its routing gives top-k and the layer axis' width (vLLM). Without a config,
   layers whose rows are all 0 in the first answer are taken as dense when top-k > 1
   (a MoE layer's k distinct ids cannot all be 0); say ``--config`` to be exact.

A server's layer axis holds either the MoE layers only (newer vLLM) or every hidden layer
(SGLang, older vLLM; dense layers' rows are padding): :func:`layer_columns` maps both.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from moetrace.errors import ConfigError, ModelError, ServerError
from moetrace.store.importers.facts import ModelOverrides
from moetrace.store.importers.known_models import find_known_model
from moetrace.store.schema import ModelInfo

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GivenFacts(ModelOverrides):
    """Model facts given on the command line (None = from the config, table or data):
    the importers' overrides (validated the same way) and the model's config folder."""

    config: str | None = None


def model_from_config(path: str | os.PathLike[str], name: str) -> ModelInfo:
    """The facts of the model whose ``config.json`` is at ``path`` (a folder or the file)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from moetrace.tracer.discover import discover, model_info

    where = Path(path)
    folder = where.parent if where.is_file() else where
    if not (folder / "config.json").is_file():
        raise ConfigError(f"{path}: no config.json there")
    try:
        config = AutoConfig.from_pretrained(folder)
        dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
        dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype or torch.bfloat16
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    except (OSError, ValueError, KeyError) as exc:
        raise ModelError(f"{folder}: cannot build the model from its config ({exc})") from None
    return model_info(model, discover(model), name)


def resolve_model(name: str, given: GivenFacts) -> ModelInfo | None:
    """The facts from the config or the known-models table (flags checked against them),
    or None when they must come from the flags and the first answer."""
    if given.config is not None:
        model = model_from_config(given.config, name)
    else:
        known = find_known_model(name)
        if known is None:
            return None
        model = ModelInfo(
            name=name,
            num_layers=known.num_layers,
            moe_layers=known.moe_layers,
            num_experts=known.num_experts,
            top_k=known.top_k,
            architecture=known.architecture,
            bytes_per_expert=known.bytes_per_expert,
            dtype=known.dtype,
            shared_experts=known.shared_experts,
            inferred=("num_layers", "moe_layers", "num_experts", "top_k", "bytes_per_expert"),
        )
    for field in ("num_layers", "num_experts", "top_k"):
        value = getattr(given, field)
        if value is not None and value != getattr(model, field):
            src = given.config or f"the known facts of {name}"
            raise ConfigError(f"--{field.replace('_', '-')} {value} contradicts {src} "
                              f"({field}={getattr(model, field)})")  # fmt: skip
    if given.bytes_per_expert is not None:
        return ModelInfo(**{**model.__dict__, "bytes_per_expert": given.bytes_per_expert})
    return model


def model_from_answer(name: str, given: GivenFacts, routing: np.ndarray, engine: str) -> ModelInfo:
    """The facts from the flags and the routing of a first answer ``(rows, width, k)``."""
    if given.num_experts is None:
        raise ConfigError(f"cannot tell the number of experts of {name!r}: pass --config DIR "
                          "(the model's config.json) or --num-experts")  # fmt: skip
    width, k = routing.shape[1], routing.shape[2]
    num_layers = given.num_layers or width
    if width not in (num_layers,):
        raise ConfigError(f"{engine}: the routing has {width} layers per token but "
                          f"--num-layers is {num_layers}; pass --config DIR to map them")  # fmt: skip
    moe = list(range(width))
    if k > 1 and routing.shape[0]:
        used = np.flatnonzero((routing != 0).any(axis=(0, 2)))
        if 0 < used.size < width:
            log.info("layers %s have only 0 ids in the first answer: taken as dense",
                     sorted(set(moe) - set(used.tolist())))  # fmt: skip
            moe = used.tolist()
    inferred = ["moe_layers"] + [f for f in ("num_layers", "top_k") if getattr(given, f) is None]
    try:
        return ModelInfo(
            name=name,
            num_layers=num_layers,
            moe_layers=tuple(moe),
            num_experts=given.num_experts,
            top_k=given.top_k or k,
            bytes_per_expert=given.bytes_per_expert,
            inferred=tuple(inferred),
        )
    except ConfigError:
        raise
    except Exception as exc:  # TraceFormatError from ModelInfo's checks
        raise ConfigError(f"inconsistent model facts for {name!r}: {exc}") from None


def layer_columns(model: ModelInfo, width: int, where: str) -> np.ndarray:
    """Which columns of a ``width``-layer routing row hold ``model.moe_layers``, in order."""
    moe = np.asarray(model.moe_layers, dtype=np.int64)
    if width == len(moe):
        return np.arange(width)
    if width == model.num_layers:
        return moe
    raise ServerError(f"{where}: the routing has {width} layers per token; model "
                      f"{model.name!r} has {model.num_layers} layers of which {len(moe)} "
                      "are MoE layers (mis-shaped routing, or the wrong model facts)")  # fmt: skip
