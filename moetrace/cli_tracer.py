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
@click.option(
    "--server",
    default=None,
    metavar="URL",
    help="Record from a running vLLM / SGLang server instead (see docs/server-recording.md); "
    "--model then names the served model.",
)
@click.option("--engine", type=click.Choice(["vllm", "sglang"]), default="vllm", show_default=True)
@click.option("--concurrency", default=8, show_default=True, type=int, help="Requests in flight.")
@click.option("--timeout", default=600.0, show_default=True, type=float, help="Seconds per try.")
@click.option("--retries", default=3, show_default=True, type=int, help="Retries of a failed try.")
@click.option("--stream", is_flag=True, help="Ask for streamed answers.")
@click.option("--n", "n", default=1, show_default=True, type=int, help="Completions per prompt.")
@click.option("--temperature", default=0.0, show_default=True, type=float)
@click.option(
    "--config",
    "config_dir",
    default=None,
    type=click.Path(),
    help="Folder with the served model's config.json (exact layers and experts).",
)
@click.option("--num-experts", default=None, type=int, help="Routed experts (without --config).")
@click.option("--num-layers", default=None, type=int, help="Hidden layers (without --config).")
@click.option("--top-k", default=None, type=int, help="Experts per token (without --config).")
@click.option(
    "--routed-experts-dtype",
    type=click.Choice(["int32", "uint16", "uint8"]),
    default="int32",
    show_default=True,
    help="SGLang: the server's SGLANG_ROUTED_EXPERTS_DTYPE when answers do not name it.",
)
@click.option(
    "--api-key", default=None, envvar="MOETRACE_API_KEY", help="Bearer token for the server."
)
@click.pass_context
def record_cmd(
    ctx: click.Context,
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
    server: str | None,
    engine: str,
    concurrency: int,
    timeout: float,
    retries: int,
    stream: bool,
    n: int,
    temperature: float,
    config_dir: str | None,
    num_experts: int | None,
    num_layers: int | None,
    top_k: int | None,
    routed_experts_dtype: str,
    api_key: str | None,
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
      moetrace record --server http://gpu1:8000 --engine vllm --config ./qwen3-30b-a3b \\
          --prompts prompts.jsonl --out traces/prod --concurrency 16
    """
    from moetrace.cli_params import plain_progress

    local_only = ("batch_size", "device", "dtype", "seed", "speculative")
    server_only = ("engine", "concurrency", "timeout", "retries", "stream", "n", "temperature",
                   "config_dir", "num_experts", "num_layers", "top_k", "api_key",
                   "routed_experts_dtype")  # fmt: skip
    given = {
        name
        for name in local_only + server_only
        if ctx.get_parameter_source(name) not in (None, click.core.ParameterSource.DEFAULT)
    }
    wrong = sorted(given & set(local_only if server else server_only))
    if wrong:
        other = "local recording" if server else "--server"
        opts = ", ".join("--" + w.replace("_dir", "").replace("_", "-") for w in wrong)
        raise click.UsageError(f"{opts}: only for {other}")
    if server is not None:
        _record_server(server, model, prompts, out, max_new_tokens, resume, ctx.params)
        return
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


def _record_server(
    url: str,
    model: str | None,
    prompts: str | None,
    out: str,
    max_new_tokens: int,
    resume: bool,
    p: dict,
) -> None:
    from moetrace.cli_params import plain_progress
    from moetrace.tracer import demo
    from moetrace.tracer.server_facts import GivenFacts
    from moetrace.tracer.server_record import ServerRecordConfig, record_server

    cfg = ServerRecordConfig(
        engine=p["engine"],
        model_name=model,
        max_new_tokens=max_new_tokens,
        n=p["n"],
        temperature=p["temperature"],
        stream=p["stream"],
        concurrency=p["concurrency"],
        timeout=p["timeout"],
        retries=p["retries"],
        resume=resume,
        api_key=p["api_key"],
        routed_experts_dtype=p["routed_experts_dtype"],
        facts=GivenFacts(
            config=p["config_dir"],
            num_layers=p["num_layers"],
            num_experts=p["num_experts"],
            top_k=p["top_k"],
        ),
    )
    result = record_server(
        url,
        prompts or demo.demo_prompts_path(),
        out,
        config=cfg,
        on_progress=plain_progress("record", "requests"),
    )
    click.echo(
        f"{result.path}: recorded {result.requests_recorded} request(s) from {url}, "
        f"skipped {result.requests_skipped} already present, "
        f"{result.generated_tokens} generated tokens, {result.activations} activations "
        f"in {result.seconds:.1f}s"
    )
    if result.interrupted:
        click.echo("interrupted: answered requests are committed; rerun with --resume", err=True)
        sys.exit(EXIT_INTERRUPTED)


def register(group: click.Group) -> None:
    """Add the tracer's commands to the top-level group."""
    group.add_command(record_cmd)
