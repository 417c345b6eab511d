"""Device expert slots: preallocated storage, the slot table's physical side, async loads.

Residency *decisions* come from :class:`moetrace.tuner.policy.cache.ExpertCache` (the
same code the simulator's policies are defined by); this module owns the bytes: one
preallocated tensor per expert parameter with ``num_slots + stream_slots`` rows, loads
into a slot on the caller's thread or asynchronously (a background thread on CPU, a side
stream with events on CUDA), and waits for a slot's pending load before it is used.
"""

from __future__ import annotations

import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import torch

from moetrace.runtime.expert_store import ExpertSource
from moetrace.runtime.experts import ExpertParam

STREAMED = (-1, -1)


class SlotPool:
    """Preallocated expert storage on the compute device."""

    def __init__(
        self,
        params: tuple[ExpertParam, ...],
        num_slots: int,
        stream_slots: int,
        device: torch.device,
        source: ExpertSource,
        async_loads: bool = True,
    ):
        self.device = device
        self.num_slots = num_slots
        self.stream_slots = stream_slots
        self.source = source
        self.storage = {
            p.name: torch.empty((num_slots + stream_slots, *p.shape), dtype=p.dtype, device=device)
            for p in params
        }
        self.bytes_per_slot = sum(p.nbytes for p in params)
        self._pending: dict[int, Any] = {}
        self._cuda = device.type == "cuda"
        self._stream = torch.cuda.Stream(device) if self._cuda else None
        self._pool = (
            ThreadPoolExecutor(1, "moetrace-prefetch") if async_loads and not self._cuda else None
        )
        self.async_loads = async_loads

    @property
    def slot_bytes(self) -> int:
        return self.num_slots * self.bytes_per_slot

    @property
    def device_bytes(self) -> int:
        return (self.num_slots + self.stream_slots) * self.bytes_per_slot

    def views(self, slot: int) -> dict[str, torch.Tensor]:
        return {name: t[slot] for name, t in self.storage.items()}

    def stream_slot(self, i: int) -> int:
        return self.num_slots + i

    def load(self, slot: int, layer: int, expert: int) -> int:
        """Fill ``slot`` now (after any pending load into it); return bytes moved."""
        self.wait(slot)
        return self.source.read_into(layer, expert, self.views(slot))

    def load_async(self, slot: int, layer: int, expert: int) -> int:
        """Start filling ``slot`` in the background; :meth:`wait` before using it."""
        self.wait(slot)
        if self._cuda:
            assert self._stream is not None
            self._stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(self._stream):
                moved = self.source.read_into(layer, expert, self.views(slot))
                event = torch.cuda.Event()
                event.record(self._stream)
            self._pending[slot] = event
            return moved
        if self._pool is None:
            return self.load(slot, layer, expert)
        fut: Future[int] = self._pool.submit(self.source.read_into, layer, expert, self.views(slot))
        self._pending[slot] = fut
        return self.bytes_per_slot

    def wait(self, slot: int) -> float:
        """Wait for a pending load into ``slot``; return the seconds stalled."""
        pending = self._pending.pop(slot, None)
        if pending is None:
            return 0.0
        t0 = time.perf_counter()
        if isinstance(pending, Future):
            pending.result()
        else:
            torch.cuda.current_stream(self.device).wait_event(pending)
        return time.perf_counter() - t0

    def drain(self) -> None:
        for slot in list(self._pending):
            self.wait(slot)

    def close(self) -> None:
        self.drain()
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
