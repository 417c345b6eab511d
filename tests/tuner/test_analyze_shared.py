"""analyze on the real reference traces reproduces the figures of their README."""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
from pathlib import Path

import pytest

from moetrace.tuner.analyze import AnalyzeConfig, analyze

pytestmark = pytest.mark.shared


def _import_prompts(deepseek_dir: Path, root: Path, name: str, first: int, last: int) -> Path:
    """Prompts first..last-1 (in number order) of the DeepSeek-V2-Lite folder, imported."""
    importers = pytest.importorskip("moetrace.store.importers")
    src = root / f"src-{name}" / "deepseek" / "puffin"  # tags (model, dataset) alike
    src.mkdir(parents=True)
    files = sorted(
        deepseek_dir.glob("prompt_*_data.csv"), key=lambda p: int(re.findall(r"\d+", p.name)[0])
    )
    for f in files[first:last]:
        shutil.copy(f, src / f.name)
    out = root / name
    importers.import_trace("moe-beyond", src, out, progress=False)
    return out


@pytest.fixture(scope="module")
def deepseek_20k(deepseek_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The first 300 prompts (> 20k tokens) of the DeepSeek-V2-Lite folder, imported."""
    return _import_prompts(deepseek_dir, tmp_path_factory.mktemp("ds"), "trace", 0, 300)


def test_deepseek_first_20k_tokens_match_the_readme(deepseek_20k: Path) -> None:
    # README: independent per-layer caches, requests in file order, demand loading;
    # 16 of 64: LRU 0.471, Belady 0.663; 32 of 64: LRU 0.708, Belady 0.869.
    rep = analyze(deepseek_20k, AnalyzeConfig(cache_sizes=(16, 32), max_tokens=20_000, sections=()))
    assert sum(rep.skew.tokens) == 20_000 * 26
    assert rep.mrc.model_lru_at == pytest.approx((0.471, 0.708), abs=0.0006)
    assert rep.mrc.model_belady == pytest.approx((0.663, 0.869), abs=0.0006)


def test_deepseek_in_two_traces_merges_to_the_single_pass(
    deepseek_dir: Path, deepseek_20k: Path, tmp_path: Path
) -> None:
    """Prompts 0-149 and 150-299 as two traces, analyzed together on a pool of 2, equal
    the one trace of prompts 0-299 analyzed in this process."""
    halves = [
        _import_prompts(deepseek_dir, tmp_path, f"half-{i}", 150 * i, 150 * (i + 1))
        for i in range(2)
    ]
    cfg = AnalyzeConfig(cache_sizes=(8, 16), seed=1)
    merged = analyze([str(tmp_path / "half-*")], dataclasses.replace(cfg, workers=2)).to_dict()
    single = analyze(deepseek_20k, dataclasses.replace(cfg, workers=1)).to_dict()
    assert merged.pop("trace") == f"{halves[0]}, {halves[1]}"
    single.pop("trace")
    for d in (merged, single):
        d.pop("timings")
    ids = merged["requests"]["request_ids"]
    merged["requests"]["request_ids"] = [r.split(":", 1)[1] for r in ids]
    assert merged["num_requests"] == single["num_requests"] == 300
    assert json.dumps(merged, sort_keys=True) == json.dumps(single, sort_keys=True)
