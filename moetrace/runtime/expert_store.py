"""Slow tiers of expert weights: host memory, or an on-disk expert store.

An expert store is a directory written once by :func:`prepare_store` (``moetrace prepare``)::

    store.json                     format (v2), routing shape, per-expert tensors, layout
    config.json, tokenizer files   to rebuild the model skeleton
    dense.safetensors              every non-expert parameter and buffer
    experts/L<layer>.bin           one MoE layer's routed experts, expert e at e * stride,
                                   each tensor at a 4 KiB-aligned offset (raw bytes)

Experts are read without the page cache (:mod:`moetrace.runtime.direct_io`), so the slots
are the only memory experts take. Version 1 stores (one safetensors file per expert,
``experts/L<layer>-E<expert>.safetensors``, read memory-mapped) are still read.

:func:`load_skeleton` rebuilds the model on the ``meta`` device, assigns the dense tensors
on the compute device and drops the expert tensors, so no expert is ever materialized on
the device outside the runtime's slots.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from moetrace.errors import ModelError, RuntimeEngineError
from moetrace.runtime.direct_io import ExpertLayout, LayerFiles, write_layer_file
from moetrace.runtime.experts import ExpertParam, MoELayerRef, expert_params, find_moe_layers
from moetrace.runtime.memory import ALIGN

log = logging.getLogger(__name__)

STORE_FORMAT = "moetrace-expert-store"
STORE_VERSION = 2
READABLE_STORE_VERSIONS = (1, 2)
STORE_INDEX = "store.json"
DENSE_FILE = "dense.safetensors"
EXPERTS_DIR = "experts"


def expert_file(layer_id: int, expert: int) -> str:
    """A version 1 store's file of one expert."""
    return f"{EXPERTS_DIR}/L{layer_id:04d}-E{expert:05d}.safetensors"


def layer_file(layer_id: int) -> str:
    """A version 2 store's file of one MoE layer's experts."""
    return f"{EXPERTS_DIR}/L{layer_id:04d}.bin"


class ExpertSource(Protocol):
    """Where experts come from when a slot is filled."""

    tier: str

    def read_into(self, layer: int, expert: int, out: dict[str, torch.Tensor]) -> int:
        """Copy expert ``expert`` of MoE layer index ``layer`` into ``out``; return bytes."""
        ...


class HostExpertSource:
    """Experts kept in host memory (pinned when the compute device is CUDA)."""

    tier = "host"

    def __init__(self, tensors: Sequence[dict[str, torch.Tensor]], pin: bool = False):
        self._tensors = []
        for per_layer in tensors:
            layer = {}
            for name, t in per_layer.items():
                t = t.detach().to("cpu")
                layer[name] = t.pin_memory() if pin else t
            self._tensors.append(layer)

    def read_into(self, layer: int, expert: int, out: dict[str, torch.Tensor]) -> int:
        moved = 0
        for name, dst in out.items():
            src = self._tensors[layer][name][expert]
            dst.copy_(src, non_blocking=dst.is_cuda)
            moved += src.numel() * src.element_size()
        return moved


@dataclass(frozen=True)
class StoreIndex:
    """The store.json of an expert store."""

    layer_ids: tuple[int, ...]
    num_experts: int
    top_k: int
    params: tuple[ExpertParam, ...]
    fingerprint: str
    dtype: str
    version: int = STORE_VERSION

    @property
    def bytes_per_expert(self) -> int:
        return sum(p.nbytes for p in self.params)

    @property
    def layout(self) -> ExpertLayout:
        """Where an expert's tensors lie in its layer file (version 2)."""
        return ExpertLayout.of([p.name for p in self.params], [p.nbytes for p in self.params])

    def to_json(self) -> dict[str, Any]:
        return {
            "format": STORE_FORMAT,
            "format_version": STORE_VERSION,
            "layer_ids": list(self.layer_ids),
            "num_experts": self.num_experts,
            "top_k": self.top_k,
            "params": [
                {
                    "name": p.name,
                    "shape": list(p.shape),
                    "dtype": str(p.dtype).removeprefix("torch."),
                }
                for p in self.params
            ],
            "fingerprint": self.fingerprint,
            "dtype": self.dtype,
            "bytes_per_expert": self.bytes_per_expert,
            "layout": {
                "files": layer_file(0).replace("0000", "<layer>"),
                "align": ALIGN,
                "stride": self.layout.stride,
                "offsets": dict(zip(self.layout.names, self.layout.offsets, strict=True)),
            },
        }

    @classmethod
    def load(cls, root: Path) -> StoreIndex:
        path = root / STORE_INDEX
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except OSError as exc:
            raise RuntimeEngineError(f"{path}: not an expert store ({exc.strerror})") from None
        except json.JSONDecodeError as exc:
            raise RuntimeEngineError(f"{path}: not valid JSON (line {exc.lineno})") from None
        version = data.get("format_version")
        if data.get("format") != STORE_FORMAT or version not in READABLE_STORE_VERSIONS:
            raise RuntimeEngineError(
                f"{path}: not an expert store this version reads (format="
                f"{data.get('format')!r}, version {version!r}; readable: "
                f"{READABLE_STORE_VERSIONS})"
            )
        try:
            params = tuple(
                ExpertParam(p["name"], tuple(p["shape"]), getattr(torch, p["dtype"]))
                for p in data["params"]
            )
            return cls(
                tuple(data["layer_ids"]),
                int(data["num_experts"]),
                int(data["top_k"]),
                params,
                str(data["fingerprint"]),
                str(data["dtype"]),
                int(version),
            )
        except (KeyError, TypeError, AttributeError) as exc:
            raise RuntimeEngineError(f"{path}: missing or invalid field ({exc})") from None


class DiskExpertSource:
    """Experts read from an expert store without the page cache (v2), or memory-mapped
    from a version 1 store's per-expert files (through the page cache)."""

    tier = "disk"

    def __init__(self, root: str | os.PathLike[str], index: StoreIndex, mode: str | None = None):
        self.root = Path(root)
        self.index = index
        self.layer_ids = index.layer_ids
        self.files: LayerFiles | None = None
        if index.version >= 2:
            paths = [self.root / layer_file(i) for i in index.layer_ids]
            self.files = LayerFiles(paths, index.layout, mode)
        else:
            log.warning(
                "%s: a version 1 expert store is read through the page cache; "
                "rewrite it with `moetrace prepare` for reads that bypass it",
                root,
            )
        self._local = threading.local()

    @property
    def mode(self) -> str:
        return "mmap" if self.files is None else self.files.mode

    def read_into(self, layer: int, expert: int, out: dict[str, torch.Tensor]) -> int:
        if self.files is None:
            return self._read_v1(layer, expert, out)
        first = next(iter(out.values()))
        if first.device.type == "cpu":
            return self.files.read_into(layer, expert, out)
        # a device slot: read into this thread's host buffer, then copy it over
        host = getattr(self._local, "host", None)
        if host is None:
            host = {n: torch.empty(t.shape, dtype=t.dtype, pin_memory=True) for n, t in out.items()}
            self._local.host = host
        moved = self.files.read_into(layer, expert, host)
        for name, dst in out.items():
            dst.copy_(host[name])
        return moved

    def _read_v1(self, layer: int, expert: int, out: dict[str, torch.Tensor]) -> int:
        path = self.root / expert_file(self.layer_ids[layer], expert)
        moved = 0
        try:
            with safe_open(str(path), framework="pt", device="cpu") as fh:
                for name, dst in out.items():
                    src = fh.get_tensor(name)
                    dst.copy_(src, non_blocking=dst.is_cuda)
                    moved += src.numel() * src.element_size()
        except (OSError, KeyError) as exc:
            raise RuntimeEngineError(f"{path}: cannot read expert ({exc})") from None
        return moved

    def close(self) -> None:
        if self.files is not None:
            self.files.close()


def is_store(path: str | os.PathLike[str]) -> bool:
    return (Path(path) / STORE_INDEX).is_file()


def model_fingerprint(model: nn.Module) -> str:
    from moetrace.store.schema import config_fingerprint

    return config_fingerprint(model.config.to_dict())


def detach_experts(
    model: nn.Module, layers: Sequence[MoELayerRef]
) -> list[dict[str, torch.Tensor]]:
    """Remove the expert tensors from the experts modules; return them per layer.

    The modules keep ``_moetrace_params`` (names, shapes, dtypes) and no expert storage.
    """
    out = []
    for ref in layers:
        mod = ref.experts
        tensors = {}
        for p in ref.params:
            tensors[p.name] = mod._parameters.pop(p.name).detach()
        mod._moetrace_params = ref.params
        out.append(tensors)
    return out


def prepare_store(
    model_path: str | os.PathLike[str], out: str | os.PathLike[str], *, dtype: str | None = None
) -> StoreIndex:
    """Write an expert store for the transformers model at ``model_path`` (a folder)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    out_dir = Path(out)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise RuntimeEngineError(f"{out_dir}: output folder exists and is not empty")
    try:
        config = AutoConfig.from_pretrained(model_path)
        kwargs: dict[str, Any] = {"dtype": getattr(torch, dtype)} if dtype else {}
        model = AutoModelForCausalLM.from_pretrained(model_path, **kwargs)
    except (OSError, ValueError) as exc:
        raise ModelError(f"{model_path}: cannot load model ({exc})") from None
    model.eval()
    layers = find_moe_layers(model)
    fingerprint = model_fingerprint(model)
    (out_dir / EXPERTS_DIR).mkdir(parents=True, exist_ok=True)
    experts = detach_experts(model, layers)
    index = StoreIndex(
        tuple(r.layer_id for r in layers),
        layers[0].num_experts,
        layers[0].top_k,
        layers[0].params,
        fingerprint,
        str(layers[0].params[0].dtype).removeprefix("torch."),
    )
    for ref, tensors in zip(layers, experts, strict=True):
        write_layer_file(
            out_dir / layer_file(ref.layer_id),
            index.layout,
            [{n: t[e] for n, t in tensors.items()} for e in range(ref.num_experts)],
        )
    save_dense(model, out_dir / DENSE_FILE)
    config.save_pretrained(out_dir)
    try:
        AutoTokenizer.from_pretrained(model_path).save_pretrained(out_dir)
    except (OSError, ValueError, TypeError):
        log.warning("%s: no tokenizer found; the store has none", model_path)
    (out_dir / STORE_INDEX).write_text(json.dumps(index.to_json(), indent=1) + "\n")
    return index


def save_dense(model: nn.Module, path: Path) -> None:
    """Every parameter and buffer left in ``model`` (experts detached), tied ones once."""
    seen: dict[int, str] = {}
    tensors: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    for name, t in [*model.named_parameters(remove_duplicate=False), *model.named_buffers()]:
        key = id(t)
        if key in seen:
            aliases[name] = seen[key]
            continue
        seen[key] = name
        tensors[name] = t.detach().contiguous().cpu()
    save_file(tensors, str(path), metadata={"aliases": json.dumps(aliases)})


def _assign(model: nn.Module, name: str, value: torch.Tensor) -> None:
    owner_name, _, attr = name.rpartition(".")
    owner = model.get_submodule(owner_name) if owner_name else model
    if attr in owner._parameters:
        owner._parameters[attr] = nn.Parameter(value, requires_grad=False)
    elif attr in owner._buffers:
        owner._buffers[attr] = value
    else:
        raise RuntimeEngineError(f"dense tensor {name!r} has no place in the model")


def meta_model(config: Any, dtype: torch.dtype, implementation: str | None = None) -> nn.Module:
    """The model of ``config`` on the ``meta`` device with its expert tensors detached
    (the runtime's slots hold them); nothing is materialized."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    if implementation is not None:
        model.set_experts_implementation(implementation)
    detach_experts(model, find_moe_layers(model))
    return model


def load_skeleton(
    store: str | os.PathLike[str], device: torch.device
) -> tuple[nn.Module, StoreIndex]:
    """The model of an expert store with dense weights on ``device`` and no experts."""
    from transformers import AutoConfig

    root = Path(store)
    index = StoreIndex.load(root)
    try:
        config = AutoConfig.from_pretrained(root)
    except (OSError, ValueError) as exc:
        raise ModelError(f"{root}: cannot read config ({exc})") from None
    model = meta_model(config, getattr(torch, index.dtype))
    dense = root / DENSE_FILE
    with safe_open(str(dense), framework="pt", device="cpu") as fh:
        aliases = json.loads((fh.metadata() or {}).get("aliases", "{}"))
        loaded = {}
        for name in fh.keys():
            loaded[name] = fh.get_tensor(name).to(device)
            _assign(model, name, loaded[name])
    for name, target in aliases.items():
        owner_name, _, attr = target.rpartition(".")
        owner = model.get_submodule(owner_name) if owner_name else model
        src = owner._parameters.get(attr)
        if src is None:
            src = owner._buffers[attr]
        a_owner_name, _, a_attr = name.rpartition(".")
        a_owner = model.get_submodule(a_owner_name) if a_owner_name else model
        if a_attr in a_owner._parameters:
            a_owner._parameters[a_attr] = src
        else:
            a_owner._buffers[a_attr] = src
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise RuntimeEngineError(f"{dense}: missing dense tensors {left[:3]}")
    model.eval()
    return model, index


__all__ = [
    "DiskExpertSource",
    "ExpertSource",
    "HostExpertSource",
    "StoreIndex",
    "detach_experts",
    "expert_params",
    "is_store",
    "load_skeleton",
    "prepare_store",
]
