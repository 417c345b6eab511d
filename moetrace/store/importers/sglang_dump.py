"""SGLang's expert distribution recorder dump, ``per_token`` mode.

``--expert-distribution-recorder-mode per_token`` and ``POST /dump_expert_distribution_record``
write ``expert_distribution_recorder_{time}_{rank}.pt`` (``torch.save``) holding
``{"records": [...], "last_physical_to_logical_map": [layers, physical experts]}``; each
record is one forward pass of one rank: ``forward_pass_id``, ``rank``, ``input_ids``,
``positions``, ``extend_seq_lens``, ``forward_mode`` (SGLang's ``ForwardMode`` value) and
``topk_ids_of_layer`` ``[layers, tokens, 8]`` of *physical* expert ids, -1 beyond the
model's top-k and in dense layers. The dump names no request, so each forward pass becomes
one request ``pass-<forward_pass_id>`` (``rank<r>/pass-<id>`` for ranks other than 0).
Loaded with ``torch.load(weights_only=True)``: no code from the file is run.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from moetrace.errors import ImportFormatError
from moetrace.store.importers import paths
from moetrace.store.importers.base import ModelHint, ParsedRequest, SourceFile, file_sources

log = logging.getLogger(__name__)

EXTEND, DECODE, MIXED, IDLE = 1, 2, 3, 4
"""SGLang's ``ForwardMode`` values (``IntEnum`` of ``auto()``, stable across versions);
the later ones (TARGET_VERIFY = 5, DRAFT_EXTEND..., which vary between versions) are
speculative-decoding passes and are refused."""
MODE_NAMES = {EXTEND: "extend", DECODE: "decode", MIXED: "mixed", IDLE: "idle"}
_KEYS = ("forward_pass_id", "rank", "input_ids", "forward_mode", "topk_ids_of_layer")


def _load(path: Path) -> dict[str, Any]:
    import torch

    try:
        with warnings.catch_warnings():  # torch's notes on pickle protocols: not the user's
            warnings.simplefilter("ignore")
            data = torch.load(path, weights_only=True, map_location="cpu")
    except Exception as exc:  # any unreadable or non-plain-data file is a bad file
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise ImportFormatError(f"{path}: not a torch.save file of plain data ({first})") from None
    if not isinstance(data, dict) or "records" not in data:
        what = sorted(data)[:6] if isinstance(data, dict) else type(data).__name__
        raise ImportFormatError(
            f"{path}: not an SGLang expert distribution dump (expected a dict with 'records' "
            f"and 'last_physical_to_logical_map', got {what})"
        )
    return data


def _array(value: Any, what: str, where: str, ndim: int) -> np.ndarray:
    import torch

    if not isinstance(value, torch.Tensor):
        raise ImportFormatError(f"{where}: {what} is not a tensor ({type(value).__name__})")
    if value.dim() != ndim or value.dtype.is_floating_point or value.dtype == torch.bool:
        raise ImportFormatError(
            f"{where}: {what} must be a {ndim}-d integer tensor, got shape "
            f"{list(value.shape)} {value.dtype}"
        )
    return value.numpy().astype(np.int64)


class SglangDumpImporter:
    name = "sglang-dump"
    description = "SGLang expert distribution recorder dump (per_token mode, .pt)"

    def model_name_hint(self, src: Path) -> str | None:
        return paths.model_name_of_folder(src)

    def discover(self, src: Path, model_name: str) -> list[SourceFile]:
        return file_sources(src, (".pt",), model_name)

    def parse(self, source: SourceFile) -> ParsedRequest:  # pragma: no cover - parse_many
        raise ImportFormatError(f"{source.path}: SGLang dumps hold many forward passes")

    def parse_many(self, source: SourceFile, hint: ModelHint) -> list[ParsedRequest]:
        path = source.path
        data = _load(path)
        records = data["records"]
        if not isinstance(records, list):
            raise ImportFormatError(f"{path}: 'records' is not a list")
        if "last_physical_to_logical_map" not in data:
            raise ImportFormatError(f"{path}: missing key 'last_physical_to_logical_map'")
        pmap = _array(data["last_physical_to_logical_map"], "last_physical_to_logical_map",
                      str(path), 2)  # fmt: skip
        if pmap.size and pmap.min() < 0:
            raise ImportFormatError(f"{path}: last_physical_to_logical_map holds negative ids")
        identity = pmap.shape[1] == int(pmap.max(initial=-1)) + 1 and bool(
            (pmap == np.arange(pmap.shape[1])).all()
        )
        if not identity:
            log.warning(
                "%s: expert ids mapped with the dump's last physical-to-logical map: passes "
                "recorded before an EPLB rebalance are approximate",
                path,
            )
        out = []
        for i, rec in enumerate(records):
            parsed = _record(source, i, rec, pmap, identity)
            if parsed is not None:
                out.append(parsed)
        return out


def _record(
    source: SourceFile, i: int, rec: Any, pmap: np.ndarray, identity: bool
) -> ParsedRequest | None:
    where = f"{source.path}: record {i}"
    if not isinstance(rec, dict):
        raise ImportFormatError(f"{where}: expected a dict, got {type(rec).__name__}")
    missing = [k for k in _KEYS if k not in rec]
    if missing:
        raise ImportFormatError(f"{where}: missing key {missing[0]!r}")
    fpid, rank, mode = rec["forward_pass_id"], rec["rank"], rec["forward_mode"]
    for name, value in (("forward_pass_id", fpid), ("rank", rank), ("forward_mode", mode)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ImportFormatError(f"{where}: {name} {value!r} is not a non-negative integer")
    where = f"{where} (forward pass {fpid})"
    if not isinstance(rec["input_ids"], list):
        raise ImportFormatError(f"{where}: input_ids is not a list")
    num_tokens = len(rec["input_ids"])
    if mode == IDLE or num_tokens == 0:
        return None
    if mode not in MODE_NAMES:
        raise ImportFormatError(
            f"{where}: forward_mode {mode} is not EXTEND (1), DECODE (2) or MIXED (3): a "
            "speculative-decoding pass (TARGET_VERIFY, DRAFT_EXTEND...); record without "
            "speculative decoding"
        )
    ids = _array(rec["topk_ids_of_layer"], "topk_ids_of_layer", where, 3)
    num_layers, physical = pmap.shape
    if ids.shape[:2] != (num_layers, num_tokens):
        raise ImportFormatError(
            f"{where}: topk_ids_of_layer has shape {list(ids.shape)}, expected "
            f"[{num_layers} layers (as the map), {num_tokens} tokens (input_ids), top-k]"
        )
    bad = (ids < -1) | (ids >= physical)
    if bad.any():
        layer, tok, _ = (int(x[0]) for x in np.nonzero(bad))
        raise ImportFormatError(
            f"{where}: layer {layer}, token {tok}: physical expert id "
            f"{int(ids[bad][0])} out of range [0, {physical})"
        )
    valid = ids != -1
    moe = np.flatnonzero(valid.any(axis=(1, 2)))
    if moe.size == 0:
        raise ImportFormatError(f"{where}: no routing in any layer (every id is -1)")
    sub = valid[moe]
    k = int(sub[0, 0].sum())
    wrong = (sub.sum(axis=2) != k) | ~sub[:, :, :k].all(axis=2)
    if k == 0 or wrong.any():
        li, tok = (int(x[0]) for x in np.nonzero(wrong)) if k else (0, 0)
        raise ImportFormatError(
            f"{where}: layer {int(moe[li])}, token {tok}: {int(sub[li, tok].sum())} expert ids "
            f"(not -1), expected {k} as at layer {int(moe[0])}, token 0 (inconsistent top-k)"
        )
    phys = ids[moe][:, :, :k]  # (moe layers, tokens, k)
    logical = pmap[moe][np.arange(moe.size)[:, None, None], phys]
    phase, sequences, split = _phases(rec, mode, num_tokens, where)
    tags = dict(source.tags)
    tags |= {"forward_mode": MODE_NAMES[mode], "forward_pass_id": str(fpid), "rank": str(rank),
             "sequences": str(sequences)}  # fmt: skip
    if not split:
        tags["mixed_split"] = "unknown"
    if not identity:
        tags["expert_map"] = "last_physical_to_logical_map"
    rid = f"pass-{fpid}" if rank == 0 else f"rank{rank}/pass-{fpid}"
    num_l = moe.size
    moe32 = moe.astype(np.int32)

    def locate(row: int) -> str:
        return f"record {i} (forward pass {fpid}), token {row // num_l}, layer {moe32[row % num_l]}"

    prefill = int((phase == 0).sum())
    return ParsedRequest(
        source=SourceFile(source.path, rid, tags),
        token=np.repeat(np.arange(num_tokens, dtype=np.int32), num_l),
        step=np.zeros(num_tokens * num_l, np.int32),
        phase=np.repeat(phase, num_l),
        layer=np.tile(moe32, num_tokens),
        experts=logical.transpose(1, 0, 2).reshape(-1, k).astype(np.int32),
        prompt_tokens=prefill,
        generated_tokens=num_tokens - prefill,
        num_forwards=1,
        moe_layers=tuple(int(x) for x in moe),
        num_layers_hint=num_layers,
        locate=locate,
    )


def _phases(rec: dict[str, Any], mode: int, n: int, where: str) -> tuple[np.ndarray, int, bool]:
    """(phase per token, number of sequences, whether a MIXED pass could be split)."""
    lens = rec.get("extend_seq_lens")
    ok = isinstance(lens, list) and all(type(x) is int and x > 0 for x in lens)
    if mode == DECODE:
        return np.ones(n, np.int8), n, True
    if mode == EXTEND:
        return np.zeros(n, np.int8), len(lens) if ok else 1, True  # type: ignore[arg-type]
    if not ok or sum(lens) != n:  # type: ignore[arg-type]
        log.debug("%s: MIXED pass without usable extend_seq_lens: all prefill", where)
        return np.zeros(n, np.int8), 0, False
    # chunked prefill mixed with running decodes: a decode sequence extends by 1 token
    per_seq = np.asarray(lens)
    phase = np.repeat((per_seq == 1).astype(np.int8), per_seq)
    return phase, len(lens), True  # type: ignore[arg-type]
