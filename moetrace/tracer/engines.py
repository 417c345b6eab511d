"""What each inference server sends and answers when it returns routed experts.

An :class:`Engine` builds the request for one prompt and turns the answer (one JSON body,
or the events of a stream) into :class:`Completion`\\ s: the routing of the prompt's
tokens and of each completion's decode steps as ``(tokens, layers, top_k)`` arrays, the
layer axis as the server sends it (see :mod:`moetrace.tracer.server_facts` for how it
maps onto model layers). Engines are found by name in a registry.

Alignment (both engines): a request with P prompt tokens that generated N tokens ran
P + N - 1 token forwards (the last generated token is never fed back), so the server
returns P prefill rows and N - 1 decode rows. A completion that sends N decode rows
(some versions) has its last row dropped.

- **vLLM** (``vllm serve --enable-return-routed-experts``), ``POST /v1/completions``:
  ``prompt_routed_experts`` on the response and ``routed_experts`` on each choice, nested
  integer lists ``[tokens][layers][top_k]``; with ``return_token_ids`` the token ids give
  N exactly. Streams: the chunk that carries ``prompt_routed_experts`` gives the prompt's
  rows, and each chunk's ``routed_experts`` rows are appended per choice ``index``.
- **SGLang** (``--enable-return-routed-experts``), native ``POST /generate`` with
  ``return_routed_experts``: ``meta_info.routed_experts`` is base64 of the flat row-major
  array of all P + N - 1 rows over all hidden layers, int32 unless
  ``meta_info.routed_experts_dtype`` (or the caller, for a server whose
  ``SGLANG_ROUTED_EXPERTS_DTYPE`` is set) names ``uint16`` or ``uint8``; ``n > 1`` answers a
  list. Streams: the routing comes with the final chunk of each ``index``.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from moetrace.errors import ServerError

SGLANG_DTYPES = {"int32": np.int32, "uint16": np.uint16, "uint8": np.uint8}


@dataclass(frozen=True)
class Sampling:
    """What is asked of the server for every prompt."""

    max_new_tokens: int
    n: int = 1
    temperature: float = 0.0
    stream: bool = False
    wire_dtype: str = "int32"
    """SGLang: the dtype of ``routed_experts`` when the answer does not name it (the
    server's ``SGLANG_ROUTED_EXPERTS_DTYPE``: int32, uint16 or uint8)."""


@dataclass(frozen=True)
class Completion:
    """One completion of a prompt as the server returned it."""

    index: int
    prompt_tokens: int
    generated_tokens: int
    prompt_routing: np.ndarray
    """``(prompt_tokens, layers, top_k)``."""
    decode_routing: np.ndarray
    """``(decode steps, layers, top_k)``; decode steps = generated_tokens - 1."""
    finish_reason: str | None = None


class Engine(Protocol):
    name: str

    def request(self, model: str, prompt: str, sampling: Sampling) -> tuple[str, dict[str, Any]]:
        """(path, JSON body) of the request for one prompt."""

    def completions(
        self, answer: Any | list[Any], sampling: Sampling, width: int | None, top_k: int | None
    ) -> list[Completion]:
        """The completions of one answer (a body, or the list of stream events).

        ``width`` (layers per row) and ``top_k`` are needed by engines that send flat
        arrays; raise ServerError (not transient) for missing or mis-shaped routing."""


_ENGINES: dict[str, Engine] = {}


def register_engine(engine: Engine) -> Engine:
    _ENGINES[engine.name] = engine
    return engine


def get_engine(name: str) -> Engine:
    try:
        return _ENGINES[name]
    except KeyError:
        raise ServerError(f"unknown engine {name!r}; available: {', '.join(engines())}") from None


def engines() -> list[str]:
    return sorted(_ENGINES)


def _bad(msg: str) -> ServerError:
    return ServerError(msg, transient=False)


def _rows(value: Any, what: str, top_k: int | None) -> np.ndarray:
    """A nested list ``[tokens][layers][top_k]`` as an int array of that shape."""
    if value is None:
        raise _bad(
            f"{what} is missing (is the server started with --enable-return-routed-experts?)"
        )
    try:
        arr = np.asarray(value, dtype=np.int64)
    except (ValueError, TypeError):
        raise _bad(f"{what} is not a [tokens][layers][top_k] integer array") from None
    if arr.size == 0:
        return np.zeros((0, 0, 0), np.int64)
    if arr.ndim != 3:
        raise _bad(f"{what} has shape {arr.shape}, expected [tokens][layers][top_k]")
    return arr


def _trim(rows: np.ndarray, generated: int, what: str) -> np.ndarray:
    """The decode rows of a completion of ``generated`` tokens (N - 1; N sent: drop last)."""
    want = max(generated - 1, 0)
    if rows.shape[0] == want + 1 and generated > 0:
        return rows[:want]
    if rows.shape[0] != want:
        raise _bad(f"{what}: {rows.shape[0]} decode rows for {generated} generated tokens "
                   f"(expected {want}: the routing is truncated or mis-shaped)")  # fmt: skip
    return rows


def _joined(parts: list[np.ndarray], what: str) -> np.ndarray:
    parts = [p for p in parts if p.size]
    if not parts:
        return np.zeros((0, 0, 0), np.int64)
    if len({p.shape[1:] for p in parts}) > 1:
        raise _bad(f"{what}: chunks disagree on [layers][top_k]: {[p.shape for p in parts]}")
    return np.concatenate(parts)


class VllmEngine:
    """vLLM's OpenAI-compatible ``/v1/completions`` with routed experts."""

    name = "vllm"

    def request(self, model: str, prompt: str, sampling: Sampling) -> tuple[str, dict[str, Any]]:
        body = {
            "model": model,
            "prompt": prompt,
            "max_tokens": sampling.max_new_tokens,
            "n": sampling.n,
            "temperature": sampling.temperature,
            "return_token_ids": True,
            "stream": sampling.stream,
        }
        return "/v1/completions", body

    def completions(
        self, answer: Any | list[Any], sampling: Sampling, width: int | None, top_k: int | None
    ) -> list[Completion]:
        events = answer if sampling.stream else [answer]
        prompt_parts: list[np.ndarray] = []
        prompt_ids: list[int] | None = None
        prompt_tokens = None
        per: dict[int, dict[str, Any]] = {}
        for ev in events:
            if not isinstance(ev, Mapping):
                raise _bad(f"vLLM answer is not a JSON object: {str(ev)[:80]}")
            if ev.get("prompt_routed_experts") is not None:
                prompt_parts.append(
                    _rows(ev["prompt_routed_experts"], "prompt_routed_experts", top_k)
                )
            if ev.get("prompt_token_ids") is not None:
                prompt_ids = list(ev["prompt_token_ids"])
            usage = ev.get("usage") or {}
            if isinstance(usage, Mapping) and usage.get("prompt_tokens") is not None:
                prompt_tokens = int(usage["prompt_tokens"])
            for ch in ev.get("choices") or []:
                if not isinstance(ch, Mapping):
                    raise _bad("vLLM answer: a choice is not a JSON object")
                slot = per.setdefault(int(ch.get("index", 0)), {"rows": [], "ids": [], "fin": None})
                if ch.get("routed_experts") is not None:
                    slot["rows"].append(
                        _rows(ch["routed_experts"], "choices[].routed_experts", top_k)
                    )
                elif not sampling.stream:
                    _rows(None, f"choices[{ch.get('index', 0)}].routed_experts", top_k)
                slot["ids"].extend(ch.get("token_ids") or [])
                slot["fin"] = ch.get("finish_reason") or slot["fin"]
        if not prompt_parts:
            _rows(None, "prompt_routed_experts", top_k)
        prompt = _joined(prompt_parts, "prompt_routed_experts")
        p = len(prompt_ids) if prompt_ids is not None else prompt_tokens
        if p is not None and prompt.shape[0] != p:
            raise _bad(f"prompt_routed_experts has {prompt.shape[0]} rows for {p} prompt tokens "
                       "(truncated or mis-shaped routing)")  # fmt: skip
        if len(per) != sampling.n:
            raise _bad(f"vLLM answered {len(per)} choice(s), asked for n={sampling.n}")
        out = []
        for index in sorted(per):
            slot = per[index]
            rows = _joined(slot["rows"], f"choices[{index}].routed_experts")
            if not slot["rows"] and sampling.stream:
                raise _bad(f"choices[{index}]: the stream carried no routed_experts (record "
                           "without --stream if this vLLM version returns them only whole)")  # fmt: skip
            generated = len(slot["ids"]) if slot["ids"] else rows.shape[0] + 1
            rows = _trim(rows, generated, f"choices[{index}].routed_experts")
            if rows.size and prompt.size and rows.shape[1:] != prompt.shape[1:]:
                raise _bad(f"choices[{index}].routed_experts rows are {rows.shape[1:]}, the "
                           f"prompt's {prompt.shape[1:]} (mis-shaped routing)")  # fmt: skip
            out.append(Completion(index, prompt.shape[0], generated, prompt,
                                  rows.reshape(-1, *prompt.shape[1:]), slot["fin"]))  # fmt: skip
        return out


class SglangEngine:
    """SGLang's native ``/generate`` with ``return_routed_experts``."""

    name = "sglang"

    def request(self, model: str, prompt: str, sampling: Sampling) -> tuple[str, dict[str, Any]]:
        body = {
            "text": prompt,
            "sampling_params": {
                "max_new_tokens": sampling.max_new_tokens,
                "temperature": sampling.temperature,
                "n": sampling.n,
            },
            "return_routed_experts": True,
            "stream": sampling.stream,
        }
        return "/generate", body

    def completions(
        self, answer: Any | list[Any], sampling: Sampling, width: int | None, top_k: int | None
    ) -> list[Completion]:
        if width is None or top_k is None:
            raise ServerError("sglang: the routing is flat; the model's layers and top-k "
                              "must be known (pass --config, or --num-layers and --top-k)")  # fmt: skip
        if sampling.stream:
            items: dict[int, Mapping[str, Any]] = {}
            for ev in answer:
                if not isinstance(ev, Mapping):
                    raise _bad(f"SGLang stream event is not a JSON object: {str(ev)[:80]}")
                items[int(ev.get("index", 0))] = ev  # the last chunk of each index
            objs: Iterable[Mapping[str, Any]] = [items[i] for i in sorted(items)]
        else:
            objs = answer if isinstance(answer, list) else [answer]
        out = []
        for i, obj in enumerate(objs):
            if not isinstance(obj, Mapping) or not isinstance(obj.get("meta_info"), Mapping):
                raise _bad("SGLang answer has no meta_info object")
            out.append(
                self._one(
                    obj["meta_info"], int(obj.get("index", i)), width, top_k, sampling.wire_dtype
                )
            )
        if len(out) != sampling.n:
            raise _bad(f"SGLang answered {len(out)} output(s), asked for n={sampling.n}")
        return out

    @staticmethod
    def _one(
        meta: Mapping[str, Any], index: int, width: int, top_k: int, wire_dtype: str
    ) -> Completion:
        what = f"output {index}: meta_info.routed_experts"
        data = meta.get("routed_experts")
        if data is None:
            _rows(None, what, top_k)
        try:
            p, n = int(meta["prompt_tokens"]), int(meta["completion_tokens"])
        except (KeyError, TypeError, ValueError):
            raise _bad(f"output {index}: meta_info lacks prompt_tokens/completion_tokens") from None
        try:
            raw = base64.b64decode(str(data), validate=True)
        except (binascii.Error, ValueError):
            raise _bad(f"{what} is not base64") from None
        rows = p + n - 1
        count = rows * width * top_k
        name = str(meta.get("routed_experts_dtype") or wire_dtype).strip().lower()
        dtype = SGLANG_DTYPES.get(name)
        if dtype is None:
            raise _bad(f"{what}: unknown routed_experts_dtype {name!r}")
        flat = np.frombuffer(raw, dtype=dtype)
        if flat.size != count:
            raise _bad(f"{what}: {flat.size} {name} ids, expected {rows} rows x {width} layers "
                       f"x top_k {top_k} = {count} (truncated or mis-shaped routing; a server "
                       "with SGLANG_ROUTED_EXPERTS_DTYPE set needs --routed-experts-dtype)")  # fmt: skip
        arr = flat.astype(np.int64).reshape(rows, width, top_k)
        fin = meta.get("finish_reason")
        reason = fin.get("type") if isinstance(fin, Mapping) else fin
        return Completion(index, p, n, arr[:p], arr[p:], reason)


register_engine(VllmEngine())
register_engine(SglangEngine())
