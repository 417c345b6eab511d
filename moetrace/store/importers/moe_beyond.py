"""Importer of the MoE-Beyond per-prompt CSV traces (arXiv 2508.17137, DeepSeek-V2-Lite).

One CSV per prompt (``prompt_17_data.csv`` -> request ``prompt_17``), header
``Layer ID,Batch Number,Token,Activated Expert IDs``, one row per (layer, token) grouped
by layer, prefill only (one forward pass, step 0). The expert ids of a row are a *set*:
they are stored sorted ascending, so the rank of an expert (column e0..e{k-1}) carries no
meaning in these traces. The Token column holds byte-level BPE pieces; they are joined
into an approximate ``prompt_text``.
"""

from __future__ import annotations

import csv
import re
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv

from moetrace.errors import ImportFormatError
from moetrace.store.importers import paths
from moetrace.store.importers.base import ParsedRequest, SourceFile, find_files
from moetrace.store.importers.bpe import decode_pieces
from moetrace.store.importers.numparse import ListParseError, parse_int_lists

HEADER = ("Layer ID", "Batch Number", "Token", "Activated Expert IDs")
_TYPES = {
    HEADER[0]: pa.int64(),
    HEADER[1]: pa.int64(),
    HEADER[2]: pa.string(),
    HEADER[3]: pa.string(),
}
_READ = pacsv.ReadOptions(use_threads=False)
_CONVERT = pacsv.ConvertOptions(
    column_types=_TYPES, strings_can_be_null=False, quoted_strings_can_be_null=False
)


def _line(row: int) -> int:
    """File line of data row ``row`` (line 1 is the header)."""
    return row + 2


def _locate_csv_problem(path: Path) -> tuple[int, str] | None:
    """Slow path after Arrow refused a file: the first line with the wrong shape."""
    with open(path, newline="", encoding="utf-8", errors="replace") as fh:
        reader = csv.reader(fh)
        next(reader, None)
        for row in reader:
            if len(row) != len(HEADER):
                return reader.line_num, f"{len(row)} columns, expected {len(HEADER)}"
            for name, value in zip(HEADER[:2], row[:2], strict=True):
                if not re.fullmatch(r"\s*-?\d+\s*", value):
                    return reader.line_num, f"{name} {value!r} is not an integer"
    return None


class MoeBeyondImporter:
    name = "moe-beyond"
    description = "MoE-Beyond per-prompt CSV (Layer ID, Batch Number, Token, Activated Expert IDs)"

    def model_name_hint(self, src: Path) -> str | None:
        return paths.model_name_hint(find_files(src, ".csv")[0])

    def discover(self, src: Path, model_name: str) -> list[SourceFile]:
        root = src if src.is_dir() else src.parent
        out = []
        for path in find_files(src, ".csv"):
            stem = re.sub(r"_data$", "", path.stem)
            rel_dir = path.parent.relative_to(root).as_posix()
            rid = stem if rel_dir == "." else f"{rel_dir}/{stem}"
            tags = {
                "model": model_name,
                "dataset": path.parent.name,
                "source_file": path.relative_to(root).as_posix(),
            }
            out.append(SourceFile(path, rid, tags))
        return out

    def parse(self, source: SourceFile) -> ParsedRequest:
        path = source.path
        table = self._read(path)
        n = table.num_rows
        if n == 0:
            raise ImportFormatError(f"{path}: line 2: no data rows")
        layer = table.column(0).to_numpy()
        batch = table.column(1).to_numpy()
        if layer.min() < 0 or layer.max() > np.iinfo(np.int16).max:
            row = int(np.flatnonzero((layer < 0) | (layer > np.iinfo(np.int16).max))[0])
            raise ImportFormatError(f"{path}: line {_line(row)}: bad Layer ID {layer[row]}")
        if (batch != batch[0]).any():
            row = int(np.flatnonzero(batch != batch[0])[0])
            raise ImportFormatError(
                f"{path}: line {_line(row)}: Batch Number {batch[row]} differs from {batch[0]} "
                "(one batch per file is supported)"
            )
        parsed = parse_int_lists(table.column(3))
        if isinstance(parsed, ListParseError):
            raise ImportFormatError(f"{path}: line {_line(parsed.row)}: {parsed.reason}")
        values, counts = parsed
        k = int(counts[0])
        if k < 1:
            raise ImportFormatError(f"{path}: line 2: no expert ids")
        odd = np.flatnonzero(counts != k)
        if odd.size:
            row = int(odd[0])
            raise ImportFormatError(
                f"{path}: line {_line(row)}: {counts[row]} expert ids, expected {k} as on line 2 "
                "(inconsistent top-k)"
            )
        experts = np.sort(values.reshape(n, k), axis=1)
        dup = np.flatnonzero((experts[:, 1:] == experts[:, :-1]).any(axis=1))
        if dup.size:
            raise ImportFormatError(f"{path}: line {_line(int(dup[0]))}: repeated expert id")
        moe, inverse, per_layer = np.unique(layer, return_inverse=True, return_counts=True)
        tokens = int(per_layer[0])
        uneven = np.flatnonzero(per_layer != tokens)
        if uneven.size:
            lay = moe[uneven[0]]
            row = int(np.flatnonzero(layer == lay)[0])
            raise ImportFormatError(
                f"{path}: line {_line(row)}: layer {lay} has {per_layer[uneven[0]]} rows but "
                f"layer {moe[0]} has {tokens} (every layer must cover the same tokens)"
            )
        order = np.argsort(inverse, kind="stable")
        token = np.empty(n, dtype=np.int32)
        token[order] = np.tile(np.arange(tokens, dtype=np.int32), len(moe))
        pieces = table.column(2).take(pa.array(order[:tokens])).to_pylist()
        zeros = np.zeros(n, dtype=np.int32)
        return ParsedRequest(
            source=source,
            token=token,
            step=zeros,
            phase=zeros.astype(np.int8),
            layer=layer.astype(np.int32),
            experts=experts.astype(np.int32),
            prompt_tokens=tokens,
            generated_tokens=0,
            num_forwards=1,
            moe_layers=tuple(int(x) for x in moe),
            num_layers_hint=int(moe[-1]) + 1,
            locate=lambda i: f"line {_line(i)}",
            prompt_text=decode_pieces(pieces),
        )

    @staticmethod
    def _read(path: Path) -> pa.Table:
        try:
            with open(path, encoding="utf-8", newline="") as fh:
                header = next(csv.reader([fh.readline()]), [])
        except (OSError, UnicodeDecodeError) as exc:
            raise ImportFormatError(f"{path}: cannot read ({exc})") from None
        if tuple(header) != HEADER:
            raise ImportFormatError(
                f"{path}: line 1: header {','.join(header)!r} is not {','.join(HEADER)!r}"
            )
        try:
            return pacsv.read_csv(path, read_options=_READ, convert_options=_CONVERT)
        except (pa.ArrowInvalid, OSError) as exc:
            where = _locate_csv_problem(path)
            if where is not None:
                raise ImportFormatError(f"{path}: line {where[0]}: {where[1]}") from None
            first = str(exc).strip().splitlines()[0]
            raise ImportFormatError(f"{path}: not a valid CSV ({first})") from None
