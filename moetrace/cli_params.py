"""Click parameter types shared by the commands: output files checked before any work."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import click

from moetrace.store.files import check_writable


class OutputFile(click.ParamType):
    """A file the command will write: its folders may be missing (they are created), but a
    path that cannot become a file fails when the command starts, not after the work.
    With ``dash=True``, ``-`` means standard output."""

    name = "file"

    def __init__(self, dash: bool = False) -> None:
        self.dash = dash

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if value is None or (self.dash and value == "-"):
            return value
        return str(check_writable(str(value)))  # OutputError: one line, exit 2


def write_output(path: str, text: str) -> None:
    """Write a command's output file (``-``: standard output)."""
    if path == "-":
        click.echo(text, nl=False)
        return
    from moetrace.store.files import write_text_atomic

    write_text_atomic(path, text)


def plain_progress(label: str, unit: str) -> Callable[[int, int, float], None]:
    """The ``on_progress`` callback of long commands: one plain line on stderr (used only
    when stderr is not a terminal; on a terminal the library shows a bar)."""
    from moetrace.progress import format_progress

    def echo(done: int, total: int, elapsed: float) -> None:
        click.echo(format_progress(label, done, total, elapsed, unit=unit), err=True)

    return echo
