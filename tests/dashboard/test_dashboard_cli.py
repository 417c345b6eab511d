"""``moetrace dashboard`` and :func:`moetrace.dashboard.launch`: help, input errors, a
real server that answers and stops."""

from __future__ import annotations

import socket
import urllib.request
from pathlib import Path

import pytest
from click.testing import CliRunner

from moetrace.cli import main
from moetrace.dashboard import DashboardInputs, launch
from moetrace.dashboard.launch import streamlit_command
from moetrace.errors import ConfigError, DashboardError, TraceFormatError


def test_help_shows_example() -> None:
    res = CliRunner().invoke(main, ["dashboard", "--help"])
    assert res.exit_code == 0
    assert "Example:" in res.output and "moetrace dashboard out/llama4 --plan" in res.output
    for opt in ("--plan", "--stats", "--port", "--no-browser"):
        assert opt in res.output


def test_missing_trace_is_one_line_error(tmp_path: Path) -> None:
    res = CliRunner().invoke(main, ["dashboard", str(tmp_path / "nope"), "--no-browser"])
    assert res.exit_code == 2
    assert res.output.startswith("moetrace: error: ") and "no such trace directory" in res.output


def test_missing_plan_is_one_line_error(fixture_paths: dict[str, Path]) -> None:
    args = ["dashboard", str(fixture_paths["trace"]), "--plan", "missing.json", "--no-browser"]
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 2 and "missing.json: no such plan file" in res.output


def test_command_passes_inputs_after_double_dash(fixture_paths: dict[str, Path]) -> None:
    inputs = DashboardInputs((str(fixture_paths["trace"]),), (str(fixture_paths["plan"]),))
    cmd = streamlit_command(inputs, "127.0.0.1", 8555)
    assert cmd[cmd.index("--server.port") + 1] == "8555"
    assert cmd[cmd.index("--server.headless") + 1] == "true"
    tail = cmd[cmd.index("--") + 1 :]
    assert tail == [
        "--trace",
        str(fixture_paths["trace"].resolve()),
        "--plan",
        str(fixture_paths["plan"].resolve()),
    ]


def test_launch_serves_and_stops(fixture_paths: dict[str, Path]) -> None:
    with launch([fixture_paths["trace"]], [fixture_paths["plan"]], ready_timeout=90) as server:
        assert server.running()
        with urllib.request.urlopen(f"{server.url}/_stcore/health", timeout=10) as resp:
            assert resp.status == 200 and resp.read() == b"ok"
        with urllib.request.urlopen(server.url, timeout=10) as resp:
            assert b"<html" in resp.read().lower()
        with pytest.raises(DashboardError, match=f"port {server.port} .* already in use"):
            launch([fixture_paths["trace"]], port=server.port)
    assert not server.running()


def test_launch_input_errors(fixture_paths: dict[str, Path]) -> None:
    with pytest.raises(TraceFormatError, match="missing manifest"):
        launch([fixture_paths["trace"] / "activations"])
    with pytest.raises(ConfigError, match="port must be in"):
        launch([fixture_paths["trace"]], port=70000)
    with pytest.raises(ConfigError, match="at least one trace"):
        launch([])


def test_port_is_free_after_stop(fixture_paths: dict[str, Path]) -> None:
    server = launch([fixture_paths["trace"]], ready_timeout=90)
    server.stop()
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # TIME_WAIT is fine, LISTEN not
        s.bind(("127.0.0.1", server.port))  # raises if the server still held it


def test_server_log_is_removed_on_a_clean_stop_and_kept_on_failure(
    fixture_paths: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    server = launch([fixture_paths["trace"]], ready_timeout=90)
    assert server.log_path.is_file()
    server.stop()
    assert not server.log_path.exists()  # no moetrace-dashboard-*.log left behind

    import importlib
    import sys

    launch_module = importlib.import_module("moetrace.dashboard.launch")  # not the function
    failing = [sys.executable, "-c", "import sys; print('boom: no streamlit'); sys.exit(3)"]
    monkeypatch.setattr(launch_module, "streamlit_command", lambda *a: failing)
    with pytest.raises(DashboardError, match="exited with code 3") as err:
        launch([fixture_paths["trace"]], ready_timeout=30)
    assert "boom: no streamlit" in str(err.value)
    kept = Path(str(err.value).split("its log (")[1].split(")")[0])
    assert kept.is_file() and "boom" in kept.read_text()  # kept for the user to read
    kept.unlink()
