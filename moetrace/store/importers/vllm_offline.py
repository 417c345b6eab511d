"""vLLM offline outputs with routed experts (``LLM(..., enable_return_routed_experts=True)``).

vLLM hands back Python objects; moetrace defines the file they are saved to (see
docs/importers.md for the snippet): JSONL, one ``RequestOutput`` per line with vLLM's
attribute names: ``request_id``, ``prompt``, ``prompt_token_ids``,
``prompt_routed_experts`` ``[prompt_len][layers][top_k]``, ``outputs`` (each ``index``,
``text``, ``token_ids``, ``routed_experts`` ``[generated - 1][layers][top_k]``), optional
``arrival_time`` / ``metrics``. Each completion becomes one request; with n > 1 the
prompt's prefill rows are repeated in each completion's request (``prefill_shared``).

The layer axis holds either the MoE layers only (newer vLLM) or every hidden layer (older
vLLM, the dense layers' rows all 0): :func:`layer_axis` decides with the model facts known
before parsing (flags, the trace in OUT, the known-models table) or the zero columns.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from moetrace.errors import ImportFormatError
from moetrace.store.importers import paths
from moetrace.store.importers.base import ModelHint, ParsedRequest, SourceFile, file_sources

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LayerAxis:
    """Which columns of a routing row are MoE layers, and their model layer ids."""

    columns: tuple[int, ...]
    moe_layers: tuple[int, ...]
    num_layers: int


def layer_axis(routing: np.ndarray, hint: ModelHint, where: str) -> LayerAxis:
    """Map the layer axis of ``routing`` ``(rows, width, k)`` onto model layers."""
    width, k = routing.shape[1], routing.shape[2]
    used = tuple(int(c) for c in np.flatnonzero((routing != 0).any(axis=(0, 2))))
    n, moe = hint.num_layers, hint.moe_layers
    if n is not None and moe is not None:
        if width == len(moe):
            return LayerAxis(tuple(range(width)), moe, n)
        if width == n:
            routed = sorted(set(used) - set(moe))
            if routed:
                raise ImportFormatError(
                    f"{where}: layer {routed[0]} has routing but is dense in model "
                    f"{hint.name!r} (MoE layers {list(moe)}); wrong model facts?"
                )
            return LayerAxis(moe, moe, n)
        raise ImportFormatError(
            f"{where}: the routing has {width} layers per token; model {hint.name!r} has {n} "
            f"layers of which {len(moe)} are MoE layers (mis-shaped routing, or wrong facts)"
        )
    if n is not None:
        if width == n:  # every hidden layer: all-0 columns are dense layers (k distinct ids)
            cols = used if 0 < len(used) < width else tuple(range(width))
            return LayerAxis(cols, cols, n)
        if width < n:  # MoE layers only: assume the dense layers come first (DeepSeek-style)
            moe_ids = tuple(range(n - width, n))
            log.info(
                "%s: %d routed layers of %d: taken as layers %d..%d (dense layers first); "
                "register the model in known_models for another layout",
                where, width, n, moe_ids[0], moe_ids[-1],
            )  # fmt: skip
            return LayerAxis(tuple(range(width)), moe_ids, n)
        raise ImportFormatError(
            f"{where}: the routing has {width} layers per token, more than --num-layers {n}"
        )
    if k > 1 and 0 < len(used) < width:  # all hidden layers, dense ones all 0
        return LayerAxis(used, used, width)
    raise ImportFormatError(
        f"{where}: the routing has {width} layers per token and the model's layer count is "
        f"unknown: pass --num-layers ({width} if every layer is a MoE layer, else the "
        "model's number of hidden layers, when vLLM returned only its MoE layers)"
    )


def _routing(value: Any, what: str, where: str) -> np.ndarray:
    """A nested list ``[rows][layers][top_k]`` of ids >= 0 as int64; [] is zero rows."""
    if value is None:
        raise ImportFormatError(
            f"{where}: missing {what} (build the LLM with enable_return_routed_experts=True)"
        )
    if isinstance(value, list) and not value:
        return np.zeros((0, 0, 0), np.int64)
    try:
        arr = np.asarray(value)
    except ValueError:
        arr = np.zeros(0, dtype=object)
    if arr.ndim != 3 or arr.dtype.kind not in "iu":
        raise ImportFormatError(
            f"{where}: {what} is not a [tokens][layers][top_k] array of integer expert ids"
            + (f" (shape {arr.shape}, {arr.dtype})" if arr.dtype != object else " (ragged)")
        )
    if arr.size and arr.min() < 0:
        raise ImportFormatError(f"{where}: {what}: negative expert id {int(arr.min())}")
    return arr.astype(np.int64)


class VllmOfflineImporter:
    name = "vllm-offline"
    description = "vLLM LLM.generate outputs with routed experts, saved as JSONL"

    def model_name_hint(self, src: Path) -> str | None:
        return paths.model_name_of_folder(src)

    def discover(self, src: Path, model_name: str) -> list[SourceFile]:
        return file_sources(src, (".jsonl",), model_name)

    def parse(self, source: SourceFile) -> ParsedRequest:  # pragma: no cover - parse_many
        raise ImportFormatError(f"{source.path}: vllm-offline files hold many requests")

    def parse_many(self, source: SourceFile, hint: ModelHint) -> list[ParsedRequest]:
        try:
            data = source.path.read_bytes()
        except OSError as exc:
            raise ImportFormatError(f"{source.path}: cannot read ({exc})") from None
        out: list[ParsedRequest] = []
        for n, raw in enumerate(data.split(b"\n"), start=1):
            if not raw.strip():
                continue
            where = f"{source.path}: line {n}"
            try:
                obj = json.loads(raw)
            except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                raise ImportFormatError(f"{where}: invalid JSON ({exc})") from None
            if not isinstance(obj, dict):
                raise ImportFormatError(f"{where}: expected one RequestOutput object per line")
            out.extend(_completions(obj, source, n, hint))
        if not out:
            raise ImportFormatError(f"{source.path}: no RequestOutput lines")
        return out


def _arrival(obj: dict[str, Any], where: str) -> float | None:
    value = obj.get("arrival_time")
    metrics = obj.get("metrics")
    if value is None and isinstance(metrics, dict):
        value = metrics.get("arrival_time")
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ImportFormatError(f"{where}: arrival_time {value!r} is not a number (seconds)")
    return float(value)


def _completions(
    obj: dict[str, Any], source: SourceFile, line: int, hint: ModelHint
) -> list[ParsedRequest]:
    where = f"{source.path}: line {line}"
    rid = obj.get("request_id")
    if isinstance(rid, bool) or not isinstance(rid, str | int) or rid == "":
        raise ImportFormatError(f"{where}: missing or bad request_id {rid!r}")
    prompt = _routing(obj.get("prompt_routed_experts"), "prompt_routed_experts", where)
    ids = obj.get("prompt_token_ids")
    if ids is not None and (not isinstance(ids, list) or len(ids) != prompt.shape[0]):
        count = len(ids) if isinstance(ids, list) else ids
        raise ImportFormatError(f"{where}: prompt_routed_experts has {prompt.shape[0]} rows "
                                f"for {count} prompt_token_ids")  # fmt: skip
    if prompt.shape[0] == 0:
        raise ImportFormatError(f"{where}: empty prompt_routed_experts (no prompt tokens)")
    outputs = obj.get("outputs")
    if not isinstance(outputs, list) or not outputs:
        raise ImportFormatError(f"{where}: 'outputs' must be a non-empty list of completions")
    decodes = []
    for j, comp in enumerate(outputs):
        at = f"{where}: outputs[{j}]"
        if not isinstance(comp, dict):
            raise ImportFormatError(f"{at}: expected a CompletionOutput object")
        tokens = comp.get("token_ids")
        if not isinstance(tokens, list):
            raise ImportFormatError(f"{at}: missing token_ids list")
        rows = _routing(comp.get("routed_experts"), "routed_experts", at)
        n_out = len(tokens)
        if rows.shape[0] == n_out and n_out > 0:  # the last token's row: it never ran
            rows = rows[:-1]
        if rows.shape[0] != max(n_out - 1, 0):
            raise ImportFormatError(
                f"{at}: routed_experts has {rows.shape[0]} rows for {n_out} generated tokens "
                f"(expected {max(n_out - 1, 0)}: the last token never ran a forward)"
            )
        if rows.size and rows.shape[1:] != prompt.shape[1:]:
            raise ImportFormatError(
                f"{at}: routed_experts rows are [layers][top_k] = {list(rows.shape[1:])}, the "
                f"prompt's {list(prompt.shape[1:])}"
            )
        index = comp.get("index", j)
        if isinstance(index, bool) or not isinstance(index, int):
            raise ImportFormatError(f"{at}: index {index!r} is not an integer")
        decodes.append((index, n_out, rows.reshape(-1, *prompt.shape[1:]), comp))
    if len({d[0] for d in decodes}) != len(decodes):
        raise ImportFormatError(f"{where}: repeated completion index in outputs")
    every = np.concatenate([prompt, *(d[2] for d in decodes)])
    axis = layer_axis(every, hint, where)
    arrival = _arrival(obj, where)
    text = obj.get("prompt") if isinstance(obj.get("prompt"), str) else None
    shared = len(decodes) > 1
    out = []
    for index, n_out, rows, comp in decodes:
        tags = dict(source.tags)
        if shared:
            tags |= {"completion_index": str(index), "prefill_shared": "true"}
        if isinstance(comp.get("finish_reason"), str):
            tags["finish_reason"] = comp["finish_reason"]
        name = str(rid) if not shared else f"{rid}/{index}"
        out.append(
            _request(
                SourceFile(source.path, name, tags),
                prompt,
                rows,
                n_out,
                axis,
                line,
                index,
                text,
                arrival,
            )  # fmt: skip
        )
    return out


def _request(
    source: SourceFile,
    prompt: np.ndarray,
    decode: np.ndarray,
    n_out: int,
    axis: LayerAxis,
    line: int,
    index: int,
    text: str | None,
    arrival: float | None,
) -> ParsedRequest:
    p, d = prompt.shape[0], decode.shape[0]
    cols = np.asarray(axis.columns, dtype=np.int64)
    routing = np.concatenate([prompt, decode])[:, cols, :] if d else prompt[:, cols, :]
    num_l, k = routing.shape[1], routing.shape[2]
    steps = np.concatenate([np.zeros(p, np.int32), np.arange(1, d + 1, dtype=np.int32)])
    moe = np.asarray(axis.moe_layers, dtype=np.int32)

    def locate(i: int) -> str:
        t, layer = i // num_l, int(moe[i % num_l])
        if t < p:
            return f"line {line}, prompt token {t}, layer {layer}"
        return f"line {line}, outputs[{index}] routed_experts row {t - p}, layer {layer}"

    return ParsedRequest(
        source=source,
        token=np.repeat(np.arange(p + d, dtype=np.int32), num_l),
        step=np.repeat(steps, num_l),
        phase=np.repeat((steps > 0).astype(np.int8), num_l),
        layer=np.tile(moe, p + d),
        experts=routing.reshape(-1, k).astype(np.int32),
        prompt_tokens=p,
        generated_tokens=n_out,
        num_forwards=1 + d,
        moe_layers=axis.moe_layers,
        num_layers_hint=axis.num_layers,
        locate=locate,
        prompt_text=text,
        arrival_time=arrival,
    )
