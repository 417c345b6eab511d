"""Start the dashboard: ``streamlit run app.py`` headless on a free port, in a subprocess.

:func:`launch` checks the inputs, starts the server, waits until its health endpoint
answers and returns a :class:`DashboardServer` (URL, ``wait``, ``stop``); the CLI prints
the URL and waits. The server's own output goes to a log file, quoted in the error when
it fails to start.
"""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import webbrowser
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

from moetrace.dashboard.inputs import DashboardInputs
from moetrace.errors import ConfigError, DashboardError, MoetraceError, PlanError
from moetrace.store.reader import open_trace

log = logging.getLogger(__name__)

APP = Path(__file__).resolve().parent / "app.py"
DEFAULT_HOST = "127.0.0.1"
READY_TIMEOUT_S = 60.0


def free_port(host: str = DEFAULT_HOST) -> int:
    """A TCP port that is free on ``host`` right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def _port_in_use(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server will
        try:
            s.bind((host, port))
        except OSError:
            return True
    return False


def check_inputs(inputs: DashboardInputs) -> None:
    """Fail before serving on anything the app could not open: a trace whose manifest or
    parts are bad (missing, truncated, wrong schema, duplicate or out-of-range data), a
    plan file that does not load, a runtime statistics file that is not a JSON object.
    (A valid plan for another model is shown, with a warning, inside the app.)"""
    from moetrace.dashboard.data.plans import load_plans, load_stats

    for path in inputs.traces:
        open_trace(path)
    for kind, paths in (("plan", inputs.plans), ("runtime stats", inputs.stats)):
        for p in paths:
            if not Path(p).is_file():
                raise ConfigError(f"{p}: no such {kind} file")
    plans = load_plans(inputs.plans)
    for loaded in (*plans, *load_stats(inputs.stats)):
        if loaded.error is not None:
            raise ConfigError(loaded.error)
    from moetrace.tuner.policy import check_plan_policies

    for lp in plans:
        try:
            check_plan_policies(lp.plan)
        except MoetraceError as exc:
            raise PlanError(f"{lp.path}: {exc}") from None


def streamlit_command(inputs: DashboardInputs, host: str, port: int) -> list[str]:
    return [
        sys.executable,
        "-m",
        "streamlit",
        "run",
        str(APP),
        "--server.headless",
        "true",
        "--server.address",
        host,
        "--server.port",
        str(port),
        "--server.fileWatcherType",
        "none",
        "--browser.gatherUsageStats",
        "false",
        "--client.toolbarMode",
        "minimal",
        "--",
        *inputs.to_argv(),
    ]


@dataclass
class DashboardServer:
    """A running dashboard server process."""

    url: str
    port: int
    process: subprocess.Popen[bytes]
    log_path: Path
    """The server's own output; removed by :meth:`stop` unless it failed."""
    _stopped: bool = field(default=False, init=False, repr=False)

    def running(self) -> bool:
        return self.process.poll() is None

    def wait(self) -> int:
        """Block until the server exits (Ctrl-C raises KeyboardInterrupt to the caller)."""
        return self.process.wait()

    def exited_on_its_own(self) -> bool:
        """Whether the server stopped with an error before anyone stopped it."""
        return self.process.poll() not in (None, 0) and not self._stopped

    def stop(self, timeout: float = 10.0, *, keep_log: bool = False) -> None:
        """Terminate the server (kill it when it does not exit within ``timeout``) and
        remove its log, unless ``keep_log`` or the server had failed on its own (then the
        log stays at :attr:`log_path` for the user to read)."""
        keep = keep_log or self.exited_on_its_own()
        self._stopped = True
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout)
        if keep:
            log.warning("the dashboard server's log is kept at %s", self.log_path)
        else:
            self.log_path.unlink(missing_ok=True)

    def __enter__(self) -> DashboardServer:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def _log_tail(path: Path, lines: int = 15) -> str:
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return ""
    return "\n".join(text.strip().splitlines()[-lines:])


def _wait_ready(server: DashboardServer, timeout: float) -> None:
    health = f"{server.url}/_stcore/health"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not server.running():
            raise DashboardError(
                f"the dashboard server exited with code {server.process.returncode} before it "
                f"was ready; its log ({server.log_path}):\n{_log_tail(server.log_path)}"
            )
        try:
            with urllib.request.urlopen(health, timeout=2) as resp:
                if resp.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(0.25)
    server.stop()
    raise DashboardError(
        f"the dashboard server did not answer {health} within {timeout:.0f} s; its log "
        f"({server.log_path}):\n{_log_tail(server.log_path)}"
    )


def launch(
    traces: Sequence[str | os.PathLike[str]],
    plans: Sequence[str | os.PathLike[str]] = (),
    stats: Sequence[str | os.PathLike[str]] = (),
    *,
    port: int | None = None,
    host: str = DEFAULT_HOST,
    open_browser: bool = False,
    ready_timeout: float = READY_TIMEOUT_S,
) -> DashboardServer:
    """Start the dashboard on ``traces`` (and plans / runtime stats JSON files) and wait
    until it serves; ``port`` None picks a free one. Stop it with ``server.stop()``."""
    inputs = DashboardInputs(
        traces=tuple(str(t) for t in traces),
        plans=tuple(str(p) for p in plans),
        stats=tuple(str(s) for s in stats),
    )
    check_inputs(inputs)
    if port is None:
        port = free_port(host)
    elif not 1 <= port <= 65535:
        raise ConfigError(f"port must be in [1, 65535], got {port}")
    elif _port_in_use(host, port):
        raise DashboardError(
            f"port {port} on {host} is already in use (leave --port out to pick a free one)"
        )
    fd, log_name = tempfile.mkstemp(prefix="moetrace-dashboard-", suffix=".log")
    log_path = Path(log_name)
    cmd = streamlit_command(inputs, host, port)
    log.info("starting dashboard: %s", " ".join(cmd))
    with os.fdopen(fd, "wb") as out:
        process = subprocess.Popen(
            cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
        )
    shown_host = "localhost" if host in ("127.0.0.1", "0.0.0.0") else host
    server = DashboardServer(f"http://{shown_host}:{port}", port, process, log_path)
    try:
        _wait_ready(server, ready_timeout)
    except BaseException as exc:
        server.stop(keep_log=isinstance(exc, DashboardError))  # the error quotes its log
        raise
    if open_browser:
        webbrowser.open(server.url)
    return server
