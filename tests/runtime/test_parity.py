"""The runtime's hits and misses equal the simulator's replay of the run's own trace."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from rt_models import clone, find_layers_info, tiny_model

from moetrace.runtime import OffloadEngine
from moetrace.runtime.session import generate
from moetrace.store.arrays import load_routing
from moetrace.store.hardware import load_hardware
from moetrace.store.plan import Budget, CacheLayout, EvictionConfig, Plan, RoutingShape
from moetrace.store.reader import open_trace
from moetrace.tracer.recorder import RoutingRecorder
from moetrace.tuner.policy.events import build_events
from moetrace.tuner.sim import kernel as K
from moetrace.tuner.sim import simulate


@pytest.mark.parametrize(
    ("arch", "layout", "policy"),
    [
        ("olmoe", CacheLayout("pool", (1, 1, 1), pool_slots=7), "lru"),
        ("qwen3_moe", CacheLayout("per_layer", (3, 2, 4)), "fifo"),
        ("mixtral", CacheLayout("pool", (0, 0, 0), pool_slots=5), "lfu"),
        ("olmoe", CacheLayout("pool", (1, 1, 1), pool_slots=7), "arc"),
        ("qwen3_moe", CacheLayout("per_layer", (3, 2, 4)), "wtinylfu"),
        ("mixtral", CacheLayout("per_layer", (3, 3, 3)), "lecar"),
    ],
)
def test_runtime_matches_simulator(tmp_path, arch, layout, policy):
    model = tiny_model(arch)
    info = find_layers_info(model)
    plan = Plan(
        routing=RoutingShape.of(info),
        budget=Budget(slots=layout.total_slots, bytes_per_expert=info.bytes_per_expert),
        layout=layout,
        eviction=EvictionConfig(policy),
    )
    prompts = [
        torch.randint(1, 64, (1, n), generator=torch.Generator().manual_seed(n)) for n in (5, 9)
    ]
    with OffloadEngine.from_model(model, plan, log_accesses=True) as eng:
        with RoutingRecorder(model, tmp_path / "trace") as rec:
            for i, ids in enumerate(prompts):
                rec.generate([f"r{i}"], ids, max_new_tokens=5, do_sample=False)
        log = eng.stats.accesses_log
        runtime_acc = eng.stats.counters["accesses"].copy()
        runtime_hit = eng.stats.counters["hits"].copy()
    trace = open_trace(tmp_path / "trace")
    assert trace.manifest.model.config_fingerprint == plan.routing.fingerprint
    events = build_events(load_routing(trace, order="arrival"), order="arrival")
    assert log is not None and len(log) == events.num_events
    for i, (layer, ph, need, _) in enumerate(log):
        assert (events.layer[i], events.phase[i]) == (layer, ph)
        assert tuple(events.experts[events.ptr[i] : events.ptr[i + 1]]) == need
    sim = simulate(events, plan, load_hardware())
    assert np.array_equal(sim.stats[K.S_ACCESS], runtime_acc)
    assert np.array_equal(sim.stats[K.S_HIT], runtime_hit)
    assert 0 < runtime_hit.sum() < runtime_acc.sum()


@pytest.mark.parametrize("prefetcher", ["transition", "learned"])
def test_runtime_prefetch_matches_simulator(tmp_path, prefetcher):
    """With a fitted prefetcher, residency is decided when a prefetch is issued (the load
    itself is asynchronous), so hits, prefetches issued and used equal the simulator's."""
    from moetrace.store.plan import PrefetchConfig
    from moetrace.tuner.sim.engine import make_plan

    model = tiny_model("qwen3_moe")
    info = find_layers_info(model)
    shape = RoutingShape.of(info)
    prompts = [
        torch.randint(1, 64, (1, n), generator=torch.Generator().manual_seed(n)) for n in (4, 7, 11)
    ]
    with RoutingRecorder(model, tmp_path / "fit") as rec:  # a trace to fit the tables on
        for i, ids in enumerate(prompts):
            rec.generate([f"f{i}"], ids, max_new_tokens=6, do_sample=False)
    fit_events = build_events(load_routing(open_trace(tmp_path / "fit")), order="arrival")
    layout = CacheLayout("per_layer", (3, 3, 3))
    plan = make_plan(
        fit_events,
        shape,
        layout,
        "lru",
        prefetch=PrefetchConfig(prefetcher, fetch=shape.top_k),
        bytes_per_expert=info.bytes_per_expert,
    )
    with OffloadEngine.from_model(model, plan) as eng:
        with RoutingRecorder(model, tmp_path / "run") as rec:
            for i, ids in enumerate(prompts[::-1]):
                rec.generate([f"r{i}"], ids, max_new_tokens=6, do_sample=False)
        counters = {k: v.copy() for k, v in eng.stats.counters.items()}
    events = build_events(load_routing(open_trace(tmp_path / "run")), order="arrival")
    sim = simulate(events, plan, load_hardware())
    assert np.array_equal(sim.stats[K.S_ACCESS], counters["accesses"])
    assert counters["prefetch_issued"].sum() > 0
    assert np.array_equal(sim.stats[K.S_PF_ISSUED], counters["prefetch_issued"])
    assert np.array_equal(sim.stats[K.S_HIT], counters["hits"])
    assert np.array_equal(sim.stats[K.S_PF_USED], counters["prefetch_used"])


def test_runtime_drift_switch_matches_simulator(tmp_path):
    """A plan pinning the experts the run uses least trails the shadow LRU: the runtime
    switches to the fallback where the simulator's replay of the same run does, and
    reports when and why in its statistics."""
    from collections import Counter

    from moetrace.store.plan import Adaptation

    model = tiny_model("qwen3_moe")
    info = find_layers_info(model)
    prompts = [
        torch.randint(1, 64, (1, n), generator=torch.Generator().manual_seed(n)) for n in (6, 9, 12)
    ]
    with RoutingRecorder(model, tmp_path / "fit") as rec:
        for i, ids in enumerate(prompts):
            rec.generate([f"f{i}"], ids, max_new_tokens=6, do_sample=False)
    ev = build_events(load_routing(open_trace(tmp_path / "fit")), order="arrival")
    L, E = ev.num_layers, ev.num_experts
    pins = []
    for layer in range(L):
        rows = [i for i in range(ev.num_events) if ev.layer[i] == layer]
        used = Counter(int(e) for i in rows for e in ev.experts[ev.ptr[i] : ev.ptr[i + 1]])
        pins.append(tuple(sorted(range(E), key=lambda e: (used[e], e))[:2]))
    plan = Plan(
        routing=RoutingShape.of(info),
        budget=Budget(slots=12, bytes_per_expert=info.bytes_per_expert),
        layout=CacheLayout("per_layer", (4, 4, 4)),
        eviction=EvictionConfig("pinned_lru", {"pin_fraction": 0.5}, pinned=tuple(pins)),
        adaptation=Adaptation("arc", window=20, margin=0.0, halflife=1e-9),
    )
    with OffloadEngine.from_model(model, plan) as eng:
        with RoutingRecorder(model, tmp_path / "run") as rec:
            for i, ids in enumerate(prompts):
                rec.generate([f"r{i}"], ids, max_new_tokens=6, do_sample=False)
        hits = eng.stats.counters["hits"].copy()
        drift = eng.stats.drift
        assert eng.stats.to_json()["drift"] == drift
    events = build_events(load_routing(open_trace(tmp_path / "run")), order="arrival")
    sim = simulate(events, plan, load_hardware())
    assert drift is not None and drift["switched"] and drift["switched_at_access"] >= 20
    assert drift == sim.summary()["drift"]
    assert np.array_equal(sim.stats[K.S_HIT], hits)


def _tokenizer():
    """A word-level tokenizer over the tiny models' vocabulary (``w1`` .. ``w63``)."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, **{f"w{i}": i for i in range(1, 64)}}
    tok = Tokenizer(WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<pad>")


def _replay(trace_dir, plan, order: str = "arrival"):
    events = build_events(load_routing(open_trace(trace_dir), order=order), order=order)
    return events, simulate(events, plan, load_hardware())


@pytest.mark.parametrize(("arch", "fetch"), [("olmoe", 0), ("deepseek_v3", 0), ("qwen2_moe", 2)])
def test_runtime_speculative_prefetch_matches_simulator(tmp_path, arch, fetch):
    """The runtime's speculative prefetch is the tracer's speculative pick (the next MoE
    layer's router on this layer's normalised output, through the tracer's adapter): the
    simulator's replay of the run's own speculative trace has the same hits and prefetches."""
    from moetrace.store.plan import PrefetchConfig

    model = tiny_model(arch)
    info = find_layers_info(model)
    L = len(info.moe_layers)
    plan = Plan(
        routing=RoutingShape.of(info),
        budget=Budget(slots=4 * L, bytes_per_expert=info.bytes_per_expert),
        layout=CacheLayout("per_layer", (4,) * L),
        eviction=EvictionConfig("lru"),
        prefetch=PrefetchConfig("speculative", lookahead=1, fetch=fetch),
    )
    prompts = [
        " ".join(f"w{t}" for t in torch.randint(1, 64, (n,), generator=g).tolist())
        for n, g in ((5, torch.Generator().manual_seed(5)), (9, torch.Generator().manual_seed(9)))
    ]
    with OffloadEngine.from_model(model, plan) as eng:
        # the run's own trace; speculative columns because the plan prefetches speculatively
        generate(eng, _tokenizer(), prompts, max_new_tokens=6, trace_dir=tmp_path / "trace")
        counters = {k: v.copy() for k, v in eng.stats.counters.items()}
    assert open_trace(tmp_path / "trace").manifest.speculative
    _, sim = _replay(tmp_path / "trace", plan)
    assert counters["prefetch_issued"].sum() > 0
    for name, stat in (
        ("accesses", K.S_ACCESS),
        ("hits", K.S_HIT),
        ("prefetch_issued", K.S_PF_ISSUED),
        ("prefetch_used", K.S_PF_USED),
    ):
        assert np.array_equal(sim.stats[stat], counters[name]), (
            name,
            counters[name].sum(),
            sim.stats[stat].sum(),
        )


def _early_eos(new: torch.Tensor, pad: int) -> int | None:
    """A token one row emits first and early while the other emits it later or never."""
    rows = new.tolist()
    for pos in range(1, len(rows[0]) - 2):
        for row in rows:
            cand = row[pos]
            if cand == pad or cand in row[:pos]:
                continue
            firsts = [r.index(cand) if cand in r else len(r) for r in rows]
            if min(firsts) == pos and max(firsts) > pos + 1:
                return cand
    return None


@pytest.mark.parametrize(
    ("implementation", "slots"), [("grouped_mm", 3), ("eager", 8), ("batched_mm", 5)]
)
def test_runtime_padded_batch_with_early_eos_matches_tracer(tmp_path, implementation, slots):
    """A left-padded batch of two prompts where one row stops early at EOS: the runtime
    counts the experts of live tokens only (no padding, nothing after a row's EOS), as the
    tracer records them, so its accesses equal the trace's events and its hits the
    simulator's; every row's logits stay bit-identical to the model without offloading
    (padding and finished rows are computed with the experts they chose)."""
    pad, new_tokens = 0, 6
    g = torch.Generator().manual_seed(3)
    short, long = torch.randint(1, 64, (4,), generator=g), torch.randint(1, 64, (7,), generator=g)
    ids = torch.stack([torch.cat([torch.full((3,), pad), short]), long])
    mask = (ids != pad).long()
    kw = dict(attention_mask=mask, max_new_tokens=new_tokens, do_sample=False, pad_token_id=pad)
    eos = None
    for seed in range(6):  # weights under which one row emits an EOS early
        base = tiny_model("olmoe", implementation, seed=seed)
        with torch.no_grad():
            probe = base.generate(ids, **kw)[:, ids.shape[1] :]
        eos = _early_eos(probe, pad)
        if eos is not None:
            break
    assert eos is not None
    base.generation_config.eos_token_id = eos  # the recorder, generate and the engine read it
    with torch.no_grad():
        ref_logits = base(ids, attention_mask=mask).logits
        ref_out = base.generate(ids, **kw)
    model = clone(base)
    info = find_layers_info(model)
    L = len(info.moe_layers)
    plan = Plan(
        routing=RoutingShape.of(info),
        budget=Budget(slots=slots * L, bytes_per_expert=info.bytes_per_expert),
        layout=CacheLayout("per_layer", (slots,) * L),
        eviction=EvictionConfig("lru"),
    )
    with OffloadEngine.from_model(model, plan, log_accesses=True) as eng:
        with RoutingRecorder(model, tmp_path / "trace") as rec:
            out = rec.generate(["r0", "r1"], ids, **kw)
        log = list(eng.stats.accesses_log or [])
        counters = {k: v.copy() for k, v in eng.stats.counters.items()}
        tokens = eng.stats.tokens.copy()
        with torch.no_grad():
            logits = model(ids, attention_mask=mask).logits
    assert torch.equal(logits, ref_logits)
    assert torch.equal(out, ref_out)
    new = out[:, ids.shape[1] :].tolist()
    lengths = [r.index(eos) + 1 if eos in r else len(r) for r in new]
    assert min(lengths) < max(lengths) == new_tokens  # one row finished early
    events, sim = _replay(tmp_path / "trace", plan, order="forward")
    assert len(log) == events.num_events
    for i, (layer, ph, need, _) in enumerate(log):
        assert (events.layer[i], events.phase[i]) == (layer, ph)
        assert tuple(events.experts[events.ptr[i] : events.ptr[i + 1]]) == need
    assert np.array_equal(sim.stats[K.S_ACCESS], counters["accesses"])
    assert np.array_equal(sim.stats[K.S_HIT], counters["hits"])
    assert np.array_equal(events.tokens_by_phase, tokens)
    assert 0 < counters["hits"].sum() < counters["accesses"].sum()
