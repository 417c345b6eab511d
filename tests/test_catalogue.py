"""The catalogue of bad inputs: every command against every bad input a hostile user tried.

Each case runs one CLI command (click's CliRunner on ``moetrace.cli.main``) and asserts
exit code 2, exactly one line on stderr that starts with ``moetrace: error:`` and names the
problem (a regular expression per case), no traceback, and every file of the case's
working folder (traces included) byte-identical before and after. Documented behaviours
that are not errors (output folders created, duplicates skipped) have their own tests
below, as do the crash cases (SIGKILL during ``record``) that need a real process.
"""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from treekit import tree_digest

from moetrace.cli import main
from moetrace.store.reader import committed_parts
from moetrace.tuner.sim.synthetic import write_synthetic_trace

DEMO_PROMPTS = Path(__file__).resolve().parents[1] / "moetrace" / "assets" / "prompts"


# ------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A synthetic trace, a plan tuned on it, a plan for the demo model, prompts."""
    root = tmp_path_factory.mktemp("catalogue-base")
    write_synthetic_trace(root / "trace", requests=8, decode_tokens=8, seed=3)
    res = CliRunner().invoke(
        main, ["tune", str(root / "trace"), "--budget", "25%", "--out", str(root / "plan.json")]
    )
    assert res.exit_code == 0, res.output
    plan = json.loads((root / "plan.json").read_text())
    plan["eviction"] = {"policy": "lru", "params": {}, "pinned": [], "tables": {}}
    plan["prefetch"] = {"name": "none", "lookahead": 1, "fetch": 0, "params": {}, "tables": {}}
    (root / "plan.json").write_text(json.dumps(plan))
    from moetrace.runtime.session import open_engine

    engine, _ = open_engine(None, None, budget_bytes="25%")
    try:
        (root / "demo-plan.json").write_text(engine.plan.dumps())
    finally:
        engine.close()
    (root / "prompts.jsonl").write_text(
        '{"id": "a", "prompt": "def f(x):"}\n{"id": "b", "prompt": "The river"}\n'
    )
    return root


# ------------------------------------------------------------------ bad traces


def _part(t: Path, kind: str) -> Path:
    act, req = committed_parts(t)[0]
    return act if kind == "activations" else req


def _truncate(p: Path) -> None:
    data = p.read_bytes()
    p.write_bytes(data[: len(data) // 2])


def _manifest(t: Path, fn: Callable[[dict], Any]) -> None:
    m = json.loads((t / "manifest.json").read_text())
    fn(m)
    (t / "manifest.json").write_text(json.dumps(m))


def _copy_pair(t: Path) -> None:
    act, req = committed_parts(t)[0]
    shutil.copy(act, act.with_name("part-copy-000000.parquet"))
    shutil.copy(req, req.with_name("part-copy-000000.parquet"))


TRACE_DAMAGE: dict[str, tuple[Callable[[Path], Any], str]] = {
    "missing": (lambda t: shutil.rmtree(t), r"no such trace directory|does not exist"),
    "a-file": (
        lambda t: (shutil.rmtree(t), t.write_text("x")),
        r"not a directory|is a file",
    ),
    "no-manifest": (lambda t: (t / "manifest.json").unlink(), r"missing manifest"),
    "manifest-not-json": (
        lambda t: (t / "manifest.json").write_text("{oops"),
        r"not valid JSON",
    ),
    "manifest-future-version": (
        lambda t: _manifest(t, lambda m: m.update(format_version=99)),
        r"version",
    ),
    "manifest-no-model": (lambda t: _manifest(t, lambda m: m.pop("model")), r"model"),
    "truncated-activations": (lambda t: _truncate(_part(t, "activations")), r"part-"),
    "truncated-requests": (lambda t: _truncate(_part(t, "requests")), r"part-"),
    "garbage-part": (
        lambda t: _part(t, "activations").write_bytes(os.urandom(2000)),
        r"part-",
    ),
    "lost-activations": (
        lambda t: _part(t, "activations").unlink(),
        r"has no activations part",
    ),
    "copied-part-pair": (_copy_pair, r"part-copy-000000\.parquet"),
    "ids-beyond-num-experts": (
        lambda t: _manifest(t, lambda m: m["model"].update(num_experts=4)),
        r"num_experts|expert id",
    ),
}


def _simulate(policy: str, *extra: str) -> Callable[[Path, Path], list[str]]:
    """``moetrace simulate TRACE --policy POLICY --cache 2 EXTRA...``"""
    return lambda t, w: ["simulate", str(t), "--policy", policy, "--cache", "2", *extra]


TRACE_COMMANDS: dict[str, Callable[[Path, Path], list[str]]] = {
    "inspect": lambda t, w: ["inspect", str(t)],
    "analyze": lambda t, w: ["analyze", str(t)],
    "simulate": _simulate("lru"),
    "tune": lambda t, w: ["tune", str(t), "--budget", "25%", "--out", str(w / "p.json")],
    "sql": lambda t, w: ["sql", str(t), "SELECT count(*) FROM activations"],
    "dashboard": lambda t, w: ["dashboard", str(t), "--no-browser", "--port", "1"],
}

# click's own existence check words a missing folder its way
_CLICK_PATH = r"does not exist|is a file|no such trace"


@dataclass(frozen=True)
class Case:
    argv: Callable[[Path, Path], list[str]]
    match: str
    prepare: Callable[[Path], Any] | None = None


def _trace_cases() -> dict[str, Case]:
    out = {}
    for dname, (damage, match) in TRACE_DAMAGE.items():
        for cname, argv in TRACE_COMMANDS.items():
            m = match
            if dname in ("missing", "a-file"):
                m = f"{match}|{_CLICK_PATH}"
            out[f"{cname}-{dname}"] = Case(argv, m, lambda w, d=damage: d(w / "trace"))
    return out


# ------------------------------------------------------------------ bad plans


def _set(path: str, value: Any) -> Callable[[dict], None]:
    def fn(plan: dict) -> None:
        *head, last = path.split(".")
        d = plan
        for k in head:
            d = d[k]
        d[last] = value

    return fn


def _drop(key: str) -> Callable[[dict], None]:
    return lambda plan: plan.pop(key)


def _layers(plan: dict) -> int:
    return len(plan["routing"]["moe_layers"])


PLAN_DAMAGE: dict[str, tuple[str | Callable[[dict], Any], str]] = {
    "not-json": ("{", r"not valid JSON"),
    "empty-file": ("", r"not valid JSON"),
    "array": ("[]", r"object|mapping|dict"),
    "empty-object": (_drop("routing"), r"routing"),
    "wrong-format": (_set("format", "something-else"), r"format"),
    "future-version": (_set("format_version", 99), r"version 99"),
    "no-layout": (_drop("layout"), r"layout"),
    "unknown-policy": (_set("eviction.policy", "nope"), r"unknown eviction policy 'nope'"),
    "param-not-a-number": (
        lambda p: p["eviction"].update(policy="lrfu", params={"alpha": "abc"}),
        r"'alpha' .* must be a number, got 'abc'",
    ),
    "param-unknown": (
        _set("eviction.params", {"bogus": 1}),
        r"unknown parameter 'bogus' .*valid: decay",
    ),
    "param-out-of-range": (_set("eviction.params", {"decay": 2.0}), r"'decay' .* in \(0, 1\]"),
    "param-bool": (_set("eviction.params", {"decay": True}), r"'decay' .* must be a number"),
    "param-window-range": (
        lambda p: p["eviction"].update(
            policy="wtinylfu", params={"window": 1.5}, pinned=[], tables={}
        ),
        r"'window' of eviction policy 'wtinylfu' must be a number in \[0, 0.99\]",
    ),
    "repin-without-prior": (
        lambda p: p["eviction"].update(policy="pinned_lru", params={"repin": 64}, tables={}),
        r"eviction.tables.prior must have shape",
    ),
    "adaptation-oracle-fallback": (
        lambda p: p.update(adaptation={"fallback": "belady", "window": 100}),
        r"adaptation.fallback 'belady' needs fitted tables or the future",
    ),
    "adaptation-bad-margin": (
        lambda p: p.update(adaptation={"margin": 2.0}),
        r"adaptation.margin must be in \[0, 1\)",
    ),
    "adaptation-in-v1": (
        lambda p: p.update(format_version=1, adaptation={}),
        r"'adaptation' needs format_version 2",
    ),
    "schedule-in-v2": (
        lambda p: p.update(format_version=2, schedule={}),
        r"'schedule' needs format_version 3",
    ),
    "schedule-bad-batch": (
        lambda p: p.update(schedule={"batch_size": 0}),
        r"schedule.batch_size must be an integer >= 1",
    ),
    "negative-capacity": (
        lambda p: p["layout"].update(capacities=[-1] + p["layout"]["capacities"][1:]),
        r"capacit|>= 0|negative",
    ),
    "capacities-wrong-length": (
        lambda p: p["layout"].update(capacities=p["layout"]["capacities"][:1]),
        r"capacities|layers",
    ),
    "layout-over-budget": (
        lambda p: p["layout"].update(capacities=[10**6] * _layers(p)),
        r"capacities\[0\] = 1000000 > num_experts|shares sum to 6000000 > pool_slots",
    ),
    "pinned-out-of-range": (
        lambda p: p["eviction"].update(pinned=[[10**4]] + [[]] * (_layers(p) - 1)),
        r"pinned|expert",
    ),
    "pinned-twice": (
        lambda p: p["eviction"].update(pinned=[[1, 1]] + [[]] * (_layers(p) - 1)),
        r"lists an expert twice",
    ),
    "unknown-prefetcher": (_set("prefetch.name", "nope"), r"unknown prefetcher 'nope'"),
    "lookahead-zero": (_set("prefetch.lookahead", 0), r"lookahead must be >= 1"),
    "fetch-negative": (_set("prefetch.fetch", -1), r"fetch must be >= 0"),
    "other-model-experts": (_set("routing.num_experts", 3), r"expert|routing|model"),
    "other-model-fingerprint": (
        _set("routing.fingerprint", "routing:0000000000000000"),
        r"fingerprint|another model|other model",
    ),
    "unknown-phase-override": (_set("phase_overrides", {"middle": {}}), r"phase"),
    "slots-not-int": (_set("budget.slots", "many"), r"budget\.slots|integer"),
}


def _plan_cases() -> dict[str, Case]:
    out = {}
    commands: dict[str, tuple[str, Callable[[Path, Path], list[str]]]] = {
        "simulate": (
            "plan.json",
            lambda t, w: ["simulate", str(w / "trace"), "--plan", str(w / "bad-plan.json")],
        ),
        "run": (
            "demo-plan.json",
            lambda t, w: [
                "run",
                "--plan",
                str(w / "bad-plan.json"),
                "--prompt",
                "x",
                "--max-new-tokens",
                "1",
            ],  # fmt: skip
        ),
        "dashboard": (
            "plan.json",
            lambda t, w: [
                "dashboard",
                str(w / "trace"),
                "--plan",
                str(w / "bad-plan.json"),
                "--no-browser",
                "--port",
                "1",
            ],  # fmt: skip
        ),
    }
    for dname, (damage, match) in PLAN_DAMAGE.items():
        for cname, (source, argv) in commands.items():

            def prepare(w: Path, damage: Any = damage, source: str = source) -> None:
                if isinstance(damage, str):
                    text = damage
                else:
                    plan = copy.deepcopy(json.loads((w / source).read_text()))
                    damage(plan)
                    text = json.dumps(plan)
                (w / "bad-plan.json").write_text(text)

            if cname == "dashboard" and dname.startswith("other-model"):
                continue  # shown in the app with a warning (a plan for another model)
            out[f"{cname}-plan-{dname}"] = Case(argv, match, prepare)
    return out


# ------------------------------------------------------------------ options


def _prompts(text: str) -> Callable[[Path], Any]:
    return lambda w: (w / "bad-prompts.jsonl").write_text(text)


UNDER_A_FILE = r"is a file, not a folder"

OPTION_CASES: dict[str, Case] = {
    # budgets: one parser everywhere
    **{
        f"{cmd}-budget-{name}": Case(argv, match)
        for name, value, match in [
            ("word", "lots", r"expected N% of all experts"),
            ("zero", "0", r"at least 1 slot"),
            ("zero-percent", "0%", r"percentage must be in \(0, 100\]"),
            ("over-100-percent", "150%", r"percentage must be in \(0, 100\]"),
            ("too-large", "1TB", r"exceeds the model"),
        ]
        for cmd, argv in {
            "tune": lambda t, w, v=value: [
                "tune",
                str(t),
                "--budget",
                v,
                "--out",
                str(w / "p.json"),
            ],  # fmt: skip
            "simulate": lambda t, w, v=value: [
                "simulate",
                str(t),
                "--policy",
                "lru",
                "--budget",
                v,
            ],  # fmt: skip
            "run": lambda t, w, v=value: [
                "run",
                "--budget",
                v,
                "--prompt",
                "x",
                "--max-new-tokens",
                "1",
            ],  # fmt: skip
        }.items()
    },
    "run-budget-one-byte": Case(
        lambda t, w: ["run", "--budget", "1B", "--prompt", "x"],
        r"budget '1B' is too small: 1 bytes hold 0 experts .* at least top_k \+ 1",
    ),
    "bench-budget-one-byte": Case(
        lambda t, w: ["bench", "--plan", str(w / "demo-plan.json"), "--budget", "1B"],
        r"budget '1B' is too small",
    ),
    # devices
    **{
        f"{cmd}-device-{dev}": Case(argv, match)
        for dev, match in [("cuda", r"CUDA is not available"), ("toaster", r"not a torch device")]
        for cmd, argv in {
            "record": lambda t, w, d=dev: [
                "record",
                "--prompts",
                str(w / "prompts.jsonl"),
                "--out",
                str(w / "rec"),
                "--device",
                d,
            ],  # fmt: skip
            "run": lambda t, w, d=dev: ["run", "--prompt", "x", "--device", d],
            "bench": lambda t, w, d=dev: [
                "bench",
                "--plan",
                str(w / "demo-plan.json"),
                "--device",
                d,
            ],  # fmt: skip
            "profile": lambda t, w, d=dev: ["profile", "--device", d],
        }.items()
    },
    # output files where no file can be
    **{
        f"{cmd}-output-under-a-file": Case(argv, UNDER_A_FILE)
        for cmd, argv in {
            "analyze": lambda t, w: ["analyze", str(t), "--json", str(w / "prompts.jsonl/x")],
            "simulate": lambda t, w: [
                "simulate",
                str(t),
                "--policy",
                "lru",
                "--cache",
                "2",
                "--json",
                str(w / "prompts.jsonl/x"),
            ],  # fmt: skip
            "tune": lambda t, w: [
                "tune",
                str(t),
                "--budget",
                "25%",
                "--out",
                str(w / "prompts.jsonl/x"),
            ],  # fmt: skip
            "run": lambda t, w: [
                "run",
                "--prompt",
                "x",
                "--stats-json",
                str(w / "prompts.jsonl/x"),
            ],  # fmt: skip
            "bench": lambda t, w: [
                "bench",
                "--plan",
                str(w / "demo-plan.json"),
                "--out",
                str(w / "prompts.jsonl/x"),
            ],  # fmt: skip
            "profile": lambda t, w: ["profile", "--out", str(w / "prompts.jsonl/x")],
        }.items()
    },
    "profile-output-is-a-folder": Case(
        lambda t, w: ["profile", "--out", str(w)], r"is a folder; give a file name"
    ),
    "profile-bytes-word": Case(lambda t, w: ["profile", "--bytes", "lots"], r"--bytes 'lots'"),
    # policy parameters and names
    "simulate-param-unknown": Case(
        _simulate("lru", "--param", "x=1"),
        r"unknown parameter 'x' for eviction policy 'lru'; valid: decay",
    ),
    "simulate-param-not-a-number": Case(
        _simulate("lru", "--param", "decay=abc"),
        r"expected NAME=NUMBER",
    ),
    "simulate-param-out-of-range": Case(
        _simulate("lfu", "--param", "decay=0"), r"'decay' .* in \(0, 1\]"
    ),
    "simulate-unknown-policy": Case(_simulate("nope"), r"unknown eviction policy 'nope'"),
    "simulate-unknown-prefetcher": Case(
        _simulate("lru", "--prefetch", "nope"), r"unknown prefetcher 'nope'"
    ),
    "simulate-cache-too-large": Case(
        lambda t, w: ["simulate", str(t), "--policy", "lru", "--cache", "999"],
        r"exceeds the 16 experts",
    ),
    "analyze-bad-cache-sizes": Case(
        lambda t, w: ["analyze", str(t), "--cache-sizes", "abc"], r"abc|cache size"
    ),
    "analyze-bad-phase": Case(lambda t, w: ["analyze", str(t), "--phase", "lunch"], r"lunch"),
    "tune-unknown-option": Case(
        lambda t, w: ["tune", str(t), "--bogus"], r"No such option '--bogus'.*tune -h'\)"
    ),
    # prompts
    "record-empty-prompt-in-the-middle": Case(
        lambda t, w: ["record", "--prompts", str(w / "bad-prompts.jsonl"), "--out", str(w / "r")],
        r"bad-prompts\.jsonl:2: the prompt is empty",
        _prompts('{"prompt": "def f():"}\n{"prompt": "   "}\n{"prompt": "x"}\n'),
    ),
    "record-prompt-too-long": Case(
        lambda t, w: ["record", "--prompts", str(w / "bad-prompts.jsonl"), "--out", str(w / "r")],
        r"bad-prompts\.jsonl:1 .*512",
        lambda w: (w / "bad-prompts.jsonl").write_text(
            json.dumps({"prompt": " ".join(["word"] * 2000)}) + "\n"
        ),
    ),
    "record-prompts-not-jsonl": Case(
        lambda t, w: ["record", "--prompts", str(w / "bad-prompts.jsonl"), "--out", str(w / "r")],
        r"bad-prompts\.jsonl:1",
        _prompts("{not json\n"),
    ),
    "run-empty-prompt-in-the-middle": Case(
        lambda t, w: ["run", "--prompts", str(w / "bad-prompts.jsonl")],
        r"bad-prompts\.jsonl:2: the prompt is empty",
        _prompts('{"prompt": "a"}\n{"prompt": ""}\n'),
    ),
    "record-resume-other-settings": Case(
        lambda t, w: [
            "record",
            "--prompts",
            str(w / "prompts.jsonl"),
            "--out",
            str(w / "rec"),
            "--resume",
            "--max-new-tokens",
            "3",
        ],  # fmt: skip
        r"max_new_tokens: 2 in the trace, 3 now",
        lambda w: _record(w, ["--max-new-tokens", "2"]),
    ),
    # sql is read-only
    "sql-copy-into-the-trace": Case(
        lambda t, w: [
            "sql",
            str(t),
            f"COPY activations TO '{t}/activations/part-evil-000000.parquet'",
        ],
        r"read-only",
    ),
    "sql-install-extension": Case(lambda t, w: ["sql", str(t), "INSTALL httpfs"], r"read-only"),
    "sql-attach-and-create": Case(
        lambda t, w: ["sql", str(t), f"ATTACH '{w}/x.db' AS d; CREATE TABLE d.t AS SELECT 1"],
        r"read-only",
    ),
    # imports
    "import-unknown-kind": Case(lambda t, w: ["import", "nope", str(w), str(w / "imp")], r"nope"),
    "import-missing-source": Case(
        lambda t, w: ["import", "patterns-behind-chaos", str(w / "missing"), str(w / "imp")],
        r"missing",
    ),
}


def _record(w: Path, extra: list[str]) -> None:
    res = CliRunner().invoke(
        main, ["record", "--prompts", str(w / "prompts.jsonl"), "--out", str(w / "rec"), *extra]
    )
    assert res.exit_code == 0, res.output


CASES: dict[str, Case] = {**_trace_cases(), **_plan_cases(), **OPTION_CASES}


def test_catalogue_is_large_enough() -> None:
    assert len(CASES) >= 60, len(CASES)


def check_refusal(res: Any, before: dict[str, str], after: dict[str, str], match: str) -> None:
    """What every bad input must give: exit 2, one line naming it, nothing changed."""
    err = res.stderr.strip().splitlines()
    assert res.exit_code == 2, (res.exit_code, res.output, res.exception)
    assert "Traceback" not in res.output, res.output
    assert len(err) == 1, err
    assert err[0].startswith("moetrace: error: "), err
    assert re.search(match, err[0]), (match, err[0])
    assert after == before, "the command changed files"


@pytest.mark.timeout(120)
@pytest.mark.parametrize("name", sorted(CASES))
def test_bad_input(name: str, base: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    case = CASES[name]
    work = tmp_path / "w"
    shutil.copytree(base, work)
    if case.prepare is not None:
        case.prepare(work)
    monkeypatch.chdir(work)
    monkeypatch.setenv("MOETRACE_CACHE_DIR", str(tmp_path / "cache"))
    before = tree_digest(work)
    res = CliRunner().invoke(main, case.argv(work / "trace", work))
    check_refusal(res, before, tree_digest(work), case.match)


@dataclass
class _FakeResult:
    exit_code: int
    stderr: str
    output: str
    exception: BaseException | None = None


def test_the_harness_fails_when_it_should(tmp_path: Path) -> None:
    """Each of check_refusal's conditions, broken once, makes it fail."""
    ok = _FakeResult(2, "moetrace: error: bad budget\n", "moetrace: error: bad budget\n")
    (tmp_path / "f").write_text("a")
    before = tree_digest(tmp_path)
    check_refusal(ok, before, tree_digest(tmp_path), "budget")
    broken = [
        _FakeResult(1, ok.stderr, ok.output),
        _FakeResult(2, "Traceback (most recent call last):\n", "Traceback (most"),
        _FakeResult(2, "moetrace: error: bad budget\nmore\n", "x"),
        _FakeResult(2, "error: bad budget\n", "x"),
        _FakeResult(2, "moetrace: error: something else\n", "x"),
    ]
    for res in broken:
        with pytest.raises(AssertionError):
            check_refusal(res, before, tree_digest(tmp_path), "budget")
    (tmp_path / "f").write_text("b")  # a file changed
    with pytest.raises(AssertionError, match="changed files"):
        check_refusal(ok, before, tree_digest(tmp_path), "budget")


# ------------------------------------------------------------------ documented behaviours


@pytest.mark.parametrize(
    "argv",
    [
        lambda t, out: ["analyze", str(t), "--json", str(out)],
        lambda t, out: ["simulate", str(t), "--policy", "lru", "--cache", "2", "--json", str(out)],
        lambda t, out: ["tune", str(t), "--budget", "25%", "--out", str(out)],
        lambda t, out: ["run", "--prompt", "x", "--max-new-tokens", "2", "--stats-json", str(out)],
        lambda t, out: ["profile", "--repeats", "1", "--bytes", "1MiB", "--out", str(out)],
        lambda t, out: [
            "bench",
            "--plan",
            str(t.parent / "demo-plan.json"),
            "--repeats",
            "1",
            "--max-new-tokens",
            "1",
            "--prompt",
            "x",
            "--out",
            str(out),
        ],  # fmt: skip
    ],
    ids=["analyze", "simulate", "tune", "run", "profile", "bench"],
)
def test_outputs_into_missing_folders_are_created(argv: Any, base: Path, tmp_path: Path) -> None:
    out = tmp_path / "new" / "deeper" / "out.json"
    res = CliRunner().invoke(main, argv(base / "trace", out))
    assert res.exit_code == 0, res.output
    assert json.loads(out.read_text())
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".tmp")]


# ------------------------------------------------------------------ real processes


def _record_proc(out: Path, prompts: Path, *extra: str) -> subprocess.Popen:
    env = {**os.environ, "MOETRACE_PROGRESS_INTERVAL": "0"}
    cmd = [sys.executable, "-m", "moetrace.cli", "record", "--prompts", str(prompts),
           "--out", str(out), "--max-new-tokens", "4", *extra]  # fmt: skip
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, text=True)


def _ids(trace: Path) -> list[str]:
    from moetrace.store.reader import open_trace

    return sorted(open_trace(trace).requests().column("request_id").to_pylist())


def _prompts_file(path: Path, prefix: str, n: int) -> Path:
    path.write_text("".join(json.dumps({"id": f"{prefix}{i}", "prompt": f"def f{i}(x):"}) + "\n"
                            for i in range(n)))  # fmt: skip
    return path


@pytest.mark.timeout(300)
def test_sigkill_during_record_keeps_finished_requests_and_resume_completes(
    tmp_path: Path,
) -> None:
    prompts = _prompts_file(tmp_path / "p.jsonl", "k", 12)
    out = tmp_path / "t"
    proc = _record_proc(out, prompts)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if committed_parts(out):  # one request committed (not a temporary file)
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    res = CliRunner().invoke(main, ["inspect", str(out)])
    assert res.exit_code == 0, res.output
    done = _ids(out)
    assert 1 <= len(done) <= 12
    res = CliRunner().invoke(
        main,
        [
            "record",
            "--prompts",
            str(prompts),
            "--out",
            str(out),
            "--max-new-tokens",
            "4",
            "--resume",
        ],  # fmt: skip
    )
    assert res.exit_code == 0, res.output
    assert _ids(out) == sorted(f"k{i}" for i in range(12))


@pytest.mark.timeout(300)
def test_two_concurrent_record_processes_share_one_trace(tmp_path: Path) -> None:
    out = tmp_path / "t"
    CliRunner().invoke(main, ["record", "--prompts", str(_prompts_file(tmp_path / "0.jsonl",
                              "z", 1)), "--out", str(out), "--max-new-tokens", "4"])  # fmt: skip
    procs = [
        _record_proc(out, _prompts_file(tmp_path / f"{p}.jsonl", p, 4), "--resume")
        for p in ("a", "b")
    ]
    for p in procs:
        _, err = p.communicate(timeout=240)
        assert p.returncode == 0, err
    assert _ids(out) == sorted(["z0"] + [f"{p}{i}" for p in "ab" for i in range(4)])
