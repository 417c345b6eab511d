"""CLI import / inspect / sql with click's CliRunner: happy paths and error paths."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner
from importkit import mb_rows, pbc_steps, write_csv, write_json
from treekit import tree_digest

from moetrace.cli import main


@pytest.fixture()
def runner() -> CliRunner:
    return CliRunner()


@pytest.fixture()
def imported(tmp_path: Path, runner: CliRunner) -> Path:
    src = tmp_path / "tiny-moe" / "mmlu-x"
    write_json(src / "0.json", pbc_steps(3, 2, seed=1))
    write_json(src / "1.json", pbc_steps(1, 4, seed=2))
    out = tmp_path / "trace"
    res = runner.invoke(
        main, ["import", "patterns-behind-chaos", str(src), str(out), "--no-progress"]
    )
    assert res.exit_code == 0, res.output
    return out


def _one_error_line(res: object) -> str:
    assert res.exit_code == 2  # type: ignore[attr-defined]
    err = res.stderr.strip().splitlines()  # type: ignore[attr-defined]
    assert len(err) == 1 and err[0].startswith("moetrace: error: "), err
    assert "Traceback" not in res.output  # type: ignore[attr-defined]
    return err[0]


def test_import_prints_summary(tmp_path: Path, runner: CliRunner) -> None:
    src = tmp_path / "tiny-ds" / "p"
    for i in (1, 2):
        write_csv(src / f"prompt_{i}_data.csv", mb_rows(["a", "Ġb", "c"], seed=i))
    (src / "prompt_3_data.csv").write_text(
        "Layer ID,Batch Number,Token,Activated Expert IDs\n1,0,a,[1\n"
    )
    out = tmp_path / "o"
    args = ["import", "moe-beyond", str(src), str(out), "--num-experts", "16", "--skip-bad"]
    res = runner.invoke(main, [*args, "--no-progress"])
    assert res.exit_code == 0, res.output
    assert "import:" not in res.stderr  # --no-progress
    lines = dict(
        line.split(None, 1) for line in res.stdout.splitlines() if not line.startswith(" ")
    )
    assert lines["requests"] == "2 imported, 0 skipped (already present)"
    assert lines["tokens"] == "6 prefill, 0 decode"
    assert lines["activations"] == "12"
    assert lines["inferred"] == "name, num_layers, moe_layers, top_k, shared_experts"
    assert "prompt_3_data.csv: line 2" in res.stdout
    again = runner.invoke(main, [*args, "--no-progress"])
    assert "0 imported, 2 skipped (already present)" in again.stdout


def test_inspect_text_and_json(imported: Path, runner: CliRunner) -> None:
    res = runner.invoke(main, ["inspect", str(imported)])
    assert res.exit_code == 0, res.output
    kv = dict(line.split(None, 1) for line in res.stdout.splitlines())
    assert kv["requests"] == "2"
    assert kv["tokens"] == "4 prefill, 6 decode"
    assert kv["layers"] == "4 (2 MoE: 1, 3)"
    assert kv["experts"].startswith("8 routed, top-2")
    res = runner.invoke(main, ["inspect", str(imported), "--json"])
    data = json.loads(res.stdout)
    assert data["activations"] == 20 and data["tokens"] == {"prefill": 4, "decode": 6}
    assert data["source"]["origin"] == "patterns-behind-chaos"


def test_sql_formats_and_limit(imported: Path, runner: CliRunner) -> None:
    q = "SELECT layer, count(*) AS n FROM activations GROUP BY layer ORDER BY layer"
    res = runner.invoke(main, ["sql", str(imported), q])
    assert res.exit_code == 0, res.output
    assert res.stdout.splitlines() == ["layer   n", "-----  --", "    1  10", "    3  10"]
    res = runner.invoke(main, ["sql", str(imported), q, "--format", "csv"])
    assert res.stdout.splitlines() == ["layer,n", "1,10", "3,10"]
    res = runner.invoke(main, ["sql", str(imported), q, "--format", "json", "--limit", "1"])
    assert json.loads(res.stdout) == [{"layer": 1, "n": 10}]
    res = runner.invoke(
        main, ["sql", str(imported), "SELECT * FROM activations_long", "--limit", "3"]
    )
    assert len(res.stdout.splitlines()) == 2 + 3 + 1 and "use --limit" in res.stdout
    res = runner.invoke(
        main, ["sql", str(imported), "SELECT tags FROM requests", "--format", "json"]
    )
    assert json.loads(res.stdout)[0]["tags"]["subject"] == "x"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["import", "nope", "{src}", "{out}"], "unknown import format 'nope'"),
        (["import", "moe-beyond", "{tmp}/missing", "{out}"], "missing: no such file or directory"),
        (
            ["import", "patterns-behind-chaos", "{bad}", "{out}"],
            "0.json: line 1 column 2: invalid JSON",
        ),
        (["inspect", "{tmp}/missing"], "missing: no such trace directory"),
        (["sql", "{trace}", "SELEC 1"], "SQL error: Parser Error"),
        (["sql", "{trace}", "SELECT * FROM nosuch"], "SQL error: Catalog Error"),
    ],
)
def test_errors_are_one_line_exit_2(
    tmp_path: Path, imported: Path, runner: CliRunner, args: list[str], message: str
) -> None:
    bad = tmp_path / "bad" / "s"
    bad.mkdir(parents=True)
    (bad / "0.json").write_text("[x]")
    names = {"src": str(tmp_path / "tiny-moe"), "out": str(tmp_path / "o2"), "tmp": str(tmp_path)}
    names |= {"bad": str(bad), "trace": str(imported)}
    res = runner.invoke(main, [a.format(**names) for a in args])
    assert message in _one_error_line(res)


@pytest.mark.parametrize("command", ["import", "inspect", "sql"])
def test_help_has_example(runner: CliRunner, command: str) -> None:
    res = runner.invoke(main, [command, "--help"])
    assert res.exit_code == 0
    assert re.search(rf"Example:\n\s+moetrace {command} \S+", res.stdout), res.stdout


# ---------------------------------------------------------------- hostile input


def test_import_again_from_a_copied_folder_imports_nothing(
    tmp_path: Path, imported: Path, runner: CliRunner
) -> None:
    src = tmp_path / "tiny-moe" / "mmlu-x"
    shutil.copytree(src, tmp_path / "tiny-moe" / "mmlu-y")
    before = tree_digest(imported)
    res = runner.invoke(
        main,
        ["import", "patterns-behind-chaos", str(tmp_path / "tiny-moe" / "mmlu-y"), str(imported)],
    )
    assert res.exit_code == 0, res.output
    assert (
        "0 imported, 2 skipped (already present; 2 of them the same files from another path)"
        in res.stdout
    )
    assert tree_digest(imported) == before
    assert re.search(r"^requests +2$", runner.invoke(main, ["inspect", str(imported)]).stdout, re.M)


@pytest.mark.parametrize("command", ["inspect", "import", "analyze"])
def test_copied_part_pair_is_refused(
    tmp_path: Path, imported: Path, runner: CliRunner, command: str
) -> None:
    act = next((imported / "activations").glob("part-*.parquet"))
    req = imported / "requests" / act.name
    copy = "part-copy-000000.parquet"
    shutil.copy(act, imported / "activations" / copy)
    shutil.copy(req, imported / "requests" / copy)
    write_json(tmp_path / "tiny-moe" / "mmlu-z" / "5.json", pbc_steps(2, 2, seed=5))
    args = {
        "inspect": ["inspect", str(imported)],
        "import": [
            "import",
            "patterns-behind-chaos",
            str(tmp_path / "tiny-moe" / "mmlu-z"),
            str(imported),
        ],
        "analyze": ["analyze", str(imported)],
    }[command]
    before = tree_digest(imported)
    line = _one_error_line(runner.invoke(main, args))
    assert str(req) in line and str(imported / "requests" / copy) in line
    assert "is also in" in line
    assert tree_digest(imported) == before


@pytest.mark.parametrize("command", ["inspect", "analyze", "sql"])
def test_manifest_with_too_few_experts_is_refused(
    imported: Path, runner: CliRunner, command: str
) -> None:
    target = imported / "manifest.json"
    data = json.loads(target.read_text())
    data["model"]["num_experts"] = 2  # the parts hold ids up to 7
    target.write_text(json.dumps(data))
    before = tree_digest(imported)
    args = [command, str(imported)] + (["SELECT 1"] if command == "sql" else [])
    line = _one_error_line(runner.invoke(main, args))
    assert re.search(r"activations/part-\S+\.parquet: expert id \d+ in column e\d", line), line
    assert "num_experts=2" in line
    assert tree_digest(imported) == before


def test_import_refuses_to_infer_experts_from_a_stray_id(tmp_path: Path, runner: CliRunner) -> None:
    src = tmp_path / "tiny-ds" / "p"
    for i in range(1, 9):
        write_csv(src / f"prompt_{i}_data.csv", mb_rows(["a", "b", "c"], seed=i))
    bad = src / "prompt_3_data.csv"
    lines = bad.read_text(encoding="utf-8").splitlines()
    lines[2] = re.sub(r"\[(\d+)", "[999", lines[2], count=1)
    bad.write_text("\n".join(lines) + "\n", encoding="utf-8")
    empty = tmp_path / "empty"
    empty.mkdir()
    for out in (tmp_path / "new", empty):
        res = runner.invoke(main, ["import", "moe-beyond", str(src), str(out), "--skip-bad"])
        line = _one_error_line(res)
        assert "prompt_3_data.csv: line 3: expert id 999 is far above" in line
        assert "--num-experts" in line
    assert not (tmp_path / "new").exists() and tree_digest(empty) == {}
    res = runner.invoke(
        main, ["import", "moe-beyond", str(src), str(empty), "--num-experts", "16", "--skip-bad"]
    )
    assert res.exit_code == 0, res.output
    assert "bad files    1" in res.stdout
    assert "prompt_3_data.csv: line 3: expert id 999 out of range [0, 16)" in res.stdout


def test_import_progress_is_plain_lines_off_a_terminal(
    tmp_path: Path, runner: CliRunner, monkeypatch: pytest.MonkeyPatch
) -> None:
    src = tmp_path / "tiny-ds" / "p"
    for i in (1, 2, 3):
        write_csv(src / f"prompt_{i}_data.csv", mb_rows(["a", "b"], seed=i))
    monkeypatch.setenv("MOETRACE_PROGRESS_INTERVAL", "0")
    args = ["import", "moe-beyond", str(src), str(tmp_path / "o"), "--num-experts", "16"]
    res = runner.invoke(main, args)
    assert res.exit_code == 0, res.output
    lines = [ln for ln in res.stderr.splitlines() if ln.startswith("import: ")]
    assert lines and lines[-1].startswith("import: 3/3 files (100%)"), res.stderr
    assert "\x1b" not in res.stderr and "\r" not in res.stderr
