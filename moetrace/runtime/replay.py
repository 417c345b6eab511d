"""Trace-driven runtime replay: a recorded workload through the real engine, real reads.

The skeleton (:mod:`moetrace.runtime.skeleton`) has the trace's routing shape at its real
expert size (or ``scale`` of it); its experts live in an expert store read without the page
cache. Each token of the replayed requests runs every MoE layer's experts call with the
recorded routing forced (the simulator's token-granularity events, in the same order),
through the engine: cache decisions, demand and prefetch reads on the I/O thread, compute
from the slots. Variants (the plan, LRU on demand at the same slots, every expert
resident where it fits in RAM) run interleaved; next to each, the simulator's replay of
the same events under the same plan with the measured hardware profile: the timing
model's error, measured.

``tier="ram"`` replays a plan with a RAM tier: experts on disk (the replay's store), the
RAM tier's slots and the device slots in CPU memory, compute on the CPU. Its variants are
the plan and ``ram_lru`` (the same device plan over a RAM tier of plain LRU at the same
RAM slots); the model's RAM -> device link is the measured copy into a device slot
(:mod:`moetrace.runtime.copyrate`), its disk link the measured store read.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import platform
import statistics
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from moetrace import __version__
from moetrace.errors import ConfigError
from moetrace.runtime.checks import available_memory, default_plan, model_info
from moetrace.runtime.copyrate import CopySamples, measure_copy
from moetrace.runtime.engine import OffloadEngine
from moetrace.runtime.expert_store import DiskExpertSource, HostExpertSource, StoreIndex
from moetrace.runtime.experts import find_moe_layers
from moetrace.runtime.profile import measure_store
from moetrace.runtime.skeleton import SkeletonShape, build_skeleton, build_store
from moetrace.store.hardware import HardwareProfile, load_hardware
from moetrace.store.plan import Budget, Plan, load_plan
from moetrace.tuner.policy.events import Events
from moetrace.tuner.sim.engine import simulate
from moetrace.tuner.sim.trace import events_for, load_traces

log = logging.getLogger(__name__)

VARIANTS = ("plan", "lru", "all_resident", "ram_lru")
"""``ram_lru`` (tier ``ram`` only): RAM as plain LRU over disk under the plan's device
cache; with tier ``ram``, ``lru`` means it and ``all_resident`` is skipped."""
TIERS = ("disk", "host", "ram")


@dataclass(frozen=True)
class ReplayConfig:
    """What to replay, where and how often."""

    trace: str
    plan: str
    store: str
    scale: float = 1.0
    requests: int = 8
    """The last ``requests`` requests of the trace (in arrival order) are replayed..."""
    only: tuple[int, ...] | None = None
    """...or the last ``requests`` of these request indices (e.g. a plan's held-out ones)."""
    max_tokens: int | None = None
    repeats: int = 3
    hardware: str | None = None
    """A hardware profile JSON; None: measure one on the store (``moetrace profile``)."""
    variants: tuple[str, ...] = ("plan", "lru", "all_resident")
    device: str = "cpu"
    read_mode: str | None = None
    implementation: str = "eager"
    tier: str = "disk"
    """Where experts live between loads: ``disk`` (the store, no page cache), ``host``
    (the store's experts read once into host memory, pinned for CUDA) or ``ram`` (the
    plan's RAM tier over the store: three tiers)."""

    def __post_init__(self) -> None:
        if self.repeats < 1:
            raise ConfigError(f"repeats must be >= 1, got {self.repeats}")
        if self.requests < 1:
            raise ConfigError(f"requests must be >= 1, got {self.requests}")
        if self.tier not in TIERS:
            raise ConfigError(f"tier must be one of {TIERS}, got {self.tier!r}")
        bad = [v for v in self.variants if v not in VARIANTS]
        if bad or not self.variants:
            raise ConfigError(f"variants must be among {VARIANTS}, got {list(self.variants)}")
        if "ram_lru" in self.variants and self.tier != "ram":
            raise ConfigError("variant 'ram_lru' needs tier 'ram' (a plan with a RAM tier)")

    @property
    def run_variants(self) -> tuple[str, ...]:
        """The variants replayed: with tier ``ram``, ``lru`` is ``ram_lru`` and
        ``all_resident`` is skipped (experts live on disk)."""
        if self.tier != "ram":
            return tuple(dict.fromkeys(self.variants))
        named = ("ram_lru" if v == "lru" else v for v in self.variants if v != "all_resident")
        return tuple(dict.fromkeys(named))


@dataclass
class VariantRun:
    """Measured figures of one variant's runs, and the simulator's for the same events."""

    seconds: list[float] = field(default_factory=list)
    stall_s: list[float] = field(default_factory=list)
    read_s: list[float] = field(default_factory=list)
    """Every read's own time on the I/O thread, over all runs."""
    copy_s: list[float] = field(default_factory=list)
    """Every RAM -> device copy's own time on the copy thread (tier ``ram``)."""
    hit_rate: float = 0.0
    peak_expert_bytes: int = 0
    limit_bytes: int = 0
    ram: dict[str, float] | None = None
    """The RAM tier's hit rate, disk bytes and ledger peak and limit (tier ``ram``)."""
    model: dict[str, float] | None = None
    model_run_link: dict[str, float] | None = None


def _events(cfg: ReplayConfig) -> tuple[Events, Any]:
    loaded = load_traces([cfg.trace])
    n = len(loaded.routing.request_ids)
    pool = np.arange(n) if cfg.only is None else np.sort(np.asarray(cfg.only, np.int64))
    if pool.size == 0 or pool.min() < 0 or pool.max() >= n:
        raise ConfigError(f"requests to replay must be among the trace's {n} requests")
    keep = pool[-cfg.requests :]
    ev = events_for(loaded, keep, granularity="token")
    if cfg.max_tokens is not None and ev.token_experts.shape[0] > cfg.max_tokens:
        cut = cfg.max_tokens * ev.num_layers
        ev = _first_events(ev, cut)
    return ev, loaded


def _first_events(ev: Events, n: int) -> Events:
    """The first ``n`` events (whole tokens) of token-granularity events."""
    m = int(ev.ptr[n])
    ntok = n // ev.num_layers
    tokens_by_phase = np.bincount(ev.token_phase[:ntok].astype(np.int64), minlength=2)
    return dataclasses.replace(
        ev,
        layer=ev.layer[:n], phase=ev.phase[:n], request=ev.request[:n],
        pass_id=ev.pass_id[:n], tokens=ev.tokens[:n], ptr=ev.ptr[: n + 1],
        experts=ev.experts[:m], counts=ev.counts[:m],
        pass_event=ev.pass_event[:ntok], tokens_by_phase=tokens_by_phase,
        token_experts=ev.token_experts[:ntok], token_phase=ev.token_phase[:ntok],
        token_request=ev.token_request[:ntok], spec_ptr=None, spec_experts=None,
        spec_counts=None,
    )  # fmt: skip


def _scaled(plan: Plan, bpe: int, fingerprint: str) -> Plan:
    """The plan for the skeleton: same slots and policy, the skeleton's expert size."""
    budget = Budget(slots=plan.budget.slots, bytes=plan.budget.slots * bpe, bytes_per_expert=bpe)
    routing = dataclasses.replace(plan.routing, fingerprint=fingerprint)
    worst = (plan.layout.total_slots + plan.routing.top_k) * bpe
    ram = plan.ram
    if ram is not None:
        ram = dataclasses.replace(
            ram, bytes=ram.slots * bpe, worst_case_bytes=(ram.slots + plan.routing.top_k) * bpe
        )
    return dataclasses.replace(
        plan, budget=budget, routing=routing, worst_case_bytes=worst, ram=ram
    )


def ram_lru_plan(plan: Plan, bpe: int) -> Plan:
    """``plan``'s device cache over a RAM tier of plain LRU at the same RAM slots (no pins,
    no prefetch into RAM): the baseline of a RAM tier's placement and policy."""
    from moetrace.tuner.placement import ram_tier

    assert plan.ram is not None
    k = plan.routing.top_k
    tier = ram_tier(plan.routing.num_layers, plan.ram.slots, "lru", bytes_per_expert=bpe, top_k=k)
    return dataclasses.replace(plan, ram=tier)


def host_experts(store: str, index: StoreIndex, pin: bool) -> HostExpertSource:
    """Every expert of ``store`` read into host memory (the host tier)."""
    disk = DiskExpertSource(store, index)
    tensors = []
    for layer in range(len(index.layer_ids)):
        per = {
            p.name: torch.empty((index.num_experts, *p.shape), dtype=p.dtype) for p in index.params
        }
        for e in range(index.num_experts):
            disk.read_into(layer, e, {n: t[e] for n, t in per.items()})
        tensors.append(per)
    disk.close()
    return HostExpertSource(tensors, pin=pin)


def _run(
    model: torch.nn.Module, source_args: tuple, plan: Plan, ev: Events, cfg: ReplayConfig
) -> dict[str, Any]:
    """One timed replay: seconds, stall seconds, hit rate, the device ledger's peak and
    limit, the reads' own seconds and, with a RAM tier, its figures and copy seconds."""
    store, index, host = source_args
    source = host if host is not None else DiskExpertSource(store, index, cfg.read_mode)
    engine = OffloadEngine(
        model, source, plan, device=cfg.device, fingerprint=plan.routing.fingerprint
    )
    try:
        layers = engine.layers
        dev = engine.device
        dtype = layers[0].params[0].dtype
        hidden = torch.randn(1, model.config.hidden_size, dtype=dtype, device=dev) * 0.1
        idx_all = torch.from_numpy(ev.experts.astype(np.int64)).to(dev)
        ptr = ev.ptr.tolist()
        ev_layer, ev_phase = ev.layer.tolist(), ev.phase.tolist()
        weights = {}
        t0 = time.perf_counter()
        with torch.no_grad():
            for i in range(ev.num_events):
                lo, hi = ptr[i], ptr[i + 1]
                n = hi - lo
                w = weights.get(n)
                if w is None:
                    w = weights[n] = torch.full((1, n), 1.0 / n, dtype=dtype, device=dev)
                engine.set_phase(ev_phase[i])
                layers[ev_layer[i]].experts(hidden, idx_all[lo:hi].view(1, n), w)
        engine.pool.drain()
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        seconds = time.perf_counter() - t0
        s = engine.stats.summary()
        out: dict[str, Any] = {
            "seconds": seconds, "stall_s": s["stall_s"], "hit_rate": s["hit_rate"],
            "peak": engine.stats.peak_expert_bytes, "limit": int(engine.memory.limit or 0),
            "read_s": list(engine.pool.read_seconds), "copy_s": [], "ram": None,
        }  # fmt: skip
        ram = engine.stats.ram
        if ram is not None:
            r = s["ram"]
            out["read_s"], out["copy_s"] = list(ram.read_seconds), list(ram.copy_seconds)
            out["ram"] = {
                "hit_rate": r["hit_rate"], "disk_bytes": r["disk_bytes"],
                "prefetch_issued": r["prefetch_issued"], "peak_bytes": r["memory"]["peak"],
                "limit_bytes": r["memory"]["limit"],
            }  # fmt: skip
        return out
    finally:
        engine.close()


def run_replay(cfg: ReplayConfig) -> dict[str, Any]:
    """Replay, measure, model; a JSON-ready result (config, versions, medians, raw)."""
    ev, loaded = _events(cfg)
    shape = SkeletonShape.for_trace(loaded.model, cfg.scale)
    index = build_store(shape, cfg.store)
    model = build_skeleton(shape, cfg.implementation)
    bpe = shape.bytes_per_expert
    layers = find_moe_layers(model)
    info = model_info(layers, max(shape.moe_layers) + 1, shape.fingerprint, "replay skeleton")
    the_plan = load_plan(cfg.plan)
    the_plan.check_compatible(loaded.model)
    if (cfg.tier == "ram") != (the_plan.ram is not None):
        raise ConfigError(
            "tier 'ram' replays a plan with a RAM tier"
            if cfg.tier == "ram"
            else f"the plan has a RAM tier: replay it with tier 'ram', not {cfg.tier!r}"
        )
    plans = {"plan": _scaled(the_plan, bpe, shape.fingerprint)}
    plans["lru"] = default_plan(info, the_plan.layout.total_slots)
    if cfg.tier == "ram":
        plans["ram_lru"] = ram_lru_plan(plans["plan"], bpe)
    elif "all_resident" in cfg.variants:
        need = len(shape.moe_layers) * shape.num_experts * bpe
        avail = available_memory(torch.device(cfg.device)) or 0
        if need < 0.7 * avail:
            plans["all_resident"] = default_plan(info, len(shape.moe_layers) * shape.num_experts)
        else:
            log.warning("all experts (%d bytes) do not fit in memory here; skipped", need)
    variants = [v for v in cfg.run_variants if v in plans]
    host = None
    if cfg.tier == "host":
        host = host_experts(cfg.store, index, pin=torch.device(cfg.device).type == "cuda")
    samples = None
    copies: CopySamples | None = None
    runs = {v: VariantRun() for v in variants}
    draws = []  # each profile draw's time per read (ms): how much the link drifted
    for rep in range(cfg.repeats):
        for i, v in enumerate(variants):
            if cfg.hardware is None:  # the profile, measured before every run (A B A B)
                got = measure_store(
                    cfg.store, device=cfg.device, read_mode=cfg.read_mode,
                    implementation=cfg.implementation, source=host, reads=4, repeats=4,
                    seed=rep * len(variants) + i,
                )  # fmt: skip
                draws.append(1e3 * statistics.median(got.batch) / got.top_k)
                samples = got if samples is None else samples.merge(got)
                if cfg.tier == "ram":  # and the RAM -> device copy
                    c = measure_copy(index.params, index.top_k, device=cfg.device,
                                     copies=4, seed=rep * len(variants) + i)  # fmt: skip
                    copies = c if copies is None else copies.merge(c)
            got_run = _run(model, (cfg.store, index, host), plans[v], ev, cfg)
            r = runs[v]
            r.read_s += got_run["read_s"]
            r.copy_s += got_run["copy_s"]
            r.seconds.append(got_run["seconds"])
            r.stall_s.append(got_run["stall_s"])
            r.hit_rate, r.limit_bytes = got_run["hit_rate"], got_run["limit"]
            r.peak_expert_bytes = max(r.peak_expert_bytes, got_run["peak"])
            if got_run["ram"] is not None:
                peak = max(got_run["ram"]["peak_bytes"], (r.ram or {}).get("peak_bytes", 0))
                r.ram = got_run["ram"] | {"peak_bytes": peak}
    if cfg.hardware is not None:
        hardware = load_hardware(cfg.hardware)
    else:
        assert samples is not None
        hardware = samples.profile(device=torch.device(cfg.device).type)
        if copies is not None:
            hardware = copies.apply(hardware)
    tokens = int(ev.token_experts.shape[0])
    for v in variants:
        runs[v].model = _modeled(ev, plans[v], hardware, bpe, tokens)
        if runs[v].read_s:  # the same model with the link as this variant's reads measured
            t = statistics.fmean(runs[v].read_s)  # the model sums reads: the mean, not median
            link = dataclasses.replace(
                hardware, link_bandwidth_gbps=bpe / t / 1e9, transfer_latency_us=0.0
            )
            if runs[v].copy_s:  # three tiers: reads are the disk link, copies the link
                c = statistics.fmean(runs[v].copy_s)
                link = dataclasses.replace(
                    hardware, link_bandwidth_gbps=bpe / c / 1e9, transfer_latency_us=0.0,
                    disk_bandwidth_gbps=bpe / t / 1e9, disk_latency_us=0.0,
                )  # fmt: skip
            runs[v].model_run_link = _modeled(ev, plans[v], link, bpe, tokens)
            runs[v].model_run_link["read_ms_mean"] = 1e3 * t
            runs[v].model_run_link["read_ms_median"] = 1e3 * statistics.median(runs[v].read_s)
    out = _result(cfg, shape, hardware, tokens, runs)
    out["profile_draws_ms_per_read"] = draws
    return out


def _modeled(
    ev: Events, plan: Plan, hardware: HardwareProfile, bpe: int, tokens: int
) -> dict[str, float]:
    summ = simulate(ev, plan, hardware, bytes_per_expert=bpe).summary()
    out = {
        "hit_rate": float(summ["hit_rate"] or 0.0),
        "stall_per_token_ms": 1e3 * float(summ["stall_s"]) / tokens,
        "tokens_per_second": tokens / float(summ["total_s"]),
        "bytes_moved": float(summ["bytes_moved"]),
    }
    if plan.ram is not None:
        out["ram_hit_rate"] = float(summ["ram_hit_rate"] or 0.0)
        out["disk_bytes"] = float(summ["disk_bytes"])
        out["ram_prefetch_issued"] = float(summ["ram_prefetch_issued"])
    return out


def _result(
    cfg: ReplayConfig,
    shape: SkeletonShape,
    hw: HardwareProfile,
    tokens: int,
    runs: dict[str, VariantRun],
) -> dict[str, Any]:
    out: dict[str, Any] = {
        "config": dataclasses.asdict(cfg),
        "skeleton": dataclasses.asdict(shape) | {"bytes_per_expert": shape.bytes_per_expert},
        "hardware": hw.to_json(),
        "versions": {
            "moetrace": __version__,
            "torch": torch.__version__,
            "python": platform.python_version(),
            "machine": platform.machine(),
            "cpus": os.cpu_count(),
        },
        "tokens": tokens,
        "variants": {},
    }
    for v, r in runs.items():
        tps = [tokens / s for s in r.seconds]
        stall = [1e3 * s / tokens for s in r.stall_s]
        med_stall = statistics.median(stall)
        row: dict[str, Any] = {
            "tokens_per_second": {"median": statistics.median(tps), "min_max": [min(tps), max(tps)], "raw": tps},
            "stall_per_token_ms": {"median": med_stall, "min_max": [min(stall), max(stall)], "raw": stall},
            "hit_rate": r.hit_rate,
            "peak_expert_bytes": r.peak_expert_bytes,
            "expert_memory_limit_bytes": r.limit_bytes,
            "model": r.model,
        }  # fmt: skip
        if r.model:
            row["tokens_per_second_error"] = (
                statistics.median(tps) / r.model["tokens_per_second"] - 1.0
            )
        if r.ram is not None:
            row["ram"] = dict(r.ram)
        if r.model and r.model["stall_per_token_ms"] > 0:
            row["stall_error"] = med_stall / r.model["stall_per_token_ms"] - 1.0
        if r.model_run_link and r.model_run_link["stall_per_token_ms"] > 0:
            row["model_run_link"] = r.model_run_link
            row["stall_error_run_link"] = med_stall / r.model_run_link["stall_per_token_ms"] - 1.0
        out["variants"][v] = row
    return out


def format_replay(data: dict[str, Any]) -> str:
    """The replay's table: measured (median, min-max) vs modeled, per variant."""
    lines = [
        f"{data['tokens']} tokens, {data['skeleton']['bytes_per_expert']} bytes per expert, "
        f"link {data['hardware']['link_bandwidth_gbps']} GB/s (measured profile)",
        f"{'variant':>13}  {'tok/s':>7} {'(min-max)':>15}  {'stall ms/tok':>12} "
        f"{'(min-max)':>15}  {'model':>7}  {'error':>6}  {'run-link':>8}  {'error':>6}  "
        f"{'hit':>5}  {'peak MiB':>8}",
    ]
    for v, r in data["variants"].items():
        t, s, m = r["tokens_per_second"], r["stall_per_token_ms"], r["model"]
        err = r.get("stall_error")
        m2, err2 = r.get("model_run_link"), r.get("stall_error_run_link")
        run_link = "" if m2 is None else f"{m2['stall_per_token_ms']:8.2f}"
        lines.append(
            f"{v:>13}  {t['median']:7.2f} ({t['min_max'][0]:6.2f}-{t['min_max'][1]:6.2f})  "
            f"{s['median']:12.2f} ({s['min_max'][0]:6.2f}-{s['min_max'][1]:6.2f})  "
            f"{m['stall_per_token_ms']:7.2f}  {'' if err is None else f'{err:+.0%}':>6}  "
            f"{run_link:>8}  "
            f"{'' if err2 is None else f'{err2:+.0%}':>6}  "
            f"{r['hit_rate']:5.3f}  {r['peak_expert_bytes'] / 2**20:8.1f}"
        )
    lines.append(f"{'variant':>13}  {'tok/s':>7}  {'model':>7}  {'error':>6}")
    for v, r in data["variants"].items():
        err = r.get("tokens_per_second_error")
        lines.append(
            f"{v:>13}  {r['tokens_per_second']['median']:7.2f}  "
            f"{r['model']['tokens_per_second']:7.2f}  {'' if err is None else f'{err:+.0%}':>6}"
        )
    hw = data["hardware"]
    for v, r in data["variants"].items():
        ram, m = r.get("ram"), r["model"]
        if ram is None:
            continue
        lines.append(
            f"{v:>13}  RAM hit {ram['hit_rate']:.3f} (model {m.get('ram_hit_rate', 0.0):.3f}), "
            f"disk {ram['disk_bytes'] / 2**20:.1f} MiB (model "
            f"{m.get('disk_bytes', 0.0) / 2**20:.1f}), RAM ledger peak "
            f"{ram['peak_bytes'] / 2**20:.2f} of {ram['limit_bytes'] / 2**20:.2f} MiB; disk "
            f"{hw.get('disk_bandwidth_gbps')} GB/s"
        )
    return "\n".join(lines)
