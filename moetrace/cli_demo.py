"""CLI: ``moetrace demo``, the whole loop on the shipped demo model."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from moetrace.cli_params import plain_progress
from moetrace.cli_tuner import splits_table


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


@click.command("demo")
@click.option("--out", default="moetrace-demo", show_default=True,
              type=click.Path(file_okay=False), help="Directory for the trace, plan and reports.")  # fmt: skip
@click.option(
    "--quick", is_flag=True, help="A smaller run (under a minute): fewer prompts and tokens."
)
@click.option("--budget", default="25%", show_default=True,
              help="Device expert cache: N% of all experts, bytes (e.g. 8MiB) or slots.")  # fmt: skip
@click.option("--hardware", default="pcie4-x16", show_default=True,
              help="Hardware profile name or JSON file for the timing model.")  # fmt: skip
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--no-progress", is_flag=True, help="No progress bars.")
def demo_cmd(
    out: str, quick: bool, budget: str, hardware: str, seed: int, no_progress: bool
) -> None:
    """Record, analyze, tune and run a plan on the shipped demo MoE, end to end.

    Records the shipped prompt set on the demo model, analyzes the trace, tunes a plan at
    the budget (tuned on half the requests, judged on the other half), runs the plan in
    the offloading runtime and compares the measured hit rate with the simulator's.

    \b
    Example:
      moetrace demo --out demo-run
      moetrace demo --quick --budget 12.5%
    """
    from moetrace.demo import DemoConfig, run_demo

    rep = run_demo(
        DemoConfig(out=Path(out), quick=quick, budget=budget, hardware=hardware, seed=seed),
        progress=not no_progress,
        on_progress=plain_progress("demo", "stages"),
    )
    echo = click.echo
    echo(f"\nTrace   {rep.trace}: {rep.requests} requests, {rep.tokens} generated tokens, "
         f"{rep.activations} routing rows")  # fmt: skip
    echo("\nWhat the trace says (moetrace analyze):")
    for line in rep.verdict:
        echo(f"  {line}")
    echo(f"\nPlan    {rep.plan}, judged on held-out requests (moetrace tune, budget {budget}):")
    echo(f"  {'policy':<46} {'hit rate':>8} {'stall ms/token':>15} {'tokens/s':>10}")
    for row in rep.validation:
        echo(f"  {row['name']:<46} {_fmt(row['hit_rate']):>8} "
             f"{_fmt(row['stall_per_token_ms']):>15} {_fmt(row['tokens_per_s'], 1):>10}")  # fmt: skip
    echo("\nUnder drift (moetrace tune --split-by time --split-by tag:domain), hit rates:")
    echo(splits_table(rep.splits))
    if rep.fallback is not None:
        echo(f"  fallback: {rep.fallback['from']!r} lost to LRU on {rep.fallback['reason']}; "
             f"wrote {rep.fallback['to']!r}")  # fmt: skip
    echo(f"\nRuntime: the plan run on {rep.runtime_prompts} held-out prompts, next to the "
         "simulator replaying that run's own trace:")  # fmt: skip
    for r in rep.runtime:
        echo(f"  {r.label:<24} measured hit rate {_fmt(r.measured_hit_rate)}, simulated "
             f"{_fmt(r.simulated_hit_rate)} ({r.accesses} expert accesses, {r.tokens} tokens)")  # fmt: skip
    echo(f"\nStage times (s): {', '.join(f'{k} {v}' for k, v in rep.seconds.items())}")
    echo(f"Report  {rep.out / 'demo-report.json'}")
    echo(f"\nSee it:  {rep.dashboard_command}")


def register(group: click.Group) -> None:
    group.add_command(demo_cmd)
