"""`moetrace record --server`: recording from vLLM / SGLang servers (in-process fakes on a
real HTTP stack that follow the engines' documented schemas, see fake_servers.py)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from pagekit import open_every_page

from moetrace.cli import main
from moetrace.errors import ConfigError, ServerError
from moetrace.store.reader import open_trace
from moetrace.tracer.prompts import Prompt
from moetrace.tracer.server_facts import GivenFacts
from moetrace.tracer.server_record import ServerRecordConfig, record_server

from .fake_servers import FakeServer
from .tiny_models import tiny_config

MAX_NEW = 6
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def config_dir(tmp_path_factory) -> Path:
    """A config.json whose model matches FakeModel: 6 layers, MoE layers 1..5, 16 x top-2."""
    path = tmp_path_factory.mktemp("fake-moe-config")
    tiny_config(
        "qwen2_moe", num_hidden_layers=6, num_experts=16, num_experts_per_tok=2, mlp_only_layers=[0]
    ).save_pretrained(path)
    return path


def prompts(n: int, start: int = 0) -> list[Prompt]:
    return [
        Prompt(f"q{i}", " ".join(f"w{(i * 7 + j) % 50}" for j in range(2 + i % 5)), {"d": "x"})
        for i in range(start, start + n)
    ]


def write_prompts(path: Path, items: list[Prompt]) -> Path:
    with open(path, "w", encoding="utf-8") as fh:
        for p in items:
            fh.write(json.dumps({"id": p.id, "prompt": p.text, "tags": dict(p.tags)}) + "\n")
    return path


def cfg(engine: str, config: Path | None = None, **kw) -> ServerRecordConfig:
    facts = GivenFacts(config=str(config)) if config else kw.pop("facts", GivenFacts())
    kw.setdefault("max_new_tokens", MAX_NEW)
    kw.setdefault("backoff", 0.01)
    return ServerRecordConfig(engine=engine, facts=facts, **kw)


def check_trace(out: Path, srv: FakeServer, items: list[Prompt], n: int = 1) -> None:
    """Every completion once, rows exactly the server's routing, in the trace's order."""
    trace = open_trace(out)
    moe = np.asarray(srv.model.moe_layers)
    assert trace.manifest.model.moe_layers == tuple(moe)
    assert trace.manifest.gate_weights is False
    req = trace.requests().to_pylist()
    ids = [r["request_id"] for r in req]
    want = [p.id if n == 1 else f"{p.id}/{i}" for p in items for i in range(n)]
    assert sorted(ids) == sorted(want)  # nothing missing, nothing twice
    acts = trace.sql(
        "SELECT request_id, token, step, phase::VARCHAR AS phase, layer, e0, e1, w0 "
        "FROM activations_raw ORDER BY request_id, token, layer"
    ).to_pandas()
    for p in items:
        for i in range(n):
            rid = p.id if n == 1 else f"{p.id}/{i}"
            pre, dec = srv.expected(p.text, i, MAX_NEW)
            rows = acts[acts.request_id == rid]
            got = rows[["e0", "e1"]].to_numpy().reshape(-1, len(moe), 2)
            np.testing.assert_array_equal(got, np.concatenate([pre, dec]), err_msg=rid)
            assert (rows.layer.to_numpy().reshape(-1, len(moe)) == moe).all()
            assert (rows.phase[: pre.shape[0] * len(moe)] == "prefill").all()
            assert (rows.phase[pre.shape[0] * len(moe) :] == "decode").all()
            assert rows.w0.isna().all()
            r = next(x for x in req if x["request_id"] == rid)
            assert r["prompt_tokens"] == pre.shape[0]
            assert r["generated_tokens"] == dec.shape[0] + 1
            assert r["arrival_time"] > 0 and r["prompt_text"] == p.text


@pytest.mark.parametrize(
    ("engine", "stream", "axis", "n"),
    [
        ("vllm", False, "moe", 1),
        ("vllm", True, "moe", 1),
        ("vllm", False, "all", 2),
        ("vllm", True, "all", 2),
        ("sglang", False, "all", 1),
        ("sglang", True, "all", 2),
        ("sglang", False, "all", 3),
    ],
)
def test_round_trip(tmp_path, config_dir, engine, stream, axis, n) -> None:
    items = prompts(12)
    with FakeServer(engine=engine, layer_axis=axis) as srv:
        res = record_server(
            srv.url, items, tmp_path / "t", config=cfg(engine, config_dir, stream=stream, n=n),
            progress=False,
        )  # fmt: skip
    assert res.requests_recorded == 12 * n and not res.interrupted
    check_trace(tmp_path / "t", srv, items, n)
    m = open_trace(tmp_path / "t").manifest
    assert m.tags["record.engine"] == engine and m.model.name == "fake/moe-a1b"
    assert m.model.architecture == "qwen2_moe"  # facts from the config, exact


@pytest.mark.parametrize(("dtype", "field"), [("uint16", True), ("uint8", False)])
def test_sglang_narrow_wire_dtypes(tmp_path, config_dir, dtype, field) -> None:
    items = prompts(4)
    with FakeServer(engine="sglang", dtype=dtype, send_dtype_field=field) as srv:
        wire = "int32" if field else dtype  # without the field the caller must say it
        conf = cfg("sglang", config_dir, routed_experts_dtype=wire)
        record_server(srv.url, items, tmp_path / "t", config=conf, progress=False)
        if not field:  # and when it does not, the size check catches it
            with pytest.raises(ServerError, match="--routed-experts-dtype"):
                record_server(srv.url, items, tmp_path / "u", progress=False,
                              config=cfg("sglang", config_dir))  # fmt: skip
    check_trace(tmp_path / "t", srv, items)


def test_facts_from_flags_and_the_first_answer(tmp_path) -> None:
    """Without a config: SGLang needs layers and top-k; dense layers (all-0 rows) are found."""
    items = prompts(5)
    with FakeServer(engine="sglang") as srv:
        with pytest.raises(ConfigError, match="--num-layers and --top-k"):
            record_server(srv.url, items, tmp_path / "a", config=cfg("sglang"), progress=False)
        facts = GivenFacts(num_layers=6, top_k=2, num_experts=16)
        record_server(srv.url, items, tmp_path / "b", config=cfg("sglang", facts=facts),
                      progress=False)  # fmt: skip
    check_trace(tmp_path / "b", srv, items)
    assert "moe_layers" in open_trace(tmp_path / "b").manifest.model.inferred
    with FakeServer(engine="vllm") as srv:
        with pytest.raises(ConfigError, match="--num-experts"):
            record_server(srv.url, items, tmp_path / "c", config=cfg("vllm"), progress=False)
        bad = GivenFacts(num_experts=16, num_layers=6)  # MoE-only axis of 5: cannot map
        with pytest.raises(ConfigError, match="5 layers per token"):
            record_server(srv.url, items, tmp_path / "d", config=cfg("vllm", facts=bad),
                          progress=False)  # fmt: skip


@pytest.mark.parametrize("engine", ["vllm", "sglang"])
@pytest.mark.parametrize("fault", ["500", "429", "reset", "timeout", "cut_stream"])
def test_transient_faults_are_retried(tmp_path, config_dir, engine, fault) -> None:
    items = prompts(6)
    stream = fault == "cut_stream"
    with FakeServer(engine=engine, faults={items[2].text: [fault, fault]}) as srv:
        record_server(srv.url, items, tmp_path / "t", progress=False,
                      config=cfg(engine, config_dir, stream=stream, timeout=1.0, retries=2))  # fmt: skip
        assert srv.calls[items[2].text] == 3
    check_trace(tmp_path / "t", srv, items)


@pytest.mark.parametrize("engine", ["vllm", "sglang"])
@pytest.mark.parametrize(
    ("fault", "message"),
    [
        ("truncate", "truncated or mis-shaped"),
        ("misshape", "mis-shaped"),
        ("missing", "enable-return-routed-experts"),
        ("bad_json", "not JSON"),
        ("500", "HTTP 500"),
    ],
)
def test_failures_stop_with_a_clear_error_and_keep_answered_requests(
    tmp_path, config_dir, engine, fault, message
) -> None:
    items = prompts(10)
    bad = items[7]
    out = tmp_path / "t"
    with FakeServer(engine=engine, faults={bad.text: [fault] * 5}) as srv:
        conf = cfg(engine, config_dir, concurrency=1, retries=1)
        with pytest.raises(ServerError, match=message) as err:
            record_server(srv.url, items, out, config=conf, progress=False)
        assert "'q7'" in str(err.value)
        kept = set(open_trace(out).requests().column("request_id").to_pylist())
        assert {p.id for p in items[:7]} <= kept and bad.id not in kept
        srv.faults.clear()
        before = dict(srv.answered)
        conf = cfg(engine, config_dir, concurrency=3, resume=True)
        res = record_server(srv.url, items, out, config=conf, progress=False)
        assert res.requests_skipped == len(kept)
        for p in items:  # kept requests were not asked again
            assert srv.answered[p.text] == before.get(p.text, 0) + (p.id not in kept)
    check_trace(out, srv, items)


def test_resume_sends_only_the_missing_completions(tmp_path, config_dir) -> None:
    items = prompts(20)
    out = tmp_path / "t"
    with FakeServer(engine="vllm", layer_axis="all") as srv:
        record_server(srv.url, items[:8], out, config=cfg("vllm", config_dir, n=2), progress=False)
        res = record_server(srv.url, items, out, progress=False,
                            config=cfg("vllm", config_dir, n=2, resume=True))  # fmt: skip
        assert res.requests_skipped == 8 and res.requests_recorded == 24
        assert all(srv.calls[p.text] == 1 for p in items)
        with pytest.raises(ConfigError, match="max_new_tokens"):
            record_server(srv.url, items, out, progress=False,
                          config=cfg("vllm", config_dir, n=2, resume=True, max_new_tokens=9))  # fmt: skip
    check_trace(out, srv, items, n=2)


def _cli(url: str, prompts_file: Path, out: Path, *extra: str) -> list[str]:
    return ["record", "--server", url, "--prompts", str(prompts_file), "--out", str(out),
            "--max-new-tokens", str(MAX_NEW), *extra]  # fmt: skip


def test_cli_errors_are_one_line(tmp_path, config_dir) -> None:
    runner = CliRunner()
    pf = write_prompts(tmp_path / "p.jsonl", prompts(3))
    cases = [
        (_cli("http://127.0.0.1:9", pf, tmp_path / "a"), "cannot reach the server"),
        (_cli("ftp://x", pf, tmp_path / "b"), "not an http(s) server URL"),
        (_cli("http://127.0.0.1:9", pf, tmp_path / "c", "--batch-size", "4"), "only for local"),
        (["record", "--out", str(tmp_path / "d"), "--engine", "sglang"], "only for --server"),
    ]
    with FakeServer(engine="sglang") as srv:
        cases.append((_cli(srv.url, pf, tmp_path / "e", "--engine", "sglang"), "--num-layers"))
        cases.append((_cli(srv.url, pf, tmp_path / "f", "--engine", "sglang", "--model", "x"),
                      "does not serve 'x'"))  # fmt: skip
        for args, message in cases:
            res = runner.invoke(main, args)
            assert res.exit_code == 2, (args, res.output)
            assert message in res.output and "Traceback" not in res.output, res.output
            assert len(res.output.strip().splitlines()) == 1, res.output


def test_recorded_trace_goes_through_analyze_tune_and_the_dashboard(
    tmp_path, config_dir, monkeypatch
) -> None:
    runner = CliRunner()
    pf = write_prompts(tmp_path / "p.jsonl", prompts(40))
    out = tmp_path / "t"
    with FakeServer(engine="sglang") as srv:
        res = runner.invoke(main, _cli(srv.url, pf, out, "--engine", "sglang", "--config",
                                       str(config_dir), "--concurrency", "4"))  # fmt: skip
    assert res.exit_code == 0, res.output
    assert "recorded 40 request(s)" in res.output
    res = runner.invoke(main, ["analyze", str(out)])
    assert res.exit_code == 0, res.output
    plan = tmp_path / "plan.json"
    res = runner.invoke(main, ["tune", str(out), "--budget", "8", "--out", str(plan)])
    assert res.exit_code == 0, res.output
    assert json.loads(plan.read_text())["format"] == "moetrace-plan"
    open_every_page(monkeypatch, [out], [plan])


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGINT])
def test_killed_halfway_then_resumed_loses_and_duplicates_nothing(tmp_path, config_dir, sig):
    items = prompts(160)
    pf = write_prompts(tmp_path / "p.jsonl", items)
    out = tmp_path / "t"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    args = [sys.executable, "-m", "moetrace", *_cli("URL", pf, out, "--config", str(config_dir),
            "--concurrency", "4")]  # fmt: skip
    with FakeServer(engine="vllm", latency=0.1) as srv:  # a run of ~4 s: the signal lands mid-run
        args[args.index("URL")] = srv.url
        proc = subprocess.Popen(  # Ctrl-C as in a terminal, even if this runner ignores it
            args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
        )  # fmt: skip
        deadline = time.time() + 120
        committed = out / "requests"
        while time.time() < deadline and not (
            sum(srv.answered.values()) >= 50
            and committed.is_dir()
            and any(p.name.startswith("part-") for p in committed.iterdir())
        ):
            time.sleep(0.02)
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == (130 if sig == signal.SIGINT else -signal.SIGKILL), err
        kept = set(open_trace(out).requests().column("request_id").to_pylist())
        assert 0 < len(kept) < len(items)
        if sig == signal.SIGINT:
            assert len(kept) >= 40  # every answered request is committed on Ctrl-C
        args.append("--resume")
        done = subprocess.run(args, env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr
        assert f"skipped {len(kept)} already present" in done.stdout
    check_trace(out, srv, items)
