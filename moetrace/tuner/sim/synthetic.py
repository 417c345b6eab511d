"""Synthetic routing traces with skewed, sticky expert use (tests, demos, benchmarks)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from moetrace.store.schema import Manifest, ModelInfo, RequestRecord, SourceInfo
from moetrace.store.writer import TraceWriter


def write_synthetic_trace(
    path: str | os.PathLike[str],
    *,
    num_layers: int = 4,
    num_experts: int = 16,
    top_k: int = 2,
    requests: int = 12,
    prompt_tokens: int = 6,
    decode_tokens: int = 20,
    stickiness: float = 0.5,
    bytes_per_expert: int | None = 1_000_000,
    speculative: bool = False,
    seed: int = 0,
    groups: int = 0,
) -> Path:
    """Write a trace whose experts follow a Zipf popularity per layer, a per-request bias
    and a chance ``stickiness`` that a token reuses the previous token's experts. With
    ``groups`` > 0, request r uses only the r-th (mod ``groups``) of that many disjoint
    shares of the experts (topics that need different experts, arriving interleaved)."""
    rng = np.random.default_rng(seed)
    L, E, k = num_layers, num_experts, top_k
    model = ModelInfo(
        name="synthetic-moe",
        num_layers=L,
        moe_layers=tuple(range(L)),
        num_experts=E,
        top_k=k,
        bytes_per_expert=bytes_per_expert,
    )
    manifest = Manifest(model=model, source=SourceInfo(kind="synthetic"), speculative=speculative)
    base = 1.0 / np.arange(1, E + 1) ** 1.1
    forward = 0
    with TraceWriter(path, manifest) as w:
        for r in range(requests):
            pop = np.stack([rng.permutation(base) for _ in range(L)])
            pop = pop * rng.gamma(2.0, size=(L, E))
            if groups:
                share = np.zeros(E, bool)
                share[(r % groups) * E // groups : (r % groups + 1) * E // groups] = True
                pop[:, ~share] = 0.0
            pop /= pop.sum(axis=1, keepdims=True)
            cols: dict[str, list] = {
                k_: [] for k_ in ("token", "step", "phase", "forward", "layer")
            }
            exps: list[np.ndarray] = []
            prev = [None] * L
            steps = [(0, list(range(prompt_tokens)))] + [
                (s, [prompt_tokens + s - 1]) for s in range(1, decode_tokens + 1)
            ]
            for step, toks in steps:
                for t in toks:
                    for layer in range(L):
                        if prev[layer] is not None and rng.random() < stickiness:
                            e = prev[layer]
                        else:
                            e = rng.choice(E, size=k, replace=False, p=pop[layer])
                        prev[layer] = e
                        exps.append(e)
                        cols["token"].append(t)
                        cols["step"].append(step)
                        cols["phase"].append(0 if step == 0 else 1)
                        cols["forward"].append(forward)
                        cols["layer"].append(layer)
                forward += 1
            ex = np.asarray(exps, dtype=np.int16)
            spec = None
            if speculative:
                spec = np.roll(ex, -1, axis=0)  # the next row's experts (next layer) as the guess
                noisy = rng.random(spec.shape) < 0.2
                spec[noisy] = rng.integers(0, E, size=int(noisy.sum()))
            w.write_request(
                RequestRecord(f"r{r}", prompt_tokens=prompt_tokens, generated_tokens=decode_tokens),
                experts=ex,
                speculative=spec,
                **{k_: np.asarray(v) for k_, v in cols.items()},
            )
    return Path(path)
