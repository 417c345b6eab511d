"""Device expert slots: preallocated storage, the slot table's physical side, loads.

Residency *decisions* come from :class:`moetrace.tuner.policy.cache.ExpertCache` (the
same code the simulator's policies are defined by); this module owns the bytes: one
preallocated tensor per expert parameter with ``num_slots + stream_slots`` rows, taken
from the :class:`~moetrace.runtime.memory.ExpertMemory` ledger (measured, checked against
the budget), and the loads into them.

Loads model the simulator's link: every load, demand or prefetch, goes through one queue
in issue order, so a demand load waits behind the prefetches already issued exactly as in
the timing model: one I/O thread for a disk tier, one side stream with an event per copy
for host memory -> CUDA (the host waits on the event, so stalls are measured). Host
memory -> CPU copies run on the caller's thread. A slot is waited for before use.

With a RAM tier (:class:`~moetrace.runtime.ram_tier.RamTier` as the source) every load
is the tier's: it queues the disk read and the RAM -> device copy it decided and returns
the copy's future, which the slot waits for like any pending load.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import torch

from moetrace.runtime.expert_store import ExpertSource
from moetrace.runtime.experts import ExpertParam
from moetrace.runtime.memory import ExpertMemory
from moetrace.runtime.ram_tier import RamTier

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
        memory: ExpertMemory,
        async_loads: bool = True,
    ):
        self.device = device
        self.num_slots = num_slots
        self.stream_slots = stream_slots
        self.source = source
        self.memory = memory
        total = num_slots + stream_slots
        self.storage = {
            p.name: memory.allocate(total * p.nbytes, f"slots/{p.name}")
            .view(p.dtype)
            .view(total, *p.shape)
            for p in params
        }
        self.bytes_per_slot = sum(p.nbytes for p in params)
        self._pending: dict[int, Any] = {}
        self._cuda = device.type == "cuda"
        self._tier = source if isinstance(source, RamTier) else None
        """The RAM tier that makes every load (three tiers), else None."""
        self._stream = torch.cuda.Stream(device) if self._cuda and self._tier is None else None
        self._io = (
            ThreadPoolExecutor(1, "moetrace-io")
            if async_loads and self._tier is None and (not self._cuda or source.tier == "disk")
            else None
        )
        self._queued = self._io is not None and source.tier == "disk"
        """Demand loads go through the I/O thread too (one link, in issue order)."""
        self.read_seconds: list[float] = []
        """How long each read on the I/O thread took (the link's own time, no queueing)."""
        self.async_loads = async_loads

    @property
    def total_slots(self) -> int:
        return self.num_slots + self.stream_slots

    @property
    def has_pending(self) -> bool:
        return bool(self._pending)

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
        return self.load_many([(slot, layer, expert)])

    def load_many(self, loads: Sequence[tuple[int, int, int]]) -> int:
        """Fill each ``(slot, layer, expert)`` and wait for all; return bytes moved."""
        for slot, _, _ in loads:
            self.wait(slot)
        if self._tier is not None:
            futs = [self._tier.submit(la, e, self.views(s)) for s, la, e in loads]
            return sum(f.result() for f in futs)
        if self._cuda and not self._queued:  # on the link's stream, behind the prefetches
            moved = sum(self._copy_on_stream(s, la, e) for s, la, e in loads)
            for s, _, _ in loads:
                self.wait(s)
            return moved
        if not self._queued:
            return sum(self.source.read_into(la, e, self.views(s)) for s, la, e in loads)
        assert self._io is not None
        futs = [self._io.submit(self._timed_read, la, e, self.views(s)) for s, la, e in loads]
        return sum(f.result() for f in futs)

    def _timed_read(self, layer: int, expert: int, out: dict[str, torch.Tensor]) -> int:
        t0 = time.perf_counter()
        moved = self.source.read_into(layer, expert, out)
        self.read_seconds.append(time.perf_counter() - t0)
        return moved

    def load_async(self, slot: int, layer: int, expert: int) -> int:
        """Start filling ``slot`` in the background; :meth:`wait` before using it."""
        self.wait(slot)
        if self._tier is not None:
            fut = self._tier.submit(layer, expert, self.views(slot))
            if self.async_loads:
                self._pending[slot] = fut
            else:
                fut.result()
            return self.bytes_per_slot
        if self._cuda and not self._queued:
            return self._copy_on_stream(slot, layer, expert)
        if self._io is None:
            return self.load(slot, layer, expert)
        fut: Future[int] = self._io.submit(self._timed_read, layer, expert, self.views(slot))
        self._pending[slot] = fut
        return self.bytes_per_slot

    def _copy_on_stream(self, slot: int, layer: int, expert: int) -> int:
        """Start a host -> device copy into ``slot`` on the link's side stream (after the
        work already queued on the compute stream, which may still read the slot)."""
        assert self._stream is not None
        self._stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self._stream):
            moved = self.source.read_into(layer, expert, self.views(slot))
            event = torch.cuda.Event()
            event.record(self._stream)
        self._pending[slot] = event
        return moved

    def wait(self, slot: int) -> float:
        """Wait for a pending load into ``slot``; return the seconds stalled."""
        if not self._pending:
            return 0.0
        pending = self._pending.pop(slot, None)
        if pending is None:
            return 0.0
        t0 = time.perf_counter()
        if isinstance(pending, Future):
            pending.result()
        else:  # the host waits for the copy: the stall is measured, and kernels launched
            pending.synchronize()  # after this see the slot filled
        return time.perf_counter() - t0

    def drain(self) -> None:
        for slot in list(self._pending):
            self.wait(slot)

    def close(self) -> None:
        self.drain()
        if self._io is not None:
            self._io.shutdown(wait=True)
            self._io = None
        for p in self.storage:
            self.memory.release(f"slots/{p}")
        close = getattr(self.source, "close", None)
        if close is not None:
            close()
