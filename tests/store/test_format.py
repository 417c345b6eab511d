"""Round-trip of trace format v1: what is written is what is read, by every reader."""

from __future__ import annotations

import dataclasses
import json
import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from storekit import make_manifest, synth_request

from moetrace.errors import TraceFormatError
from moetrace.store import Manifest, ModelInfo, SourceInfo, TraceWriter, open_trace
from moetrace.store.arrays import load_routing
from moetrace.store.schema import activations_schema


@st.composite
def manifests(draw: st.DrawFn) -> Manifest:
    top_k = draw(st.integers(1, 8))
    num_experts = draw(st.integers(top_k, 300))
    num_layers = draw(st.integers(1, 6))
    moe = draw(
        st.lists(st.integers(0, num_layers - 1), min_size=1, max_size=num_layers, unique=True)
    )
    tags = draw(st.dictionaries(st.text(max_size=8), st.text(max_size=8), max_size=3))
    return make_manifest(
        top_k=top_k,
        num_experts=num_experts,
        num_layers=num_layers,
        moe_layers=tuple(sorted(moe)),
        weight_dtype=draw(st.sampled_from(["float32", "float16"])),
        speculative=draw(st.booleans()),
        tags=tags,
    )


request_specs = st.lists(
    st.tuples(
        st.integers(0, 4),  # prompt tokens
        st.integers(0, 3),  # generated tokens
        st.booleans(),  # weights known
        st.one_of(st.none(), st.text(max_size=20)),  # prompt text (unicode)
        st.dictionaries(st.text(min_size=1, max_size=5), st.text(max_size=5), max_size=2),
    ),
    min_size=1,
    max_size=6,
)


@settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(
    manifest=manifests(),
    specs=request_specs,
    part_rows=st.integers(1, 40),
    threads=st.integers(0, 2),
    seed=st.integers(0, 2**31),
)
def test_round_trip(
    manifest: Manifest, specs: list, part_rows: int, threads: int, seed: int
) -> None:
    rng = np.random.default_rng(seed)
    reqs = [
        synth_request(
            manifest,
            rng,
            f"req-{i}",
            prompt_tokens=p,
            generated_tokens=g,
            with_weights=w,
            prompt_text=text,
            tags=tags,
            forward_base=100 * i,
        )
        for i, (p, g, w, text, tags) in enumerate(specs)
    ]
    k = manifest.top_k
    wdtype = np.float16 if manifest.weight_dtype == "float16" else np.float32
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "trace"
        with TraceWriter(path, manifest, part_rows=part_rows, threads=threads) as writer:
            for req in reqs:
                writer.write_request(req.record, **req.kwargs())
        trace = open_trace(path)
        assert trace.manifest == manifest
        assert trace.num_requests == len(reqs)
        total = sum(r.rows for r in reqs)
        assert trace.num_activations == total

        # requests(): arrival order = write order, every field as written
        rt = trace.requests().to_pylist()
        assert [r["request_id"] for r in rt] == [r.record.request_id for r in reqs]
        assert [r["arrival"] for r in rt] == list(range(len(reqs)))
        for got, req in zip(rt, reqs, strict=True):
            rec = req.record
            assert got["prompt_text"] == rec.prompt_text
            assert got["prompt_hash"] == rec.prompt_hash
            assert got["prompt_tokens"] == rec.prompt_tokens
            assert got["generated_tokens"] == rec.generated_tokens
            assert dict(got["tags"] or []) == dict(rec.tags)

        # read_activations(): every column, per request
        acts = trace.read_activations()
        assert acts.schema.equals(activations_schema(manifest), check_metadata=False)
        rid = np.asarray(acts.column("request_id").to_pylist())
        for req in reqs:
            sel = rid == req.record.request_id
            assert sel.sum() == req.rows
            order = np.lexsort(
                (acts.column("layer").to_numpy()[sel], acts.column("token").to_numpy()[sel])
            )
            for name in ("token", "step", "forward", "layer"):
                got = acts.column(name).to_numpy()[sel][order]
                np.testing.assert_array_equal(got, getattr(req, name))
            phases = np.asarray(acts.column("phase").to_pylist(), dtype=object)[sel][order]
            assert list(phases) == [("prefill", "decode")[p] for p in req.phase]
            for i in range(k):
                got_e = acts.column(f"e{i}").to_numpy()[sel][order]
                np.testing.assert_array_equal(got_e, req.experts[:, i])
                wcol = acts.column(f"w{i}").to_numpy(zero_copy_only=False)[sel][order]
                if req.weights is None:
                    assert np.isnan(wcol.astype(np.float64)).all()  # nulls
                else:
                    np.testing.assert_array_equal(wcol, req.weights[:, i].astype(wdtype))
                if manifest.speculative:
                    scol = acts.column(f"s{i}").to_pandas().to_numpy()[sel][order]
                    want = req.speculative[:, i].astype(float)
                    want[want < 0] = np.nan
                    np.testing.assert_array_equal(scol.astype(float), want)

        # DuckDB views
        n_long = trace.sql("SELECT count(*) AS n FROM activations_long").column(0)[0].as_py()
        assert n_long == total * k
        if total:
            want = np.concatenate([r.experts for r in reqs])
            got = trace.sql(
                "SELECT rank, expert, count(*) AS n FROM activations_long GROUP BY ALL"
            ).to_pylist()
            counts = {(g["rank"], g["expert"]): g["n"] for g in got}
            for i in range(k):
                vals, cnt = np.unique(want[:, i], return_counts=True)
                for v, c in zip(vals, cnt, strict=True):
                    assert counts[(i, int(v))] == c
            nulls = (
                trace.sql("SELECT count(*) FROM activations_long WHERE weight IS NULL")
                .column(0)[0]
                .as_py()
            )
            assert nulls == sum(r.rows * k for r in reqs if r.weights is None)
        view_reqs = trace.sql("SELECT request_id, prompt_text FROM requests ORDER BY arrival")
        assert view_reqs.column("prompt_text").to_pylist() == [r.record.prompt_text for r in reqs]

        # load_routing: arrival order = requests in order, tokens, layers
        routing = load_routing(trace)
        assert routing.request_ids == tuple(r.record.request_id for r in reqs)
        assert routing.num_rows == total
        if total:
            np.testing.assert_array_equal(
                routing.experts, np.concatenate([r.experts for r in reqs]).astype(np.int16)
            )
            lix = {layer: i for i, layer in enumerate(manifest.model.moe_layers)}
            want_layers = np.concatenate([[lix[x] for x in r.layer] for r in reqs])
            np.testing.assert_array_equal(routing.layer, want_layers)
            if manifest.speculative:
                np.testing.assert_array_equal(
                    routing.speculative, np.concatenate([r.speculative for r in reqs])
                )
            else:
                assert routing.speculative is None


@settings(max_examples=60, deadline=None)
@given(
    manifest=manifests(),
    name=st.text(min_size=1, max_size=30),
    origin=st.one_of(st.none(), st.text(max_size=20)),
    inferred=st.lists(st.sampled_from(["top_k", "num_layers", "moe_layers"]), unique=True),
    bytes_per_expert=st.one_of(st.none(), st.integers(1, 2**40)),
    created=st.floats(0, 4e9, allow_nan=False),
    gate_weights=st.sampled_from([None, True, False]),
)
def test_manifest_json_round_trip(
    manifest: Manifest,
    name: str,
    origin: str | None,
    inferred: list[str],
    bytes_per_expert: int | None,
    created: float,
    gate_weights: bool | None,
) -> None:
    m = Manifest(
        model=ModelInfo(
            name=name,
            num_layers=manifest.model.num_layers,
            moe_layers=manifest.model.moe_layers,
            num_experts=manifest.model.num_experts,
            top_k=manifest.model.top_k,
            architecture="MixtralForCausalLM",
            bytes_per_expert=bytes_per_expert,
            inferred=tuple(inferred),
        ),
        source=SourceInfo(kind="imported", origin=origin, created=created),
        tags=manifest.tags,
        weight_dtype=manifest.weight_dtype,
        speculative=manifest.speculative,
        gate_weights=gate_weights,
    )
    text = m.dumps()
    back = Manifest.from_json(json.loads(text))
    assert back == m
    assert back.dumps() == text


@pytest.mark.parametrize(
    ("patch", "needle"),
    [
        ({"format": "other"}, "not a moetrace trace manifest"),
        ({"format_version": 2}, "format version 2"),
        ({"weight_dtype": "int8"}, "weight_dtype"),
        ({"gate_weights": "no"}, "gate_weights must be true, false or null"),
        ({"model": {"name": "x"}}, "missing or invalid field"),
    ],
)
def test_manifest_from_json_rejects(patch: dict, needle: str) -> None:
    data = make_manifest().to_json()
    data.update(patch)
    with pytest.raises(TraceFormatError, match=needle) as err:
        Manifest.from_json(data, where="some/manifest.json")
    assert "some/manifest.json" in str(err.value)


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"top_k": 9, "num_experts": 8}, "top_k"),
        ({"moe_layers": (2, 1)}, "strictly increasing"),
        ({"moe_layers": (1, 7), "num_layers": 4}, r"\[0, 4\)"),
        ({"moe_layers": ()}, "at least one"),
    ],
)
def test_model_info_validation(kwargs: dict, needle: str) -> None:
    with pytest.raises(TraceFormatError, match=needle):
        make_manifest(**kwargs)


def test_manifest_without_gate_weights_reads_as_not_stated() -> None:
    data = make_manifest().to_json()
    del data["gate_weights"]  # a manifest written before the field existed
    assert Manifest.from_json(data).gate_weights is None


def test_writer_refuses_weights_when_the_source_has_none(tmp_path) -> None:
    import numpy as np

    from moetrace.errors import TraceWriteError
    from moetrace.store.writer import TraceWriter

    m = dataclasses.replace(make_manifest(), gate_weights=False)
    rows = dict(token=[0], step=[0], phase=0, forward=[0], layer=[1])
    with TraceWriter(tmp_path / "t", m) as w:
        w.begin_request("r")
        with pytest.raises(TraceWriteError, match="no gate weights"):
            w.add_activations("r", **rows, experts=np.array([[0, 1]]), weights=np.ones((1, 2)))
        w.add_activations("r", **rows, experts=np.array([[0, 1]]))
        w.abandon_request("r")
