"""The host-RAM tier: a cache of experts in RAM between the device slots and a disk store.

A plan with ``ram`` (format v4) over an expert store on disk runs with three tiers: the
device slots (the plan's cache), ``ram.slots`` experts in host RAM (the RAM tier's own
cache) and every expert on disk. :class:`RamTier` makes the RAM cache's decisions with
the simulator's cache code (:class:`~moetrace.tuner.policy.cache.ExpertCache` built from
``ram.eviction`` on ``ram.layout``), in the simulator's order (see
:func:`moetrace.tuner.sim.kernel.replay`), and moves the bytes:

1. an event's device misses (loaded and streamed, in use order) are ONE event of the RAM
   cache, stamped with the device event's index (:meth:`RamTier.decide`);
2. a RAM hit is copied from its RAM slot to the device slot; a RAM miss is read from
   disk into the RAM slot the RAM cache chose (or into a staging row when it streamed
   the expert), then copied;
3. the device's prefetches look RAM up without changing its recency
   (:meth:`RamTier.decide_prefetch`): resident ones are copied, the others read from
   disk (into the RAM slot the RAM cache gives them, else through staging) then copied;
4. the RAM tier's own prefetcher (:meth:`RamTier.prefetch`) predicts from the event's
   experts; those the device does not hold are read from disk into the RAM slots the
   RAM cache installs (no copy).

Two single-thread queues carry the bytes, as the simulator's two links: disk reads
(``O_DIRECT`` through the :class:`~moetrace.runtime.expert_store.DiskExpertSource` into
the RAM rows, aligned by :class:`~moetrace.runtime.memory.ExpertMemory`) and RAM ->
device copies (``dst.copy_(src)``; on CUDA from pinned RAM on a side stream). A copy
waits for the disk read that fills its source; a disk read into a RAM row waits for the
copies still reading that row. Every task waits only on tasks queued before it, so the
two queues cannot deadlock. The device slots' loads (:class:`~moetrace.runtime.slots.SlotPool`)
call :meth:`RamTier.submit`, which returns the copy's future.

RAM buffers (``ram.slots`` rows plus ``top_k`` staging rows per expert parameter) come
from the tier's own :class:`~moetrace.runtime.memory.ExpertMemory` ledger on the CPU,
measured at allocation and limited by the RAM budget.
"""

from __future__ import annotations

import concurrent.futures
import logging
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np
import torch

from moetrace.errors import ConfigError, RuntimeEngineError
from moetrace.runtime.checks import RamFootprint
from moetrace.runtime.expert_store import DiskExpertSource
from moetrace.runtime.experts import ExpertParam
from moetrace.runtime.memory import ALIGN, ExpertMemory
from moetrace.runtime.stats import RamStats
from moetrace.store.plan import RamTier as RamTierConfig
from moetrace.tuner.policy.cache import ExpertCache
from moetrace.tuner.policy.core import HIT
from moetrace.tuner.policy.eviction import eviction_spec
from moetrace.tuner.policy.prefetch import Prefetcher, get_prefetcher

log = logging.getLogger(__name__)

STAGE = -1
"""A decision's row when the expert has no RAM slot: read through a staging row."""


class RamTier:
    """The RAM tier of a three-tier plan; the device slot pool's source (``tier`` "ram")."""

    tier = "ram"

    def __init__(
        self,
        config: RamTierConfig,
        source: DiskExpertSource,
        params: Sequence[ExpertParam],
        num_layers: int,
        num_experts: int,
        footprint: RamFootprint,
        device: torch.device,
        stats: RamStats,
        *,
        prefetch: bool = True,
    ):
        L, E = num_layers, num_experts
        self.config, self.source, self.device, self.stats = config, source, device, stats
        self.num_layers, self.num_experts = L, E
        self.bytes_per_expert = int(sum(p.nbytes for p in params))
        try:
            spec = eviction_spec(config.eviction, L, E, {}, config.adaptation)
            self.cache = ExpertCache(config.layout, spec, E)
        except ConfigError as exc:
            raise RuntimeEngineError(f"the plan's RAM tier cannot run online: {exc}") from None
        self.prefetcher: Prefetcher | None = None
        if prefetch and config.prefetch.name != "none" and config.prefetch.fetch > 0:
            pf = get_prefetcher(config.prefetch, L, E)
            if not pf.online or config.prefetch.name == "speculative":
                raise RuntimeEngineError(
                    f"the RAM tier's prefetcher {config.prefetch.name!r} cannot run online "
                    "from the routing; use one that predicts from routing (e.g. transition)"
                )
            self.prefetcher = pf
        self.slots = footprint.slots
        self.rows = footprint.slots + footprint.staging
        self._cuda = device.type == "cuda"
        self.memory = ExpertMemory(torch.device("cpu"), footprint.limit + ALIGN * len(params))
        """The RAM tier's expert memory as allocated (measured), limited by its budget."""
        stats.memory = self.memory
        self.storage: dict[str, torch.Tensor] = {}
        try:
            for p in params:
                buf = self._buffer(self.rows * p.nbytes, f"ram/{p.name}")
                self.storage[p.name] = buf.view(p.dtype).view(self.rows, *p.shape)
        except BaseException:
            self._release()
            raise
        self._stream = torch.cuda.Stream(device) if self._cuda else None
        init = (lambda: torch.cuda.set_device(device)) if self._cuda else None
        self._disk_io = ThreadPoolExecutor(1, "moetrace-disk")
        self._copy_io = ThreadPoolExecutor(1, "moetrace-copy", initializer=init)
        self._disk: dict[int, Future[int]] = {}
        """Per RAM row, the latest disk read into it."""
        self._last_copy: dict[int, Future[int]] = {}
        """Per RAM row, the latest copy out of it (copies run in order: the last one done,
        every earlier one is)."""
        self._gen = [0] * self.rows  # disk reads into each row so far
        self._decided: dict[tuple[int, int], tuple[int, int]] = {}
        """(layer, expert) -> (row, generation) decided and not yet copied to the device."""
        self._stage_next = 0
        self.warming = True
        """Reads count as warm-up (not in the counters) until the engine has loaded its
        pinned experts."""
        pins = sorted(self.cache.slot_of.items(), key=lambda kv: kv[1])
        try:
            for (layer, expert), row in pins:  # the experts kept in RAM for good
                self._read(layer, expert, row)
                stats.warmup_disk_bytes += self.bytes_per_expert
            for f in list(self._disk.values()):
                f.result()  # a failed read fails here, before any run
        except BaseException:
            self.close()
            raise

    # ------------------------------------------------------------ buffers
    def _buffer(self, nbytes: int, name: str) -> torch.Tensor:
        """An aligned host buffer from the tier's ledger (pinned for a CUDA device)."""
        return self.memory.allocate(nbytes, name, pin=self._cuda)

    def _release(self) -> None:
        for name in list(self.memory.buffers):
            self.memory.release(name)
        self.storage = {}

    def views(self, row: int) -> dict[str, torch.Tensor]:
        return {name: t[row] for name, t in self.storage.items()}

    @property
    def mode(self) -> str:
        """The disk reads' mode (``direct``, ``dontneed``, ``mmap``)."""
        return self.source.mode

    # ------------------------------------------------------------ decisions
    def _count(self, name: str, layer: int, phase: int, value: float = 1.0) -> None:
        self.stats.add(name, layer, phase, value)

    def decide(self, layer: int, missed: np.ndarray, phase: int, at: int) -> None:
        """The device missed ``missed`` (int64, in use order) at device event ``at``: one
        event of the RAM cache; RAM misses given a slot start their disk reads now."""
        rows = self.cache.event(layer, missed, phase, at=at)
        bpe = self.bytes_per_expert
        for j, e in enumerate(missed.tolist()):
            row, status = int(rows[j, 0]), int(rows[j, 2])
            self._count("ram_accesses", layer, phase)
            if status == HIT:
                self._count("ram_hits", layer, phase)
            else:
                self._count("disk_bytes", layer, phase, bpe)
                if row >= 0:
                    self._read(layer, e, row)
                else:
                    row = STAGE
            self._decided[(layer, e)] = (row, self._gen[row] if row >= 0 else 0)

    def decide_prefetch(self, layer: int, experts: Sequence[int], phase: int, at: int) -> None:
        """The device prefetches ``experts`` of ``layer`` (issued at device event ``at``):
        one prefetch batch of the RAM cache (no recency change for those it holds)."""
        issued = {e: s for e, s, _ in self.cache.prefetch(layer, list(experts), phase, at=at)}
        for e in experts:
            row = issued.get(e)
            if row is not None:  # given a RAM slot: read from disk into it
                self._count("disk_bytes", layer, phase, self.bytes_per_expert)
                self._read(layer, e, row)
            else:
                held = self.cache.slot(layer, e)
                if held is None:  # dropped by the RAM cache: read through staging
                    self._count("disk_bytes", layer, phase, self.bytes_per_expert)
                row = STAGE if held is None else held
            self._decided[(layer, e)] = (row, self._gen[row] if row >= 0 else 0)

    def prefetch(
        self,
        layer: int,
        experts: np.ndarray,
        counts: np.ndarray,
        tokens: int,
        phase: int,
        at: int,
        device_holds: Callable[[int, int], bool],
    ) -> None:
        """The RAM tier's prefetch after device event ``at`` of ``layer`` (``experts``
        used, ``counts`` tokens each): predicted experts the device does not hold are
        read from disk into the RAM slots the RAM cache installs."""
        pf = self.prefetcher
        if pf is None:
            return
        target = layer + pf.lookahead
        if target >= self.num_layers:
            return
        fetch = self.config.prefetch.fetch
        predicted = pf.predict(layer, experts, counts.astype(np.float64), tokens=tokens,
                               fetch=fetch).tolist()  # fmt: skip
        rest = [int(e) for e in predicted if not device_holds(target, int(e))]
        if not rest:
            return
        for e, row, _ in self.cache.prefetch(target, rest, phase, at=at):
            self._count("ram_prefetch_issued", target, phase)
            self._count("disk_bytes", target, phase, self.bytes_per_expert)
            self._read(target, e, row)

    # ------------------------------------------------------------ the two queues
    def _read(self, layer: int, expert: int, row: int) -> Future[int]:
        """Queue a disk read of the expert into RAM ``row`` (after the copies reading it)."""
        fut = self._disk_io.submit(self._timed_read, layer, expert, row, self._last_copy.get(row))
        self._disk[row] = fut
        self._gen[row] += 1
        return fut

    def _timed_read(self, layer: int, expert: int, row: int, before: Future[int] | None) -> int:
        if before is not None:
            before.result()
        t0 = time.perf_counter()
        moved = self.source.read_into(layer, expert, self.views(row))
        self.stats.read_seconds.append(time.perf_counter() - t0)
        return moved

    def _copy(self, row: int, out: dict[str, torch.Tensor]) -> Future[int]:
        """Queue a copy of RAM ``row`` into the device slot ``out`` (after its read)."""
        after = None
        if self._cuda:  # the slot may still be read by kernels queued before now
            after = torch.cuda.Event()
            after.record(torch.cuda.current_stream(self.device))
        fut = self._copy_io.submit(self._timed_copy, row, out, self._disk.get(row), after)
        self._last_copy[row] = fut
        return fut

    def _timed_copy(
        self,
        row: int,
        out: dict[str, torch.Tensor],
        source: Future[int] | None,
        after: torch.cuda.Event | None,
    ) -> int:
        if source is not None:
            source.result()
        t0 = time.perf_counter()
        if self._stream is not None and after is not None:
            with torch.cuda.stream(self._stream):
                self._stream.wait_event(after)
                for name, dst in out.items():
                    dst.copy_(self.storage[name][row], non_blocking=True)
                done = torch.cuda.Event()
                done.record(self._stream)
            done.synchronize()
        else:
            for name, dst in out.items():
                dst.copy_(self.storage[name][row])
        self.stats.copy_seconds.append(time.perf_counter() - t0)
        return self.bytes_per_expert

    def _stage(self) -> int:
        row = self.slots + self._stage_next
        self._stage_next = (self._stage_next + 1) % (self.rows - self.slots)
        return row

    def submit(self, layer: int, expert: int, out: dict[str, torch.Tensor]) -> Future[int]:
        """Fill the device slot ``out`` with the expert as decided (an undecided one, the
        pinned experts at start or one only padding rows chose, is copied from RAM when
        RAM holds it, else read through staging); the copy's future (bytes)."""
        decided = self._decided.pop((layer, expert), None)
        if decided is None:
            held = self.cache.slot(layer, expert)
            decided = (STAGE, 0) if held is None else (held, self._gen[held])
            if held is None and self.warming:
                self.stats.warmup_disk_bytes += self.bytes_per_expert
            elif held is None:
                self.stats.other_disk_bytes += self.bytes_per_expert
        row, gen = decided
        if row == STAGE:
            row = self._stage()
            self._read(layer, expert, row)
        elif self._gen[row] != gen:
            raise RuntimeEngineError(
                f"RAM slot {row} was refilled before its copy of layer {layer} expert "
                f"{expert} (the RAM tier's decisions are out of order)"
            )
        return self._copy(row, out)

    def read_into(self, layer: int, expert: int, out: dict[str, torch.Tensor]) -> int:
        """The :class:`~moetrace.runtime.expert_store.ExpertSource` form: fill ``out`` now."""
        return self.submit(layer, expert, out).result()

    def close(self) -> None:
        """Wait for every queued read and copy, stop both queues, free the RAM rows and
        close the disk store."""
        concurrent.futures.wait([*self._disk.values(), *self._last_copy.values()])
        self._disk_io.shutdown(wait=True)
        self._copy_io.shutdown(wait=True)
        self._disk.clear()
        self._last_copy.clear()
        self._decided.clear()
        self._release()
        self.source.close()
