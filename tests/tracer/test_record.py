"""record(), the RoutingRecorder API and `moetrace record`."""

from __future__ import annotations

import dataclasses
import json
import logging
import re
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from treekit import tree_digest

from moetrace.cli import main
from moetrace.errors import ModelError, TraceWriteError
from moetrace.progress import INTERVAL_ENV, Progress, format_progress
from moetrace.store import open_trace
from moetrace.tracer.record import RecordConfig, load_model, record
from moetrace.tracer.recorder import RoutingRecorder

from .conftest import make_tokenizer, write_prompts
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
    args = _record_args(
        model_dir, prompts, tmp_path / "t", "--max-new-tokens", "3", "--batch-size", "2"
    )
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


# ------------------------------------------------------------ hostile input, checked up front


def _refused(res, *needles: str) -> str:
    """Assert a CLI refusal: exit 2, exactly one line of output, naming the problem."""
    assert res.exit_code == 2, res.output
    assert "Traceback" not in res.output
    lines = res.output.splitlines()
    assert len(lines) == 1, res.output
    assert lines[0].startswith("moetrace: error: ")
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def _record_args(model_dir, prompts, out, *extra: str) -> list[str]:
    return [
        "record",
        "--model",
        str(model_dir),
        "--prompts",
        str(prompts),
        "--out",
        str(out),
        *extra,
    ]


@pytest.fixture(scope="module")
def short_model_dir(tmp_path_factory) -> Path:
    """The tiny olmoe with only 16 positions."""
    path = tmp_path_factory.mktemp("tiny-olmoe-16")
    tiny_model("olmoe", max_position_embeddings=16).save_pretrained(path)
    make_tokenizer().save_pretrained(path)
    return path


@pytest.mark.parametrize("text", ["", "   \t "])
def test_cli_empty_prompt_is_refused_before_recording(model_dir, tmp_path, text: str) -> None:
    f = tmp_path / "p.jsonl"
    write_prompts(f, 2)
    with open(f, "a", encoding="utf-8") as fh:
        fh.write(json.dumps({"id": "blank", "prompt": text}) + "\n")
        fh.write(json.dumps({"id": "after", "prompt": "w5 w6"}) + "\n")
    out = tmp_path / "t"
    for batch in ("1", "2"):  # was: a reshape traceback (batch 1), silently recorded (batch 2)
        res = CliRunner().invoke(main, _record_args(model_dir, f, out, "--batch-size", batch))
        _refused(res, f"{f}:3", "empty")
        assert not out.exists()  # nothing written


def test_cli_prompt_longer_than_the_model_is_refused(short_model_dir, tmp_path) -> None:
    f = tmp_path / "p.jsonl"
    rows = [("ok", 2), ("long", 14), ("longer", 20)]
    f.write_text("".join(json.dumps({"id": i, "prompt": "w5 " * n}) + "\n" for i, n in rows))
    out = tmp_path / "t"
    res = CliRunner().invoke(main, _record_args(short_model_dir, f, out, "--max-new-tokens", "3"))
    _refused(
        res,
        f"{f}:2 (prompt 'long')",
        "14 prompt tokens + max_new_tokens 3 = 17",
        "16 positions",
        "1 more prompt(s) too long",
    )
    assert not out.exists()
    res = CliRunner().invoke(main, _record_args(short_model_dir, f, out, "--max-new-tokens", "16"))
    _refused(res, "max_new_tokens 16", "16 positions")
    assert not out.exists()
    # exactly at the limit: 13 + 3 = 16 positions is recorded
    f.write_text(json.dumps({"id": "fits", "prompt": "w5 " * 13}) + "\n")
    res = CliRunner().invoke(main, _record_args(short_model_dir, f, out, "--max-new-tokens", "3"))
    assert res.exit_code == 0, res.output
    assert "recorded 1 request(s)" in res.output


def test_prompt_that_tokenizes_to_nothing_is_refused() -> None:
    from moetrace.errors import PromptsError
    from moetrace.tracer.prompts import Prompt
    from moetrace.tracer.record import check_prompt_lengths

    class DropsEverything:
        def __call__(self, texts):
            return {"input_ids": [[7] if t == "a" else [] for t in texts]}

    prompts = [Prompt("x", "a", where="f.jsonl:1"), Prompt("y", "\u200b", where="f.jsonl:2")]
    with pytest.raises(PromptsError, match=r"f\.jsonl:2 \(prompt 'y'\): .* 0 tokens"):
        check_prompt_lengths(prompts, DropsEverything(), tiny_model("olmoe").config, 4)


def test_cli_resume_with_other_settings_is_refused_and_leaves_the_trace(
    model_dir, tmp_path
) -> None:
    runner = CliRunner()
    out = tmp_path / "t"
    first = write_prompts(tmp_path / "a.jsonl", 2)
    settings = ["--max-new-tokens", "3", "--batch-size", "2"]
    res = runner.invoke(main, _record_args(model_dir, first, out, *settings))
    assert res.exit_code == 0, res.output
    tags = open_trace(out).manifest.tags
    assert tags["record.max_new_tokens"] == "3" and tags["record.batch_size"] == "2"
    assert tags["record.dtype"] == "float32" and tags["record.speculative"] == "false"
    before = tree_digest(out)
    assert any(name.startswith("activations/part-") for name in before)

    more = write_prompts(tmp_path / "b.jsonl", 4)
    blank = tmp_path / "blank.jsonl"
    blank.write_text(more.read_text() + json.dumps({"id": "z", "prompt": " "}) + "\n")
    refusals = [
        (["--max-new-tokens", "5", "--batch-size", "2"], ["max_new_tokens: 3 in the trace, 5 now"]),
        (
            ["--max-new-tokens", "4", "--batch-size", "1"],
            ["max_new_tokens: 3 in the trace, 4 now", "batch_size: 2 in the trace, 1 now"],
        ),
        ([*settings, "--speculative"], ["speculative: false in the trace, true now"]),
        ([*settings, "--dtype", "bfloat16"], ["dtype: float32 in the trace, bfloat16 now"]),
    ]
    for args, needles in refusals:
        res = runner.invoke(main, _record_args(model_dir, more, out, *args, "--resume"))
        line = _refused(res, str(out), "other generation settings", *needles)
        assert "seed" not in line
        assert tree_digest(out) == before, args
    res = runner.invoke(main, _record_args(model_dir, blank, out, *settings, "--resume"))
    _refused(res, f"{blank}:5", "empty")
    assert tree_digest(out) == before
    # the same settings (the seed does not matter for greedy decoding) resume
    res = runner.invoke(
        main, _record_args(model_dir, more, out, *settings, "--seed", "7", "--resume")
    )
    assert res.exit_code == 0, res.output
    assert "recorded 2 request(s), skipped 2" in res.output


def test_resume_of_a_trace_without_stored_settings_warns(model_dir, tmp_path, caplog) -> None:
    from moetrace.store.schema import MANIFEST_NAME, Manifest

    out = tmp_path / "t"
    cfg = RecordConfig(max_new_tokens=3)
    record(str(model_dir), write_prompts(tmp_path / "a.jsonl", 1), out, config=cfg, progress=False)
    manifest_path = out / MANIFEST_NAME
    old = Manifest.from_json(json.loads(manifest_path.read_text()))
    manifest_path.write_text(dataclasses.replace(old, tags={}).dumps())  # as written before
    resumed = RecordConfig(max_new_tokens=2, resume=True)
    with caplog.at_level(logging.WARNING, logger="moetrace.tracer.record"):
        result = record(
            str(model_dir),
            write_prompts(tmp_path / "b.jsonl", 2),
            out,
            config=resumed,
            progress=False,
        )
    assert result.requests_recorded == 1
    assert "resuming without checking them" in caplog.text and "max_new_tokens" in caplog.text


# ------------------------------------------------------------------------------ progress


def test_cli_progress_is_plain_lines_when_stderr_is_not_a_terminal(model_dir, tmp_path) -> None:
    prompts = write_prompts(tmp_path / "p.jsonl", 3)
    runner = CliRunner(env={INTERVAL_ENV: "0"})  # CliRunner's stderr is not a TTY
    res = runner.invoke(
        main, _record_args(model_dir, prompts, tmp_path / "t", "--max-new-tokens", "2")
    )
    assert res.exit_code == 0, res.output
    line = re.compile(r"^record: (\d)/3 requests \((\d+)%\), \d+\.\d s elapsed(, ~\d+ s left)?$")
    seen = [m.groups()[:2] for m in map(line.match, res.output.splitlines()) if m]
    assert seen == [("1", "33"), ("2", "66"), ("3", "100")], res.output
    assert "\x1b" not in res.output and "\r" not in res.output  # no tqdm escape codes


def test_cli_bad_progress_interval_is_refused(model_dir, tmp_path) -> None:
    prompts = write_prompts(tmp_path / "p.jsonl", 1)
    res = CliRunner(env={INTERVAL_ENV: "soon"}).invoke(
        main, _record_args(model_dir, prompts, tmp_path / "t")
    )
    _refused(res, INTERVAL_ENV, "'soon'")
    assert not (tmp_path / "t").exists()


def test_progress_throttles_and_reports_the_end(monkeypatch) -> None:
    import moetrace.progress as progress_mod

    clock = {"t": 100.0}
    monkeypatch.setattr(progress_mod.time, "monotonic", lambda: clock["t"])
    calls: list[tuple[int, int, float]] = []
    with Progress(5, on_progress=lambda *a: calls.append(a), interval=10, tty=False) as bar:
        for t in (1, 5, 11, 12, 25):
            clock["t"] = 100.0 + t
            bar.update()
    assert calls == [(3, 5, 11.0), (5, 5, 25.0)]  # every 10 s at most
    calls.clear()
    with Progress(5, on_progress=lambda *a: calls.append(a), interval=10, tty=False) as bar:
        bar.update(5)  # a short run reports nothing
    assert calls == []
    with Progress(2, on_progress=lambda *a: calls.append(a), interval=0, enabled=False) as bar:
        bar.update(2)
    assert calls == []
    assert (
        format_progress("record", 40, 300, 12.3, unit="requests")
        == "record: 40/300 requests (13%), 12.3 s elapsed, ~1 min 20 s left"
    )


def test_progress_uses_tqdm_on_a_terminal(capsys) -> None:
    calls: list[tuple[int, int, float]] = []
    with Progress(2, unit="req", on_progress=lambda *a: calls.append(a), interval=0, tty=True) as b:
        b.update(2, tok_s="1.0")
    assert calls == []
    assert "2/2" in capsys.readouterr().err
