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
from moetrace.tuner.sched.workload import workload
from moetrace.tuner.sim import make_plan, simulate, uniform_layout

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


@pytest.mark.parametrize("passes", [[0], [3, 4], [0, 5, 9, 30], list(range(0, 300, 7))])
def test_step_events_are_the_union_of_the_steps_passes(grouped, passes) -> None:
    from moetrace.tuner.sched.workload import step_events

    ev, _ = grouped
    m = step_events(ev, np.asarray(passes))
    assert m.pass_event.shape == (1, ev.num_layers)
    for layer in range(ev.num_layers):
        want: dict[int, int] = {}
        tokens, phase = 0, 1
        for p in passes:
            e = ev.pass_event[p, layer]
            if e < 0:
                continue
            tokens += int(ev.tokens[e])
            phase = min(phase, int(ev.phase[e]))
            lo, hi = ev.ptr[e], ev.ptr[e + 1]
            for x, c in zip(ev.experts[lo:hi], ev.counts[lo:hi], strict=True):
                want[int(x)] = want.get(int(x), 0) + int(c)
        j = m.pass_event[0, layer]
        got = dict(zip(m.experts[m.ptr[j] : m.ptr[j + 1]].tolist(),
                       m.counts[m.ptr[j] : m.ptr[j + 1]].tolist(), strict=True))  # fmt: skip
        assert got == want
        assert (int(m.tokens[j]), int(m.phase[j]), int(m.layer[j])) == (tokens, phase, layer)
    assert list(m.experts) != [] and np.all(np.diff(m.ptr) > 0)


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
    assert np.all(q.start >= q.arrival)  # the scheduler only sees requests that arrived
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
    w = workload(ev, get_scheduler("affinity").signature)
    assert w.signature.shape == (32, ev.num_experts)
    assert np.allclose(np.linalg.norm(w.signature, axis=1), 1.0)
    half = ev.num_experts // 2
    assert (w.signature[0::2, half:] == 0).all() and (w.signature[1::2, :half] == 0).all()
    with pytest.raises(ConfigError, match="probe_layers"):
        workload(ev, get_scheduler("affinity", {"probe_layers": ev.num_layers + 1}).signature)


@pytest.mark.parametrize("policy", ["lru", "wtinylfu", "pinned_lfu"])
def test_replay_in_steps_is_the_replay_in_one_call(grouped, policy: str) -> None:
    """The kernel's clock carries state between calls: replaying pass by pass (what the
    queue model does) counts and times exactly what one call does."""
    from moetrace.tuner.policy.events import Events  # noqa: F401
    from moetrace.tuner.sched.workload import step_events
    from moetrace.tuner.sim.engine import Replay

    ev, _ = grouped
    plan = make_plan(ev, _shape(ev.num_layers, ev.num_experts, ev.top_k),
                     uniform_layout(ev.num_layers * 5, ev.num_layers, ev.num_experts), policy)  # fmt: skip
    one = simulate(ev, plan, HW)
    r = Replay(plan, HW, ev.num_layers, ev.num_experts)
    for p in range(ev.num_passes):
        r.run(step_events(ev, np.array([p])))
    assert np.array_equal(r.stats, one.stats)
    assert r.now == pytest.approx(one.total_seconds)
    r.wait_until(r.now + 5.0)
    assert r.now == pytest.approx(one.total_seconds + 5.0)
    with pytest.raises(ConfigError, match="needs the whole future"):
        Replay(make_plan(ev, _shape(3, 16, 2), uniform_layout(15, 3, 16), "belady"), HW, 3, 16)


def test_steps_in_one_call_equal_steps_one_by_one(grouped) -> None:
    """A grid of steps (what the queue replays when nothing can be admitted) gives the
    events of its rows one after another; -1 leaves a request out of a step."""
    from moetrace.tuner.sched.workload import step_events

    ev, _ = grouped
    grid = np.array([[0, 14, 30], [1, 15, -1], [2, 16, -1]])
    many = step_events(ev, grid)
    rows = [step_events(ev, row[row >= 0]) for row in grid]
    assert many.num_events == sum(r.num_events for r in rows)
    assert np.array_equal(many.experts, np.concatenate([r.experts for r in rows]))
    assert np.array_equal(many.layer, np.concatenate([r.layer for r in rows]))
    assert np.array_equal(many.tokens, np.concatenate([r.tokens for r in rows]))
    assert np.array_equal(many.pass_id, np.repeat(np.arange(3), [r.num_events for r in rows]))
