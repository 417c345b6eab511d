"""TraceWriter: input validation, part cutting, flush/close semantics, appending."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from storekit import make_manifest, synth_request, write_trace

from moetrace.errors import TraceWriteError
from moetrace.store import RequestRecord, TraceWriter, open_trace


@pytest.fixture
def writer(tmp_path: Path):
    w = TraceWriter(tmp_path / "t", make_manifest(top_k=2, num_experts=8, moe_layers=(1, 3)))
    yield w
    w.close()


def _ok_rows(n: int = 2) -> dict[str, object]:
    return {
        "token": np.arange(n),
        "step": 0,
        "phase": 0,
        "forward": 0,
        "layer": 1,
        "experts": np.zeros((n, 2), dtype=np.int64),
    }


@pytest.mark.parametrize(
    ("override", "needle"),
    [
        ({"experts": np.zeros((2, 3), dtype=np.int64)}, r"shape \(n, top_k=2\)"),
        ({"experts": np.zeros(4, dtype=np.int64)}, r"got \(4,\)"),
        ({"experts": np.array([[0, 8], [1, 2]])}, "id 8 out of range"),
        ({"experts": np.array([[0, -2], [1, 2]])}, "id -2 out of range"),
        ({"experts": np.array([[0.5, 1.0], [1.0, 2.0]])}, "integer expert ids"),
        ({"layer": 2}, r"layer\(s\) \[2\] are not MoE layers"),
        ({"layer": np.array([1, 0])}, r"\[0\] are not MoE layers"),
        ({"token": np.arange(3)}, r"token must be a scalar or have shape \(2,\).*\(3,\)"),
        ({"step": np.zeros((2, 2), dtype=int)}, r"step must be .* got shape \(2, 2\)"),
        ({"phase": 2}, "unknown phase code 2"),
        ({"phase": "generate"}, "unknown phase 'generate'"),
        ({"phase": np.array(["prefill", "bogus"])}, "unknown phase 'bogus'"),
        ({"weights": np.zeros((2, 1))}, r"weights shape \(2, 1\) != experts shape \(2, 2\)"),
        ({"speculative": np.zeros((2, 2), dtype=int)}, "manifest has speculative=False"),
        ({"forward": np.array([0.5, 1.5])}, "forward must hold integers"),
    ],
)
def test_add_activations_rejects(writer: TraceWriter, override: dict, needle: str) -> None:
    writer.begin_request("r")
    with pytest.raises(TraceWriteError, match=needle) as err:
        writer.add_activations("r", **{**_ok_rows(), **override})
    assert "'r'" in str(err.value)


def test_phase_names_accepted(tmp_path: Path) -> None:
    m = make_manifest(top_k=2, num_experts=8, moe_layers=(1, 3))
    with TraceWriter(tmp_path / "t", m) as w:
        w.write_request(RequestRecord("r", 2), **{**_ok_rows(), "phase": ["prefill", "decode"]})
    phases = open_trace(tmp_path / "t").read_activations(["phase"]).column(0).to_pylist()
    assert phases == ["prefill", "decode"]


def test_speculative_required_and_range_checked(tmp_path: Path) -> None:
    m = make_manifest(top_k=2, num_experts=8, moe_layers=(1, 3), speculative=True)
    with TraceWriter(tmp_path / "t", m) as w:
        w.begin_request("r")
        with pytest.raises(TraceWriteError, match="speculative experts are required"):
            w.add_activations("r", **_ok_rows())
        with pytest.raises(TraceWriteError, match="speculative id 9 out of range"):
            w.add_activations("r", **_ok_rows(), speculative=np.array([[0, 9], [1, 1]]))


def test_request_id_rules(writer: TraceWriter) -> None:
    with pytest.raises(TraceWriteError, match="non-empty string"):
        writer.begin_request("")
    writer.begin_request("a")
    with pytest.raises(TraceWriteError, match="'a' is already open"):
        writer.begin_request("a")
    writer.end_request(RequestRecord("a", 0))
    with pytest.raises(TraceWriteError, match="'a' is already in the trace"):
        writer.begin_request("a")
    with pytest.raises(TraceWriteError, match="'zz' was not begun"):
        writer.add_activations("zz", **_ok_rows())
    with pytest.raises(TraceWriteError, match="'zz' was not begun"):
        writer.end_request(RequestRecord("zz", 0))
    with pytest.raises(TraceWriteError, match="part_rows must be >= 1, got 0"):
        TraceWriter(writer.path, writer.manifest, part_rows=0)


def test_duplicate_request_in_existing_trace(tmp_path: Path) -> None:
    m = make_manifest()
    rng = np.random.default_rng(0)
    write_trace(tmp_path / "t", m, [synth_request(m, rng, "x")])
    with TraceWriter(tmp_path / "t", m) as w:
        assert w.existing_request_ids == frozenset({"x"})
        with pytest.raises(TraceWriteError, match="'x' is already in the trace"):
            w.begin_request("x")


def test_record_validation() -> None:
    with pytest.raises(TraceWriteError, match="prompt_tokens=-1"):
        RequestRecord("r", -1)
    with pytest.raises(TraceWriteError, match="request_id must be a non-empty string"):
        RequestRecord("", 1)


@pytest.mark.parametrize("threads", [0, 2])
def test_parts_cut_by_part_rows_and_unfinished_not_committed(tmp_path: Path, threads: int) -> None:
    m = make_manifest(moe_layers=(1, 2, 3))
    rng = np.random.default_rng(1)
    reqs = [synth_request(m, rng, f"r{i}", prompt_tokens=2, generated_tokens=0) for i in range(7)]
    path = tmp_path / "t"
    with TraceWriter(path, m, part_rows=12, threads=threads) as w:  # 6 rows per request
        for r in reqs:
            w.write_request(r.record, **r.kwargs())
        w.begin_request("open")
        w.add_activations("open", **reqs[0].kwargs())
    assert (w.parts_written, w.rows_written, w.requests_written) == (4, 42, 7)
    trace = open_trace(path)
    assert [p.activation_rows for p in trace.parts] == [12, 12, 12, 6]
    assert [p.request_rows for p in trace.parts] == [2, 2, 2, 1]
    ids = trace.requests().column("request_id").to_pylist()
    assert ids == [f"r{i}" for i in range(7)]
    with pytest.raises(TraceWriteError, match="writer is closed"):
        w.begin_request("late")


def test_flush_makes_requests_visible(tmp_path: Path) -> None:
    m = make_manifest()
    rng = np.random.default_rng(2)
    path = tmp_path / "t"
    w = TraceWriter(path, m)
    r = synth_request(m, rng, "a")
    w.write_request(r.record, **r.kwargs())
    assert open_trace(path).num_requests == 0
    w.flush()
    assert open_trace(path).num_activations == r.rows
    w.flush()  # nothing buffered: no new part
    assert len(open_trace(path).parts) == 1
    w.close()
    w.close()  # idempotent


def test_multi_chunk_request_and_mixed_weights(tmp_path: Path) -> None:
    m = make_manifest(top_k=2, num_experts=8, moe_layers=(1, 3))
    path = tmp_path / "t"
    with TraceWriter(path, m) as w:
        w.begin_request("a")
        w.add_activations("a", **_ok_rows(), weights=np.full((2, 2), 0.25))
        w.add_activations("a", **{**_ok_rows(3), "experts": np.ones((3, 2), dtype=int)})
        w.end_request(RequestRecord("a", 5))
    acts = open_trace(path).read_activations()
    assert acts.column("e0").to_pylist() == [0, 0, 1, 1, 1]
    assert acts.column("w1").to_pylist() == [0.25, 0.25, None, None, None]


def test_abandon_and_exception_in_write_request(tmp_path: Path) -> None:
    m = make_manifest(top_k=2, num_experts=8, moe_layers=(1, 3))
    path = tmp_path / "t"
    with TraceWriter(path, m) as w:
        with pytest.raises(TraceWriteError):
            w.write_request(RequestRecord("bad", 2), **{**_ok_rows(), "layer": 2})
        w.write_request(RequestRecord("bad", 2), **_ok_rows())  # id free again
        w.begin_request("gone")
        w.abandon_request("gone")
    assert open_trace(path).requests().column("request_id").to_pylist() == ["bad"]


def test_append_continues_arrival_numbering(tmp_path: Path) -> None:
    m = make_manifest()
    rng = np.random.default_rng(3)
    path = tmp_path / "t"
    write_trace(path, m, [synth_request(m, rng, f"a{i}") for i in range(3)])
    write_trace(path, m, [synth_request(m, rng, f"b{i}") for i in range(2)], threads=0)
    req = open_trace(path).requests()
    assert req.column("request_id").to_pylist() == ["a0", "a1", "a2", "b0", "b1"]
    assert req.column("arrival").to_pylist() == [0, 1, 2, 3, 4]


def test_arrival_follows_begin_order(tmp_path: Path) -> None:
    m = make_manifest(top_k=2, num_experts=8, moe_layers=(1, 3))
    path = tmp_path / "t"
    with TraceWriter(path, m) as w:
        for rid in ("first", "second", "third"):
            w.begin_request(rid)
        for rid in ("third", "first", "second"):  # batched: requests end out of order
            w.add_activations(rid, **_ok_rows())
            w.end_request(RequestRecord(rid, 2))
    req = open_trace(path).requests()
    assert req.column("request_id").to_pylist() == ["first", "second", "third"]


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"top_k": 3}, "top_k 3"),
        ({"num_experts": 16}, "16 experts"),
        ({"weight_dtype": "float16"}, "weight_dtype float16"),
        ({"speculative": True}, "speculative True"),
        ({"moe_layers": (1, 2)}, "another model or layout"),
    ],
)
def test_incompatible_manifest(tmp_path: Path, kwargs: dict, needle: str) -> None:
    path = tmp_path / "t"
    TraceWriter(path, make_manifest()).close()
    with pytest.raises(TraceWriteError, match=needle) as err:
        TraceWriter(path, make_manifest(**kwargs))
    assert str(path / "manifest.json") in str(err.value)


def test_compatible_manifest_keeps_existing(tmp_path: Path) -> None:
    path = tmp_path / "t"
    TraceWriter(path, make_manifest(tags={"run": "1"})).close()
    w = TraceWriter(path, make_manifest(tags={"run": "2"}))
    assert w.manifest.tags == {"run": "1"}
    w.close()


def test_background_error_is_raised(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from moetrace.store import encode

    m = make_manifest()
    rng = np.random.default_rng(4)
    path = tmp_path / "t"

    def boom(*args: object, **kwargs: object) -> None:
        raise OSError("disk full")

    w = TraceWriter(path, m, part_rows=1, threads=2)
    monkeypatch.setattr(encode, "write_synced", boom)
    r = synth_request(m, rng, "a")
    w.write_request(r.record, **r.kwargs())  # submitted in the background
    with pytest.raises(OSError, match="disk full"):
        w.close()
    monkeypatch.undo()
    assert open_trace(path).num_requests == 0
    assert not [p for p in (path / "activations").iterdir()]
