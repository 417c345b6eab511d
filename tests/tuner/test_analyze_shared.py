"""analyze on the real reference traces reproduces the figures of their README."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest

from moetrace.tuner.analyze import AnalyzeConfig, analyze

pytestmark = pytest.mark.shared


@pytest.fixture(scope="module")
def deepseek_20k(deepseek_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The first 300 prompts (> 20k tokens) of the DeepSeek-V2-Lite folder, imported."""
    importers = pytest.importorskip("moetrace.store.importers")
    src = tmp_path_factory.mktemp("ds") / "src"
    src.mkdir()
    files = sorted(
        deepseek_dir.glob("prompt_*_data.csv"), key=lambda p: int(re.findall(r"\d+", p.name)[0])
    )
    for f in files[:300]:
        shutil.copy(f, src / f.name)
    out = src.parent / "trace"
    importers.import_trace("moe-beyond", src, out, progress=False)
    return out


def test_deepseek_first_20k_tokens_match_the_readme(deepseek_20k: Path) -> None:
    # README: independent per-layer caches, requests in file order, demand loading;
    # 16 of 64: LRU 0.471, Belady 0.663; 32 of 64: LRU 0.708, Belady 0.869.
    rep = analyze(deepseek_20k, AnalyzeConfig(cache_sizes=(16, 32), max_tokens=20_000, sections=()))
    assert sum(rep.skew.tokens) == 20_000 * 26
    assert rep.mrc.model_lru_at == pytest.approx((0.471, 0.708), abs=0.0006)
    assert rep.mrc.model_belady == pytest.approx((0.663, 0.869), abs=0.0006)
