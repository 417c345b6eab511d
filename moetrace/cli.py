"""The ``moetrace`` command line: each command parses, makes one API call, formats output.

Any :class:`~moetrace.errors.MoetraceError` becomes one line on stderr and exit code 2.
Commands are registered by the ``cli_*`` modules' functions below to keep this file small.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Any

import click

from moetrace import __version__
from moetrace.errors import MoetraceError

EXIT_BAD_INPUT = 2


class MoetraceGroup(click.Group):
    """A click group that turns MoetraceError and usage errors into one line, exit code 2."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except MoetraceError as exc:
            click.echo(f"moetrace: error: {_one_line(str(exc))}", err=True)
            ctx.exit(EXIT_BAD_INPUT)
        except click.UsageError as exc:  # bad options: one line too, with where to look
            where = exc.ctx.command_path if exc.ctx is not None else ctx.command_path
            click.echo(
                f"moetrace: error: {_one_line(exc.format_message())} (see '{where} -h')", err=True
            )
            ctx.exit(EXIT_BAD_INPUT)


def _one_line(text: str) -> str:
    return " ".join(text.split())


@click.group(cls=MoetraceGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="moetrace")
@click.option("-v", "--verbose", count=True, help="More log output (-v info, -vv debug).")
def main(verbose: int) -> None:
    """moetrace: trace MoE expert routing, mine it, tune offloading plans, run them.

    \b
    Example:
      moetrace import patterns-behind-chaos traces/llama4 out/llama4
      moetrace inspect out/llama4
    """
    level = logging.WARNING - 10 * min(verbose, 2)
    if verbose == 0:  # Hugging Face's own "Loading weights" bars only with -v
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        if "transformers" in sys.modules:  # already imported: its bar flag is set
            sys.modules["transformers"].utils.logging.disable_progress_bar()
    logging.basicConfig(
        level=level, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )


def _register() -> None:
    from moetrace import cli_store

    cli_store.register(main)
    for name in ("cli_tracer", "cli_tuner", "cli_size", "cli_runtime", "cli_dashboard", "cli_demo"):
        try:
            module = __import__(f"moetrace.{name}", fromlist=["register"])
        except ModuleNotFoundError as exc:
            if exc.name != f"moetrace.{name}":
                raise
            continue
        module.register(main)


_register()

if __name__ == "__main__":  # pragma: no cover
    main()
