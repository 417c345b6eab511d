"""CoServe-style offline profiler: link bandwidth and per-layer compute time on this machine.

Measures the slow tier -> compute device copy rate (host -> CUDA with pinned memory, or
disk -> RAM through a memory-mapped file on CPU) and the time of one MoE layer's experts
call at a few token counts, fitted as ``base + per_token * tokens``; writes a hardware
profile in the format of :mod:`moetrace.store.hardware` that ``simulate``/``tune`` accept.
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from moetrace.devices import check_device
from moetrace.runtime.expert_store import ExpertSource
from moetrace.store.hardware import HardwareProfile

TOKEN_COUNTS = (1, 4, 16)


def _bandwidth(device: torch.device, nbytes: int, repeats: int) -> tuple[float, float]:
    """(GB/s median, latency us) of copies of ``nbytes`` from the slow tier."""
    rates, small = [], []
    if device.type == "cuda":
        src = torch.empty(nbytes, dtype=torch.uint8).pin_memory()
        dst = torch.empty(nbytes, dtype=torch.uint8, device=device)
        tiny_src, tiny_dst = src[:64], dst[:64]
        for _ in range(repeats):
            torch.cuda.synchronize(device)
            t0 = time.perf_counter()
            dst.copy_(src, non_blocking=True)
            torch.cuda.synchronize(device)
            rates.append(nbytes / (time.perf_counter() - t0) / 1e9)
            t0 = time.perf_counter()
            tiny_dst.copy_(tiny_src, non_blocking=True)
            torch.cuda.synchronize(device)
            small.append(time.perf_counter() - t0)
        return statistics.median(rates), statistics.median(small) * 1e6
    with tempfile.TemporaryDirectory(prefix="moetrace-profile-") as tmp:
        path = Path(tmp) / "blob.bin"
        path.write_bytes(os.urandom(nbytes))
        dst = torch.empty(nbytes, dtype=torch.uint8)
        for _ in range(repeats):
            _drop_cache(path)
            t0 = time.perf_counter()
            mm = np.memmap(path, dtype=np.uint8, mode="c")
            dst.copy_(torch.from_numpy(np.asarray(mm)))
            rates.append(nbytes / (time.perf_counter() - t0) / 1e9)
            del mm
            t0 = time.perf_counter()
            with open(path, "rb") as fh:
                fh.read(64)
            small.append(time.perf_counter() - t0)
    return statistics.median(rates), statistics.median(small) * 1e6


def _drop_cache(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
    except (AttributeError, OSError):
        pass


def _compute(device: torch.device, model_dir: str | None, repeats: int) -> tuple[float, float]:
    """(base us, per-token us) of one MoE layer's experts call."""
    from moetrace.runtime.experts import find_moe_layers, inner_forward

    if model_dir is None:
        from moetrace.tracer.demo import load_demo_model

        model, _ = load_demo_model(device=device)
    else:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(model_dir).to(device).eval()
    ref = find_moe_layers(model)[0]
    hidden_size = int(next(iter(ref.experts.parameters())).shape[-1])
    fn = inner_forward(ref.experts, getattr(model.config, "_experts_implementation", "eager"))
    times = []
    for tokens in TOKEN_COUNTS:
        h = torch.randn(tokens, hidden_size, device=device, dtype=ref.params[0].dtype)
        idx = torch.randint(0, ref.num_experts, (tokens, ref.top_k), device=device)
        w = torch.full((tokens, ref.top_k), 1.0 / ref.top_k, device=device, dtype=h.dtype)
        samples = []
        for _ in range(repeats):
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            t0 = time.perf_counter()
            with torch.no_grad():
                fn(ref.experts, h, idx, w)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            samples.append(time.perf_counter() - t0)
        times.append(statistics.median(samples) * 1e6)
    return _fit(times)


def _fit(times_us: list[float]) -> tuple[float, float]:
    slope, base = np.polyfit(np.asarray(TOKEN_COUNTS, float), np.asarray(times_us), 1)
    return max(float(base), 0.0), max(float(slope), 0.0)


@dataclass
class StoreSamples:
    """Raw timings of an expert store through the runtime (seconds), mergeable so
    measurements taken at several moments (interleaved with a benchmark's runs) make one
    profile: ``single`` lone reads, ``batch`` top-k back-to-back reads, ``compute[i]``
    one layer's call at ``TOKEN_COUNTS[i]`` tokens."""

    store: str
    bytes_per_expert: int
    top_k: int
    mode: str
    single: list[float] = field(default_factory=list)
    batch: list[float] = field(default_factory=list)
    compute: list[list[float]] = field(default_factory=lambda: [[] for _ in TOKEN_COUNTS])

    def merge(self, other: StoreSamples) -> StoreSamples:
        self.single += other.single
        self.batch += other.batch
        for mine, theirs in zip(self.compute, other.compute, strict=True):
            mine += theirs
        return self

    def profile(self, name: str | None = None, device: str = "cpu") -> HardwareProfile:
        """The hardware profile of these samples: the mean time per read of a batch is
        the link's (bandwidth; the mean, as the simulator sums reads and a disk's slow
        reads count), the rest of a lone read its latency (the simulator's ``xfer`` and
        ``lat``); compute from medians, exact at 1 and 16 tokens (memory-bound, not
        linear in between)."""
        k = self.top_k
        times = [statistics.median(c) * 1e6 for c in self.compute]
        per_token = max((times[-1] - times[0]) / (TOKEN_COUNTS[-1] - TOKEN_COUNTS[0]), 0.0)
        base = max(times[0] - per_token * TOKEN_COUNTS[0], 0.0)
        t1, tk = statistics.fmean(self.single), statistics.fmean(self.batch)
        xfer = max((tk - t1) / (k - 1), 1e-9) if k > 1 else t1
        latency = max(t1 - xfer, 0.0)
        return HardwareProfile(
            name=name or f"measured-store-{device}",
            link_bandwidth_gbps=round(self.bytes_per_expert / xfer / 1e9, 4),
            transfer_latency_us=round(latency * 1e6, 2),
            layer_compute_base_us=round(base, 2),
            layer_compute_per_token_us=round(per_token, 3),
            device_memory_gib=None,
            description=(
                f"measured by moetrace profile on the expert store {Path(self.store).name}: "
                f"{len(self.single)} times one read and {k} back-to-back reads of "
                f"{self.bytes_per_expert} bytes ({self.mode} mode; means {t1 * 1e3:.2f} and "
                f"{tk * 1e3:.2f} ms, so {xfer * 1e3:.2f} ms per read plus "
                f"{latency * 1e3:.2f} ms latency); a layer of top-{k} through the engine at "
                f"{TOKEN_COUNTS} tokens: {[round(x, 1) for x in times]} us"
            ),
            source="moetrace profile",
        )


def measure_store(
    store: str | os.PathLike[str],
    *,
    device: str = "cpu",
    read_mode: str | None = None,
    implementation: str = "eager",
    source: ExpertSource | None = None,
    reads: int = 12,
    repeats: int = 20,
    seed: int = 0,
) -> StoreSamples:
    """Time an expert store's tier on this machine through the runtime itself.

    The link: reads of random (layer, expert) from the store through the engine's demand
    path (the I/O thread, no page cache), one alone and top-k back to back as an event's
    misses are, ``reads`` times each. The compute: one MoE layer's experts call through
    the engine with its experts resident (engine overhead included), at 1, 4 and 16
    tokens, ``repeats`` times each. ``source`` replaces the store's disk reads (the
    replay's host tier)."""
    from transformers import AutoConfig

    from moetrace.runtime.checks import default_plan, model_info
    from moetrace.runtime.engine import OffloadEngine
    from moetrace.runtime.expert_store import DiskExpertSource, StoreIndex, meta_model
    from moetrace.runtime.experts import find_moe_layers

    dev = check_device(device)
    root = Path(store)
    index = StoreIndex.load(root)
    config = AutoConfig.from_pretrained(root)
    model = meta_model(config, getattr(torch, index.dtype), implementation).eval()
    layers = find_moe_layers(model)
    k, E = index.top_k, index.num_experts
    info = model_info(layers, max(index.layer_ids) + 1, index.fingerprint, "profile")
    plan = default_plan(info, 2 * k)
    if source is None:
        source = DiskExpertSource(root, index, read_mode)
    out = StoreSamples(str(root), index.bytes_per_expert, k, getattr(source, "mode", source.tier))
    rng = np.random.default_rng(seed)
    with OffloadEngine(model, source, plan, device=dev, fingerprint=index.fingerprint) as eng:
        for _ in range(reads):  # back-to-back reads, as an event's misses are queued
            picks = [(int(rng.integers(len(layers))), int(rng.integers(E))) for _ in range(k + 1)]
            t0 = time.perf_counter()
            eng.pool.load_many([(0, *picks[0])])
            out.single.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            eng.pool.load_many([(s, la, e) for s, (la, e) in enumerate(picks[1:])])
            out.batch.append(time.perf_counter() - t0)
        ref = layers[0]
        dtype = ref.params[0].dtype
        hidden_size = int(model.config.hidden_size)
        chosen = torch.as_tensor(rng.choice(E, size=k, replace=False), device=dev)
        with torch.no_grad():
            for i, tokens in enumerate(TOKEN_COUNTS):
                h = torch.randn(tokens, hidden_size, device=dev, dtype=dtype)
                idx = torch.stack([chosen[torch.randperm(k)] for _ in range(tokens)])
                w = torch.full((tokens, k), 1.0 / k, device=dev, dtype=dtype)
                ref.experts(h, idx, w)  # loads the k experts
                for _ in range(repeats):
                    if dev.type == "cuda":
                        torch.cuda.synchronize(dev)
                    t0 = time.perf_counter()
                    ref.experts(h, idx, w)
                    if dev.type == "cuda":
                        torch.cuda.synchronize(dev)
                    out.compute[i].append(time.perf_counter() - t0)
    return out


def profile_store(
    store: str | os.PathLike[str],
    *,
    device: str = "cpu",
    name: str | None = None,
    **kw: Any,
) -> HardwareProfile:
    """The hardware profile of an expert store's tier (:func:`measure_store`): the one
    the trace replay's model uses and a plan for that store should be tuned with."""
    return measure_store(store, device=device, **kw).profile(name, check_device(device).type)


def profile_hardware(
    device: str = "cpu",
    *,
    model: str | None = None,
    nbytes: int = 64 * 2**20,
    repeats: int = 5,
    name: str | None = None,
) -> HardwareProfile:
    """Measure this machine and return a hardware profile (for an expert store given as
    ``model``: its reads and compute through the runtime, :func:`profile_store`)."""
    from moetrace.runtime.expert_store import is_store

    if model is not None and is_store(model):
        return profile_store(model, device=device, name=name)
    dev = check_device(device)
    gbps, latency = _bandwidth(dev, nbytes, repeats)
    base, per_token = _compute(dev, model, repeats)
    link = "host->device (pinned)" if dev.type == "cuda" else "disk->RAM (mmap)"
    memory = None
    if dev.type == "cuda":
        memory = torch.cuda.get_device_properties(dev).total_memory / 2**30
    return HardwareProfile(
        name=name or f"measured-{dev.type}",
        link_bandwidth_gbps=round(gbps, 4),
        transfer_latency_us=round(latency, 2),
        layer_compute_base_us=round(base, 2),
        layer_compute_per_token_us=round(per_token, 3),
        device_memory_gib=memory,
        description=f"measured by moetrace profile: {link}, {nbytes} byte copies, {repeats} repeats",
        source="moetrace profile",
    )
