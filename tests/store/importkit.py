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
