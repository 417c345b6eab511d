"""One helper for the tests that open a trace in the dashboard: every page, no exception."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

PAGES = ("overview", "experts", "reuse", "groups", "requests", "plans")


def open_every_page(
    monkeypatch: pytest.MonkeyPatch, traces: list[Path], plans: list[Path] = ()
) -> None:
    """Run every dashboard page under streamlit's AppTest on ``traces`` and ``plans``."""
    from streamlit.testing.v1 import AppTest

    from moetrace.dashboard.inputs import ENV_VAR
    from moetrace.dashboard.launch import APP

    inputs = {"traces": [str(t) for t in traces], "plans": [str(p) for p in plans]}
    monkeypatch.setenv(ENV_VAR, json.dumps(inputs))
    for page in PAGES:
        at = AppTest.from_file(str(APP), default_timeout=120)
        if page != "overview":
            at.switch_page(f"views/{page}.py")
        at.run()
        assert not at.exception, (page, [e.value for e in at.exception])
