"""CLI command of the tracer: record."""

from __future__ import annotations

import sys

import click

EXIT_INTERRUPTED = 130


@click.command("record")
@click.option(
    "--model", "model", default=None, help="Model directory or hub id (default: the demo model)."
)
@click.option(
    "--prompts",
    type=click.Path(dir_okay=False),
    default=None,
    help="JSONL (prompt, id, tags), plain text (one per line) or Parquet (default: demo prompts).",
)
@click.option(
    "--out", required=True, type=click.Path(file_okay=False), help="Trace directory to write."
)
@click.option("--max-new-tokens", default=32, show_default=True, type=int)
@click.option("--batch-size", default=1, show_default=True, type=int)
@click.option("--device", default="cpu", show_default=True, help="torch device, e.g. cpu, cuda:0.")
@click.option(
    "--dtype",
    default="auto",
    show_default=True,
    type=click.Choice(["auto", "float32", "float16", "bfloat16"]),
    help="auto: float32 on the CPU, the checkpoint's dtype on accelerators.",
)
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--speculative", is_flag=True, help="Also record the next MoE layer's router pick.")
@click.option(
    "--resume", is_flag=True, help="Add only the requests missing from an existing trace."
)
def record_cmd(
    model: str | None,
    prompts: str | None,
    out: str,
    max_new_tokens: int,
    batch_size: int,
    device: str,
    dtype: str,
    seed: int,
    speculative: bool,
    resume: bool,
) -> None:
    """Run prompts through an MoE model with generate() and record its expert routing.

    Prompts are checked before anything is written: none may be empty, and each must fit
    the model's max positions with --max-new-tokens. --resume refuses a trace recorded
    with other generation settings (max new tokens, batch size, dtype, speculative).
    Progress: a bar on a terminal, else a line on stderr every 10 s
    (MOETRACE_PROGRESS_INTERVAL).

    \b
    Example:
      moetrace record --out traces/demo
      moetrace record --model ./my-olmoe --prompts prompts.jsonl --out traces/olmoe \\
          --batch-size 8 --max-new-tokens 64 --speculative
    """
    from moetrace.cli_params import plain_progress
    from moetrace.tracer.record import RecordConfig, record

    cfg = RecordConfig(
        max_new_tokens=max_new_tokens,
        batch_size=batch_size,
        device=device,
        dtype=dtype,
        seed=seed,
        speculative=speculative,
        resume=resume,
    )
    result = record(
        model, prompts, out, config=cfg, on_progress=plain_progress("record", "requests")
    )
    click.echo(
        f"{result.path}: recorded {result.requests_recorded} request(s), "
        f"skipped {result.requests_skipped} already present, "
        f"{result.generated_tokens} generated tokens, {result.activations} activations "
        f"in {result.seconds:.1f}s ({result.tokens_per_second:.1f} tok/s)"
    )
    if result.interrupted:
        click.echo("interrupted: finished requests are committed; rerun with --resume", err=True)
        sys.exit(EXIT_INTERRUPTED)


def register(group: click.Group) -> None:
    """Add the tracer's commands to the top-level group."""
    group.add_command(record_cmd)
