"""load_routing: replay orders, phase filter, request subsets, speculative columns."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from storekit import make_manifest

from moetrace.errors import AnalysisError
from moetrace.store import RequestRecord, TraceWriter, open_trace
from moetrace.store.arrays import load_routing

LAYERS = (1, 3)


def _rows(tokens: list[int], step: int, forward: int, expert: int) -> dict[str, object]:
    tok = np.repeat(np.asarray(tokens), len(LAYERS))
    lay = np.tile(np.asarray(LAYERS), len(tokens))
    ex = np.stack([np.full(len(tok), expert), (tok * 10 + lay) % 64], axis=1)
    return {
        "token": tok,
        "step": step,
        "phase": "prefill" if step == 0 else "decode",
        "forward": forward,
        "layer": lay,
        "experts": ex,
        "speculative": np.where((lay == LAYERS[-1])[:, None], -1, ex),
    }


@pytest.fixture
def batched(tmp_path: Path) -> Path:
    """Two requests served in one batch: A (2 prompt tokens) and B (1), decoding together.

    forward 0: prefill A(0,1) + prefill B(0); forward 1: decode A(2) + B(1);
    forward 2: decode A(3) + B(2). Expert e0 is 10 + forward for A, 20 + forward for B.
    """
    m = make_manifest(top_k=2, num_experts=64, moe_layers=LAYERS, num_layers=4, speculative=True)
    path = tmp_path / "t"
    with TraceWriter(path, m) as w:
        w.begin_request("A")
        w.begin_request("B")
        w.add_activations("A", **_rows([0, 1], 0, 0, 10))
        w.add_activations("B", **_rows([0], 0, 0, 20))
        for f in (1, 2):
            w.add_activations("B", **_rows([f], f, f, 20 + f))  # B's rows arrive first
            w.add_activations("A", **_rows([f + 1], f, f, 10 + f))
        w.end_request(RequestRecord("B", 1, 2))
        w.end_request(RequestRecord("A", 2, 2))
    return path


def test_arrival_order(batched: Path) -> None:
    r = load_routing(open_trace(batched))
    assert r.request_ids == ("A", "B")
    assert r.num_rows == 14 and r.num_layers == 2 and r.top_k == 2
    assert r.request.tolist() == [0] * 8 + [1] * 6
    assert r.token.tolist() == [0, 0, 1, 1, 2, 2, 3, 3, 0, 0, 1, 1, 2, 2]
    assert r.layer.tolist() == [0, 1] * 7  # MoE-layer index, not the model layer id
    assert r.experts[:, 0].tolist() == [10, 10, 10, 10, 11, 11, 12, 12, 20, 20, 21, 21, 22, 22]
    assert r.experts[:, 1].tolist() == [
        (t * 10 + lay) % 64
        for t, lay in zip(r.token.tolist(), [LAYERS[i] for i in r.layer.tolist()], strict=True)
    ]
    assert r.phase.tolist() == [0] * 4 + [1] * 4 + [0] * 2 + [1] * 4
    assert r.speculative is not None
    assert r.speculative[r.layer == 1].tolist() == [[-1, -1]] * 7  # no next MoE layer
    np.testing.assert_array_equal(r.speculative[r.layer == 0], r.experts[r.layer == 0])


def test_forward_order(batched: Path) -> None:
    r = load_routing(open_trace(batched), order="forward")
    assert r.forward.tolist() == [0] * 6 + [1] * 4 + [2] * 4
    assert r.request.tolist() == [0, 0, 0, 0, 1, 1, 0, 0, 1, 1, 0, 0, 1, 1]
    assert r.experts[:, 0].tolist() == [10] * 4 + [20] * 2 + [11, 11, 21, 21, 12, 12, 22, 22]


def test_phase_filter(batched: Path) -> None:
    trace = open_trace(batched)
    pre = load_routing(trace, phase="prefill")
    dec = load_routing(trace, phase="decode")
    assert pre.num_rows == 6 and dec.num_rows == 8
    assert set(pre.phase.tolist()) == {0} and set(dec.phase.tolist()) == {1}
    assert dec.experts[:, 0].tolist() == [11, 11, 12, 12, 21, 21, 22, 22]
    assert pre.request_ids == ("A", "B")


def test_request_subset(batched: Path) -> None:
    trace = open_trace(batched)
    r = load_routing(trace, requests=["B"])
    assert r.request_ids == ("B",)
    assert r.request.tolist() == [0] * 6
    assert r.experts[:, 0].tolist() == [20, 20, 21, 21, 22, 22]
    both = load_routing(trace, requests=["B", "A"])
    assert both.request_ids == ("A", "B")  # arrival order, not the order asked
    empty = load_routing(trace, requests=[])
    assert empty.num_rows == 0 and empty.experts.shape == (0, 2)
    sub = r.select(r.layer == 0)
    assert sub.num_rows == 3 and sub.speculative is not None and sub.speculative.shape == (3, 2)


def test_errors(batched: Path) -> None:
    trace = open_trace(batched)
    with pytest.raises(AnalysisError, match=r"\['C'\] are not in the trace"):
        load_routing(trace, requests=["A", "C"])
    with pytest.raises(AnalysisError, match="order must be one of"):
        load_routing(trace, order="random")
    with pytest.raises(AnalysisError, match="phase must be one of"):
        load_routing(trace, phase="generate")


def test_no_speculative_and_dropped(tmp_path: Path) -> None:
    m = make_manifest(top_k=1, num_experts=4, moe_layers=(0,), num_layers=1)
    with TraceWriter(tmp_path / "t", m) as w:
        w.write_request(
            RequestRecord("r", 3),
            token=[0, 1, 2],
            step=0,
            phase=0,
            forward=0,
            layer=0,
            experts=np.array([[3], [-1], [0]]),
        )
    r = load_routing(open_trace(tmp_path / "t"))
    assert r.speculative is None
    assert r.experts.dtype == np.int16 and r.experts[:, 0].tolist() == [3, -1, 0]


def test_layer_subset_is_renumbered_and_equals_the_full_rows(batched: Path) -> None:
    trace = open_trace(batched)
    full = load_routing(trace)
    only = load_routing(trace, layers=[1])
    assert only.moe_layers == (LAYERS[1],)
    assert set(only.layer.tolist()) == {0}
    mask = full.layer == 1
    assert np.array_equal(only.experts, full.experts[mask])
    assert np.array_equal(only.request, full.request[mask])
    with pytest.raises(AnalysisError, match="out of range"):
        load_routing(trace, layers=[2])


def test_out_of_range_ids_in_an_unvalidated_trace_name_the_part(batched: Path) -> None:
    """load_routing checks the ids it hands out even when the trace was opened without
    validation (the dashboard does that)."""
    import json

    from moetrace.errors import TraceFormatError

    target = batched / "manifest.json"
    data = json.loads(target.read_text())
    data["model"]["num_experts"] = 16  # e0 holds 10..22
    target.write_text(json.dumps(data))
    trace = open_trace(batched, validate=False)
    with pytest.raises(TraceFormatError, match=r"expert id 2\d in column e0 .*num_experts=16") as e:
        load_routing(trace)
    assert str(trace.parts[0].activations) in str(e.value)
