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
from pathlib import Path

import numpy as np
import torch

from moetrace.devices import check_device
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
    slope, base = np.polyfit(np.asarray(TOKEN_COUNTS, float), np.asarray(times), 1)
    return max(float(base), 0.0), max(float(slope), 0.0)


def profile_hardware(
    device: str = "cpu",
    *,
    model: str | None = None,
    nbytes: int = 64 * 2**20,
    repeats: int = 5,
    name: str | None = None,
) -> HardwareProfile:
    """Measure this machine and return a hardware profile."""
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
