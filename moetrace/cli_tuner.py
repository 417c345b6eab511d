"""CLI commands of the tuner: analyze, simulate, tune."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import click

from moetrace.cli_params import OutputFile, plain_progress, write_output


def register(group: click.Group) -> None:
    """Add the tuner's commands to the top-level group."""
    _add_analyze(group)
    _add_simulate(group)
    _add_tune(group)


# ------------------------------------------------------------------ analyze


def _num(v: float | None, fmt: str = ".3f") -> str:
    if v is None or v != v:  # None or NaN
        return "-"
    return format(v, fmt)


def _analyze_summary(report: Any) -> str:
    """Verdict first, then one line per MoE layer."""
    E = report.num_experts
    mrc, skew = report.mrc, report.skew
    mid = len(mrc.policy_sizes) // 2
    c = mrc.policy_sizes[mid]
    lines = [
        f"{report.model}: {report.num_requests} requests, {report.num_rows} token-layer rows, "
        f"{len(report.moe_layers)} MoE layers x {E} experts, top-{report.top_k}, "
        f"phase {report.phase}",
        *([f"traces: {report.trace}"] if ", " in report.trace else []),
        "",
        "Verdict:",
        *[f"  - {line}" for line in report.verdict.lines],
        "",
    ]
    trans = {}
    if report.transitions is not None:
        trans = {s.layer: s for s in report.transitions.scores}
    lift = report.groups.max_lift if report.groups is not None else None
    header = (
        f"{'layer':>5} {'accesses':>10} {'gini':>5} {'H bits':>6} {'hot80':>5} "
        f"{'LRU@' + str(c):>7} {'LFU@' + str(c):>7} {'OPT@' + str(c):>7} {'pair lift':>9} "
        f"{'next rec':>8} {'freq rec':>8}"
    )
    lines.append(header)
    for i, layer in enumerate(report.moe_layers):
        t = trans.get(i)
        lines.append(
            f"{layer:>5} {skew.accesses[i]:>10} {_num(skew.gini[i], '.2f'):>5} "
            f"{_num(skew.entropy_bits[i], '.2f'):>6} {skew.hot_set['0.8'][i]:>5} "
            f"{_num(mrc.lru[i][c - 1]):>7} {_num(mrc.lfu[i][mid]):>7} "
            f"{_num(mrc.belady[i][mid]):>7} {_num(lift[i] if lift else None, '.2f'):>9} "
            f"{_num(t.recall if t else None):>8} {_num(t.baseline if t else None):>8}"
        )
    lines.append(
        f"{'all':>5} {sum(skew.accesses):>10} {_num(skew.model_gini, '.2f'):>5} "
        f"{_num(skew.model_entropy_bits, '.2f'):>6} {'':>5} {_num(mrc.model_lru_at[mid]):>7} "
        f"{_num(mrc.model_lfu[mid]):>7} {_num(mrc.model_belady[mid]):>7}"
    )
    lines.append("")
    lines.append(
        "hot80: experts covering 80% of a layer's activations; @"
        f"{c}: hit rate with {c} experts cached per layer; pair lift: strongest "
        "co-activation; next/freq rec: next-layer recall of the transition table / frequency."
    )
    return "\n".join(lines)


def _count_summary(report: Any) -> str:
    """A count trace's analysis: the skew lines, one line per MoE layer, what is missing."""
    skew = report.skew
    lines = [
        f"{report.model}: per-expert counts only (from {report.source or 'unknown'}), "
        f"{report.num_accesses} expert activations, {len(report.moe_layers)} MoE layers x "
        f"{report.num_experts} experts, top-{report.top_k}, phase {report.phase}",
        "",
        "Verdict:",
        *[f"  - {line}" for line in report.lines],
        "",
        f"{'layer':>5} {'accesses':>10} {'gini':>5} {'H bits':>6} {'hot50':>5} {'hot80':>5} "
        f"{'hot90':>5} {'zipf':>5}",
    ]
    for i, layer in enumerate(report.moe_layers):
        hot = [skew.hot_set[h][i] for h in ("0.5", "0.8", "0.9")]
        lines.append(
            f"{layer:>5} {skew.accesses[i]:>10} {_num(skew.gini[i], '.2f'):>5} "
            f"{_num(skew.entropy_bits[i], '.2f'):>6} {hot[0]:>5} {hot[1]:>5} {hot[2]:>5} "
            f"{_num(skew.zipf_exponent[i], '.2f'):>5}"
        )
    lines.append(
        f"{'all':>5} {sum(skew.accesses):>10} {_num(skew.model_gini, '.2f'):>5} "
        f"{_num(skew.model_entropy_bits, '.2f'):>6} {'':>5} {'':>5} {'':>5} "
        f"{_num(skew.model_zipf_exponent, '.2f'):>5}"
    )
    lines += ["", "hotNN: experts covering NN% of a layer's activations."]
    return "\n".join(lines)


def _executor_options(f: Callable[..., Any]) -> Callable[..., Any]:
    """--workers and --ray, shared by analyze and tune (results are the same on each)."""
    f = click.option(
        "--ray", "ray", default=None, envvar="RAY_ADDRESS", metavar="ADDRESS",
        help="Run the tasks on a Ray cluster (auto, ray://host:10001, or 'local' for a "
        "new local one); also read from RAY_ADDRESS.",
    )(f)  # fmt: skip
    return click.option(
        "--workers", type=click.IntRange(1), default=None,
        help="Processes for the tasks (default: one per CPU; 1: in this process).",
    )(f)  # fmt: skip


def _add_analyze(group: click.Group) -> None:
    from moetrace.tuner.analyze import PHASE_CHOICES

    @group.command("analyze")
    @click.argument("traces", nargs=-1, required=True)
    @click.option(
        "--phase",
        type=click.Choice(PHASE_CHOICES),
        default="all",
        show_default=True,
        help="Rows to analyze.",
    )
    @click.option(
        "--json",
        "json_out",
        type=OutputFile(),
        default=None,
        help="Write the full versioned report as JSON here.",
    )
    @click.option(
        "--cache-sizes",
        default=None,
        metavar="LIST",
        help="Per-layer cache sizes for LFU/Belady/predictors: integers or percentages of "
        "the experts, comma-separated (default 12.5%,25%,50%).",
    )
    @click.option("--seed", type=int, default=0, show_default=True, help="Seed of every split.")
    @_executor_options
    def analyze_cmd(
        traces: tuple[str, ...],
        phase: str,
        json_out: str | None,
        cache_sizes: str | None,
        seed: int,
        workers: int | None,
        ray: str | None,
    ) -> None:
        """Can caching or prefetching pay off? Mine traces for skewed reuse and groups.

        TRACES: one trace folder, or several of one model (folders or quoted globs such
        as "fleet/server-*"), analyzed as one workload: requests replayed trace after
        trace. The work runs as one task per MoE layer on a local process pool
        (--workers, default the CPUs) or a Ray cluster (--ray); the report is the same.

        Prints a verdict (cache size for 80%/90% hits under LRU and the optimum, which
        predictors beat frequency), then a per-layer table. See docs/analyze.md.

        A count trace (per-expert counts only, e.g. imported with sglang-counts) gets the
        skew section only (frequency, Gini, entropy, hot sets, Zipf exponent per layer).

        \b
        Example:
          moetrace analyze out/deepseek --json deepseek-analysis.json
          moetrace analyze out/llama4 --phase decode --cache-sizes 16,32,25%
          moetrace analyze "fleet/server-*" --workers 8
        """
        from moetrace.tuner.analyze import AnalyzeConfig, analyze
        from moetrace.tuner.mining.report import AnalysisReport

        sizes = None
        if cache_sizes is not None:
            sizes = tuple(x.strip() for x in cache_sizes.split(",") if x.strip())
        cfg = AnalyzeConfig(phase=phase, cache_sizes=sizes, seed=seed, workers=workers, ray=ray)
        report = analyze(list(traces), cfg)
        summary = _analyze_summary if isinstance(report, AnalysisReport) else _count_summary
        click.echo(summary(report))
        if json_out is not None:
            report.save(json_out)
            click.echo(f"\nreport written to {json_out}")


# ------------------------------------------------------------------ simulate / tune


def _fmt(v: Any, pct: bool = False) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4f}" if not pct else f"{100 * v:.1f}%"
    return str(v)


def _table(rows: list[dict[str, Any]]) -> str:
    cols = [
        ("name", "configuration"),
        ("hit_rate", "hit rate"),
        ("stall_per_token_ms", "stall/token ms"),
        ("tokens_per_s", "tokens/s"),
        ("prefetch_precision", "pf precision"),
        ("prefetch_recall", "pf recall"),
        ("bytes_moved", "GB moved"),
    ]
    cells = []
    for r in rows:
        line = []
        for key, _ in cols:
            v = r.get(key)
            if key == "bytes_moved" and v is not None:
                v = f"{v / 1e9:.2f}"
            elif key == "tokens_per_s" and v is not None:
                v = f"{v:.1f}"
            line.append(_fmt(v))
        cells.append(line)
    heads = [h for _, h in cols]
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(heads)]
    out = [
        "  ".join(
            h.ljust(w) if i == 0 else h.rjust(w)
            for i, (h, w) in enumerate(zip(heads, widths, strict=True))
        )
    ]
    for c in cells:
        out.append(
            "  ".join(
                x.ljust(w) if i == 0 else x.rjust(w)
                for i, (x, w) in enumerate(zip(c, widths, strict=True))
            )
        )
    return "\n".join(out)


def splits_table(splits: list[dict[str, Any]]) -> str:
    """One line per split: hit rates of the plan, LRU and Belady, gap closed, stall vs LRU."""
    head = (f"  {'split':<24} {'requests':>9} {'plan':>6} {'no pf':>6} {'lru':>6} "
            f"{'belady':>6} {'gap closed':>10} {'stall/LRU':>9}")  # fmt: skip
    out = [head]
    for sp in splits:
        rows = {r["name"]: r for r in sp["rows"]}
        plan, no_pf, lru = sp["rows"][0], sp["rows"][1], sp["rows"][2]
        bel = rows["belady (oracle bound, no prefetch)"]
        gap = no_pf.get("gap_closed_vs_lru_belady")
        gap_s = "-" if gap is None else f"{100 * gap:.0f}%"
        req = f"{sp['tune_requests']}/{sp['validation_requests']}"
        r = plan.get("stall_vs_lru")
        ratio = "-" if r is None else f"{r:.2f}x"
        name = sp["name"] + (" (judged)" if sp.get("judged_only") else "")
        out.append(
            f"  {name[:24]:<24} {req:>9} {_fmt(plan['hit_rate'])[:6]:>6} "
            f"{_fmt(no_pf['hit_rate'])[:6]:>6} {_fmt(lru['hit_rate'])[:6]:>6} "
            f"{_fmt(bel['hit_rate'])[:6]:>6} {gap_s:>10} {ratio:>9}"
        )
    return "\n".join(out)


def _param(
    ctx: click.Context, param: click.Parameter, values: tuple[str, ...]
) -> tuple[tuple[str, float], ...]:
    out = []
    for v in values:
        key, sep, num = v.partition("=")
        try:
            out.append((key, float(num)))
        except ValueError:
            sep = ""
        if not sep or not key:
            raise click.BadParameter(f"expected NAME=NUMBER, got {v!r}")
    return tuple(out)


def _queue_options(f: Callable[..., Any]) -> Callable[..., Any]:
    """The queue model's options, shared by simulate and tune."""
    for opt in reversed((
        click.option("--batch-size", type=click.IntRange(1), default=None,
                     help="Requests run together (queue model; tune default 1)."),
        click.option("--batching", type=click.Choice(["continuous", "static"]), default=None,
                     help="Queue model: join a running batch when a place frees (continuous) "
                     "or wait for the whole batch (static)."),
        click.option("--arrival-rate", type=click.FloatRange(min=0, min_open=True),
                     default=None, help="Queue model: Poisson arrivals at this many requests/s "
                     "(default: the recorded arrival times, else all waiting at once)."),
    )):  # fmt: skip
        f = opt(f)
    return f


def schedule_table(rows: list[dict[str, Any]]) -> str:
    """Schedulers side by side: hit rate, bytes moved, latencies, queue length."""
    out = [f"{'scheduler':<34} {'hit':>6} {'GB moved':>9} {'mean s':>8} {'p99 s':>8} "
           f"{'wait s':>7} {'waiting':>7} {'overtaken':>9}"]  # fmt: skip
    for r in rows:
        out.append(
            f"{r['name'][:34]:<34} {_fmt(r['hit_rate']):>6} {r['bytes_moved'] / 1e9:>9.3f} "
            f"{r['mean_latency_s']:>8.3f} {r['p99_latency_s']:>8.3f} {r['mean_wait_s']:>7.2f} "
            f"{r['mean_waiting']:>7.1f} {r['max_overtaken']:>9}"
        )
    return "\n".join(out)


def placement_table(splits: list[dict[str, Any]]) -> str:
    """Per split, the RAM placement written next to RAM as plain LRU over disk."""
    out = [f"{'split':<22} {'RAM tier':<34} {'tok/s':>9} {'stall ms/tok':>12} "
           f"{'dev hit':>7} {'RAM hit':>7} {'disk GB':>8}"]  # fmt: skip
    for sp in splits:
        for key in ("placement", "lru"):
            r = sp[key]
            out.append(
                f"{sp['name'][:22]:<22} {r['name'][:34]:<34} {r['tokens_per_s']:>9.1f} "
                f"{r['stall_per_token_ms']:>12.3f} {_fmt(r['hit_rate']):>7} "
                f"{_fmt(r['ram_hit_rate']):>7} {r['disk_bytes'] / 1e9:>8.3f}"
            )
    return "\n".join(out)


def _add_simulate(group: click.Group) -> None:
    @group.command("simulate")
    @click.argument("trace")
    @click.option(
        "--plan", "plan", type=click.Path(exists=True, dir_okay=False), help="Plan file to replay."
    )
    @click.option(
        "--policy",
        help="Eviction policy name (lru, lfu, fifo, static, pinned_lru, freq_lru, belady...).",
    )
    @click.option(
        "--param",
        "params",
        multiple=True,
        callback=_param,
        help="Policy parameter NAME=VALUE (repeatable).",
    )
    @click.option(
        "--prefetch",
        default="none",
        show_default=True,
        help="Prefetcher with --policy (none, transition, learned, activation_matrix, similar_request, speculative, oracle).",
    )
    @click.option(
        "--fetch",
        type=int,
        default=0,
        show_default=True,
        help="Experts prefetched per predicted layer (0: none; all for oracle/speculative).",
    )
    @click.option(
        "--lookahead", type=int, default=1, show_default=True, help="Prefetch lookahead in layers."
    )
    @click.option("--cache", type=int, help="Slots per layer (with --policy).")
    @click.option("--budget", help="Total budget: N%, bytes (4GiB) or slots (with --policy).")
    @click.option(
        "--layout", type=click.Choice(["uniform", "pool"]), default="uniform", show_default=True
    )
    @click.option("--hardware", help="Hardware profile name or JSON file (default pcie4-x16).")
    @click.option(
        "--order", type=click.Choice(["arrival", "forward"]), default="arrival", show_default=True
    )
    @click.option(
        "--granularity",
        type=click.Choice(["pass", "token"]),
        default="pass",
        show_default=True,
        help="Replay whole forward passes (union of experts) or token by token.",
    )
    @click.option(
        "--phase", type=click.Choice(["prefill", "decode"]), help="Replay only one phase."
    )
    @click.option("--bytes-per-expert", type=int, help="Override the manifest's bytes_per_expert.")
    @click.option("--per-layer", is_flag=True, help="Also print per-layer, per-phase metrics.")
    @click.option("--json", "json_out", type=OutputFile(), help="Write results as JSON here.")
    @_queue_options
    @click.option(
        "--scheduler", help="Replay as a served queue under this scheduler (fcfs, affinity)."
    )
    @click.option(
        "--scheduler-param", "scheduler_params", multiple=True, callback=_param, metavar="K=V",
        help="Scheduler parameter (repeatable), e.g. max_overtakes=16.",
    )  # fmt: skip
    def simulate_cmd(trace: str, json_out: str | None, per_layer: bool, **kw: Any) -> None:
        """Replay TRACE under a plan or a named policy; print hit rate, prefetch precision
        and recall, bytes moved, stall per token and modeled tokens/s.

        With --policy, policy tables (pins, frequencies, predictors) are fitted on TRACE
        itself (in-sample); use `moetrace tune` for an honest tune/validation split.

        \b
        Example:
          moetrace simulate out/llama4 --policy lru --cache 16
          moetrace simulate out/llama4 --policy belady --cache 16 --prefetch oracle
          moetrace simulate out/llama4 --plan plan.json --hardware pcie5-x16 --json sim.json
        """
        from moetrace.tuner.sim.trace import SimulateRequest, simulate_queue_trace, simulate_trace

        req = SimulateRequest(**kw)
        if req.queued:
            plan, queued = simulate_queue_trace(trace, req)
            q = queued.summary()
            click.echo(
                f"{q['scheduler']} {q['params']}: {q['requests']} requests ({q['arrivals']} "
                f"arrivals), batches of up to {q['batch_size']} ({q['batching']}), {q['steps']} steps"
            )
            click.echo(schedule_table([{"name": q["scheduler"], **q}]))
            if json_out:
                write_output(json_out, json.dumps(q, indent=1) + "\n")
                click.echo(f"wrote {json_out}")
            return
        plan, result = simulate_trace(trace, req)
        s = result.summary()
        click.echo(f"{result.label}: layout {plan.layout.kind}, {plan.layout.total_slots} slots")
        click.echo(_table([{"name": result.label, **s}]))
        if result.bytes_per_expert_assumed:
            click.echo(
                f"note: bytes_per_expert unknown, assumed {result.bytes_per_expert} (see --bytes-per-expert)"
            )
        if plan.ram is not None:
            ram = s["ram"]
            click.echo(
                f"RAM tier: {ram['slots']} slots ({ram['pinned']} pinned, {plan.ram.eviction.policy}"
                f", RAM prefetch {plan.ram.prefetch.name}): RAM hit rate "
                f"{_fmt(s['ram_hit_rate'])} of {s['ram_accesses']} device misses, "
                f"{s['disk_bytes'] / 1e9:.2f} GB read from disk, {s['ram_prefetch_issued']} "
                "RAM prefetches"
            )
        d = s.get("drift")
        if d:
            click.echo(
                f"drift: switched to {plan.adaptation.fallback} at access {d['switched_at_access']} "
                f"(plan {d['plan_hit_rate']:.3f} < LRU {d['lru_hit_rate']:.3f})"
                if d["switched"]
                else f"drift: no switch (shadow LRU hit rate {d['shadow_lru_hits'] / max(d['accesses'], 1):.3f})"
            )
        if per_layer:
            for r in result.per_layer():
                click.echo(
                    f"layer {r['layer']:>3} {r['phase']:<7} hit {r['hit_rate']:.4f} "
                    f"pf-precision {_fmt(r['prefetch_precision'])} pf-recall {_fmt(r['prefetch_recall'])} "
                    f"stall {r['stall_s']:.4f}s"
                )
        if json_out:
            write_output(json_out, json.dumps(result.to_json(), indent=1) + "\n")
            click.echo(f"wrote {json_out}")


def _add_tune(group: click.Group) -> None:
    @group.command("tune")
    @click.argument("traces", nargs=-1, required=True)
    @click.option(
        "--budget",
        required=True,
        help="Device budget: N% of all experts, bytes (4GB, 4GiB) or slots.",
    )
    @click.option(
        "--ram-budget",
        help="Host RAM for experts over a disk store (N%, bytes or slots): the plan gets a "
        "RAM tier and its placement is tuned (needs a profile with a disk link).",
    )
    @click.option(
        "--sweep", is_flag=True,
        help="Also model tokens/s over a grid of device and RAM sizes (moetrace size) and "
        "write the frontier into the plan (the dashboard's Plans page draws it).",
    )  # fmt: skip
    @click.option("--hardware", help="Hardware profile name or JSON file (default pcie4-x16).")
    @click.option("--out", "out", required=True, type=OutputFile(), help="Plan file to write.")
    @click.option(
        "--seed", type=int, default=0, show_default=True, help="Seed of the request split."
    )
    @click.option(
        "--validation-fraction",
        type=float,
        default=0.5,
        show_default=True,
        help="Share of requests held out for validation.",
    )
    @click.option(
        "--order", type=click.Choice(["arrival", "forward"]), default="arrival", show_default=True
    )
    @click.option(
        "--granularity", type=click.Choice(["pass", "token"]), default="pass", show_default=True
    )
    @click.option("--bytes-per-expert", type=int, help="Override the manifest's bytes_per_expert.")
    @click.option(
        "--split-by",
        "split_by",
        multiple=True,
        metavar="SPLIT",
        help="Drift splits besides the random one (repeatable): time, tag:KEY, source, shift. "
        "Default: time.",
    )
    @click.option(
        "--judge-by",
        "judge_by",
        multiple=True,
        metavar="SPLIT",
        help="Splits the plan is judged on but not chosen on (repeatable), e.g. shift.",
    )
    @_queue_options
    @click.option(
        "--no-schedule", is_flag=True, help="Skip the scheduler search (the plan keeps FCFS)."
    )
    @_executor_options
    def tune_cmd(
        traces: tuple[str, ...],
        out: str,
        split_by: tuple[str, ...],
        judge_by: tuple[str, ...],
        batch_size: int | None,
        batching: str | None,
        arrival_rate: float | None,
        no_schedule: bool,
        **kw: Any,
    ) -> None:
        """Tune an offloading plan on part of the requests of TRACES and report it against
        LRU, LFU, the peers' released policies and the Belady/oracle bounds on the rest.

        Besides a random split, the plan is judged on splits that model drift (early vs
        late requests; one tag value or source held out; hot experts permuted): candidates
        are chosen by minimax regret over the splits, every plan carries a drift detector
        that switches it to an online fallback when it trails LRU, and a plan that loses to
        LRU on any split by more than half a point is replaced by a safer one (said in the
        output). See docs/simulator.md.

        \b
        Example:
          moetrace tune out/llama4 --budget 12.5% --out plan.json
          moetrace tune out/demo --budget 25% --split-by time --split-by tag:domain --out p.json
          moetrace tune out/ds --budget 24GiB --hardware pcie5-x16 --seed 1 --out plan.json
          moetrace tune out/llama4 --budget 12.5% --judge-by shift --out plan.json
        """
        from moetrace.store.plan import save_plan
        from moetrace.tuner.sched.search import QueueSettings
        from moetrace.tuner.tune import TuneConfig, tune

        queue = None
        if not no_schedule:
            queue = QueueSettings(batch_size or 1, batching or "continuous", arrival_rate,
                                  kw["seed"])  # fmt: skip
        config = TuneConfig(**kw, splits=split_by or ("time",), judge=judge_by, queue=queue)
        result = tune(list(traces), config, on_progress=plain_progress("tune", "candidates"))
        save_plan(result.plan, out)
        p = result.plan
        pf = p.prefetch
        click.echo(
            f"chosen: {p.layout.kind} layout, {p.layout.total_slots} slots, eviction "
            f"{p.eviction.policy} {dict(p.eviction.params)}, prefetch {pf.name}"
            + (f" (fetch {pf.fetch}, lookahead {pf.lookahead})" if pf.name != "none" else "")
        )
        prov = p.provenance
        click.echo(
            f"validation on {len(prov.validation_requests)} held-out requests "
            f"(tuned on {len(prov.tune_requests)}, seed {prov.seed}):"
        )
        click.echo(_table(result.validation))
        gap = result.validation[1].get("gap_closed_vs_lru_belady")
        if gap is not None:
            click.echo(f"gap LRU->Belady closed without prefetch: {100 * gap:.1f}%")
        ratio = result.validation[0].get("stall_vs_lru")
        if ratio is not None:
            click.echo(f"stall per token vs LRU on demand: {ratio:.2f}x")
        click.echo("\nevery split (plan fitted on the split's tune requests, judged on the rest):")
        click.echo(splits_table(result.splits))
        if p.adaptation.window:
            click.echo(
                f"drift: switches to {p.adaptation.fallback} when the plan trails LRU by more "
                f"than {100 * p.adaptation.margin:g} points (windows of {p.adaptation.window} "
                f"accesses, half-life {p.adaptation.halflife:g})"
            )
        if result.fallback is not None:
            fb = result.fallback
            click.echo(
                f"fallback: the search chose {fb['from']!r}, which loses to LRU on "
                f"{fb['reason']}; wrote {fb['to']!r} instead"
            )
        placement = p.expected.get("placement")
        if placement and p.ram is not None:
            click.echo(
                f"\nRAM tier: {p.ram.slots} slots, placement {placement['written']!r} "
                f"({sum(len(r) for r in p.ram.eviction.pinned)} experts pinned, eviction "
                f"{p.ram.eviction.policy}, RAM prefetch {p.ram.prefetch.name}); vs RAM as "
                "LRU over disk on every split's validation requests:"
            )
            click.echo(placement_table(placement["splits"]))
            if placement["fallback"]:
                fb = placement["fallback"]
                click.echo(f"placement fallback: {fb['from']!r} is slower on {fb['reason']}")
        sched = p.expected.get("schedule")
        if sched:
            sc = p.schedule
            click.echo(
                f"\nschedule: {sc.scheduler} {dict(sc.params)} (batches of up to {sc.batch_size}, "
                f"{sc.batching}); vs FCFS on every split's validation requests:"
            )
            for sp in sched["splits"]:
                click.echo(f"[{sp['name']}]")
                click.echo(schedule_table(sp["rows"]))
            if sched["fallback"]:
                fb = sched["fallback"]
                click.echo(f"schedule fallback: {fb['from']!r} loses on {fb['reason']}; wrote FCFS")
        if "sizing" in p.expected:
            from moetrace.tuner.sizing import format_sizing

            click.echo("\nsizing (moetrace size):")
            click.echo(format_sizing(p.expected["sizing"]))
        click.echo(f"wrote {out} ({result.seconds:.1f}s)")
