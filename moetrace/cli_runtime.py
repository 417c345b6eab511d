"""CLI commands of the offloading runtime: prepare, run, bench, profile."""

from __future__ import annotations

import json

import click

from moetrace.cli_params import OutputFile, write_output


def _budget(value: str | None) -> str | None:
    """Check a budget's syntax before any work; the engine resolves it against the model."""
    from moetrace.store.budget import parse_budget

    return None if value is None else parse_budget(value).text


def _prompts(prompt: str | None, prompts: str | None) -> list[str]:
    if (prompt is None) == (prompts is None):
        raise click.UsageError("give exactly one of --prompt TEXT or --prompts FILE")
    if prompt is not None:
        return [prompt]
    from moetrace.tracer.prompts import load_prompts

    return [p.text for p in load_prompts(prompts)]  # type: ignore[arg-type]


@click.command("prepare")
@click.argument("model", type=click.Path(exists=True, file_okay=False))
@click.option("--out", "out", required=True, type=click.Path(), help="Expert store folder.")
@click.option("--dtype", default=None, help="Store weights in this dtype (e.g. bfloat16).")
def prepare_cmd(model: str, out: str, dtype: str | None) -> None:
    """Write an expert store: one memory-mapped safetensors file per expert.

    \b
    Example:
      moetrace prepare moetrace/assets/demo-moe --out stores/demo
      moetrace run --model stores/demo --prompt "def fib(n):" --budget 8MiB
    """
    from moetrace.runtime.expert_store import prepare_store

    index = prepare_store(model, out, dtype=dtype)
    n = len(index.layer_ids) * index.num_experts
    click.echo(f"wrote {n} experts of {index.bytes_per_expert} bytes to {out}")


@click.command("run")
@click.option("--model", default=None, help="Model folder or expert store (default: demo model).")
@click.option("--plan", "plan", default=None, type=click.Path(exists=True, dir_okay=False),
              help="Plan file (default: LRU on demand at --budget).")  # fmt: skip
@click.option("--prompt", default=None, help="One prompt.")
@click.option("--prompts", default=None, type=click.Path(exists=True, dir_okay=False),
              help="Prompts file (JSONL, text or Parquet).")  # fmt: skip
@click.option("--budget", default=None, help="Device bytes for experts, e.g. 64MiB.")
@click.option("--max-new-tokens", default=32, show_default=True, type=click.IntRange(1))
@click.option("--device", default="cpu", show_default=True)
@click.option("--stats-json", default=None, type=OutputFile(dash=True),
              help="Write the statistics as JSON here ('-' for stdout).")  # fmt: skip
@click.option("--trace", "trace_dir", default=None, type=click.Path(file_okay=False),
              help="Also record this run's routing as a trace.")  # fmt: skip
@click.option("--timeline-events", default=0, show_default=True, type=click.IntRange(0),
              help="Keep the outcomes of the first N events in --stats-json's 'timeline' "
              "(for the dashboard's Timeline page; 0: off).")  # fmt: skip
@click.option("--batch-size", default=None, type=click.IntRange(1),
              help="Run the prompts in batches of up to N, in the plan's schedule's order and "
              "grouping (default: the plan's batch size).")  # fmt: skip
def run_cmd(
    model: str | None,
    plan: str | None,
    prompt: str | None,
    prompts: str | None,
    budget: str | None,
    max_new_tokens: int,
    device: str,
    stats_json: str | None,
    trace_dir: str | None,
    timeline_events: int,
    batch_size: int | None,
) -> None:
    """Generate text with only a budgeted cache of experts on the device.

    With --batch-size (or a plan whose schedule batches), the prompts wait together and
    run in batches in the order the plan's scheduler picks; --stats-json then also has
    each request's batch and times, and each batch's hit rate.

    \b
    Example:
      moetrace run --plan plans/demo.json --prompt "import os" --budget 16MiB --stats-json -
      moetrace run --plan plans/demo.json --prompts prompts.jsonl --batch-size 4 --budget 16MiB
    """
    from moetrace.runtime.session import generate, open_engine

    texts = _prompts(prompt, prompts)
    engine, tok = open_engine(
        model, plan, budget_bytes=_budget(budget), device=device, timeline_events=timeline_events
    )
    batched = None
    try:
        own = engine.plan.schedule
        if batch_size is not None or (own.scheduler, own.batch_size) != ("fcfs", 1):
            from dataclasses import replace

            from moetrace.runtime.batches import generate_scheduled

            sched = replace(own, batch_size=batch_size or own.batch_size)
            gen = batched = generate_scheduled(
                engine, tok, texts, max_new_tokens, schedule=sched, trace_dir=trace_dir
            )
        else:
            gen = generate(engine, tok, texts, max_new_tokens, trace_dir=trace_dir)
        stats = engine.stats
    finally:
        engine.close()
    for text in gen.texts:
        click.echo(text)
    s = stats.summary()
    click.echo(
        f"# {gen.new_tokens} tokens in {gen.seconds:.2f}s ({gen.tokens_per_second:.1f} tok/s); "
        f"hit rate {s['hit_rate']:.3f}, misses {int(s['misses'])}, "
        f"prefetch precision {s['prefetch_precision']:.3f}, stalled {s['stall_s']:.3f}s",
        err=True,
    )
    ram = s.get("ram")
    if ram is not None:
        mem = ram["memory"]
        click.echo(
            f"# RAM tier: hit rate {ram['hit_rate']:.3f} of {int(ram['accesses'])} device "
            f"misses, {ram['disk_bytes'] / 2**20:.1f} MiB read from disk, "
            f"{int(ram['prefetch_issued'])} RAM prefetches; RAM peak {mem['peak']} of "
            f"{mem['limit']} bytes",
            err=True,
        )
    if stats.drift and stats.drift["switched"]:
        d = stats.drift
        click.echo(
            f"# drift: switched to {engine.plan.adaptation.fallback} at access "
            f"{d['switched_at_access']} (plan hit rate {d['plan_hit_rate']:.3f} < LRU "
            f"{d['lru_hit_rate']:.3f} over {d['window']} accesses)",
            err=True,
        )
    if batched is not None:
        for b in batched.batches:
            click.echo(
                f"# batch of prompts {b['requests']}: {b['end_s'] - b['start_s']:.2f}s, "
                f"hit rate {b['hit_rate']:.3f}",
                err=True,
            )
    if stats_json:
        text = stats.dumps()
        if batched is not None:
            text = json.dumps({**json.loads(text), **batched.to_json()}, indent=1) + "\n"
        write_output(stats_json, text)


@click.command("bench")
@click.option("--model", default=None, help="Model folder or expert store (default: demo model).")
@click.option("--plan", "plan", required=True, type=click.Path(exists=True, dir_okay=False))
@click.option("--prompt", "prompt_list", multiple=True, help="Prompt (repeatable).")
@click.option("--budget", default=None, help="Device bytes for experts (default: the plan's).")
@click.option("--repeats", default=3, show_default=True, type=click.IntRange(1))
@click.option("--max-new-tokens", default=16, show_default=True, type=click.IntRange(1))
@click.option("--device", default="cpu", show_default=True)
@click.option(
    "--replay", "replay", default=None, type=click.Path(exists=True, file_okay=False),
    help="Replay this trace's routing through a skeleton at its expert size instead.",
)  # fmt: skip
@click.option("--store", default=None, help="Replay: expert store folder (built or reused).")
@click.option(
    "--scale", default=1.0, show_default=True, type=float, help="Replay: expert size factor."
)
@click.option(
    "--requests",
    default=8,
    show_default=True,
    type=click.IntRange(1),
    help="Replay: last N requests.",
)
@click.option(
    "--max-tokens", default=None, type=click.IntRange(1), help="Replay: at most N tokens."
)
@click.option(
    "--hardware",
    default=None,
    help="Replay: hardware profile (default: measured between the runs).",
)
@click.option(
    "--tier", default="disk", show_default=True, type=click.Choice(["disk", "host", "ram"]),
    help="Replay: experts between loads on disk (no page cache), in host memory, or "
    "'ram': the plan's RAM tier over the store (a plan with a RAM tier; variants plan and "
    "ram_lru, RAM as plain LRU over disk).",
)  # fmt: skip
@click.option("--out", "out", default=None, type=OutputFile(), help="JSON file.")
def bench_cmd(
    model: str | None,
    plan: str,
    prompt_list: tuple[str, ...],
    budget: str | None,
    repeats: int,
    max_new_tokens: int,
    device: str,
    replay: str | None,
    store: str | None,
    scale: float,
    requests: int,
    max_tokens: int | None,
    hardware: str | None,
    tier: str,
    out: str | None,
) -> None:
    """Tokens/s of a plan vs all experts resident vs LRU on demand (interleaved runs).

    With --replay TRACE: the trace's last requests run token by token through a model
    skeleton with the trace's routing shape and expert size (times --scale), experts read
    from an expert store on disk without the page cache, routing forced to the recorded
    one; measured tokens/s and stall per token next to the simulator's for the same run.
    With --tier ram (a plan with a RAM tier): the plan vs its device cache over a RAM tier
    of plain LRU, modeled with the measured copy into a device slot (RAM -> device link)
    and the measured store read (disk link); each tier's hit rate and the RAM ledger's
    peak vs its limit.

    \b
    Example:
      moetrace bench --plan plans/demo.json --budget 16MiB --repeats 5 --out bench.json
      moetrace bench --replay out/ds --plan ds.json --store /ssd/ds-store --scale 0.25 \\
          --requests 4 --max-tokens 200 --out replay.json
      moetrace bench --replay out/ds --plan ds-ram.json --store /ssd/ds-store --tier ram
    """
    if replay is not None:
        from moetrace.runtime.replay import ReplayConfig, format_replay, run_replay

        if store is None:
            raise click.UsageError("--replay needs --store (a folder for the replay's experts)")
        cfg = ReplayConfig(
            replay, plan, store, scale=scale, requests=requests, max_tokens=max_tokens,
            repeats=repeats, hardware=hardware, device=device, tier=tier,
        )  # fmt: skip
        data = run_replay(cfg)
        if out:
            write_output(out, json.dumps(data, indent=1, sort_keys=True) + "\n")
        click.echo(format_replay(data))
        return
    from moetrace.runtime.bench import BenchConfig, run_bench

    prompts = prompt_list or ("def main():", "The history of the Python language")
    config = BenchConfig(
        model, plan, tuple(prompts), repeats, max_new_tokens, _budget(budget), device
    )
    data = run_bench(config).to_json()
    text = json.dumps(data, indent=1, sort_keys=True)
    if out:
        write_output(out, text + "\n")
    for variant, med in data["median"].items():
        lo, hi = data["min_max"][variant]
        click.echo(f"{variant:>13}: {med:8.2f} tok/s (min {lo:.2f}, max {hi:.2f})")


@click.command("profile")
@click.option("--device", default="cpu", show_default=True)
@click.option(
    "--model", default=None,
    help="Model folder to time a layer of (default: demo), or an expert store: its disk reads.",
)  # fmt: skip
@click.option("--bytes", "nbytes", default="64MiB", show_default=True,
              help="Size of the timed copies and disk reads.")  # fmt: skip
@click.option("--repeats", default=5, show_default=True, type=click.IntRange(1))
@click.option(
    "--dir", "directory", default=None,
    help="Folder for the disk read test (default: the temporary folder); give one on the "
    "SSD the experts will live on.",
)  # fmt: skip
@click.option("--name", default=None, help="Profile name.")
@click.option("--out", "out", default=None, type=OutputFile(), help="JSON file.")
def profile_cmd(
    device: str,
    model: str | None,
    nbytes: str,
    repeats: int,
    directory: str | None,
    name: str | None,
    out: str | None,
) -> None:
    """Measure both links and per-layer compute; write a hardware profile.

    RAM -> device: pinned host -> GPU copies on CUDA, a host memcpy into an aligned buffer
    on the CPU. Disk -> RAM: reads of a test file in --dir without the page cache
    (O_DIRECT, else pread + DONTNEED). Prints one line per figure; the profile JSON goes
    to --out, or to stdout without --out (the figures then on stderr).

    \b
    Example:
      moetrace profile --device cpu --dir /mnt/nvme --out hw/this-box.json
      moetrace simulate TRACE --plan plan.json --hardware hw/this-box.json
    """
    from moetrace.devices import check_device
    from moetrace.runtime.expert_store import is_store
    from moetrace.runtime.profile import measure_hardware, measure_store, profile_lines
    from moetrace.store.budget import parse_size

    size = parse_size(nbytes, "--bytes")
    if model is not None and is_store(model):
        if directory is not None:
            raise click.UsageError(
                "--dir does not apply to an expert store (its reads are timed where it lies)"
            )
        samples = measure_store(model, device=device)
        prof = samples.profile(name, check_device(device).type)
        lines = profile_lines(
            prof, disk_mode=f"{samples.mode} reads of the store", link="store -> device"
        )
    else:
        measured = measure_hardware(
            device, model=model, nbytes=size, repeats=repeats, directory=directory
        )
        prof = measured.profile(name)
        lines = measured.lines()
    text = json.dumps(prof.to_json(), indent=1, sort_keys=True)
    for line in lines:
        click.echo(line, err=not out)
    if out:
        write_output(out, text + "\n")
        click.echo(f"wrote hardware profile {prof.name} to {out}")
    else:
        click.echo(text)


def register(group: click.Group) -> None:
    for cmd in (prepare_cmd, run_cmd, bench_cmd, profile_cmd):
        group.add_command(cmd)
