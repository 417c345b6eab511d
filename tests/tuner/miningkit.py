"""Synthetic traces with planted routing structure, for the mining/analyze tests."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from moetrace.store import Manifest, ModelInfo, RequestRecord, SourceInfo, TraceWriter


def write_trace(
    path: Path,
    experts: Sequence[np.ndarray],
    *,
    num_experts: int,
    phases: Sequence[np.ndarray] | None = None,
    prompts: Sequence[str | None] | None = None,
    moe_layers: Sequence[int] | None = None,
    part_rows: int = 1 << 20,
    id_prefix: str = "r",
) -> Path:
    """Write requests whose routing is ``experts[r]`` of shape (tokens, layers, k).

    ``phases[r]`` gives each token's phase code (default all prefill); prefill tokens
    share step 0 and one forward pass, each decode token is its own step and forward.
    """
    num_layers, k = experts[0].shape[1], experts[0].shape[2]
    layers = list(moe_layers) if moe_layers is not None else list(range(num_layers))
    manifest = Manifest(
        model=ModelInfo(
            name="synthetic",
            num_layers=max(layers) + 1,
            moe_layers=tuple(layers),
            num_experts=num_experts,
            top_k=k,
        ),
        source=SourceInfo(kind="synthetic"),
    )
    forward = 0
    with TraceWriter(path, manifest, part_rows=part_rows) as w:
        for r, ex in enumerate(experts):
            n_tok = ex.shape[0]
            ph = np.zeros(n_tok, np.int8) if phases is None else np.asarray(phases[r], np.int8)
            step = np.cumsum(ph).astype(np.int32)  # prefill tokens: step 0
            fwd = forward + step
            forward = int(fwd.max()) + 1 if n_tok else forward
            rows = n_tok * num_layers
            w.write_request(
                RequestRecord(
                    request_id=f"{id_prefix}{r:05d}",
                    prompt_tokens=int((ph == 0).sum()),
                    generated_tokens=int((ph == 1).sum()),
                    prompt_text=None if prompts is None else prompts[r],
                ),
                token=np.repeat(np.arange(n_tok, dtype=np.int32), num_layers),
                step=np.repeat(step, num_layers),
                phase=np.repeat(ph, num_layers),
                forward=np.repeat(fwd, num_layers),
                layer=np.tile(np.asarray(layers, np.int16), n_tok),
                experts=ex.reshape(rows, k),
            )
    return path


def sample_distinct(rng: np.random.Generator, probs: np.ndarray, n: int, k: int) -> np.ndarray:
    """(n, k) distinct expert ids per row drawn without replacement from ``probs``."""
    e = probs.size
    keys = np.log(rng.random((n, e))) / probs[None, :]  # Efraimidis-Spirakis weighted sampling
    return np.argsort(-keys, axis=1)[:, :k].astype(np.int16)


def zipf_routing(
    rng: np.random.Generator, tokens: Sequence[int], layers: int, num_experts: int, k: int, s: float
) -> list[np.ndarray]:
    """Each layer: a fixed random permutation of Zipf(s) popularity over the experts."""
    p = np.arange(1, num_experts + 1, dtype=np.float64) ** -s
    p /= p.sum()
    perms = [rng.permutation(num_experts) for _ in range(layers)]
    out = []
    for t in tokens:
        ex = np.empty((t, layers, k), np.int16)
        for layer in range(layers):
            probs = np.empty(num_experts)
            probs[perms[layer]] = p
            ex[:, layer, :] = sample_distinct(rng, probs, t, k)
        out.append(ex)
    return out
