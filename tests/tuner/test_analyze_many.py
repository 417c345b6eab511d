"""analyze as per-layer tasks merged exactly; many traces and globs as one workload."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner
from miningkit import write_trace, zipf_routing

from moetrace.cli import main
from moetrace.errors import AnalysisError, TraceFormatError
from moetrace.store import open_trace
from moetrace.store.arrays import load_routing
from moetrace.store.traceset import expand_locations, open_traces
from moetrace.tuner.analyze import AnalyzeConfig, analyze
from moetrace.tuner.mining import frequency as F
from moetrace.tuner.mining import groups as G
from moetrace.tuner.mining import phases as P
from moetrace.tuner.mining import transitions as T
from moetrace.tuner.mining.curves import combine_reuse, policy_reuse
from moetrace.tuner.mining.layers import (
    LayerTask,
    merge_layers,
    pair_task,
    routing_source,
    shard_part,
    trace_source,
)
from moetrace.tuner.mining.partial import stream_partial
from moetrace.tuner.mining.replacement import TokenStream
from moetrace.tuner.mining.streams import layer_rows, layer_stream
from moetrace.tuner.parallel import _SHARED

E, K = 12, 3


def _write(path: Path, seed: int, requests: int = 10, fingerprint_experts: int = E) -> Path:
    rng = np.random.default_rng(seed)
    routing = zipf_routing(
        rng, [30 + 5 * i for i in range(requests)], layers=3, num_experts=fingerprint_experts,
        k=K, s=1.0,
    )  # fmt: skip
    phases = [np.r_[np.zeros(10, np.int8), np.ones(ex.shape[0] - 10, np.int8)] for ex in routing]
    return write_trace(
        path, routing, num_experts=fingerprint_experts, phases=phases, moe_layers=(1, 3, 5),
        part_rows=400, id_prefix=f"s{seed}-",
    )  # fmt: skip


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("fleet")
    for i in range(3):
        _write(root / f"server-{i}", seed=11 + i)
    return root


def reuse_and_mrc(routing, sizes):  # type: ignore[no-untyped-def]
    """The single-pass reference: each layer's whole stream at once, no shards."""
    parts = []
    for layer, rows in enumerate(layer_rows(routing)):
        st = layer_stream(routing, layer, rows)
        whole = stream_partial(st.experts, st.row, routing.num_experts)
        parts.append(policy_reuse(whole, TokenStream(st.experts, st.row, E), sizes))
    return combine_reuse(parts, sizes, routing.top_k, routing.num_experts, 1)


def _report(rep) -> dict:  # type: ignore[no-untyped-def]
    d = rep.to_dict()
    d.pop("timings")
    d.pop("trace")
    return d


def test_shard_tasks_equal_the_single_pass_implementations(fleet: Path) -> None:
    """Every merged piece of many small shards against the whole-routing (or DuckDB)
    computation of it."""
    trace = open_trace(fleet / "server-0")
    routing = load_routing(trace)
    L = routing.num_layers
    task = LayerTask(sizes=(3, 6), groups=True, phase_curves=True, seed=3)
    ids = tuple(routing.request_ids)
    sources = (
        routing_source(routing, shard_rows=300),
        trace_source([trace], None, (ids,), shard_rows=300),
    )
    for source in sources:
        assert len(source.shards) > 2
        shards = [shard_part(source, lay, sh, task) for lay in range(L)
                  for sh in range(len(source.shards))]  # fmt: skip
        parts = merge_layers(shards[::-1], L, (3, 6))  # merged in shard order whatever given
        freqs = F.frequency_matrices(trace)
        for p in freqs:
            assert np.array_equal(np.stack([x.freq[p] for x in parts]), freqs[p])
        assert np.array_equal(np.stack([x.pairs for x in parts]), G.pair_counts(trace))
        whole = T.score_transitions(routing, top_n=K, test_fraction=0.2, seed=3)
        assert [pair_task(source, lay, task) for lay in range(1, L)] == whole
        distinct = P.distinct_per_forward(trace)
        for p, means in distinct.items():
            assert tuple(x.distinct_per_forward[p] for x in parts) == pytest.approx(means)
        merged = combine_reuse([x.reuse for x in parts], (3, 6), K, E, 1)
        single = reuse_and_mrc(routing, (3, 6))
        assert merged == single


def test_shards_do_not_change_the_report(fleet: Path) -> None:
    path = fleet / "server-0"
    one = analyze(path, AnalyzeConfig(workers=1))
    many = analyze(path, AnalyzeConfig(workers=2, shard_rows=250))
    assert _report(one) == _report(many)


def test_many_traces_are_one_workload(fleet: Path, tmp_path: Path) -> None:
    """Three servers' traces analyzed together equal one trace holding all their requests."""
    servers = sorted(fleet.glob("server-*"))
    together = tmp_path / "together"
    together.mkdir()
    shutil.copy(servers[0] / "manifest.json", together / "manifest.json")
    for sub in ("activations", "requests"):
        (together / sub).mkdir()
    for i, s in enumerate(servers):  # server i's requests arrive after server i-1's
        for sub, column in (("activations", "forward"), ("requests", "arrival")):
            for part in sorted((s / sub).iterdir()):  # forward passes numbered apart too
                table = pq.read_table(part)
                at = table.schema.get_field_index(column)
                moved = pc.add(table.column(at), pa.scalar(10**6 * i, table.field(at).type))
                table = table.set_column(at, column, moved)
                pq.write_table(table, together / sub / f"part-{s.name}-{part.name[5:]}")
    whole = open_trace(together)
    ids = whole.requests().column("request_id").to_pylist()
    assert [r.split("-")[0] for r in ids[::10]] == ["s11", "s12", "s13"]
    cfg = AnalyzeConfig(seed=5, workers=1)
    many = analyze([str(fleet / "server-*")], cfg)
    one = analyze(together, cfg)
    a, b = _report(many), _report(one)
    a["requests"]["request_ids"] = [r.split(":", 1)[1] for r in a["requests"]["request_ids"]]
    assert json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)
    assert many.trace == ", ".join(str(s) for s in servers)
    assert many.num_requests == 30


def test_pool_and_ray_equal_serial(fleet: Path) -> None:
    serial = analyze(fleet / "server-1", AnalyzeConfig(workers=1))
    pooled = analyze(fleet / "server-1", AnalyzeConfig(workers=2))
    assert _report(serial) == _report(pooled)
    assert not _SHARED
    ray = pytest.importorskip("ray")
    try:
        on_ray = analyze(fleet / "server-1", AnalyzeConfig(workers=2, ray="local"))
    except Exception as exc:  # pragma: no cover - a machine where Ray cannot start
        pytest.skip(f"Ray cannot start here: {exc}")
    finally:
        if ray.is_initialized():
            ray.shutdown()
    assert _report(on_ray) == _report(serial)


def test_max_tokens_in_memory_equals_reading_the_layers(fleet: Path) -> None:
    path = fleet / "server-2"
    full = analyze(path, AnalyzeConfig(workers=1))
    cut = analyze(path, AnalyzeConfig(workers=1, max_tokens=10**9))  # all tokens, in memory
    assert _report(full) == _report(cut)


def test_globs_and_errors(fleet: Path, tmp_path: Path) -> None:
    assert expand_locations([str(fleet / "server-[01]")]) == [
        str(fleet / "server-0"), str(fleet / "server-1"),
    ]  # fmt: skip
    with pytest.raises(TraceFormatError, match="no trace folder .* matches"):
        expand_locations([str(tmp_path / "nothing-*")])
    with pytest.raises(AnalysisError, match="given twice"):
        expand_locations([str(fleet / "server-0"), str(fleet / "server-*")])
    other = _write(tmp_path / "other", seed=1, requests=3, fingerprint_experts=16)
    with pytest.raises(AnalysisError, match="another model"):
        open_traces([fleet / "server-0", other])
    runner = CliRunner()
    res = runner.invoke(main, ["analyze", str(fleet / "server-0"), str(other)])
    assert res.exit_code == 2
    assert "another model" in res.output and "Traceback" not in res.output
    res = runner.invoke(main, ["analyze", str(tmp_path / "nothing-*")])
    assert res.exit_code == 2 and "no trace folder" in res.output
    assert len(res.output.strip().splitlines()) == 1
    res = runner.invoke(main, ["analyze", str(fleet / "server-*"), "--workers", "1"])
    assert res.exit_code == 0, res.output
    assert "requests: 30" in res.output or re.search(r"\b30 requests", res.output), res.output
