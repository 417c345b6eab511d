"""Importer of the "Patterns behind Chaos" per-request JSON traces (arXiv 2510.05497).

Layout: ``<org?>/<model>/<benchmark>/<subject>/<query>.json``. Each file is a list of
forward steps; step 0 is the prefill (1..n tokens), steps 1..n decode one token each.
A step maps every layer id (as a string) to null (dense layer) or to one entry per token,
each the list of selected expert ids (rank order as logged). No gate weights.

Tokens are numbered prefill 0..n-1, then decode n, n+1, ...; ``step`` is the forward step
of the file. Request ids are ``<dataset>/<query>`` where dataset is the folder path below
the model folder (``mmlu-abstract_algebra`` or ``mmlu/abstract_algebra``), so several
subjects can share one trace.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from moetrace.errors import ImportFormatError
from moetrace.store.importers import paths
from moetrace.store.importers.base import ParsedRequest, SourceFile, find_files


def _split_dataset(dataset: str) -> tuple[str, str]:
    """(benchmark, subject): ``mmlu/abstract_algebra`` or ``mmlu-abstract_algebra``."""
    parts = dataset.split("/")
    if len(parts) >= 2:
        return parts[-2], parts[-1]
    if "-" in dataset:
        bench, subject = dataset.split("-", 1)
        return bench, subject
    return dataset, dataset


def _is_id(x: Any) -> bool:
    return type(x) is int


class PatternsBehindChaosImporter:
    name = "patterns-behind-chaos"
    description = "Patterns behind Chaos per-request JSON (list of forward steps)"

    def model_name_hint(self, src: Path) -> str | None:
        return paths.model_name_hint(find_files(src, ".json")[0])

    def discover(self, src: Path, model_name: str) -> list[SourceFile]:
        root = src if src.is_dir() else src.parent
        out = []
        for path in find_files(src, ".json"):
            dataset = paths.dataset_of(path, model_name)
            bench, subject = _split_dataset(dataset)
            tags = {
                "model": model_name,
                "dataset": dataset,
                "benchmark": bench,
                "subject": subject,
                "query": path.stem,
                "source_file": path.relative_to(root).as_posix(),
            }
            out.append(SourceFile(path, f"{dataset}/{path.stem}", tags))
        return out

    # ------------------------------------------------------------------ parsing
    def parse(self, source: SourceFile) -> ParsedRequest:
        path = source.path
        try:
            data = json.loads(path.read_bytes())
        except json.JSONDecodeError as exc:
            raise ImportFormatError(
                f"{path}: line {exc.lineno} column {exc.colno}: invalid JSON ({exc.msg})"
            ) from None
        except (OSError, UnicodeDecodeError) as exc:
            raise ImportFormatError(f"{path}: cannot read ({exc})") from None
        if not isinstance(data, list) or not data:
            raise ImportFormatError(f"{path}: expected a non-empty JSON list of forward steps")
        keys, moe = self._layers(path, data[0])
        k = self._top_k(path, data[0], moe)
        for s, step in enumerate(data):
            self._check_step(path, s, step, keys, moe)
        prefill = self._block(path, data[0:1], moe, k, first_step=0)
        n0 = prefill.shape[0]
        if n0 < 1:
            raise ImportFormatError(f"{path}: step 0 (prefill) holds no tokens")
        decode = self._block(path, data[1:], moe, k, first_step=1)
        nd = decode.shape[0]
        num_l = len(moe)
        experts = np.concatenate([prefill, decode]).reshape(-1, k)
        tok_ids = np.arange(n0 + nd, dtype=np.int32)
        steps = np.concatenate([np.zeros(n0, np.int32), np.arange(1, nd + 1, dtype=np.int32)])
        token = np.repeat(tok_ids, num_l)
        step = np.repeat(steps, num_l)
        layer = np.tile(np.asarray(moe, dtype=np.int32), n0 + nd)
        moe_arr = np.asarray(moe)

        def locate(i: int) -> str:
            s = int(step[i])
            pos = int(token[i]) if s == 0 else 0
            return f"step {s}, layer {int(moe_arr[i % num_l])}, token {pos}"

        return ParsedRequest(
            source=source,
            token=token,
            step=step,
            phase=(step > 0).astype(np.int8),
            layer=layer,
            experts=experts,
            prompt_tokens=n0,
            generated_tokens=nd,
            num_forwards=len(data),
            moe_layers=tuple(moe),
            num_layers_hint=max(keys) + 1,
            locate=locate,
        )

    @staticmethod
    def _layers(path: Path, step0: Any) -> tuple[list[int], list[int]]:
        if not isinstance(step0, dict) or not step0:
            raise ImportFormatError(f"{path}: step 0: expected an object of layer id -> routing")
        bad = [key for key in step0 if not (isinstance(key, str) and key.isdigit())]
        if bad:
            raise ImportFormatError(f"{path}: step 0: layer key {bad[0]!r} is not a layer id")
        keys = sorted(int(key) for key in step0)
        moe = [layer for layer in keys if step0[str(layer)] is not None]
        if not moe:
            raise ImportFormatError(f"{path}: step 0: every layer is null (no MoE routing)")
        return keys, moe

    @staticmethod
    def _top_k(path: Path, step0: dict[str, Any], moe: list[int]) -> int:
        entries = step0[str(moe[0])]
        if not isinstance(entries, list) or not entries or not isinstance(entries[0], list):
            raise ImportFormatError(
                f"{path}: step 0, layer {moe[0]}: expected a list of per-token expert lists"
            )
        if not entries[0]:
            raise ImportFormatError(f"{path}: step 0, layer {moe[0]}, token 0: no expert ids")
        return len(entries[0])

    @staticmethod
    def _check_step(path: Path, s: int, step: Any, keys: list[int], moe: list[int]) -> None:
        if not isinstance(step, dict):
            raise ImportFormatError(
                f"{path}: step {s}: expected an object, got {type(step).__name__}"
            )
        if len(step) != len(keys) or any(str(layer) not in step for layer in keys):
            raise ImportFormatError(
                f"{path}: step {s}: layer keys {sorted(step, key=str)[:6]}... differ from step 0"
            )
        moe_set = set(moe)
        n = None
        for layer in keys:
            value = step[str(layer)]
            if layer not in moe_set:
                if value is not None:
                    raise ImportFormatError(
                        f"{path}: step {s}, layer {layer}: routing for a layer that is null "
                        "(dense) in step 0"
                    )
                continue
            if not isinstance(value, list):
                raise ImportFormatError(
                    f"{path}: step {s}, layer {layer}: expected a list of per-token expert "
                    f"lists, got {'null' if value is None else type(value).__name__}"
                )
            if n is None:
                n = len(value)
            elif len(value) != n:
                raise ImportFormatError(
                    f"{path}: step {s}, layer {layer}: {len(value)} tokens, but layer "
                    f"{moe[0]} has {n}"
                )
        if s > 0 and n != 1:
            raise ImportFormatError(
                f"{path}: step {s}, layer {moe[0]}: a decode step must hold 1 token, got {n}"
            )

    @staticmethod
    def _block(
        path: Path, steps: list[dict[str, Any]], moe: list[int], k: int, first_step: int
    ) -> np.ndarray:
        """(tokens, layers, k) int32 of consecutive steps (shapes already checked)."""
        if not steps:
            return np.zeros((0, len(moe), k), np.int32)
        nested = [[step[str(layer)] for layer in moe] for step in steps]
        try:
            arr = np.asarray(nested)
            ok = arr.ndim == 4 and arr.shape[3] == k and arr.dtype.kind in "iu"
        except (ValueError, TypeError, OverflowError):
            ok = False
        if ok and arr.size and arr.min() < 0:
            ok = False
        if not ok:
            _raise_bad_entry(path, nested, moe, k, first_step)
        # (steps, layers, tokens, k) -> (steps * tokens, layers, k)
        arr = arr.transpose(0, 2, 1, 3).reshape(-1, len(moe), k)
        return arr.astype(np.int32)


def _raise_bad_entry(
    path: Path, nested: list[list[Any]], moe: list[int], k: int, first_step: int
) -> None:
    for si, per_layer in enumerate(nested):
        for li, entries in enumerate(per_layer):
            for t, entry in enumerate(entries):
                where = f"{path}: step {first_step + si}, layer {moe[li]}, token {t}"
                if not isinstance(entry, list):
                    raise ImportFormatError(
                        f"{where}: expected a list of expert ids, got {entry!r}"
                    )
                if len(entry) != k:
                    raise ImportFormatError(
                        f"{where}: {len(entry)} expert ids, expected {k} as in step 0 "
                        "(inconsistent top-k)"
                    )
                for x in entry:
                    if not _is_id(x):
                        raise ImportFormatError(f"{where}: non-integer expert id {x!r}")
                    if x < 0:
                        raise ImportFormatError(f"{where}: negative expert id {x}")
    raise ImportFormatError(f"{path}: malformed expert lists")  # pragma: no cover
