"""benchmarks/fleet_trace.py: fit a tiny routing, generate small fleet traces, check them."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest

from moetrace.store.arrays import Routing, load_routing
from moetrace.store.reader import open_trace
from moetrace.store.schema import Manifest, ModelInfo, SourceInfo

ROOT = Path(__file__).resolve().parents[2]
L, E, K = 26, 64, 6


@pytest.fixture(scope="module")
def fleet():
    spec = importlib.util.spec_from_file_location(
        "fleet_trace", ROOT / "benchmarks" / "fleet_trace.py"
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules["fleet_trace"] = module
    spec.loader.exec_module(module)
    return module


def tiny_routing(requests: int = 12, seed: int = 0) -> Routing:
    """Sticky random routing of the DeepSeek-V2-Lite shape (26 MoE layers, 64 experts, top-6)."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(2, 30, requests)
    rows = []
    for r, n in enumerate(lengths):
        prev = [rng.choice(E, K, replace=False) for _ in range(L)]
        for t in range(n):
            for layer in range(L):
                if rng.random() < 0.5:
                    prev[layer] = rng.choice(E, K, replace=False)
                rows.append((r, t, layer, np.sort(prev[layer])))
    req, tok, lay, ex = zip(*rows, strict=True)
    n = len(rows)
    return Routing(
        request_ids=tuple(f"q{r}" for r in range(requests)),
        moe_layers=tuple(range(1, L + 1)),
        num_experts=E,
        top_k=K,
        request=np.asarray(req, np.int32),
        token=np.asarray(tok, np.int32),
        step=np.zeros(n, np.int32),
        phase=np.zeros(n, np.int8),
        forward=np.asarray(req, np.int64),
        layer=np.asarray(lay, np.int16),
        experts=np.asarray(ex, np.int16),
    )


def manifest() -> Manifest:
    model = ModelInfo(name="tiny-deepseek", num_layers=L + 1, moe_layers=tuple(range(1, L + 1)),
                      num_experts=E, top_k=K)  # fmt: skip
    return Manifest(model=model, source=SourceInfo(kind="imported"), gate_weights=False)


@pytest.fixture(scope="module")
def model(fleet):
    return fleet.fit(tiny_routing())


def test_fit_model_shapes_and_json(fleet, model, tmp_path: Path) -> None:
    assert np.asarray(model.theta).shape == (L, 3)
    assert np.asarray(model.transitions).shape == (L, E, E)
    assert np.asarray(model.transitions)[0].sum() == 0  # layer 0 has no layer above
    assert len(model.request_lengths) == 12
    assert sum(model.request_lengths) * L == model.real_stats["rows"]
    assert np.asarray(model.popularity).sum() == model.real_stats["rows"] * K
    model.save(tmp_path / "m.json")
    again = fleet.FleetModel.load(tmp_path / "m.json")
    assert again.theta == model.theta and again.request_histograms == model.request_histograms


def test_generate_small_trace(fleet, model, tmp_path: Path) -> None:
    out = tmp_path / "t"
    res = fleet.generate(model, out, 20_000, seed=3, manifest=manifest())
    tokens = -(-20_000 // (L * K))  # rounded up to whole tokens: 129
    assert (res["tokens"], res["rows"], res["selections"]) == (tokens, tokens * L, tokens * L * K)
    trace = open_trace(out)
    assert trace.manifest.source.kind == "synthetic"
    assert trace.manifest.model.fingerprint == manifest().model.fingerprint
    routing = load_routing(trace)
    assert routing.num_rows == tokens * L
    assert len(routing.request_ids) == res["requests"] == trace.num_requests
    ex = routing.experts
    assert ex.shape == (tokens * L, K)
    assert ex.min() >= 0 and ex.max() < E
    assert (np.diff(ex.astype(int), axis=1) > 0).all()  # k distinct, sorted ids per row
    assert (routing.phase == 0).all()
    # every token has all 26 layers, in order
    assert (np.bincount(routing.layer, minlength=L) == tokens).all()
    prompt = trace.sql("SELECT sum(prompt_tokens) AS n FROM requests").column("n")[0].as_py()
    assert prompt == tokens


def _routing(path: Path) -> Routing:
    return load_routing(open_trace(path))


def test_generate_is_deterministic_and_servers_split(fleet, model, tmp_path: Path) -> None:
    a = fleet.generate(model, tmp_path / "a", 20_000, seed=5, servers=2, manifest=manifest())
    b = fleet.generate(model, tmp_path / "b", 20_000, seed=5, servers=2, manifest=manifest())
    c = fleet.generate(model, tmp_path / "c", 20_000, seed=6, servers=2, manifest=manifest())
    assert a["requests"] == b["requests"]
    assert [s["tokens"] for s in a["servers"]] == [65, 64]  # 129 tokens split over 2 servers
    ids: set[str] = set()
    for s in ("server-00", "server-01"):
        ra, rb = _routing(tmp_path / "a" / s), _routing(tmp_path / "b" / s)
        np.testing.assert_array_equal(ra.experts, rb.experts)
        assert ra.request_ids == rb.request_ids
        assert not ids.intersection(ra.request_ids)  # disjoint request ids across servers
        ids.update(ra.request_ids)
    assert len(ids) == a["requests"]
    assert sum(_routing(tmp_path / "a" / s).num_rows for s in ("server-00", "server-01")) == 129 * L
    rc = _routing(tmp_path / "c" / "server-00")
    ra = _routing(tmp_path / "a" / "server-00")
    assert rc.experts.shape != ra.experts.shape or not np.array_equal(rc.experts, ra.experts)
    assert c["selections"] == a["selections"]


def test_calibration_fits_a_bias(fleet) -> None:
    plain = fleet.fit(tiny_routing(requests=4, seed=1))
    tuned = fleet.fit(tiny_routing(requests=4, seed=1), calibrate_iters=1)
    assert np.asarray(plain.bias).shape == (L, E) and not np.asarray(plain.bias).any()
    assert np.asarray(tuned.bias).any()
    assert tuned.theta == plain.theta  # the calibration only moves the bias
