"""``moetrace import`` of the many-request formats end to end: import, analyze, tune."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from importkit import (
    SGLANG_DECODE,
    SGLANG_EXTEND,
    byo_rows,
    sglang_dump,
    vllm_output,
    write_byo,
    write_jsonl,
)
from pagekit import open_every_page

from moetrace.cli import main


def _source(fmt: str, root: Path) -> Path:
    src = root / "tiny-moe"
    if fmt == "byo":
        reqs = {f"r{i}": (4, 6) for i in range(12)}
        write_byo(src / "t.parquet", byo_rows(reqs, num_experts=8, weights=True, seed=1))
    elif fmt == "vllm-offline":
        outs = [vllm_output(f"r{i}", 4, [7], width=4, dense=(0, 2), seed=i) for i in range(12)]
        write_jsonl(src / "o.jsonl", outs)
    else:
        passes = [(SGLANG_EXTEND, 6, [6])] + [(SGLANG_DECODE, 3, None)] * 11
        src.mkdir(parents=True)
        torch.save(sglang_dump(passes, seed=2), src / "expert_distribution_recorder_1.0_0.pt")
    return src


@pytest.mark.parametrize("fmt", ["byo", "vllm-offline", "sglang-dump"])
def test_import_analyze_tune_dashboard(
    tmp_path: Path, fmt: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    runner = CliRunner()
    src, out = _source(fmt, tmp_path), tmp_path / "trace"
    res = runner.invoke(main, ["import", fmt, str(src), str(out), "--no-progress"])
    assert res.exit_code == 0, res.output
    assert "12 imported, 0 skipped" in res.output
    res = runner.invoke(main, ["analyze", str(out), "--seed", "1"])
    assert res.exit_code == 0, res.output
    res = runner.invoke(
        main, ["tune", str(out), "--budget", "50%", "--out", str(tmp_path / "p.json")]
    )
    assert res.exit_code == 0, res.output
    assert (tmp_path / "p.json").is_file()
    open_every_page(monkeypatch, [out], [tmp_path / "p.json"])
    res = runner.invoke(main, ["import", fmt, str(src), str(out), "--no-progress"])
    assert res.exit_code == 0 and "0 imported, 12 skipped" in res.output


@pytest.mark.parametrize(
    ("fmt", "name", "content", "message"),
    [
        ("byo", "t.jsonl", '{"request_id": "a"}\n', "t.jsonl: missing column 'token'"),
        ("vllm-offline", "o.jsonl", "{x\n", "o.jsonl: line 1: invalid JSON"),
        ("sglang-dump", "d.pt", "nope", "d.pt: not a torch.save file of plain data"),
    ],
)
def test_bad_input_is_one_line_exit_2(
    tmp_path: Path, fmt: str, name: str, content: str, message: str
) -> None:
    src = tmp_path / "m"
    src.mkdir()
    (src / name).write_text(content)
    res = CliRunner().invoke(main, ["import", fmt, str(src), str(tmp_path / "o"), "--no-progress"])
    assert res.exit_code == 2
    err = res.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("moetrace: error: ") and message in err[0], err
