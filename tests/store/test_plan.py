"""Plan format v4 (reads v1-v3): round trip, validation errors naming file and field, compatibility."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from moetrace.errors import PlanError
from moetrace.store.plan import (
    Adaptation,
    Budget,
    CacheLayout,
    EvictionConfig,
    PhaseOverride,
    Plan,
    PrefetchConfig,
    Provenance,
    RamTier,
    RoutingShape,
    ScheduleConfig,
    load_plan,
    save_plan,
)
from moetrace.store.schema import ModelInfo


def model(**kw: object) -> ModelInfo:
    args = {"name": "m", "num_layers": 4, "moe_layers": (1, 3), "num_experts": 8, "top_k": 2}
    args.update(kw)
    return ModelInfo(**args)  # type: ignore[arg-type]


RAM = RamTier(slots=6, layout=CacheLayout("pool", (0, 0), pool_slots=6))


def plan(**kw: object) -> Plan:
    info = model()
    args: dict[str, object] = {
        "routing": RoutingShape.of(info),
        "budget": Budget(slots=8, bytes=8000, bytes_per_expert=1000),
        "layout": CacheLayout("per_layer", (4, 4)),
        "eviction": EvictionConfig("pinned_lru", {"pin_fraction": 0.5}, pinned=((0, 1), (2,))),
        "prefetch": PrefetchConfig("transition", 1, 2, {"keep": 2}, {"succ": [[[1, 2]] * 8] * 2}),
        "phase_overrides": {"prefill": PhaseOverride(prefetch_fetch=4)},
        "worst_case_bytes": 10000,
        "provenance": Provenance(("a",), 1, 0.5, ("r1",), ("r2",), "0.1.0", 1.0),
        "expected": {"rows": [{"name": "plan", "hit_rate": 0.5}]},
    }
    args.update(kw)
    return Plan(**args)  # type: ignore[arg-type]


def test_round_trip_file(tmp_path: Path) -> None:
    p = plan()
    path = save_plan(p, tmp_path / "plan.json")
    assert load_plan(path) == p
    assert [f.name for f in tmp_path.iterdir()] == ["plan.json"]  # no temporary left behind
    p.check_compatible(model())


caps = st.lists(st.integers(0, 8), min_size=1, max_size=5)


@settings(
    max_examples=60, suppress_health_check=[HealthCheck.function_scoped_fixture], deadline=None
)
@given(
    caps=caps,
    pool=st.booleans(),
    policy=st.sampled_from(["lru", "freq_lru", "belady"]),
    params=st.dictionaries(
        st.sampled_from(["beta", "decay", "pin_fraction"]), st.floats(0, 10), max_size=3
    ),
    fetch=st.integers(0, 8),
    table=st.lists(st.lists(st.floats(-1e3, 1e3, allow_nan=False), max_size=4), max_size=3),
    seed=st.integers(0, 2**31),
    adaptation=st.builds(
        Adaptation,
        fallback=st.sampled_from(["lru", "arc"]),
        window=st.integers(0, 10**6),
        margin=st.floats(0, 0.99),
        halflife=st.floats(0.01, 100),
    ),
    schedule=st.builds(
        ScheduleConfig,
        scheduler=st.sampled_from(["fcfs", "affinity"]),
        batch_size=st.integers(1, 512),
        batching=st.sampled_from(["continuous", "static"]),
        params=st.dictionaries(
            st.sampled_from(["max_wait", "window", "probe_layers"]), st.floats(0, 1e4), max_size=3
        ),
    ),
    ram=st.one_of(
        st.none(),
        st.tuples(
            st.integers(0, 40),
            st.sampled_from(["lru", "pinned_lru", "arc"]),
            st.integers(0, 2),
            st.integers(0, 2),
        ),
    ),
)
def test_round_trip_hypothesis(
    caps: list[int],
    pool: bool,
    policy: str,
    params: dict[str, float],
    fetch: int,
    table: list[list[float]],
    seed: int,
    adaptation: Adaptation,
    schedule: ScheduleConfig,
    ram: tuple[int, str, int, int] | None,
) -> None:
    L = len(caps)
    tier = None
    if ram is not None:
        extra, ram_policy, n_pin, ahead = ram
        tier = RamTier(
            slots=L * 2 + extra,
            layout=CacheLayout("pool", (0,) * L, pool_slots=L * 2 + extra),
            eviction=EvictionConfig(ram_policy, pinned=tuple(tuple(range(n_pin)) for _ in caps)),
            prefetch=PrefetchConfig("transition", 1 + ahead, 2),
            adaptation=adaptation,
            bytes=(L * 2 + extra) * 100,
            worst_case_bytes=(L * 2 + extra + 2) * 100,
        )
    layout = (
        CacheLayout("pool", tuple(caps), pool_slots=sum(caps) + 1)
        if pool
        else CacheLayout("per_layer", tuple(caps))
    )
    pinned = tuple(tuple(range(min(c, 2))) for c in caps)
    p = Plan(
        routing=RoutingShape("fp", tuple(range(L)), 8, 2),
        budget=Budget(slots=max(1, layout.total_slots)),
        layout=layout,
        eviction=EvictionConfig(policy, params, pinned=pinned, tables={"t": table}),
        prefetch=PrefetchConfig("learned", 2, fetch, {}, {"w": table}),
        provenance=Provenance(seed=seed),
        adaptation=adaptation,
        schedule=schedule,
        ram=tier,
    )
    again = Plan.from_json(json.loads(p.dumps()))
    assert again == p
    assert again.to_json() == p.to_json()
    v3 = json.loads(p.dumps())  # format v3: no ram section (every expert in host RAM)
    v3["format_version"] = 3
    del v3["ram"]
    old3 = Plan.from_json(v3)
    assert old3.ram is None
    assert replace(old3, ram=tier) == p
    v2 = dict(v3)  # the same plan as format v2 wrote it: no schedule section
    v2["format_version"] = 2
    del v2["schedule"]
    old2 = Plan.from_json(v2)
    assert old2.schedule == ScheduleConfig() and old2.schedule.batch_size == 1
    assert replace(old2, schedule=schedule, ram=tier) == p
    v1 = dict(v2)  # format v1: no adaptation section either
    v1["format_version"] = 1
    del v1["adaptation"]
    old = Plan.from_json(v1)
    assert old.adaptation == Adaptation() and old.adaptation.window == 0
    assert replace(old, adaptation=adaptation, schedule=schedule, ram=tier) == p


def write(tmp_path: Path, data: object) -> Path:
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(data) if not isinstance(data, str) else data)
    return path


@pytest.mark.parametrize(
    ("mutate", "match"),
    [
        (lambda d: d.pop("routing"), "missing field 'routing'"),
        (lambda d: d["layout"].pop("kind"), "missing field layout.kind"),
        (lambda d: d["budget"].update(slots="eight"), "field budget.slots must be an integer"),
        (lambda d: d["layout"].update(capacities=[4]), "layout.capacities has 1 entries"),
        (
            lambda d: d["eviction"].update(pinned=[[0, 1, 2, 3, 4], []]),
            r"pinned\[0\] pins 5 experts > layer capacity 4",
        ),
        (lambda d: d["eviction"].update(pinned=[[9], []]), "out of range"),
        (lambda d: d.update(format_version=5), "format version 5 is not supported"),
        (lambda d: d.update(format_version=1), "'adaptation' needs format_version 2"),
        (lambda d: d.update(format_version=2), "'schedule' needs format_version 3"),
        (lambda d: d["schedule"].update(batch_size=0), "schedule.batch_size must be"),
        (lambda d: d["schedule"].update(batch_size=2.5), "field schedule.batch_size must be"),
        (lambda d: d["schedule"].update(batching="dynamic"), "schedule.batching must be one of"),
        (lambda d: d["schedule"].update(scheduler=""), "schedule.scheduler must not be"),
        (lambda d: d["schedule"].update(order=1), "unknown field schedule.order"),
        (lambda d: d["adaptation"].update(window=-1), "adaptation.window must be"),
        (lambda d: d["adaptation"].update(margin=1.5), r"adaptation.margin must be in \[0, 1\)"),
        (lambda d: d["adaptation"].update(fallback=""), "adaptation.fallback must not be"),
        (lambda d: d["adaptation"].update(every=3), "unknown field adaptation.every"),
        (lambda d: d["adaptation"].update(halflife=0), r"adaptation.halflife must be > 0"),
        (lambda d: d.update(format="other"), "not a moetrace plan"),
        (lambda d: d.update(extra=1), "unknown field 'extra'"),
        (lambda d: d["prefetch"].update(lookahead=0), "prefetch.lookahead must be >= 1"),
        (lambda d: d["phase_overrides"].update(warmup={}), "unknown phase 'warmup'"),
        (lambda d: d["budget"].update(slots=2), "layout needs 8 slots > budget.slots 2"),
        (lambda d: d["layout"].update(kind="ring"), "layout.kind must be one of"),
        (lambda d: d.update(format_version=3), "'ram' needs format_version 4"),
        (lambda d: d["ram"].update(slots=1), "ram.layout needs 6 slots > ram.slots 1"),
        (lambda d: d["ram"].update(slots="six"), "field ram.slots must be an integer"),
        (lambda d: d["ram"].update(disk=1), "unknown field ram.disk"),
        (lambda d: d["ram"].pop("layout"), "missing field ram.layout"),
        (lambda d: d["ram"]["layout"].update(capacities=[0]), "ram.layout.capacities has 1"),
        (lambda d: d["ram"]["eviction"].update(pinned=[[9], []]), r"ram.eviction.pinned\[0\]"),
        (lambda d: d["ram"]["eviction"].update(pinned=[[0, 1, 2, 3], [4, 5, 6]]), "ram pins 7"),
        (lambda d: d["ram"]["prefetch"].update(lookahead=0), "ram.prefetch.lookahead must be"),
        (lambda d: d["ram"]["adaptation"].update(window=-2), "adaptation.window must be"),
    ],
)
def test_malformed_file_names_file_and_field(tmp_path: Path, mutate, match: str) -> None:
    data = plan(ram=RAM).to_json()
    mutate(data)
    path = write(tmp_path, data)
    with pytest.raises(PlanError, match=match) as info:
        load_plan(path)
    assert str(path) in str(info.value)


def test_not_json_and_missing_file(tmp_path: Path) -> None:
    with pytest.raises(PlanError, match=r"bad.json: not valid JSON \(line 1"):
        load_plan(write(tmp_path, "{nope"))
    with pytest.raises(PlanError, match="cannot read plan"):
        load_plan(tmp_path / "absent.json")


def test_other_model_is_rejected() -> None:
    p = plan()
    with pytest.raises(PlanError, match="plan is for model fingerprint"):
        p.check_compatible(model(config_fingerprint="config:other"))
    same_fp = replace(p, routing=replace(p.routing, fingerprint=model(num_experts=16).fingerprint))
    with pytest.raises(PlanError, match="does not match model"):
        same_fp.check_compatible(model(num_experts=16, config_fingerprint=None))


def test_budget_below_pins_or_worst_case() -> None:
    p = plan()
    with pytest.raises(PlanError, match="budget of 2 slots is below the 3 the plan pins"):
        p.check_budget(slots=2)
    with pytest.raises(PlanError, match="below the plan's layout of 8"):
        p.check_budget(slots=5)
    with pytest.raises(PlanError, match="below the plan's worst case of 10000 bytes"):
        p.check_budget(bytes=9000)
    p.check_budget(slots=8, bytes=10000)
    with pytest.raises(PlanError, match="pins 3 experts > budget of 2 slots"):
        plan(
            budget=Budget(slots=2),
            layout=CacheLayout("pool", (0, 0), pool_slots=2),
        )


def test_provenance_split_must_be_disjoint() -> None:
    with pytest.raises(PlanError, match="in both tune and validation"):
        Provenance(tune_requests=("a", "b"), validation_requests=("b",))
