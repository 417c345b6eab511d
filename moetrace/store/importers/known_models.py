"""Facts about models whose published traces moetrace imports, for what files lack.

The files of published trace sets name no model facts. When SRC's folder (or
``--model-name``) names a model listed here, its layer count, MoE layers, routed experts,
top-k, shared experts and bytes per expert (3 projection matrices of the routed expert in
the checkpoint dtype) come from this table; the manifest still lists them as inferred.
Add a model with :func:`register_known_model`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from moetrace.errors import ConfigError


@dataclass(frozen=True)
class KnownModel:
    key: str
    aliases: tuple[str, ...]
    architecture: str
    num_layers: int
    moe_layers: tuple[int, ...]
    num_experts: int
    top_k: int
    shared_experts: int
    bytes_per_expert: int
    dtype: str

    def __post_init__(self) -> None:
        if not self.aliases:
            raise ConfigError(f"known model {self.key!r}: needs at least one alias")
        if not all(0 <= x < self.num_layers for x in self.moe_layers):
            raise ConfigError(f"known model {self.key!r}: moe_layers outside [0, num_layers)")
        if not 1 <= self.top_k <= self.num_experts:
            raise ConfigError(f"known model {self.key!r}: top_k {self.top_k} out of range")


def normalize(name: str) -> str:
    """Lowercase alphanumerics only: ``Llama-4-Maverick`` -> ``llama4maverick``."""
    return re.sub(r"[^a-z0-9]", "", name.lower())


_KNOWN: dict[str, KnownModel] = {}


def register_known_model(model: KnownModel) -> None:
    _KNOWN[model.key] = model


def find_known_model(name: str | None) -> KnownModel | None:
    """The known model whose longest alias occurs in ``name`` (normalized), or None."""
    if not name:
        return None
    norm = normalize(name)
    best: tuple[int, KnownModel] | None = None
    for model in _KNOWN.values():
        for alias in model.aliases:
            a = normalize(alias)
            if a in norm and (best is None or len(a) > best[0]):
                best = (len(a), model)
    return best[1] if best else None


def _bytes(hidden: int, intermediate: int, bytes_per_param: int) -> int:
    return 3 * hidden * intermediate * bytes_per_param


for _model in (
    KnownModel(
        key="llama4-maverick",
        aliases=("llama4-maverick", "llama-4-maverick"),
        architecture="Llama4ForConditionalGeneration",
        num_layers=48,
        moe_layers=tuple(range(1, 48, 2)),
        num_experts=128,
        top_k=1,
        shared_experts=1,
        bytes_per_expert=_bytes(5120, 8192, 2),
        dtype="bfloat16",
    ),
    KnownModel(
        key="llama4-scout",
        aliases=("llama4-scout", "llama-4-scout"),
        architecture="Llama4ForConditionalGeneration",
        num_layers=48,
        moe_layers=tuple(range(48)),
        num_experts=16,
        top_k=1,
        shared_experts=1,
        bytes_per_expert=_bytes(5120, 8192, 2),
        dtype="bfloat16",
    ),
    KnownModel(
        key="deepseek-v2-lite",
        aliases=("deepseek-v2-lite",),
        architecture="DeepseekV2ForCausalLM",
        num_layers=27,
        moe_layers=tuple(range(1, 27)),
        num_experts=64,
        top_k=6,
        shared_experts=2,
        bytes_per_expert=_bytes(2048, 1408, 2),
        dtype="bfloat16",
    ),
    KnownModel(
        key="deepseek-r1",
        aliases=("deepseek-r1", "deepseek-v3"),
        architecture="DeepseekV3ForCausalLM",
        num_layers=61,
        moe_layers=tuple(range(3, 61)),
        num_experts=256,
        top_k=8,
        shared_experts=1,
        bytes_per_expert=_bytes(7168, 2048, 1),
        dtype="float8_e4m3fn",
    ),
    KnownModel(
        key="qwen3-235b-a22b",
        aliases=("qwen3-235b",),
        architecture="Qwen3MoeForCausalLM",
        num_layers=94,
        moe_layers=tuple(range(94)),
        num_experts=128,
        top_k=8,
        shared_experts=0,
        bytes_per_expert=_bytes(4096, 1536, 2),
        dtype="bfloat16",
    ),
):
    register_known_model(_model)
