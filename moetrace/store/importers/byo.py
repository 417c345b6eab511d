"""Bring your own: a documented table any runtime can write (see docs/importers.md).

Parquet, CSV or JSONL (by extension; SRC a file or a folder of them), one row per
(request, token, MoE layer): ``request_id``, ``token``, ``phase`` (``prefill`` /
``decode``), ``layer``, the experts as a list column ``experts`` (JSON text in CSV) or
``e0..e{k-1}``, optionally gate ``weights`` (or ``w0..``), ``step``, ``prompt_text``,
``arrival_time``. Rows may come in any order; a request's rows must all be in one file.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from moetrace.errors import ImportFormatError
from moetrace.store.importers import paths
from moetrace.store.importers.base import ModelHint, ParsedRequest, SourceFile, file_sources
from moetrace.store.importers.tables import (
    TABLE_SUFFIXES,
    LoadedTable,
    column,
    columns_block,
    int_column,
    list_column,
    read_table,
)
from moetrace.store.schema import DROPPED_EXPERT

PHASES = ("prefill", "decode")


def _numbered(names: list[str], letter: str) -> list[str]:
    """``e0, e1, ...`` present in ``names``, contiguous from 0."""
    found = {int(m.group(1)) for n in names if (m := re.fullmatch(rf"{letter}(\d+)", n))}
    out = []
    while len(out) in found:
        out.append(f"{letter}{len(out)}")
    if found and len(out) != len(found):
        missing = min(set(range(max(found) + 1)) - found)
        raise ImportFormatError(f"missing column {letter}{missing} (columns {letter}0.. must be "
                                "contiguous)")  # fmt: skip
    return out


class ByoImporter:
    name = "byo"
    description = "bring your own: one row per (request, token, MoE layer), Parquet/CSV/JSONL"

    def model_name_hint(self, src: Path) -> str | None:
        return paths.model_name_of_folder(src)

    def discover(self, src: Path, model_name: str) -> list[SourceFile]:
        return file_sources(src, TABLE_SUFFIXES, model_name)

    def parse(self, source: SourceFile) -> ParsedRequest:  # pragma: no cover - parse_many
        raise ImportFormatError(f"{source.path}: byo files hold many requests")

    def parse_many(self, source: SourceFile, hint: ModelHint) -> list[ParsedRequest]:
        t = read_table(source.path)
        if t.table.num_rows == 0:
            raise ImportFormatError(f"{source.path}: no data rows")
        try:
            return _requests(t, source)
        except ImportFormatError as exc:
            if str(exc).startswith(str(source.path)):
                raise
            raise ImportFormatError(f"{source.path}: {exc}") from None


def _experts(t: LoadedTable) -> tuple[np.ndarray, np.ndarray | None]:
    names = t.table.column_names
    if "experts" in names:
        experts = list_column(t, "experts", "int")
    else:
        cols = _numbered(names, "e")
        if not cols:
            raise ImportFormatError(
                f"missing column 'experts' (or e0..e{{k-1}}); columns: {', '.join(names)}"
            )
        experts = columns_block(t, cols, "int")
    low = np.flatnonzero((experts < DROPPED_EXPERT).any(axis=1))
    if low.size:
        row = int(low[0])
        raise t.fail(row, f"negative expert id {int(experts[row].min())} (only -1 = dropped)")
    weights = None
    if "weights" in names:
        weights = list_column(t, "weights", "float")
    elif cols := _numbered(names, "w"):
        weights = columns_block(t, cols, "float")
    if weights is not None and weights.shape != experts.shape:
        raise t.fail(0, f"{weights.shape[1]} weights for {experts.shape[1]} experts per row")
    return experts.astype(np.int32), None if weights is None else weights.astype(np.float32)


def _phase(t: LoadedTable) -> np.ndarray:
    col = column(t, "phase")
    codes = np.full(len(col), -1, dtype=np.int8)
    text = col.cast(pa.string()) if not pa.types.is_string(col.type) else col
    for code, name in enumerate(PHASES):
        codes[pc.equal(text, name).to_numpy(zero_copy_only=False)] = code
    bad = np.flatnonzero(codes < 0)
    if bad.size:
        row = int(bad[0])
        raise t.fail(row, f"unknown phase {text[row].as_py()!r} (prefill or decode)")
    return codes


def _request_ids(t: LoadedTable) -> tuple[np.ndarray, list[str]]:
    col = column(t, "request_id")
    if pa.types.is_integer(col.type):
        col = col.cast(pa.string())
    if not (pa.types.is_string(col.type) or pa.types.is_large_string(col.type)):
        raise t.fail(0, f"request_id must be text, got {col.type}")
    empty = np.flatnonzero(pc.equal(col, "").to_numpy(zero_copy_only=False))
    if empty.size:
        raise t.fail(int(empty[0]), "empty request_id")
    enc = pc.dictionary_encode(col).combine_chunks()  # ids in order of first appearance
    return enc.indices.to_numpy().astype(np.int64), enc.dictionary.to_pylist()


def _first_rows(key: np.ndarray, order: np.ndarray) -> np.ndarray:
    """Positions in ``order`` where a new value of ``key[order]`` starts."""
    k = key[order]
    return np.flatnonzero(np.concatenate([[True], k[1:] != k[:-1]]))


def _requests(t: LoadedTable, source: SourceFile) -> list[ParsedRequest]:
    req, ids = _request_ids(t)
    token = int_column(t, "token")
    layer = int_column(t, "layer")
    phase = _phase(t)
    experts, weights = _experts(t)
    names = t.table.column_names
    step_given = int_column(t, "step") if "step" in names else None
    order = np.lexsort((layer, token, req))
    r, tok, lay, ph = req[order], token[order], layer[order], phase[order]
    same_tok = np.concatenate([[False], (r[1:] == r[:-1]) & (tok[1:] == tok[:-1])])
    dup = np.flatnonzero(same_tok & np.concatenate([[False], lay[1:] == lay[:-1]]))
    if dup.size:
        i = int(dup[0])
        raise t.fail(int(order[i]), f"repeated (request {ids[r[i]]!r}, token {tok[i]}, layer "
                                    f"{lay[i]}), also on {t.where(int(order[i - 1]))}")  # fmt: skip
    flip = np.flatnonzero(same_tok & np.concatenate([[False], ph[1:] != ph[:-1]]))
    if flip.size:
        i = int(flip[0])
        raise t.fail(int(order[i]), f"token {tok[i]} of request {ids[r[i]]!r} is "
                                    f"{PHASES[ph[i]]} here but {PHASES[ph[i - 1]]} on "
                                    f"{t.where(int(order[i - 1]))}")  # fmt: skip
    prompt = column(t, "prompt_text").to_pylist() if "prompt_text" in names else None
    arrival = _arrival(t) if "arrival_time" in names else None
    starts = np.append(_first_rows(req, order), len(order))
    out = []  # requests in order of first appearance (the dictionary's order)
    for a, b in zip(starts[:-1], starts[1:], strict=True):
        rows = order[a:b]
        out.append(
            _one(
                t,
                source,
                ids[int(req[rows[0]])],
                rows,
                token,
                layer,
                phase,
                experts,
                weights,
                step_given,
                prompt,
                arrival,
            )  # fmt: skip
        )
    if all(p.arrival_time is not None for p in out):
        out.sort(key=lambda p: p.arrival_time or 0.0)  # stable: ties keep file order
    return out


def _arrival(t: LoadedTable) -> list[float | None]:
    col = t.table.column("arrival_time")
    if not (pa.types.is_integer(col.type) or pa.types.is_floating(col.type)):
        raise t.fail(0, f"arrival_time must be a number (seconds), got {col.type}")
    return col.cast(pa.float64()).to_pylist()


def _one(
    t: LoadedTable,
    source: SourceFile,
    rid: str,
    rows: np.ndarray,
    token: np.ndarray,
    layer: np.ndarray,
    phase: np.ndarray,
    experts: np.ndarray,
    weights: np.ndarray | None,
    step_given: np.ndarray | None,
    prompt: list[str | None] | None,
    arrival: list[float | None] | None,
) -> ParsedRequest:
    """One request from its rows (sorted by token, layer; checked unique)."""
    tok, lay, ph = token[rows], layer[rows], phase[rows]
    moe = np.unique(lay)
    tokens, starts, per = np.unique(tok, return_index=True, return_counts=True)
    short = np.flatnonzero(per != moe.size)
    if short.size:
        i = int(starts[short[0]])
        missing = sorted(set(moe.tolist()) - set(lay[i : i + per[short[0]]].tolist()))
        raise t.fail(int(rows[i]), f"request {rid!r} token {tokens[short[0]]} has no row for "
                                   f"layer(s) {missing} (every token needs one row per MoE "
                                   "layer of the request)")  # fmt: skip
    tok_phase = ph[starts]
    pre, dec = tokens[tok_phase == 0], tokens[tok_phase == 1]
    if pre.size and dec.size and dec.min() < pre.max():
        i = int(starts[np.flatnonzero((tok_phase == 1) & (tokens < pre.max()))[0]])
        raise t.fail(int(rows[i]), f"decode token {tok[i]} of request {rid!r} comes before "
                                   f"its prefill token {int(pre.max())} (decode before prefill)")  # fmt: skip
    if step_given is not None:
        step = step_given[rows]
        wrong = np.flatnonzero(((ph == 0) & (step != 0)) | ((ph == 1) & (step < 1)))
        if wrong.size:
            i = int(wrong[0])
            want = "0" if ph[i] == 0 else ">= 1"
            raise t.fail(int(rows[i]), f"{PHASES[ph[i]]} row with step {step[i]} (expected "
                                       f"{want})")  # fmt: skip
        tok_of = np.searchsorted(tokens, tok)
        first_step = step[starts][tok_of]
        odd = np.flatnonzero(step != first_step)
        if odd.size:
            i = int(odd[0])
            raise t.fail(int(rows[i]), f"token {tok[i]} of request {rid!r} has step {step[i]} "
                                       f"here but {first_step[i]} in another row")  # fmt: skip
    else:  # prefill step 0; decode steps 1.. in token order
        step_of_token = np.zeros(tokens.size, np.int64)
        step_of_token[tok_phase == 1] = np.arange(1, dec.size + 1)
        step = step_of_token[np.searchsorted(tokens, tok)]
    text = next((x for x in (prompt[i] for i in np.sort(rows)) if x), None) if prompt else None
    when = None
    if arrival is not None:
        when = next((x for x in (arrival[i] for i in np.sort(rows)) if x is not None), None)
        if when is not None and not np.isfinite(when):
            raise t.fail(int(rows[0]), f"arrival_time {when!r} is not a finite number")

    def locate(i: int) -> str:
        return t.where(int(rows[i]))

    return ParsedRequest(
        source=SourceFile(source.path, rid, dict(source.tags)),
        token=tok.astype(np.int32),
        step=step.astype(np.int32),
        phase=ph.astype(np.int8),
        layer=lay.astype(np.int32),
        experts=experts[rows],
        prompt_tokens=int(pre.size),
        generated_tokens=int(dec.size),
        num_forwards=int(step.max()) + 1,
        moe_layers=tuple(int(x) for x in moe),
        num_layers_hint=int(moe[-1]) + 1,
        locate=locate,
        prompt_text=text,
        weights=None if weights is None else weights[rows],
        arrival_time=when,
    )
