"""record(), the RoutingRecorder API and `moetrace record`."""

from __future__ import annotations

import pytest
import torch
from click.testing import CliRunner

from moetrace.cli import main
from moetrace.errors import ModelError, TraceWriteError
from moetrace.store import open_trace
from moetrace.tracer.record import RecordConfig, load_model, record
from moetrace.tracer.recorder import RoutingRecorder

from .conftest import write_prompts
from .tiny_models import PAD, tiny_model

torch.set_num_threads(1)


def _rows_per_request(trace) -> dict[str, tuple[int, int]]:
    table = trace.sql(
        "SELECT request_id, count(DISTINCT token) AS n, count(*) AS rows FROM activations "
        "GROUP BY request_id"
    ).to_pylist()
    return {r["request_id"]: (r["n"], r["rows"]) for r in table}


def test_record_batched_rows_match_requests(model_dir, tmp_path) -> None:
    prompts = write_prompts(tmp_path / "p.jsonl", 5)
    cfg = RecordConfig(max_new_tokens=4, batch_size=2)
    result = record(str(model_dir), prompts, tmp_path / "t", config=cfg, progress=False)
    assert (result.requests_recorded, result.requests_skipped) == (5, 0)
    trace = open_trace(tmp_path / "t")
    reqs = {r["request_id"]: r for r in trace.requests().to_pylist()}
    assert sorted(reqs) == [f"q{i}" for i in range(5)]
    layers = len(trace.manifest.model.moe_layers)
    counts = _rows_per_request(trace)
    for rid, r in reqs.items():
        assert r["prompt_tokens"] == 2 + int(rid[1:]) % 4  # no padding recorded
        assert 1 <= r["generated_tokens"] <= 4
        n_tokens = r["prompt_tokens"] + r["generated_tokens"] - 1
        assert counts[rid] == (n_tokens, n_tokens * layers)
        assert dict(r["tags"]) == {"domain": "d"}
    assert result.activations == trace.num_activations
    assert result.generated_tokens == sum(r["generated_tokens"] for r in reqs.values())


def test_existing_trace_needs_resume_and_resume_never_duplicates(model_dir, tmp_path) -> None:
    out = tmp_path / "t"
    cfg = RecordConfig(max_new_tokens=3, batch_size=2)
    record(str(model_dir), write_prompts(tmp_path / "a.jsonl", 3), out, config=cfg, progress=False)
    more = write_prompts(tmp_path / "b.jsonl", 5)  # q0..q4: q0..q2 already there
    with pytest.raises(TraceWriteError, match="--resume"):
        record(str(model_dir), more, out, config=cfg, progress=False)
    resumed = RecordConfig(max_new_tokens=3, batch_size=2, resume=True)
    result = record(str(model_dir), more, out, config=resumed, progress=False)
    assert (result.requests_recorded, result.requests_skipped) == (2, 3)
    trace = open_trace(out)
    ids = [r["request_id"] for r in trace.requests().to_pylist()]
    assert sorted(ids) == [f"q{i}" for i in range(5)]
    forwards = trace.sql("SELECT request_id, min(forward) AS f FROM activations GROUP BY 1")
    firsts = dict(zip(*[forwards.column(i).to_pylist() for i in range(2)], strict=True))
    assert firsts["q3"] > max(firsts[f"q{i}"] for i in range(3))  # forward index goes on


def test_interrupt_keeps_finished_batches(model_dir, tmp_path) -> None:
    model, tok = load_model(model_dir)
    calls = {"n": 0}

    def boom(mod, args):
        calls["n"] += 1
        if calls["n"] == 5:  # inside the second batch (3 forwards per batch)
            raise KeyboardInterrupt

    handle = model.register_forward_pre_hook(boom)
    prompts = write_prompts(tmp_path / "p.jsonl", 6)
    cfg = RecordConfig(max_new_tokens=3, batch_size=2)
    result = record(model, prompts, tmp_path / "t", tokenizer=tok, config=cfg, progress=False)
    handle.remove()
    assert result.interrupted and result.requests_recorded == 2
    assert sorted(r["request_id"] for r in open_trace(tmp_path / "t").requests().to_pylist()) == [
        "q0",
        "q1",
    ]
    # hooks are gone: the model runs without the recorder's hooks attached
    assert not any(m._forward_pre_hooks or m._forward_hooks for m in model.modules())
    rest = record(
        model,
        prompts,
        tmp_path / "t",
        tokenizer=tok,
        config=RecordConfig(max_new_tokens=3, batch_size=2, resume=True),
        progress=False,
    )
    assert (rest.requests_recorded, rest.requests_skipped) == (4, 2)


def test_model_errors(tmp_path) -> None:
    with pytest.raises(ModelError, match="does not exist"):
        load_model(tmp_path / "nope")
    from transformers import LlamaConfig, LlamaForCausalLM

    dense = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=32,
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=1,
        )
    )
    with pytest.raises(ModelError, match="has no MoE layers"):
        RoutingRecorder(dense, tmp_path / "t")


def test_explicit_set_batch_continuous_batching(tmp_path) -> None:
    model = tiny_model("mixtral")
    before = sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules())
    with RoutingRecorder(model, tmp_path / "t") as rec, torch.no_grad():
        rec.set_batch(["a"])
        model(input_ids=torch.tensor([[5, 6, 7]]), use_cache=False)
        rec.set_batch(["a", "b"])  # a decodes one token while b's 2-token prompt runs
        model(
            input_ids=torch.tensor([[8, PAD], [9, 10]]),
            attention_mask=torch.tensor([[1, 0], [1, 1]]),
            use_cache=False,
        )
        from moetrace.store import RequestRecord

        rec.end_request(RequestRecord("a", prompt_tokens=3, generated_tokens=2))
        rec.end_request(RequestRecord("b", prompt_tokens=2, generated_tokens=1))
    after = sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules())
    assert after == before
    acts = open_trace(tmp_path / "t").read_activations().to_pandas()
    got = sorted(
        set(zip(acts.request_id, acts.token, acts.phase, acts.step, acts.forward, strict=True))
    )
    assert got == [
        ("a", 0, "prefill", 0, 0),
        ("a", 1, "prefill", 0, 0),
        ("a", 2, "prefill", 0, 0),
        ("a", 3, "decode", 1, 1),
        ("b", 0, "prefill", 0, 1),
        ("b", 1, "prefill", 0, 1),
    ]


def test_cli_record_resume_and_errors(model_dir, tmp_path) -> None:
    runner = CliRunner()
    prompts = write_prompts(tmp_path / "p.jsonl", 3)
    args = [
        "record",
        "--model",
        str(model_dir),
        "--prompts",
        str(prompts),
        "--out",
        str(tmp_path / "t"),
        "--max-new-tokens",
        "3",
        "--batch-size",
        "2",
    ]
    res = runner.invoke(main, args)
    assert res.exit_code == 0, res.output
    assert "recorded 3 request(s)" in res.output
    res = runner.invoke(main, args)
    assert res.exit_code == 2 and "--resume" in res.output
    res = runner.invoke(main, [*args, "--resume"])
    assert res.exit_code == 0 and "recorded 0 request(s), skipped 3" in res.output
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "w5"}\n{oops\n')
    res = runner.invoke(
        main,
        ["record", "--model", str(model_dir), "--prompts", str(bad), "--out", str(tmp_path / "t2")],
    )
    assert res.exit_code == 2 and f"{bad}:2" in res.output
    res = runner.invoke(
        main,
        [
            "record",
            "--model",
            str(tmp_path / "missing"),
            "--prompts",
            str(prompts),
            "--out",
            str(tmp_path / "t3"),
        ],
    )
    assert res.exit_code == 2 and "does not exist" in res.output
    help_text = runner.invoke(main, ["record", "--help"]).output
    assert "Example:" in help_text and "moetrace record --out" in help_text


def test_defaults_to_demo_model_and_prompts(model_dir, tmp_path, monkeypatch) -> None:
    from moetrace.tracer import demo

    prompts = write_prompts(tmp_path / "demo.jsonl", 2)
    monkeypatch.setattr(demo, "demo_model_path", lambda: model_dir)
    monkeypatch.setattr(demo, "demo_prompts_path", lambda: prompts)
    res = CliRunner().invoke(
        main, ["record", "--out", str(tmp_path / "t"), "--max-new-tokens", "2"]
    )
    assert res.exit_code == 0, res.output
    trace = open_trace(tmp_path / "t")
    assert sorted(r["request_id"] for r in trace.requests().to_pylist()) == ["q0", "q1"]
    assert trace.manifest.model.architecture == "olmoe"


def test_draining_early_gives_the_same_rows(tmp_path, monkeypatch) -> None:
    import moetrace.tracer.recorder as recorder_mod

    model = tiny_model("qwen3_moe")
    ids = torch.tensor([[PAD, 5, 6, 7], [8, 9, 10, 11]])
    tables = []
    for name, limit in (("deferred", recorder_mod.MAX_DEFERRED), ("eager", 1)):
        monkeypatch.setattr(recorder_mod, "MAX_DEFERRED", limit)
        with RoutingRecorder(model, tmp_path / name, speculative=True) as rec:
            rec.generate(["a", "b"], ids, (ids != PAD).long(), max_new_tokens=4, do_sample=False)
        cols = ["request_id", "token", "step", "phase", "forward", "layer", "e0", "e1", "w0", "w1"]
        cols += ["s0", "s1"]
        tables.append(
            open_trace(tmp_path / name)
            .read_activations()
            .to_pandas()[cols]
            .sort_values(["request_id", "token", "layer"])
            .reset_index(drop=True)
        )
    assert len(tables[0]) == (3 + 4 - 1 + 4 + 4 - 1) * 2
    assert tables[0].equals(tables[1])
