"""Shared test fixtures: the real reference traces beside the repository, when present."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_TRACES = Path(
    os.environ.get("MOETRACE_SHARED_TRACES", REPO_ROOT.parent / "shared" / "traces")
)
LLAMA4_DIR = (
    SHARED_TRACES / "patterns-behind-chaos" / "llama4-maverick-17b-128e" / "mmlu-abstract_algebra"
)
DEEPSEEK_DIR = SHARED_TRACES / "moe-beyond" / "deepseek-v2-lite-chat" / "puffin-1-1000"


@pytest.fixture(scope="session")
def shared_traces() -> Path:
    """The ../shared/traces folder; tests that need it skip when it is absent."""
    if not SHARED_TRACES.is_dir():
        pytest.skip(f"reference traces not present at {SHARED_TRACES}")
    return SHARED_TRACES


@pytest.fixture(scope="session")
def llama4_dir(shared_traces: Path) -> Path:
    if not LLAMA4_DIR.is_dir():
        pytest.skip(f"{LLAMA4_DIR} not present")
    return LLAMA4_DIR


@pytest.fixture(scope="session")
def deepseek_dir(shared_traces: Path) -> Path:
    if not DEEPSEEK_DIR.is_dir():
        pytest.skip(f"{DEEPSEEK_DIR} not present")
    return DEEPSEEK_DIR
