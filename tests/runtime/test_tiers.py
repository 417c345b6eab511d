"""Three tiers (device slots, a RAM tier, a disk store): the runtime makes the simulator's
decisions, so its counters per tier equal the simulator's replay of the same events, and
the outputs stay those of the plain model."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from rt_models import clone, find_layers_info, tiny_model

from moetrace.errors import PlanError, RuntimeEngineError
from moetrace.runtime import OffloadEngine, prepare_store
from moetrace.runtime.experts import find_moe_layers
from moetrace.store.hardware import load_hardware
from moetrace.store.plan import (
    CacheLayout,
    EvictionConfig,
    Plan,
    PrefetchConfig,
    RamTier,
    RoutingShape,
)
from moetrace.tracer.recorder import RoutingRecorder
from moetrace.tuner.placement import ram_tier
from moetrace.tuner.policy.events import Events
from moetrace.tuner.policy.prefetch import get_prefetcher
from moetrace.tuner.sim import kernel as K
from moetrace.tuner.sim.engine import make_plan, simulate
from moetrace.tuner.sim.trace import events_for, load_traces

HW = dataclasses.replace(load_hardware(), disk_bandwidth_gbps=1.0, disk_latency_us=20.0)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tiny model, its expert store, and the token-granularity events of a recorded run."""
    root = tmp_path_factory.mktemp("tiers")
    model = tiny_model("qwen3_moe")
    with RoutingRecorder(clone(model), root / "trace") as rec:
        for i, n in enumerate((5, 8, 6)):
            ids = torch.randint(1, 64, (1, n), generator=torch.Generator().manual_seed(n))
            rec.generate([f"r{i}"], ids, max_new_tokens=8, do_sample=False)
    events = events_for(load_traces([root / "trace"]), granularity="token")
    clone(model).save_pretrained(root / "model")
    prepare_store(root / "model", root / "store")
    return model, str(root / "store"), events


def _ram(L: int, slots: int, policy: str = "lru", pinned=(), prefetch=None, bpe=None, k=2):  # type: ignore[no-untyped-def]
    return ram_tier(L, slots, policy, pinned, prefetch, bpe, k)


def _plan(model, ev: Events, case: str) -> Plan:  # type: ignore[no-untyped-def]
    info = find_layers_info(model)
    shape, bpe, L = RoutingShape.of(info), info.bytes_per_expert, ev.num_layers
    dev_pf = PrefetchConfig("transition", fetch=2)
    ram_pf = PrefetchConfig("transition", lookahead=2, fetch=3)
    ram_pf = get_prefetcher(ram_pf, L, ev.num_experts).fit(ev)
    if case == "lru":  # LRU over LRU, no prefetch
        layout, pf, ram = CacheLayout("per_layer", (2, 2, 2)), None, _ram(L, 12, bpe=bpe)
    elif case == "pins+prefetch":  # pinned_lru RAM with pins, both prefetchers
        pins = ((0,), (3,), (5,))
        layout, pf = CacheLayout("pool", (1, 1, 1), pool_slots=5), dev_pf
        ram = _ram(L, 10, "pinned_lru", pins, ram_pf, bpe)
    elif case == "ram-prefetch":  # only the RAM tier prefetches
        layout, pf, ram = CacheLayout("per_layer", (2, 2, 2)), None, _ram(L, 8, prefetch=ram_pf)
    else:  # no RAM slot: every read goes through staging, device prefetches too
        layout, pf, ram = CacheLayout("per_layer", (3, 2, 3)), dev_pf, _ram(L, 0, bpe=bpe)
    plan = make_plan(ev, shape, layout, "lru", prefetch=pf, bytes_per_expert=bpe)
    return dataclasses.replace(plan, ram=ram)


def _drive(engine: OffloadEngine, plain, ev: Events) -> list[tuple[torch.Tensor, torch.Tensor]]:  # type: ignore[no-untyped-def]
    """Every event as an experts call with the recorded routing; (engine, plain) outputs."""
    g = torch.Generator().manual_seed(0)
    mine, theirs = engine.layers, find_moe_layers(plain)
    outs = []
    with torch.no_grad():
        for i in range(ev.num_events):
            lo, hi = int(ev.ptr[i]), int(ev.ptr[i + 1])
            layer, n = int(ev.layer[i]), hi - lo
            h = torch.randn(1, plain.config.hidden_size, generator=g)
            idx = torch.from_numpy(ev.experts[lo:hi].astype(np.int64)).view(1, n)
            w = torch.full((1, n), 1.0 / n)
            engine.set_phase(int(ev.phase[i]))
            outs.append((mine[layer].experts(h, idx, w), theirs[layer].experts(h, idx, w)))
    return outs


PAIRS = (
    ("accesses", K.S_ACCESS),
    ("hits", K.S_HIT),
    ("prefetch_issued", K.S_PF_ISSUED),
    ("prefetch_used", K.S_PF_USED),
)
RAM_PAIRS = (
    ("ram_accesses", K.S_RAM_ACCESS),
    ("ram_hits", K.S_RAM_HIT),
    ("disk_bytes", K.S_BYTES_DISK),
    ("ram_prefetch_issued", K.S_RAM_PF_ISSUED),
)


@pytest.mark.parametrize("case", ["lru", "pins+prefetch", "ram-prefetch", "no-ram-slot"])
def test_three_tiers_match_simulator(setup, case):
    """Device and RAM counters per layer and phase equal the simulator's replay of the same
    events; outputs equal the plain model's; the RAM ledger stays within its limit."""
    model, store, ev = setup
    plan = _plan(model, ev, case)
    with OffloadEngine.from_store(store, plan) as eng:
        outs = _drive(eng, model, ev)
        eng.pool.drain()
        counters = {k: v.copy() for k, v in eng.stats.counters.items()}
        ram = eng.stats.ram
        assert ram is not None
        ram_counters = {k: v.copy() for k, v in ram.counters.items()}
        summary = eng.stats.summary()
    for got, want in outs:
        assert torch.equal(got, want)
    sim = simulate(ev, plan, HW, bytes_per_expert=find_layers_info(model).bytes_per_expert)
    for name, row in PAIRS:
        assert np.array_equal(sim.stats[row], counters[name]), name
    for name, row in RAM_PAIRS:
        assert np.array_equal(sim.stats[row], ram_counters[name]), name
    s, r = sim.summary(), summary["ram"]
    assert r["accesses"] == s["ram_accesses"] > 0
    assert r["hit_rate"] == pytest.approx(s["ram_hit_rate"] or 0.0)
    assert r["disk_bytes"] == s["disk_bytes"] > 0
    assert r["prefetch_issued"] == s["ram_prefetch_issued"]
    assert summary["prefetch_issued"] == s["prefetch_issued"]
    assert summary["hit_rate"] == pytest.approx(s["hit_rate"])
    mem = r["memory"]
    assert 0 < mem["peak"] <= mem["limit"]
    assert r["reads"] >= r["disk_bytes"] / find_layers_info(model).bytes_per_expert
    if case == "pins+prefetch":
        assert s["prefetch_issued"] > 0 and s["ram_prefetch_issued"] > 0
        assert r["warmup_disk_bytes"] > 0  # the RAM pins, read at start
    if case == "ram-prefetch":
        assert s["ram_prefetch_issued"] > 0
    if case in ("lru", "pins+prefetch"):
        assert 0 < r["hits"] < r["accesses"]


def test_three_tiers_generate_the_plain_models_tokens(setup, prompt_ids):
    """generate() from the store with a three-tier plan (both prefetchers) gives the plain
    model's tokens; the statistics JSON has the RAM tier's section."""
    import json

    model, store, ev = setup
    ref = model.generate(prompt_ids, max_new_tokens=8, do_sample=False)
    plan = _plan(model, ev, "pins+prefetch")
    with OffloadEngine.from_store(store, plan) as eng:
        out = eng.model.generate(prompt_ids, max_new_tokens=8, do_sample=False)
        data = json.loads(eng.stats.dumps())
        ram = eng.ram
        assert ram is not None
    assert torch.equal(out, ref)
    r = data["total"]["ram"]
    assert r["accesses"] > 0 and r["disk_bytes"] > 0 and r["copy_s"] >= 0
    assert r["memory"]["peak"] <= r["memory"]["limit"]
    assert "ram_hits" in data["per_layer"][0]["decode"]
    assert ram.memory.current == 0 and ram._disk_io._shutdown  # closed: freed, stopped


def test_ram_budget_one_expert_short_fails_before_running(setup):
    model, store, ev = setup
    plan = _plan(model, ev, "lru")
    assert plan.ram is not None
    bpe = find_layers_info(model).bytes_per_expert
    short = dataclasses.replace(plan.ram, worst_case_bytes=plan.ram.worst_case_bytes - bpe)
    with pytest.raises(RuntimeEngineError, match="RAM tier needs") as exc:
        OffloadEngine.from_store(store, dataclasses.replace(plan, ram=short))
    assert "\n" not in str(exc.value)


def test_ram_pins_over_its_slots_are_refused(setup):
    model, store, ev = setup
    L = ev.num_layers
    with pytest.raises(PlanError, match="ram pins 6 experts > ram.slots 4"):
        _ram(L, 4, "static", ((0, 1), (0, 1), (0, 1)))
    # fewer pins than slots, but more than a layer's share of a per-layer RAM layout
    crowded = RamTier(
        slots=6,
        layout=CacheLayout("per_layer", (2, 2, 2)),
        eviction=EvictionConfig("static", pinned=((0, 1, 2), (0,), (0,))),
    )
    plan = dataclasses.replace(_plan(model, ev, "lru"), ram=crowded)
    with pytest.raises(RuntimeEngineError, match="RAM tier cannot run online.*pinned"):
        OffloadEngine.from_store(store, plan)


def test_ram_tier_needs_a_disk_store(setup):
    model, _, ev = setup
    with pytest.raises(RuntimeEngineError, match="expert store"):
        OffloadEngine.from_model(clone(model), _plan(model, ev, "lru"))


def test_three_tiers_speculative_prefetch_matches_simulator(setup, tmp_path):
    """The device prefetches speculatively (after the layer's compute); the RAM tier's
    prefetch of that event waits for it, as in the simulator's order. generate() with
    whole-pass events (a prompt's misses exceed the staging rows) matches the simulator's
    replay of the run's own trace, tier by tier."""
    from test_parity import _tokenizer

    from moetrace.runtime.session import generate
    from moetrace.store.arrays import load_routing
    from moetrace.store.reader import open_trace
    from moetrace.tuner.policy.events import build_events

    model, store, ev = setup
    base = _plan(model, ev, "pins+prefetch")
    plan = dataclasses.replace(base, prefetch=PrefetchConfig("speculative", fetch=2))
    prompts = [
        " ".join(f"w{t}" for t in torch.randint(1, 64, (n,), generator=g).tolist())
        for n, g in ((5, torch.Generator().manual_seed(5)), (9, torch.Generator().manual_seed(9)))
    ]
    with OffloadEngine.from_store(store, plan) as eng:
        generate(eng, _tokenizer(), prompts, max_new_tokens=6, trace_dir=tmp_path / "trace")
        counters = {k: v.copy() for k, v in eng.stats.counters.items()}
        assert eng.stats.ram is not None
        ram_counters = {k: v.copy() for k, v in eng.stats.ram.counters.items()}
    routing = load_routing(open_trace(tmp_path / "trace"), order="arrival")
    events = build_events(routing, order="arrival")
    sim = simulate(events, plan, HW, bytes_per_expert=find_layers_info(model).bytes_per_expert)
    assert counters["prefetch_issued"].sum() > 0 and ram_counters["ram_prefetch_issued"].sum() > 0
    for name, row in PAIRS:
        assert np.array_equal(sim.stats[row], counters[name]), name
    for name, row in RAM_PAIRS:
        assert np.array_equal(sim.stats[row], ram_counters[name]), name
