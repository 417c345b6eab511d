"""Expert memory as allocated, not as computed: every expert buffer the runtime holds.

The runtime allocates expert memory in one place, :class:`ExpertMemory`; each buffer's
size is *measured* when it is allocated: on CUDA as the allocator's ``memory_allocated``
delta around the allocation (what the caching allocator really reserved for it), on the
CPU as the byte size of the storage the CPU allocator returned. The ledger's total is
checked against the limit after every allocation and by :meth:`ExpertMemory.check` (the
engine calls it after every experts call), so a buffer that is not accounted for by the
budget (a per-call copy of experts, a bounce buffer too many) fails loudly.

Buffers are aligned to :data:`ALIGN` bytes so direct (``O_DIRECT``) reads can land in
them without a bounce copy.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch

from moetrace.errors import RuntimeEngineError

log = logging.getLogger(__name__)

ALIGN = 4096
"""Byte alignment of every expert buffer (the page size; direct I/O needs the block size)."""


def _aligned_bytes(
    nbytes: int, device: torch.device, pin: bool = False
) -> tuple[torch.Tensor, int]:
    """A uint8 tensor of ``nbytes`` whose address is ALIGN-aligned, and the bytes allocated;
    ``pin``: page-locked host memory (a CPU buffer that CUDA copies read asynchronously)."""
    if device.type == "cuda":
        before = torch.cuda.memory_allocated(device)
        raw = torch.empty(nbytes + ALIGN, dtype=torch.uint8, device=device)
        measured = torch.cuda.memory_allocated(device) - before
    else:
        raw = torch.empty(nbytes + ALIGN, dtype=torch.uint8, device=device, pin_memory=pin)
        measured = raw.untyped_storage().nbytes()
    off = (-raw.data_ptr()) % ALIGN
    return raw[off : off + nbytes], int(measured)


@dataclass
class ExpertMemory:
    """The ledger of expert buffers on one device, with a limit in bytes (None: no limit)."""

    device: torch.device
    limit: int | None = None
    current: int = 0
    peak: int = 0
    buffers: dict[str, int] = field(default_factory=dict)
    """What each named buffer measured, in bytes."""

    def allocate(self, nbytes: int, name: str, pin: bool = False) -> torch.Tensor:
        """An aligned uint8 buffer of ``nbytes`` on the device, accounted as ``name``
        (``pin``: page-locked, for a host buffer that CUDA copies read)."""
        if name in self.buffers:
            raise RuntimeEngineError(f"expert buffer {name!r} is already allocated")
        buf, measured = _aligned_bytes(nbytes, self.device, pin)
        self.track(name, measured)
        return buf

    def track(self, name: str, nbytes: int) -> None:
        """Account ``nbytes`` held under ``name`` (for buffers allocated elsewhere)."""
        self.buffers[name] = self.buffers.get(name, 0) + int(nbytes)
        self.current += int(nbytes)
        self.peak = max(self.peak, self.current)
        self.check()

    def release(self, name: str) -> None:
        self.current -= self.buffers.pop(name, 0)

    def check(self) -> None:
        """Raise RuntimeEngineError when the measured bytes exceed the limit."""
        if self.limit is not None and self.current > self.limit:
            parts = ", ".join(f"{k} {v}" for k, v in self.buffers.items())
            raise RuntimeEngineError(
                f"expert memory on {self.device} is {self.current} bytes, over the budget of "
                f"{self.limit} bytes ({parts})"
            )
