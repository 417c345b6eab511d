"""``moetrace dashboard``: start the Streamlit dashboard on traces, plans and runtime stats."""

from __future__ import annotations

import signal
from types import FrameType

import click

from moetrace.errors import DashboardError


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


@click.command("dashboard")
@click.argument("traces", nargs=-1, required=True, type=click.Path())
@click.option("--plan", "plans", multiple=True, type=click.Path(), help="A plan file (repeatable).")
@click.option(
    "--stats",
    "stats",
    multiple=True,
    type=click.Path(),
    help="A runtime statistics JSON (repeatable).",
)
@click.option("--port", type=int, default=None, help="Port to serve on (default: a free one).")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--no-browser", is_flag=True, help="Do not open a browser tab.")
def dashboard(
    traces: tuple[str, ...],
    plans: tuple[str, ...],
    stats: tuple[str, ...],
    port: int | None,
    host: str,
    no_browser: bool,
) -> None:
    """Explore traces in the browser: hot experts, reuse, groups, requests, plans.

    Starts a headless Streamlit server, prints its URL and runs until Ctrl-C.
    Per-trace aggregates are kept between sessions in $MOETRACE_CACHE_DIR (default
    $XDG_CACHE_HOME/moetrace or ~/.cache/moetrace), never in the trace folder.

    \b
    Example:
      moetrace dashboard out/llama4 --plan plans/llama4-16.json --no-browser
      moetrace dashboard out/a out/b --port 8501 --stats runs/stats.json
    """
    from moetrace.dashboard import launch

    server = launch(traces, plans, stats, port=port, host=host, open_browser=not no_browser)
    click.echo(f"moetrace dashboard: {server.url}  (Ctrl-C to stop)")
    click.echo(f"moetrace dashboard: server log {server.log_path} (removed on a clean stop)")
    previous = signal.signal(signal.SIGTERM, _interrupt)  # stop the server on kill, too
    try:
        code = server.wait()
        if server.exited_on_its_own():
            raise DashboardError(
                f"the dashboard server exited with code {code}; its log: {server.log_path}"
            )
    except KeyboardInterrupt:
        click.echo("moetrace dashboard: stopping")
    finally:
        server.stop()
        signal.signal(signal.SIGTERM, previous)


def register(group: click.Group) -> None:
    group.add_command(dashboard)
