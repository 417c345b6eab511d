"""CLI commands of the store: import, inspect, sql."""

from __future__ import annotations

import click


def register(group: click.Group) -> None:
    """Add the store's commands to the top-level group."""
    # import / inspect / sql are added here.
    del group
