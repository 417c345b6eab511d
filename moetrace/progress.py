"""Progress of long commands: a tqdm bar on a terminal, plain throttled lines elsewhere.

Library code never prints, so when stderr is not a terminal (a log file, CI, a pipe) the
helper does not write anything itself: it calls ``on_progress(done, total, elapsed)`` at
most every ``interval`` seconds (and once at the end if it called it before) and the CLI
prints the line, usually made with :func:`format_progress`::

    def echo(done: int, total: int, elapsed: float) -> None:
        click.echo(format_progress("record", done, total, elapsed, unit="requests"), err=True)

    with Progress(len(batches), unit="req", on_progress=echo) as bar:
        for batch in batches:
            ...
            bar.update()

Without a callback the line goes to this module's logger at INFO (seen with ``-v``).
``interval`` defaults to the environment variable ``MOETRACE_PROGRESS_INTERVAL``
(seconds), else 10.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from types import TracebackType
from typing import Any, TypeVar

from moetrace.errors import ConfigError

log = logging.getLogger(__name__)

DEFAULT_INTERVAL = 10.0
INTERVAL_ENV = "MOETRACE_PROGRESS_INTERVAL"

OnProgress = Callable[[int, int, float], None]
"""``on_progress(done, total, elapsed_seconds)``."""

T = TypeVar("T")


def stderr_is_tty() -> bool:
    """Whether ``sys.stderr`` is an interactive terminal."""
    try:
        return bool(sys.stderr is not None and sys.stderr.isatty())
    except (AttributeError, ValueError):  # replaced by an object without isatty, or closed
        return False


def default_interval() -> float:
    """Seconds between plain progress lines: ``$MOETRACE_PROGRESS_INTERVAL`` or 10."""
    raw = os.environ.get(INTERVAL_ENV)
    if raw is None or raw.strip() == "":
        return DEFAULT_INTERVAL
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not value >= 0:  # also rejects nan
        raise ConfigError(f"{INTERVAL_ENV} must be a number of seconds >= 0, got {raw!r}")
    return value


def _duration(seconds: float, *, tenths: bool = True) -> str:
    if seconds < 60:
        return f"{seconds:.1f} s" if tenths else f"{seconds:.0f} s"
    whole = int(round(seconds))
    if whole < 3600:
        return f"{whole // 60} min {whole % 60:02d} s"
    return f"{whole // 3600} h {whole % 3600 // 60:02d} min"


def format_progress(
    label: str, done: int, total: int, elapsed: float, *, unit: str = "items"
) -> str:
    """One plain progress line, e.g. ``record: 40/300 requests (13%), 12.3 s elapsed, ~80 s left``."""
    line = f"{label}: {done}/{total} {unit}"
    if total > 0:
        line += f" ({100 * done // total}%)"
    line += f", {_duration(elapsed)} elapsed"
    if 0 < done < total:
        line += f", ~{_duration(elapsed / done * (total - done), tenths=False)} left"
    return line


class Progress:
    """Counts finished units of work; a tqdm bar when stderr is a terminal.

    Args:
        total: how many units the work has.
        label: the name in the plain line logged when no ``on_progress`` is given.
        unit: tqdm's unit (the bar only).
        enabled: False shows and calls nothing.
        on_progress: called ``(done, total, elapsed)`` when stderr is not a terminal.
        interval: seconds between two calls (0: every update); default
            :func:`default_interval`.
        tty: force the terminal decision (default: :func:`stderr_is_tty`).
    """

    def __init__(
        self,
        total: int,
        *,
        label: str = "progress",
        unit: str = "it",
        enabled: bool = True,
        on_progress: OnProgress | None = None,
        interval: float | None = None,
        tty: bool | None = None,
    ) -> None:
        self.total = int(total)
        self.done = 0
        self.label = label
        self.interval = default_interval() if interval is None else float(interval)
        if not self.interval >= 0:
            raise ConfigError(f"progress interval must be >= 0 seconds, got {interval!r}")
        self._on_progress = on_progress
        self._start = time.monotonic()
        self._last_call = self._start
        self._called = False
        self._reported = 0
        self._bar: Any = None
        self._plain = False
        self._closed = False
        if not enabled:
            return
        if stderr_is_tty() if tty is None else tty:
            from tqdm import tqdm

            self._bar = tqdm(total=self.total, unit=unit, file=sys.stderr)
        else:
            self._plain = True

    @property
    def elapsed(self) -> float:
        """Seconds since the progress started."""
        return time.monotonic() - self._start

    def update(self, n: int = 1, **postfix: Any) -> None:
        """Count ``n`` more finished units; ``postfix`` is shown by the tqdm bar only."""
        self.done += n
        if self._bar is not None:
            self._bar.update(n)
            if postfix:
                self._bar.set_postfix(**postfix)
        elif self._plain and time.monotonic() - self._last_call >= self.interval:
            self._report()

    def _report(self) -> None:
        self._last_call = time.monotonic()
        self._called = True
        self._reported = self.done
        if self._on_progress is not None:
            self._on_progress(self.done, self.total, self.elapsed)
        else:
            log.info("%s", format_progress(self.label, self.done, self.total, self.elapsed))

    def close(self) -> None:
        """Close the bar; report the final count if a plain line was already reported."""
        if self._closed:
            return
        self._closed = True
        if self._bar is not None:
            self._bar.close()
        elif self._plain and self._called and self.done != self._reported:
            self._report()

    def __enter__(self) -> Progress:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def track(iterable: Iterable[T], total: int, **kwargs: Any) -> Iterator[T]:
    """Yield from ``iterable``, counting one unit per item (``kwargs``: :class:`Progress`'s)."""
    with Progress(total, **kwargs) as bar:
        for item in iterable:
            yield item
            bar.update()
