"""Helpers shared by the store tests: small manifests and synthetic requests."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from moetrace.store import Manifest, ModelInfo, RequestRecord, TraceWriter


def make_manifest(
    *,
    top_k: int = 2,
    num_experts: int = 8,
    moe_layers: tuple[int, ...] = (1, 2, 3),
    num_layers: int = 4,
    weight_dtype: str = "float32",
    speculative: bool = False,
    tags: dict[str, str] | None = None,
    name: str = "tiny-moe",
) -> Manifest:
    return Manifest(
        model=ModelInfo(
            name=name,
            num_layers=num_layers,
            moe_layers=moe_layers,
            num_experts=num_experts,
            top_k=top_k,
        ),
        tags=tags or {},
        weight_dtype=weight_dtype,
        speculative=speculative,
    )


@dataclass
class SynthRequest:
    """One request's rows as given to the writer (prefill step 0 + one decode token/step)."""

    record: RequestRecord
    token: np.ndarray
    step: np.ndarray
    phase: np.ndarray
    forward: np.ndarray
    layer: np.ndarray
    experts: np.ndarray
    weights: np.ndarray | None
    speculative: np.ndarray | None
    extra: dict[str, object] = field(default_factory=dict)

    @property
    def rows(self) -> int:
        return int(self.experts.shape[0])

    def kwargs(self) -> dict[str, object]:
        out: dict[str, object] = {
            "token": self.token,
            "step": self.step,
            "phase": self.phase,
            "forward": self.forward,
            "layer": self.layer,
            "experts": self.experts,
            "weights": self.weights,
        }
        if self.speculative is not None:
            out["speculative"] = self.speculative
        return out


def synth_request(
    manifest: Manifest,
    rng: np.random.Generator,
    request_id: str,
    *,
    prompt_tokens: int = 3,
    generated_tokens: int = 2,
    with_weights: bool = True,
    forward_base: int = 0,
    prompt_text: str | None = None,
    tags: dict[str, str] | None = None,
    dropped: float = 0.05,
) -> SynthRequest:
    """Rows for one request: token-major, layer-minor, ``(tokens x MoE layers)`` rows."""
    m = manifest.model
    layers = np.asarray(m.moe_layers, dtype=np.int64)
    n_tok = prompt_tokens + generated_tokens
    token = np.repeat(np.arange(n_tok), len(layers))
    step = np.where(token < prompt_tokens, 0, token - prompt_tokens + 1)
    phase = (step > 0).astype(np.int8)
    forward = forward_base + step
    layer = np.tile(layers, n_tok)
    n = len(token)
    experts = np.argsort(rng.random((n, m.num_experts)), axis=1)[:, : m.top_k]
    experts[rng.random((n, m.top_k)) < dropped] = -1
    weights = rng.random((n, m.top_k)).astype(np.float32) if with_weights else None
    spec = None
    if manifest.speculative:
        spec = rng.integers(-1, m.num_experts, size=(n, m.top_k))
    record = RequestRecord(
        request_id=request_id,
        prompt_tokens=prompt_tokens,
        generated_tokens=generated_tokens,
        prompt_text=prompt_text,
        tags=tags or {},
    )
    return SynthRequest(record, token, step, phase, forward, layer, experts, weights, spec)


def write_trace(
    path: Path,
    manifest: Manifest,
    requests: list[SynthRequest],
    **writer_kwargs: object,
) -> None:
    with TraceWriter(path, manifest, **writer_kwargs) as writer:  # type: ignore[arg-type]
        for req in requests:
            writer.write_request(req.record, **req.kwargs())
