"""The RAM -> device link as the RAM tier uses it: copies of one expert from a RAM row into
a device slot, on one copy thread, timed on this machine.

The trace replay of a three-tier plan (``tier="ram"``) models its RAM -> device link with
these figures and its disk -> RAM link with the store's reads
(:func:`moetrace.runtime.profile.measure_store`). Like the store's read, the link is
fitted from one copy alone and ``top_k`` copies back to back (an event's misses): the mean
time per copy of a batch is the link's time per expert (bandwidth), the rest of a lone
copy its latency.
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import torch

from moetrace.devices import check_device
from moetrace.runtime.experts import ExpertParam
from moetrace.runtime.memory import ExpertMemory
from moetrace.store.hardware import HardwareProfile

ROWS = 8
"""RAM rows the copies read from, in turn (as a RAM tier's slots)."""


@dataclass
class CopySamples:
    """Raw timings (seconds) of expert copies RAM -> device slot: ``single`` lone copies,
    ``batch`` ``top_k`` copies back to back; mergeable across moments of a benchmark."""

    bytes_per_expert: int
    top_k: int
    device: str
    single: list[float] = field(default_factory=list)
    batch: list[float] = field(default_factory=list)

    def merge(self, other: CopySamples) -> CopySamples:
        self.single += other.single
        self.batch += other.batch
        return self

    def link(self) -> tuple[float, float]:
        """The link's bandwidth (GB/s) and latency (us) from the means, as the simulator
        sums copies (its ``xfer`` and ``lat``)."""
        k = self.top_k
        t1, tk = statistics.fmean(self.single), statistics.fmean(self.batch)
        xfer = max((tk - t1) / (k - 1), 1e-9) if k > 1 else t1
        return self.bytes_per_expert / xfer / 1e9, max(t1 - xfer, 0.0) * 1e6

    def apply(self, hardware: HardwareProfile) -> HardwareProfile:
        """``hardware`` with its RAM -> device link (``link_*``) measured here."""
        gbps, latency_us = self.link()
        return dataclasses.replace(
            hardware,
            link_bandwidth_gbps=round(gbps, 4),
            transfer_latency_us=round(latency_us, 2),
            description=(
                f"{hardware.description}; RAM -> device link: {len(self.single)} lone and "
                f"{len(self.batch)} x {self.top_k} back-to-back copies of "
                f"{self.bytes_per_expert} bytes into a {self.device} slot"
            ),
        )


def measure_copy(
    params: Sequence[ExpertParam],
    top_k: int,
    *,
    device: str = "cpu",
    copies: int = 12,
    seed: int = 0,
) -> CopySamples:
    """Time the RAM tier's copies of experts with ``params`` into device slots: one alone
    and ``top_k`` back to back, ``copies`` times each, on one copy thread (the RAM tier's
    queue). RAM rows are aligned host buffers (pinned for CUDA), slots device buffers."""
    dev = check_device(device)
    cuda = dev.type == "cuda"
    host, slots = ExpertMemory(torch.device("cpu")), ExpertMemory(dev)
    ram, dst = {}, {}
    for p in params:
        n = p.nbytes
        buf = host.allocate(ROWS * n, f"ram/{p.name}", pin=cuda)
        ram[p.name] = buf.view(p.dtype).view(ROWS, *p.shape)
        dst[p.name] = slots.allocate(top_k * n, p.name).view(p.dtype).view(top_k, *p.shape)
        ram[p.name].view(torch.uint8).fill_(1)
    stream = torch.cuda.Stream(dev) if cuda else None

    def copy(row: int, slot: int) -> None:
        if stream is not None:
            with torch.cuda.stream(stream):
                for name, t in dst.items():
                    t[slot].copy_(ram[name][row], non_blocking=True)
            stream.synchronize()
        else:
            for name, t in dst.items():
                t[slot].copy_(ram[name][row])

    out = CopySamples(sum(p.nbytes for p in params), top_k, str(dev))
    rng = np.random.default_rng(seed)
    init = (lambda: torch.cuda.set_device(dev)) if cuda else None
    with ThreadPoolExecutor(1, "moetrace-copyrate", initializer=init) as pool:
        pool.submit(copy, 0, 0).result()  # warm-up
        for _ in range(copies):
            rows = rng.integers(ROWS, size=top_k + 1).tolist()
            t0 = time.perf_counter()
            pool.submit(copy, rows[0], 0).result()
            out.single.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            for f in [pool.submit(copy, r, s) for s, r in enumerate(rows[1:])]:
                f.result()
            out.batch.append(time.perf_counter() - t0)
    return out
