"""Expert reads that bypass the OS page cache: a slow tier that costs real I/O.

An expert store (v2) keeps each MoE layer's experts in one file, expert ``e`` at byte
``e * stride``, each of its tensors at an offset aligned to :data:`ALIGN`. A read fills
the tensors of a slot in place, in one of two modes:

- ``direct``: the file is opened with ``O_DIRECT`` and one ``preadv`` fills the slot's
  rows straight from the device (Linux; needs every tensor's bytes to be a multiple of
  the block size and the rows aligned, which :class:`~moetrace.runtime.memory.ExpertMemory`
  guarantees for the addresses).
- ``dontneed``: a plain ``pread`` per tensor, then ``posix_fadvise(DONTNEED)`` on the
  range just read, so the page cache does not keep the expert (file systems without
  ``O_DIRECT``, like tmpfs, or tensor sizes that are not block multiples).

Either way the process's memory for experts is the slots, so a RAM budget really bounds
it and a miss costs a read from the disk. ``os.preadv``/``os.pread`` release the GIL, so
reads issued from the runtime's I/O thread overlap compute.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from moetrace.errors import RuntimeEngineError
from moetrace.runtime.memory import ALIGN

log = logging.getLogger(__name__)

MODES = ("direct", "dontneed")


def round_up(n: int, to: int = ALIGN) -> int:
    return -(-n // to) * to


@dataclass(frozen=True)
class ExpertLayout:
    """Where an expert's tensors lie in its layer file (byte offsets from the expert's start)."""

    names: tuple[str, ...]
    nbytes: tuple[int, ...]
    offsets: tuple[int, ...]
    stride: int

    @classmethod
    def of(cls, names: Sequence[str], nbytes: Sequence[int]) -> ExpertLayout:
        offsets, at = [], 0
        for n in nbytes:
            offsets.append(at)
            at += round_up(n)
        return cls(tuple(names), tuple(int(n) for n in nbytes), tuple(offsets), at)

    @property
    def packed(self) -> bool:
        """Every tensor a whole number of blocks: one contiguous direct read per expert."""
        return all(n % ALIGN == 0 for n in self.nbytes)


def _byte_view(t: torch.Tensor) -> memoryview:
    """A writable byte view of a contiguous CPU tensor (no copy)."""
    if not t.is_contiguous() or t.device.type != "cpu":
        raise RuntimeEngineError("expert reads need contiguous host buffers")
    return memoryview(t.view(torch.uint8).reshape(-1).numpy())


def _aligned(views: Sequence[memoryview]) -> bool:
    return all(
        np.frombuffer(v, dtype=np.uint8).ctypes.data % ALIGN == 0 and v.nbytes % ALIGN == 0
        for v in views
    )


class LayerFiles:
    """Open layer files of an expert store, read without the page cache."""

    def __init__(self, paths: Sequence[Path], layout: ExpertLayout, mode: str | None = None):
        if mode is not None and mode not in MODES:
            raise RuntimeEngineError(f"read mode must be one of {MODES}, got {mode!r}")
        self.layout = layout
        self.paths = tuple(paths)
        self.mode = mode or ("direct" if layout.packed and hasattr(os, "O_DIRECT") else "dontneed")
        self._fds: list[int] = []
        self._plain: dict[int, int] = {}  # buffered fds, for buffers O_DIRECT cannot take
        self._lock = threading.Lock()
        try:
            for p in self.paths:
                self._fds.append(self._open(p))
        except OSError as exc:
            self.close()
            raise RuntimeEngineError(
                f"{exc.filename}: cannot open expert file ({exc.strerror})"
            ) from None
        log.info("expert reads: %s mode, %d byte stride", self.mode, layout.stride)

    def _open(self, path: Path) -> int:
        if self.mode == "direct":
            try:
                return os.open(path, os.O_RDONLY | os.O_DIRECT)
            except OSError as exc:
                if exc.errno != 22:  # EINVAL: the file system has no O_DIRECT
                    raise
                log.warning("%s: no O_DIRECT on this file system; reading with DONTNEED", path)
                self.mode = "dontneed"
        fd = os.open(path, os.O_RDONLY)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)  # no readahead past the expert
        return fd

    def read_into(self, layer: int, expert: int, out: dict[str, torch.Tensor]) -> int:
        """Fill ``out`` (the slot's host tensors, by name) with the expert; return bytes."""
        lay = self.layout
        base = expert * lay.stride
        fd = self._fds[layer]
        views = [_byte_view(out[n]) for n in lay.names]
        try:
            if self.mode == "direct" and _aligned(views):
                got = os.preadv(fd, views, base)
                want = lay.stride
            else:
                if self.mode == "direct":  # unaligned buffers (a host tier's tensors)
                    fd = self._plain_fd(layer)
                got = want = 0
                for v, off, n in zip(views, lay.offsets, lay.nbytes, strict=True):
                    got += os.preadv(fd, [v], base + off)
                    want += n
                os.posix_fadvise(fd, base, lay.stride, os.POSIX_FADV_DONTNEED)
        except OSError as exc:
            raise RuntimeEngineError(
                f"{self.paths[layer]}: cannot read expert {expert} ({exc.strerror})"
            ) from None
        if got != want:
            raise RuntimeEngineError(
                f"{self.paths[layer]}: expert {expert} is truncated ({got} of {want} bytes)"
            )
        return sum(lay.nbytes)

    def _plain_fd(self, layer: int) -> int:
        fd = self._plain.get(layer)
        if fd is None:
            fd = self._plain[layer] = os.open(self.paths[layer], os.O_RDONLY)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
        return fd

    def close(self) -> None:
        with self._lock:
            for fd in [*self._fds, *self._plain.values()]:
                os.close(fd)
            self._fds, self._plain = [], {}


def write_layer_file(
    path: Path, layout: ExpertLayout, experts: Sequence[dict[str, torch.Tensor]]
) -> None:
    """Write one layer's experts (each a dict of CPU tensors) in ``layout``, then drop the
    file from the page cache (a fresh store is not read from RAM)."""
    pad = bytes(ALIGN)
    with open(path, "wb") as fh:
        for tensors in experts:
            for name, n in zip(layout.names, layout.nbytes, strict=True):
                t = tensors[name].detach().contiguous().cpu()
                data = t.view(torch.uint8).reshape(-1).numpy().tobytes()
                if len(data) != n:
                    raise RuntimeEngineError(
                        f"expert tensor {name!r} has {len(data)} bytes, not {n}"
                    )
                fh.write(data)
                fh.write(pad[: round_up(n) - n])
        fh.flush()
        os.fsync(fh.fileno())
        os.posix_fadvise(fh.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
