"""Tuning fanned out over processes gives the serial run's plan, bit for bit."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from moetrace.errors import ConfigError
from moetrace.tuner.parallel import _SHARED, Fanout, default_workers, shared
from moetrace.tuner.sim.synthetic import write_synthetic_trace
from moetrace.tuner.tune import TuneConfig, tune


@pytest.fixture(scope="module")
def trace(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("par") / "trace"
    return write_synthetic_trace(path, requests=24, decode_tokens=14, stickiness=0.5, seed=7)


def _without_clock(plan_json: dict) -> dict:
    plan_json["provenance"].pop("created")
    return plan_json


def test_pool_tune_equals_serial_tune(trace: Path) -> None:
    base = TuneConfig(budget="25%", seed=2, splits=("time",), judge=("shift",))
    serial = tune([trace], TuneConfig(**{**base.__dict__, "workers": 1}), progress=False)
    pooled = tune([trace], TuneConfig(**{**base.__dict__, "workers": 2}), progress=False)
    a, b = _without_clock(serial.plan.to_json()), _without_clock(pooled.plan.to_json())
    assert json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)
    assert serial.search == pooled.search  # every candidate's row, in the same order
    assert not _SHARED  # nothing left behind


def square(x: int, h: str) -> int:
    return x * x + len(shared(h))


def test_fanout_shares_before_forking() -> None:
    with Fanout(2) as fan:
        assert fan.kind == "pool"
        h = fan.share("k", [1, 2, 3])
        assert fan.map(square, [(i, h) for i in range(6)]) == [i * i + 3 for i in range(6)]
        h2 = fan.share("k2", [1])  # after the pool forked: it is restarted with it
        assert fan.map(square, [(2, h2), (3, h2)]) == [5, 10]
    assert "k" not in _SHARED
    assert Fanout(1).map(square, [(2, [0, 0])]) == [6]
    assert default_workers() >= 1
    with pytest.raises(ConfigError, match="workers must be >= 1"):
        Fanout(0)
    with pytest.raises(ConfigError, match="workers must be >= 1"):
        TuneConfig(budget="25%", workers=0)


def test_ray_address_that_does_not_answer_is_one_line(monkeypatch) -> None:
    pytest.importorskip("ray")
    with pytest.raises(ConfigError, match="cannot connect to Ray at '127.0.0.1:1': .*refused"):
        Fanout(1, ray="127.0.0.1:1")
    with pytest.raises(ConfigError, match="cannot connect to Ray at 'ray://127.0.0.1:1'"):
        Fanout(1, ray="ray://127.0.0.1:1")


@pytest.fixture(scope="module")
def ray_cluster():
    """A real local Ray cluster of 2 CPUs (skips cleanly where Ray cannot start)."""
    ray = pytest.importorskip("ray")
    try:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    except Exception as exc:  # no shared memory, no ports...
        pytest.skip(f"Ray cannot start here: {exc}")
    yield ray
    ray.shutdown()


def test_ray_tune_equals_serial_tune(trace: Path, ray_cluster) -> None:
    base = TuneConfig(budget="25%", seed=2, splits=("time",))
    serial = tune([trace], TuneConfig(**{**base.__dict__, "workers": 1}), progress=False)
    on_ray = tune([trace], TuneConfig(**{**base.__dict__, "ray": "auto"}), progress=False)
    a, b = _without_clock(serial.plan.to_json()), _without_clock(on_ray.plan.to_json())
    assert json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)
    assert serial.search == on_ray.search
    with Fanout(2, ray="auto") as fan:
        assert fan.kind == "ray"
        h = fan.share("k", [1, 2, 3])
        assert not isinstance(h, str)  # an object reference, resolved on the workers
