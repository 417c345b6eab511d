"""Small source files in the published formats, for the importer and CLI tests."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

CSV_HEADER = "Layer ID,Batch Number,Token,Activated Expert IDs"


def pbc_steps(
    prefill: int,
    decode: int,
    *,
    num_layers: int = 4,
    moe_layers: tuple[int, ...] = (1, 3),
    k: int = 2,
    num_experts: int = 8,
    seed: int = 0,
) -> list[dict[str, object]]:
    """A Patterns-behind-Chaos request: step 0 with ``prefill`` tokens, then decode steps."""
    rng = np.random.default_rng(seed)
    steps = []
    for s in range(decode + 1):
        n = prefill if s == 0 else 1
        step: dict[str, object] = {}
        for layer in range(num_layers):
            if layer in moe_layers:
                step[str(layer)] = [
                    [int(x) for x in rng.choice(num_experts, size=k, replace=False)]
                    for _ in range(n)
                ]
            else:
                step[str(layer)] = None
        steps.append(step)
    return steps


def write_json(path: Path, data: object) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2), encoding="utf-8")
    return path


def pbc_experts(steps: list[dict[str, object]], moe_layers: tuple[int, ...]) -> np.ndarray:
    """(rows, k) in (token, layer) order, as the importer stores them."""
    rows = []
    for step in steps:
        n = len(step[str(moe_layers[0])])  # type: ignore[arg-type]
        for t in range(n):
            for layer in moe_layers:
                rows.append(step[str(layer)][t])  # type: ignore[index]
    return np.asarray(rows)


def mb_rows(
    tokens: list[str],
    *,
    moe_layers: tuple[int, ...] = (1, 2),
    k: int = 3,
    num_experts: int = 16,
    seed: int = 0,
) -> list[tuple[int, str, list[int]]]:
    """MoE-Beyond rows (layer, token piece, expert ids) grouped by layer."""
    rng = np.random.default_rng(seed)
    rows = []
    for layer in moe_layers:
        for tok in tokens:
            ids = [int(x) for x in rng.choice(num_experts, size=k, replace=False)]
            rows.append((layer, tok, ids))
    return rows


def write_csv(path: Path, rows: list[tuple[int, str, list[int]]], header: str = CSV_HEADER) -> Path:
    import csv
    import io

    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    for layer, tok, ids in rows:
        writer.writerow([layer, 0, tok, json.dumps(ids)])
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(header + "\n" + buf.getvalue(), encoding="utf-8")
    return path


# ---------------------------------------------------------------- many-request formats
def byo_rows(
    requests: dict[str, tuple[int, int]],
    *,
    moe_layers: tuple[int, ...] = (1, 3),
    k: int = 2,
    num_experts: int = 8,
    weights: bool = False,
    seed: int = 0,
) -> list[dict[str, object]]:
    """Bring-your-own rows: request id -> (prefill tokens, decode tokens), in (request,
    token, layer) order; experts distinct per row, weights summing to 1 when asked."""
    rng = np.random.default_rng(seed)
    rows: list[dict[str, object]] = []
    for rid, (prefill, decode) in requests.items():
        for tok in range(prefill + decode):
            for layer in moe_layers:
                row: dict[str, object] = {
                    "request_id": rid,
                    "token": tok,
                    "phase": "prefill" if tok < prefill else "decode",
                    "layer": layer,
                    "experts": [int(x) for x in rng.choice(num_experts, size=k, replace=False)],
                }
                if weights:
                    w = rng.random(k)
                    row["weights"] = [float(x) for x in (w / w.sum()).astype(np.float32)]
                rows.append(row)
    return rows


def write_byo(path: Path, rows: list[dict[str, object]]) -> Path:
    """Rows as a byo table, by extension: .jsonl, .csv (lists as JSON text), .parquet."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    elif path.suffix == ".csv":
        import csv

        names = list(dict.fromkeys(k for r in rows for k in r))
        with open(path, "w", newline="", encoding="utf-8") as fh:
            writer = csv.writer(fh, lineterminator="\n")
            writer.writerow(names)
            for r in rows:
                writer.writerow(
                    [
                        json.dumps(r[n]) if isinstance(r.get(n), list) else r.get(n, "")
                        for n in names
                    ]
                )
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def write_jsonl(path: Path, objs: list[dict[str, object]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(o) + "\n" for o in objs), encoding="utf-8")
    return path


def vllm_output(
    request_id: str,
    prompt_len: int,
    generated: list[int],
    *,
    width: int = 3,
    k: int = 2,
    num_experts: int = 8,
    dense: tuple[int, ...] = (),
    extra_row: bool = False,
    seed: int = 0,
) -> dict[str, object]:
    """A vLLM RequestOutput as saved by the documented snippet: ``width`` layer columns
    (``dense`` ones all 0), one completion per entry of ``generated`` (token counts) with
    generated - 1 routing rows (generated rows with ``extra_row``)."""
    rng = np.random.default_rng(seed)

    def rows(n: int) -> list[list[list[int]]]:
        out = []
        for _ in range(n):
            out.append(
                [
                    [0] * k
                    if c in dense
                    else [int(x) for x in rng.choice(num_experts, size=k, replace=False)]
                    for c in range(width)
                ]
            )
        return out

    return {
        "request_id": request_id,
        "prompt": f"prompt of {request_id}",
        "prompt_token_ids": list(range(100, 100 + prompt_len)),
        "prompt_routed_experts": rows(prompt_len),
        "outputs": [
            {
                "index": i,
                "text": "x" * n,
                "token_ids": list(range(n)),
                "routed_experts": rows(n if extra_row else max(n - 1, 0)),
                "finish_reason": "length",
            }
            for i, n in enumerate(generated)
        ],
    }


SGLANG_EXTEND, SGLANG_DECODE, SGLANG_MIXED, SGLANG_IDLE = 1, 2, 3, 4


def sglang_dump(
    passes: list[tuple[int, int, list[int] | None]],
    *,
    num_layers: int = 4,
    moe_layers: tuple[int, ...] = (1, 3),
    k: int = 2,
    num_physical: int = 8,
    physical_to_logical: np.ndarray | None = None,
    rank: int = 0,
    first_pass_id: int = 0,
    seed: int = 0,
) -> dict[str, object]:
    """SGLang's per_token dump dict: one record per (forward_mode, tokens, extend_seq_lens),
    topk ids [num_layers, tokens, 8] of physical ids, -1 padded and in dense layers."""
    import torch

    rng = np.random.default_rng(seed)
    records = []
    for i, (mode, n, lens) in enumerate(passes):
        ids = np.full((num_layers, n, 8), -1, dtype=np.int32)
        for layer in moe_layers:
            for t in range(n):
                ids[layer, t, :k] = rng.choice(num_physical, size=k, replace=False)
        records.append(
            {
                "forward_pass_id": first_pass_id + i,
                "rank": rank,
                "gatherer_key": "primary",
                "input_ids": [int(x) for x in rng.integers(0, 1000, size=n)],
                "positions": list(range(n)),
                "extend_seq_lens": lens,
                "forward_mode": mode,
                "topk_ids_of_layer": torch.from_numpy(ids),
                "misc_objects": [],
                "global_physical_count": torch.zeros((num_layers, num_physical), dtype=torch.int32),
            }
        )
    pmap = (
        np.tile(np.arange(num_physical), (num_layers, 1))
        if physical_to_logical is None
        else physical_to_logical
    )
    return {"records": records, "last_physical_to_logical_map": torch.from_numpy(pmap)}


def sglang_expected(dump: dict[str, object], moe_layers: tuple[int, ...], k: int) -> np.ndarray:
    """(rows, k) logical ids in (pass, token, layer) order, passes with tokens, not IDLE."""
    pmap = dump["last_physical_to_logical_map"].numpy()  # type: ignore[union-attr]
    rows = []
    for rec in dump["records"]:  # type: ignore[union-attr]
        if rec["forward_mode"] == SGLANG_IDLE or not rec["input_ids"]:
            continue
        ids = rec["topk_ids_of_layer"].numpy()
        for t in range(ids.shape[1]):
            for layer in moe_layers:
                rows.append([pmap[layer, p] for p in ids[layer, t, :k]])
    return np.asarray(rows)
