"""The queue model and the request schedulers: batched events, clock, fairness, parity
with the plain replay, and that affinity scheduling pays where requests share experts."""

from __future__ import annotations

import numpy as np
import pytest
from simhelpers import routing_from_requests

from moetrace.errors import ConfigError
from moetrace.store.hardware import load_hardware
from moetrace.store.plan import ScheduleConfig
from moetrace.tuner.policy.events import build_events
from moetrace.tuner.sched import arrival_times, get_scheduler, simulate_queue
from moetrace.tuner.sched.queue import _max_overtaken
from moetrace.tuner.sched.workload import merge_passes, workload
from moetrace.tuner.sim import kernel as K
from moetrace.tuner.sim import make_plan, simulate, uniform_layout
from moetrace.tuner.sim.engine import DEFAULT_BYTES_PER_EXPERT

HW = load_hardware("pcie4-x16")


def grouped_requests(n: int, seed: int = 0, groups: int = 2, decode: int = 12):
    """``n`` requests alternating between groups whose experts are disjoint halves."""
    rng = np.random.default_rng(seed)
    L, E, k = 3, 16, 2
    reqs = []
    for i in range(n):
        g = i % groups
        pool = np.arange(E)[g * E // groups : (g + 1) * E // groups]
        steps = 1 + int(rng.integers(decode // 2, decode + 1))
        prefill = int(rng.integers(2, 6))
        rows = []
        for s in range(steps):
            for _ in range(prefill if s == 0 else 1):
                rows.append(rng.choice(pool, size=(L, k), replace=False))
        reqs.append((prefill, rows))
    return L, E, k, reqs


@pytest.fixture(scope="module")
def grouped():
    L, E, k, reqs = grouped_requests(32)
    routing = routing_from_requests(reqs, L, E, k)
    ev = build_events(routing)
    plan = make_plan(ev, _shape(L, E, k), uniform_layout(L * 4, L, E), "lru")
    return ev, plan


def _shape(L: int, E: int, k: int):
    from moetrace.store.plan import RoutingShape

    return RoutingShape("fp", tuple(range(L)), E, k)


def test_merge_passes_is_the_union_of_each_steps_passes(grouped) -> None:
    ev, _ = grouped
    rng = np.random.default_rng(1)
    step = np.sort(rng.integers(0, ev.num_passes // 3, ev.num_passes))
    step = np.unique(step, return_inverse=True)[1]  # no gaps
    m = merge_passes(ev, step)
    for s in range(int(step.max()) + 1):
        for layer in range(ev.num_layers):
            want: dict[int, int] = {}
            tokens = 0
            for p in np.flatnonzero(step == s):
                e = ev.pass_event[p, layer]
                if e < 0:
                    continue
                tokens += int(ev.tokens[e])
                for x, c in zip(ev.experts[ev.ptr[e] : ev.ptr[e + 1]],
                                ev.counts[ev.ptr[e] : ev.ptr[e + 1]], strict=True):  # fmt: skip
                    want[int(x)] = want.get(int(x), 0) + int(c)
            j = m.pass_event[s, layer]
            got = dict(zip(m.experts[m.ptr[j] : m.ptr[j + 1]].tolist(),
                           m.counts[m.ptr[j] : m.ptr[j + 1]].tolist(), strict=True))  # fmt: skip
            assert got == want and int(m.tokens[j]) == tokens
    with pytest.raises(ConfigError, match="without gaps"):
        merge_passes(ev, step * 2)


def test_one_at_a_time_fcfs_is_the_plain_replay(grouped) -> None:
    """Batch 1, FCFS, a backlog: the queue model's replay is the ordinary one, counter
    for counter and second for second; its clock ends where the kernel's does."""
    ev, plan = grouped
    q = simulate_queue(ev, plan, HW, schedule=ScheduleConfig("fcfs", 1))
    plain = simulate(ev, plan, HW)
    assert np.array_equal(q.sim.stats, plain.stats)
    assert q.sim.total_seconds == pytest.approx(plain.total_seconds)
    assert q.finish.max() == pytest.approx(plain.total_seconds)
    assert np.all(np.diff(q.finish) > 0) and np.all(q.start[1:] == pytest.approx(q.finish[:-1]))


def test_clock_waits_for_arrivals(grouped) -> None:
    ev, plan = grouped
    q = simulate_queue(ev, plan, HW, schedule=ScheduleConfig("fcfs", 4), arrival_rate=0.5)
    assert q.arrivals == "poisson 0.5/s"
    assert np.all(q.start >= q.arrival - 1e-12) and np.all(q.finish > q.start)
    assert q.sim.total_seconds == pytest.approx(q.finish.max())
    # sparse arrivals: requests rarely wait, the device idles between them
    assert q.sim.total_seconds > q.arrival.max()
    assert np.median(q.wait) < 0.01 * np.median(q.latency) + 1e-9


def test_batches_and_continuous_vs_static(grouped) -> None:
    ev, plan = grouped
    cont = simulate_queue(ev, plan, HW, schedule=ScheduleConfig("fcfs", 4, "continuous"))
    stat = simulate_queue(ev, plan, HW, schedule=ScheduleConfig("fcfs", 4, "static"))
    assert all(len(b) <= 4 for b in stat.schedule.batches)
    assert [len(b) for b in stat.schedule.batches] == [4] * 8
    assert cont.schedule.num_steps < stat.schedule.num_steps  # places refilled at once
    one = simulate_queue(ev, plan, HW, schedule=ScheduleConfig("fcfs", 1))
    assert one.schedule.num_steps == ev.num_passes > cont.schedule.num_steps
    assert np.array_equal(cont.sim.tokens_by_phase, one.sim.tokens_by_phase)


def test_affinity_groups_requests_that_share_experts(grouped) -> None:
    """Two groups with disjoint experts arrive interleaved: FCFS batches mix them, the
    affinity scheduler batches each group with itself and moves fewer bytes."""
    ev, plan = grouped
    cfg = {"max_overtakes": 64}
    fcfs = simulate_queue(ev, plan, HW, schedule=ScheduleConfig("fcfs", 4, "static"))
    aff = simulate_queue(ev, plan, HW, schedule=ScheduleConfig("affinity", 4, "static", cfg))
    assert all(len({r % 2 for r in b}) == 1 for b in aff.schedule.batches)
    assert all(len({r % 2 for r in b}) == 2 for b in fcfs.schedule.batches)
    f, a = fcfs.summary(), aff.summary()
    assert a["bytes_moved"] < 0.9 * f["bytes_moved"]
    assert a["hit_rate"] > f["hit_rate"]


@pytest.mark.parametrize("bound", [0, 2, 5])
def test_fairness_bound_holds(grouped, bound: int) -> None:
    ev, plan = grouped
    sched = ScheduleConfig("affinity", 4, "continuous", {"max_overtakes": bound})
    q = simulate_queue(ev, plan, HW, schedule=sched)
    assert q.summary()["max_overtaken"] <= bound
    if bound == 0:  # never overtaken: first come, first served
        assert q.schedule.order.tolist() == list(range(len(q.arrival)))
    free = simulate_queue(ev, plan, HW, schedule=ScheduleConfig(
        "affinity", 4, "continuous", {"max_overtakes": 1e9}))  # fmt: skip
    assert free.summary()["max_overtaken"] > bound  # the bound is what holds it


def test_max_wait_sends_old_requests_first(grouped) -> None:
    ev, plan = grouped
    sched = ScheduleConfig("affinity", 2, "static", {"max_overtakes": 1e9, "max_wait": 1e-9})
    q = simulate_queue(ev, plan, HW, schedule=sched)
    order = q.schedule.order.tolist()  # after the first batch everyone has waited too long
    assert order[2:] == sorted(order[2:]) and order[:2] != [0, 1]


def test_max_overtaken_counts_later_requests_served_first() -> None:
    assert _max_overtaken(np.array([0, 1, 2])) == 0
    assert _max_overtaken(np.array([2, 1, 0])) == 2
    assert _max_overtaken(np.array([1, 2, 3, 0])) == 3


def test_registry_errors() -> None:
    with pytest.raises(ConfigError, match="unknown scheduler 'sjf'"):
        get_scheduler("sjf")
    with pytest.raises(ConfigError, match="has no parameter 'beta'"):
        get_scheduler("affinity", {"beta": 1})
    with pytest.raises(ConfigError, match="must be >= 0"):
        get_scheduler("fcfs", {"max_overtakes": -1})
    with pytest.raises(ConfigError, match="arrival rate must be > 0"):
        arrival_times(3, 0.0)


def test_arrivals() -> None:
    t, kind = arrival_times(2000, 4.0, seed=3)
    assert kind == "poisson 4/s" and t[0] == 0 and np.all(np.diff(t) >= 0)
    assert np.mean(np.diff(t)) == pytest.approx(0.25, rel=0.1)
    t, kind = arrival_times(3, None, recorded=np.array([10.0, 12.5, 11.0]))
    assert kind == "recorded" and t.tolist() == [0.0, 2.5, 2.5]
    t, kind = arrival_times(3, None, recorded=np.array([1.0, np.nan, 2.0]))
    assert kind == "backlog" and not t.any()


def test_probe_signature_is_the_first_layers_prefill(grouped) -> None:
    ev, _ = grouped
    w = workload(ev, probe_layers=1)
    assert w.signature.shape == (32, ev.num_experts)
    assert np.allclose(np.linalg.norm(w.signature, axis=1), 1.0)
    half = ev.num_experts // 2
    assert (w.signature[0::2, half:] == 0).all() and (w.signature[1::2, :half] == 0).all()
    with pytest.raises(ConfigError, match="probe_layers"):
        workload(ev, probe_layers=ev.num_layers + 1)


def test_release_array_delays_events() -> None:
    """The kernel's release times: an event starts no earlier than its release."""
    L, E, k, reqs = grouped_requests(2)
    ev = build_events(routing_from_requests(reqs, L, E, k))
    plan = make_plan(ev, _shape(L, E, k), uniform_layout(L * E, L, E), "lru")
    base = simulate(ev, plan, HW)
    rel = np.zeros(ev.num_events)
    rel[-1] = base.total_seconds + 5.0
    late = simulate(ev, plan, HW, release=rel)
    compute = HW.layer_compute_base_us * 1e-6 + HW.layer_compute_per_token_us * 1e-6 * int(
        ev.tokens[-1]
    )
    assert late.total_seconds == pytest.approx(base.total_seconds + 5.0 + compute)
    assert np.array_equal(late.stats[K.S_HIT], base.stats[K.S_HIT])
    assert DEFAULT_BYTES_PER_EXPERT > 0
