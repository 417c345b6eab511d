"""CoServe-style offline profiler: both links and per-layer compute time on this machine.

A hardware profile (:mod:`moetrace.store.hardware`) has two links, and
:func:`profile_hardware` measures both:

- RAM -> device (``link_*``): on CUDA, copies of ``nbytes`` from pinned host memory to
  the device; on the CPU, a host memcpy of ``nbytes`` from one aligned host buffer into
  another (``dst.copy_(src)``, the copy a CPU-compute runtime does from its RAM tier into
  a device slot).
- disk -> RAM (``disk_*``): reads of a test file written to a folder (a temporary one by
  default; point it at your SSD) that bypass the page cache, through the runtime's own
  expert reader (:class:`~moetrace.runtime.direct_io.LayerFiles`): ``O_DIRECT`` into a
  :data:`~moetrace.runtime.memory.ALIGN`-aligned buffer where the file system has it,
  else ``pread`` then ``posix_fadvise(DONTNEED)`` (tmpfs, whose files live in RAM anyway).
  Latency from 4 KiB reads, bandwidth from ``nbytes`` reads at random offsets of a file
  several times ``nbytes``.

Each link is fitted as ``latency + bytes / bandwidth`` from the medians of its small and
large transfers. The compute: one MoE layer's experts call at a few token counts, fitted
as ``base + per_token * tokens``. The profile is in the format ``simulate``/``tune`` accept.

On the CPU the meaning of ``link_*`` changed: it used to be the disk read (through a
memory map); it is now the RAM -> device memcpy, and the disk read is ``disk_*``.

Given an expert store, :func:`measure_store` times that store through the runtime
instead; its profile's ``link_*`` is the store read (the store is the slow tier of a
plan without a RAM tier), and its ``disk_*`` the same read when the store is on disk.
"""

from __future__ import annotations

import logging
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
from moetrace.errors import ConfigError
from moetrace.runtime.direct_io import ExpertLayout, LayerFiles, round_up
from moetrace.runtime.expert_store import ExpertSource
from moetrace.runtime.memory import ALIGN, _aligned_bytes
from moetrace.store.hardware import HardwareProfile

log = logging.getLogger(__name__)

TOKEN_COUNTS = (1, 4, 16)
SMALL_COPY = 64
"""Bytes of the small RAM -> device copies that time the link's latency."""
SMALL_READ = ALIGN
"""Bytes of the small disk reads that time the disk's latency (one block)."""
FILE_SPAN = 4
"""The disk test file is this many times the read size (neighbouring reads not cached)."""
RAM_FILESYSTEMS = ("tmpfs", "ramfs")
WARMUP_CALLS = 3
"""Untimed layer calls before the compute is timed."""


def _fit_link(
    small_bytes: int, small_s: float, big_bytes: int, big_s: float
) -> tuple[float, float]:
    """(GB/s, latency us) of a link from the medians of a small and a large transfer:
    ``time = latency + bytes / bandwidth`` through both points."""
    if big_s > small_s and big_bytes > small_bytes:
        bps = (big_bytes - small_bytes) / (big_s - small_s)
    else:  # noise swamped the difference: all of the large transfer is bandwidth
        bps = big_bytes / big_s
    latency = max(small_s - small_bytes / bps, 0.0)
    return bps / 1e9, latency * 1e6


@dataclass(frozen=True)
class LinkSample:
    """A measured link: ``gbps`` achievable bandwidth, ``latency_us`` per transfer."""

    gbps: float
    latency_us: float
    what: str
    """How it was measured, in words."""


def measure_link(device: torch.device, nbytes: int, repeats: int) -> LinkSample:
    """The RAM -> device link: pinned host -> device copies on CUDA, an aligned host
    memcpy (``dst.copy_(src)``) on the CPU; medians of ``repeats`` copies of ``nbytes``
    and of as many (at least 16) of :data:`SMALL_COPY` bytes."""
    cuda = device.type == "cuda"
    if cuda:
        src = torch.empty(nbytes, dtype=torch.uint8).pin_memory()
        dst = torch.empty(nbytes, dtype=torch.uint8, device=device)
        what = f"host -> {device} copies from pinned memory"
    else:
        src, _ = _aligned_bytes(nbytes, device)
        dst, _ = _aligned_bytes(nbytes, device)
        what = "host memcpy between aligned buffers (dst.copy_(src))"
    src.fill_(1)
    dst.zero_()  # the pages are touched before any copy is timed
    tiny_src, tiny_dst = src[:SMALL_COPY], dst[:SMALL_COPY]

    def timed(d: torch.Tensor, s: torch.Tensor) -> float:
        if cuda:
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        d.copy_(s, non_blocking=cuda)
        if cuda:
            torch.cuda.synchronize(device)
        return time.perf_counter() - t0

    timed(dst, src)  # warm-up
    big = [timed(dst, src) for _ in range(repeats)]
    small = [timed(tiny_dst, tiny_src) for _ in range(max(repeats, 16))]
    gbps, latency = _fit_link(SMALL_COPY, statistics.median(small), nbytes, statistics.median(big))
    return LinkSample(gbps, latency, what)


@dataclass(frozen=True)
class DiskSample:
    """A measured disk -> RAM link (reads without the page cache)."""

    gbps: float
    latency_us: float
    mode: str
    """``direct`` (O_DIRECT) or ``dontneed`` (pread + POSIX_FADV_DONTNEED)."""
    directory: str
    filesystem: str | None
    read_bytes: int
    file_bytes: int
    repeats: int

    @property
    def mode_text(self) -> str:
        how = "O_DIRECT" if self.mode == "direct" else "pread + POSIX_FADV_DONTNEED"
        return f"{self.mode} reads ({how}) in {self.directory} ({self.filesystem or 'unknown fs'})"


def filesystem_of(path: str | os.PathLike[str]) -> str | None:
    """The type of the file system ``path`` is on (Linux ``/proc/self/mounts``), or None."""
    target = os.path.realpath(path)
    best, fstype = "", None
    try:
        with open("/proc/self/mounts", encoding="utf-8") as fh:
            for line in fh:
                parts = line.split()
                if len(parts) < 3:
                    continue
                mount = parts[1].replace("\\040", " ")
                inside = target == mount or target.startswith(mount.rstrip("/") + "/")
                if inside and len(mount) >= len(best):
                    best, fstype = mount, parts[2]
    except OSError:
        return None
    return fstype


def _test_file_bytes(nbytes: int) -> tuple[int, int]:
    """(read size, test file size) of disk reads of ``nbytes``: whole blocks."""
    size = round_up(max(nbytes, ALIGN))
    return size, FILE_SPAN * size


def _test_folder(directory: str | os.PathLike[str] | None, file_bytes: int) -> Path:
    """The disk test folder, checked: exists, a folder, writable, room for the file."""
    folder = Path(directory) if directory is not None else Path(tempfile.gettempdir())
    if not folder.exists():
        raise ConfigError(f"disk test folder {folder} does not exist")
    if not folder.is_dir():
        raise ConfigError(f"disk test folder {folder} is not a folder")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise ConfigError(f"disk test folder {folder} is not writable")
    try:
        st = os.statvfs(folder)
        free: int | None = st.f_bavail * st.f_frsize
    except OSError:
        free = None
    if free is not None and free < file_bytes + 16 * 2**20:
        raise ConfigError(
            f"disk test folder {folder} has {free} bytes free, too little for a "
            f"{file_bytes}-byte test file (give a smaller read size or another folder)"
        )
    return folder


def _write_test_file(path: Path, nbytes: int, seed: int) -> None:
    """``nbytes`` of random bytes (incompressible), synced and out of the page cache."""
    rng = np.random.default_rng(seed)
    chunk = 8 * 2**20
    with open(path, "wb") as fh:
        left = nbytes
        while left:
            n = min(chunk, left)
            fh.write(rng.bytes(n))
            left -= n
        fh.flush()
        os.fsync(fh.fileno())
        os.posix_fadvise(fh.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)


def measure_disk(
    directory: str | os.PathLike[str] | None = None,
    *,
    nbytes: int = 64 * 2**20,
    repeats: int = 5,
    mode: str | None = None,
    seed: int = 0,
) -> DiskSample:
    """The disk -> RAM link: reads of a test file in ``directory`` (default: the system's
    temporary folder) that bypass the page cache.

    The file (:data:`FILE_SPAN` times ``nbytes``, rounded up to whole blocks) is written
    in a temporary subfolder and removed after. Reads go through the runtime's expert
    reader into an aligned buffer: ``O_DIRECT`` where the file system has it, else
    ``pread`` + ``POSIX_FADV_DONTNEED`` (``mode`` forces one). Bandwidth from ``repeats``
    reads of ``nbytes`` at random block-aligned offsets, latency from at least 16 reads of
    one block; ConfigError when the folder does not exist, is not writable or is full."""
    size, file_bytes = _test_file_bytes(nbytes)
    folder = _test_folder(directory, file_bytes)
    fs = filesystem_of(folder)
    if fs in RAM_FILESYSTEMS:
        log.warning(
            "disk test folder %s is on %s (RAM): the disk figures are memory speed; "
            "give a folder on the SSD the experts will live on",
            folder,
            fs,
        )
    rng = np.random.default_rng(seed)
    try:
        tmp = tempfile.TemporaryDirectory(prefix="moetrace-profile-", dir=folder)
    except OSError as exc:
        raise ConfigError(
            f"disk test folder {folder}: cannot write there ({exc.strerror})"
        ) from None
    with tmp:
        path = Path(tmp.name) / "disk-test.bin"
        try:
            _write_test_file(path, file_bytes, seed)
        except OSError as exc:
            raise ConfigError(
                f"disk test folder {folder}: cannot write the {file_bytes}-byte test file "
                f"({exc.strerror})"
            ) from None
        big = LayerFiles([path], ExpertLayout.of(["blob"], [size]), mode)
        small = LayerFiles([path], ExpertLayout.of(["blob"], [SMALL_READ]), big.mode)
        try:
            buf, _ = _aligned_bytes(size, torch.device("cpu"))
            buf.zero_()  # the pages are touched before any read is timed
            out_big, out_small = {"blob": buf}, {"blob": buf[:SMALL_READ]}

            def timed(files: LayerFiles, which: int, out: dict[str, torch.Tensor]) -> float:
                t0 = time.perf_counter()
                files.read_into(0, which, out)
                return time.perf_counter() - t0

            timed(big, 0, out_big)  # warm-up (the drive and the code path)
            blocks = file_bytes // SMALL_READ
            small_s = [
                timed(small, int(b), out_small)
                for b in rng.choice(blocks, size=max(repeats, 16), replace=blocks < 16)
            ]
            order = np.concatenate(
                [rng.permutation(FILE_SPAN) for _ in range(-(-repeats // FILE_SPAN))]
            )
            big_s = [timed(big, int(e), out_big) for e in order[:repeats]]
            read_mode = big.mode
        finally:
            big.close()
            small.close()
    gbps, latency = _fit_link(
        SMALL_READ, statistics.median(small_s), size, statistics.median(big_s)
    )
    log.info("disk -> RAM: %.3f GB/s, %.1f us latency (%s reads)", gbps, latency, read_mode)
    return DiskSample(gbps, latency, read_mode, str(folder), fs, size, file_bytes, repeats)


def _compute(device: torch.device, model_dir: str | None, repeats: int) -> tuple[float, float]:
    """(base us, per-token us) of one MoE layer's experts call (after
    :data:`WARMUP_CALLS` untimed calls per token count: the first calls are slow)."""
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
        for i in range(WARMUP_CALLS + repeats):
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            t0 = time.perf_counter()
            with torch.no_grad():
                fn(ref.experts, h, idx, w)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            if i >= WARMUP_CALLS:
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
        linear in between). The link (``link_*``) is the store read; when the store is read
        from disk (not the replay's host tier) the disk link (``disk_*``) is the same read,
        so the profile also serves a three-tier plan's disk link."""
        k = self.top_k
        times = [statistics.median(c) * 1e6 for c in self.compute]
        per_token = max((times[-1] - times[0]) / (TOKEN_COUNTS[-1] - TOKEN_COUNTS[0]), 0.0)
        base = max(times[0] - per_token * TOKEN_COUNTS[0], 0.0)
        t1, tk = statistics.fmean(self.single), statistics.fmean(self.batch)
        xfer = max((tk - t1) / (k - 1), 1e-9) if k > 1 else t1
        latency = max(t1 - xfer, 0.0)
        gbps, latency_us = round(self.bytes_per_expert / xfer / 1e9, 4), round(latency * 1e6, 2)
        on_disk = self.mode != "host"  # a store read from disk also serves as the disk link
        return HardwareProfile(
            name=name or f"measured-store-{device}",
            link_bandwidth_gbps=gbps,
            transfer_latency_us=latency_us,
            disk_bandwidth_gbps=gbps if on_disk else None,
            disk_latency_us=latency_us if on_disk else None,
            host_memory_gib=host_memory_gib(),
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


def host_memory_gib() -> float | None:
    """This machine's physical memory in GiB (None where the OS does not say)."""
    try:
        return round(os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / 2**30, 1)
    except (AttributeError, ValueError, OSError):
        return None


def profile_lines(
    profile: HardwareProfile, *, disk_mode: str | None = None, link: str = "RAM -> device"
) -> list[str]:
    """One line per figure of a profile: the two links and the layer compute
    (``disk_mode``: how the disk was read, in words; ``link``: what ``link_*`` is)."""
    lines = [
        f"{link}: {profile.link_bandwidth_gbps:.3f} GB/s, "
        f"{profile.transfer_latency_us:.2f} us latency"
    ]
    if profile.has_disk_link:
        lines.append(
            f"disk -> RAM: {profile.disk_bandwidth_gbps:.3f} GB/s, "
            f"{profile.disk_latency_us or 0.0:.2f} us latency"
            + (f" ({disk_mode})" if disk_mode else "")
        )
    lines.append(
        f"layer compute: {profile.layer_compute_base_us:.2f} us + "
        f"{profile.layer_compute_per_token_us:.3f} us per token"
    )
    return lines


@dataclass(frozen=True)
class HardwareSamples:
    """What :func:`measure_hardware` measured: both links and the layer compute."""

    device: torch.device
    link: LinkSample
    disk: DiskSample
    compute_base_us: float
    compute_per_token_us: float
    nbytes: int
    repeats: int
    device_memory_gib: float | None = None
    host_memory_gib: float | None = None

    def profile(self, name: str | None = None) -> HardwareProfile:
        d = self.disk
        return HardwareProfile(
            name=name or f"measured-{self.device.type}",
            link_bandwidth_gbps=round(self.link.gbps, 4),
            transfer_latency_us=round(self.link.latency_us, 2),
            layer_compute_base_us=round(self.compute_base_us, 2),
            layer_compute_per_token_us=round(self.compute_per_token_us, 3),
            device_memory_gib=self.device_memory_gib,
            disk_bandwidth_gbps=round(d.gbps, 4),
            disk_latency_us=round(d.latency_us, 2),
            host_memory_gib=self.host_memory_gib,
            description=(
                f"measured by moetrace profile on {self.device}: RAM -> device: "
                f"{self.link.what}, {self.nbytes}-byte copies; disk -> RAM: {d.mode_text}, "
                f"{d.read_bytes}-byte reads at random offsets of a {d.file_bytes}-byte file "
                f"and {SMALL_READ}-byte reads for the latency; {self.repeats} repeats, medians"
            ),
            source=f"moetrace profile (disk read mode: {d.mode}, file system: "
            f"{d.filesystem or 'unknown'})",
        )

    def lines(self) -> list[str]:
        return profile_lines(self.profile(), disk_mode=self.disk.mode_text)


def measure_hardware(
    device: str = "cpu",
    *,
    model: str | None = None,
    nbytes: int = 64 * 2**20,
    repeats: int = 5,
    directory: str | os.PathLike[str] | None = None,
) -> HardwareSamples:
    """Measure this machine's two links (:func:`measure_link`, :func:`measure_disk` in
    ``directory``) and one MoE layer's compute time of ``model`` (default: the demo)."""
    dev = check_device(device)
    _test_folder(directory, _test_file_bytes(nbytes)[1])  # a bad folder fails before any work
    base, per_token = _compute(dev, model, repeats)  # first: before the large buffers
    link = measure_link(dev, nbytes, repeats)
    disk = measure_disk(directory, nbytes=nbytes, repeats=repeats)
    memory = None
    if dev.type == "cuda":
        memory = round(torch.cuda.get_device_properties(dev).total_memory / 2**30, 1)
    return HardwareSamples(
        dev, link, disk, base, per_token, nbytes, repeats, memory, host_memory_gib()
    )


def profile_hardware(
    device: str = "cpu",
    *,
    model: str | None = None,
    nbytes: int = 64 * 2**20,
    repeats: int = 5,
    name: str | None = None,
    directory: str | os.PathLike[str] | None = None,
) -> HardwareProfile:
    """Measure this machine and return a hardware profile with both links
    (:func:`measure_hardware`; ``directory``: the folder of the disk test, default the
    temporary folder); for an expert store given as ``model``: its reads and compute
    through the runtime (:func:`profile_store`; ``directory`` must then be None)."""
    from moetrace.runtime.expert_store import is_store

    if model is not None and is_store(model):
        if directory is not None:
            raise ConfigError(
                "an expert store's reads are timed where the store lies; "
                "a disk test folder does not apply"
            )
        return profile_store(model, device=device, name=name)
    samples = measure_hardware(
        device, model=model, nbytes=nbytes, repeats=repeats, directory=directory
    )
    return samples.profile(name)
