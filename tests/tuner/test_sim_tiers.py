"""Simulator with a RAM tier: two links, a brute-force reference, bounds and prefetch targets."""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import replace

import numpy as np
import pytest

from moetrace.errors import ConfigError
from moetrace.store.hardware import HardwareProfile
from moetrace.store.plan import PrefetchConfig, RamTier
from moetrace.tuner.placement import ram_tier
from moetrace.tuner.policy import build_events
from moetrace.tuner.sim import kernel as K
from moetrace.tuner.sim.engine import simulate
from tests.tuner.simhelpers import plan_for, random_tokens, routing

BPE = 1000
# RAM -> device 1 MB/s (1 ms per expert, 20 us latency); disk -> RAM 0.25 MB/s (4 ms, 100 us)
HW = HardwareProfile(
    "two-links", 0.001, 20.0, 300.0, 50.0, disk_bandwidth_gbps=0.00025, disk_latency_us=100.0
)
# a slow copy link behind a fast disk: a RAM slot is overwritten while copies still read it
COPY_BOUND = HardwareProfile(
    "copy-bound", 0.00025, 20.0, 100.0, 0.0, disk_bandwidth_gbps=0.004, disk_latency_us=10.0
)


def ram(slots: int, policy: str = "lru", pinned=(), L: int = 3, **kw) -> RamTier:  # type: ignore[no-untyped-def]
    return replace(ram_tier(L, slots, policy, pinned), **kw)


def reference(tokens, dev_cap: int, ram_slots: int, hw: HardwareProfile) -> dict[str, float]:  # type: ignore[no-untyped-def]
    """Per-layer LRU device caches over one LRU pool of RAM over disk, one pass per token,
    timed with a FIFO disk queue and a FIFO copy queue, by brute force."""
    L = len(tokens[0])
    xfer, lat = BPE / hw.bytes_per_second, hw.transfer_latency_us * 1e-6
    dx, dlat = BPE / hw.disk_bytes_per_second, (hw.disk_latency_us or 0.0) * 1e-6
    dev = [OrderedDict() for _ in range(L)]  # expert -> ready time
    ram_c: OrderedDict = OrderedDict()  # (layer, expert) -> [ready, busy until]
    now = link = disk = 0.0
    out = {"accesses": 0, "hits": 0, "ram_accesses": 0, "ram_hits": 0, "disk": 0, "stall": 0.0}
    for t in tokens:
        for layer in range(L):
            need = sorted(set(t[layer]))  # one pass: its experts in id order, as in events
            cache, misses, streamed, done = dev[layer], [], set(), now
            for e in need:
                out["accesses"] += 1
                if e in cache:
                    out["hits"] += 1
                    cache.move_to_end(e)
                    done = max(done, cache[e])
                    continue
                misses.append(e)
                if len(cache) >= dev_cap:
                    victims = [x for x in cache if x not in need]
                    if not victims:
                        streamed.add(e)
                        continue
                    del cache[victims[0]]
                cache[e] = None
            keys = [(layer, e) for e in misses]
            for key in keys:
                e = key[1]
                out["ram_accesses"] += 1
                if key in ram_c:
                    out["ram_hits"] += 1
                    ram_c.move_to_end(key)
                    src, entry = ram_c[key][0], ram_c[key]
                else:
                    start = max(now, disk)
                    if len(ram_c) >= ram_slots:
                        victims = [k for k in ram_c if k not in keys]
                        entry = None
                        if victims:
                            old = ram_c.pop(victims[0])
                            start = max(start, old[1])
                            entry = [0.0, 0.0]
                    else:
                        entry = [0.0, 0.0]
                    disk = start + dx
                    src = start + dx + dlat
                    out["disk"] += BPE
                    if entry is not None:
                        entry[0] = src
                        ram_c[key] = entry
                cstart = max(now, link, src)
                link = cstart + xfer
                if entry is not None:
                    entry[1] = max(entry[1], link)
                ready = link + lat
                if e not in streamed:
                    cache[e] = ready
                done = max(done, ready)
            out["stall"] += done - now
            now = done + (hw.layer_compute_base_us + hw.layer_compute_per_token_us) * 1e-6
    out["total"] = now
    return out


@pytest.mark.parametrize("hw", [HW, COPY_BOUND], ids=["disk-bound", "copy-bound"])
@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize(("dev_cap", "ram_slots"), [(2, 3), (3, 8), (1, 20), (4, 0)])
def test_matches_brute_force_two_links(
    seed: int, dev_cap: int, ram_slots: int, hw: HardwareProfile
) -> None:
    rng = np.random.default_rng(seed)
    tokens = random_tokens(rng, 120, 3, 10, 3)
    ev = build_events(routing(tokens, 10))
    plan = replace(plan_for(ev, "lru", dev_cap), ram=ram(ram_slots))
    res = simulate(ev, plan, hw, bytes_per_expert=BPE)
    ref = reference(tokens, dev_cap, ram_slots, hw)
    s = res.summary()
    assert s["accesses"] == ref["accesses"]
    assert round(s["hit_rate"] * s["accesses"]) == ref["hits"]
    assert s["ram_accesses"] == ref["ram_accesses"]
    assert round((s["ram_hit_rate"] or 0.0) * s["ram_accesses"]) == ref["ram_hits"]
    assert s["disk_bytes"] == ref["disk"]
    assert s["stall_s"] == pytest.approx(ref["stall"], rel=1e-9)
    assert s["total_s"] == pytest.approx(ref["total"], rel=1e-9)


def test_ram_holding_every_expert_is_the_two_tier_model() -> None:
    rng = np.random.default_rng(7)
    ev = build_events(routing(random_tokens(rng, 150, 3, 8, 2), 8))
    base = plan_for(ev, "lru", 2, prefetch="transition", fetch=2)
    two = simulate(ev, base, HW, bytes_per_expert=BPE)
    every = tuple(tuple(range(8)) for _ in range(3))
    three = simulate(ev, replace(base, ram=ram(24, "static", every)), HW, bytes_per_expert=BPE)
    assert np.array_equal(two.stats[: K.S_RAM_ACCESS], three.stats[: K.S_RAM_ACCESS])
    assert two.total_seconds == three.total_seconds
    s = three.summary()
    assert s["ram_hit_rate"] == 1.0 and s["disk_bytes"] == 0
    assert s["warmup_disk_bytes"] == 24 * BPE and "ram" not in two.summary()


def test_a_smaller_ram_reads_more_from_disk_and_stalls_more() -> None:
    rng = np.random.default_rng(3)
    ev = build_events(routing(random_tokens(rng, 300, 3, 16, 2), 16))
    base = plan_for(ev, "lru", 3)
    rows = [simulate(ev, replace(base, ram=ram(n)), HW, bytes_per_expert=BPE).summary()
            for n in (0, 8, 24, 48)]  # fmt: skip
    disk = [r["disk_bytes"] for r in rows]
    stall = [r["stall_s"] for r in rows]
    assert disk == sorted(disk, reverse=True) and disk[0] > disk[-1]
    assert stall == sorted(stall, reverse=True)
    assert rows[-1]["ram_hit_rate"] > rows[1]["ram_hit_rate"]
    # RAM of 0 slots: every device miss is read from disk through the staging area
    assert rows[0]["disk_bytes"] == rows[0]["ram_accesses"] * BPE


def test_prefetch_into_ram_hides_disk_reads_and_device_prefetch_reads_through_ram() -> None:
    rng = np.random.default_rng(4)
    ev = build_events(routing(random_tokens(rng, 300, 4, 16, 2), 16))
    base = replace(plan_for(ev, "lru", 3), ram=ram(12, L=4))
    plain = simulate(ev, base, HW, bytes_per_expert=BPE).summary()
    oracle = PrefetchConfig("oracle", lookahead=1, fetch=0)
    to_ram = simulate(ev, replace(base, ram=replace(base.ram, prefetch=oracle)), HW,
                      bytes_per_expert=BPE).summary()  # fmt: skip
    assert to_ram["ram_prefetch_issued"] > 0
    assert to_ram["ram_hit_rate"] > plain["ram_hit_rate"]
    assert to_ram["stall_s"] < plain["stall_s"]
    assert to_ram["bytes_moved"] == plain["bytes_moved"]  # the device link carries the same
    # a device prefetch reads through RAM: with no RAM slot every one is a disk read
    dev_pf = replace(base, prefetch=oracle, ram=ram(0, L=4))
    d = simulate(ev, dev_pf, HW, bytes_per_expert=BPE).summary()
    assert d["prefetch_issued"] > 0
    assert d["disk_bytes"] == (d["ram_accesses"] + d["prefetch_issued"]) * BPE
    every = tuple(tuple(range(16)) for _ in range(4))
    d = simulate(ev, replace(dev_pf, ram=ram(64, "static", every, L=4)), HW,
                 bytes_per_expert=BPE).summary()  # fmt: skip
    assert d["prefetch_issued"] > 0 and d["disk_bytes"] == 0


def test_ram_tier_errors() -> None:
    rng = np.random.default_rng(5)
    ev = build_events(routing(random_tokens(rng, 20, 3, 8, 2), 8))
    plan = replace(plan_for(ev, "lru", 2), ram=ram(4))
    no_disk = HardwareProfile("no-disk", 1.0, 0.0, 1.0, 0.0)
    with pytest.raises(ConfigError, match="no disk link"):
        simulate(ev, plan, no_disk, bytes_per_expert=BPE)
    with pytest.raises(ConfigError, match="needs the future"):
        simulate(ev, replace(plan, ram=ram(4, "belady")), HW, bytes_per_expert=BPE)
