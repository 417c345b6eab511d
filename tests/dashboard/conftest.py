"""Dashboard fixtures: a small planted trace, a second trace, two plans, runtime stats,
an empty trace and broken inputs, written once per session."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from dashkit import write_fixture

from moetrace.store import Manifest, ModelInfo, TraceWriter


@pytest.fixture(scope="session", autouse=True)
def dashboard_cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The on-disk aggregate cache in a temporary folder, never the user's ~/.cache
    (inherited by the dashboard subprocesses of the CLI and browser tests)."""
    from moetrace.dashboard.diskcache import ENV_VAR

    path = tmp_path_factory.mktemp("moetrace-cache")
    old = os.environ.get(ENV_VAR)
    os.environ[ENV_VAR] = str(path)
    yield path
    if old is None:
        os.environ.pop(ENV_VAR, None)
    else:
        os.environ[ENV_VAR] = old


@pytest.fixture(scope="session")
def fixture_paths(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("dashboard")
    paths = write_fixture(out)
    empty = out / "empty"
    with TraceWriter(empty, Manifest(ModelInfo("empty-moe", 2, (0, 1), 4, 2)), threads=0):
        pass
    paths["empty"] = empty
    broken = out / "broken"
    broken.mkdir()
    (broken / "manifest.json").write_text("{not json", encoding="utf-8")
    paths["broken_trace"] = broken
    bad_plan = out / "bad-plan.json"
    bad_plan.write_text(
        json.dumps({"format": "moetrace-plan", "format_version": 1}), encoding="utf-8"
    )
    paths["bad_plan"] = bad_plan
    other = json.loads(paths["plan"].read_text(encoding="utf-8"))
    other["routing"]["fingerprint"] = "config:0123456789abcdef"
    foreign = out / "foreign-plan.json"
    foreign.write_text(json.dumps(other), encoding="utf-8")
    paths["foreign_plan"] = foreign
    return paths
