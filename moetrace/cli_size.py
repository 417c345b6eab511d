"""CLI command of the sizing frontier: size."""

from __future__ import annotations

import json
from typing import Any

import click

from moetrace.cli_params import OutputFile, write_output


def register(group: click.Group) -> None:
    @group.command("size")
    @click.argument("traces", nargs=-1, required=True)
    @click.option("--hardware", help="Hardware profile name or JSON file (default pcie4-x16).")
    @click.option(
        "--device-budget", "device_budgets", multiple=True, metavar="BUDGET",
        help="Device budgets of the grid (repeatable; N%, bytes or slots). "
        "Default: 2.5% 5% 10% 15% 20% 30% 50%.",
    )  # fmt: skip
    @click.option(
        "--ram-budget", "ram_budgets", multiple=True, metavar="BUDGET",
        help="Host-RAM budgets of the grid (repeatable; 100% = every expert in RAM). "
        "Default: 10% 25% 50% 75% 100%.",
    )  # fmt: skip
    @click.option("--target-tps", type=float, help="Find the smallest sizes giving this tok/s.")
    @click.option(
        "--granularity", type=click.Choice(["pass", "token"]), default="token",
        show_default=True,
    )  # fmt: skip
    @click.option("--bytes-per-expert", type=int, help="Override the manifest's bytes_per_expert.")
    @click.option("--max-requests", type=click.IntRange(2), help="Size on the last N requests.")
    @click.option("--workers", type=click.IntRange(1), help="Processes for the replays.")
    @click.option("--out", "out", type=OutputFile(), help="Write the grid and frontier as JSON.")
    def size_cmd(
        traces: tuple[str, ...],
        device_budgets: tuple[str, ...],
        ram_budgets: tuple[str, ...],
        out: str | None,
        **kw: Any,
    ) -> None:
        """Modeled tokens/s of TRACES' traffic over a grid of device and host-RAM sizes,
        and the smallest device + RAM that give --target-tps (experts on disk below RAM).

        \b
        Example:
          moetrace size out/ds --hardware hw/this-box.json --target-tps 20 --out size.json
          moetrace size out/llama4 --device-budget 10% --device-budget 20% \\
              --ram-budget 25% --ram-budget 100%
        """
        from moetrace.tuner.sizing import SizingConfig, format_sizing, size

        opts: dict[str, Any] = dict(kw)
        if device_budgets:
            opts["device_budgets"] = device_budgets
        if ram_budgets:
            opts["ram_budgets"] = ram_budgets
        data = size(list(traces), SizingConfig(**opts))
        click.echo(format_sizing(data))
        if out is not None:
            write_output(out, json.dumps(data, indent=1) + "\n")
            click.echo(f"wrote {out}")
