"""CLI commands of the store: import, inspect, sql."""

from __future__ import annotations

import csv
import io
import json
from typing import Any

import click
import pyarrow as pa

from moetrace.cli_params import plain_progress
from moetrace.store.importers import CountImportResult, import_trace
from moetrace.store.query import query_trace
from moetrace.store.summary import summarize

OUTPUT_FORMATS = ("table", "csv", "json")
TABLE_DEFAULT_LIMIT = 100


def _kv_lines(items: list[tuple[str, Any]]) -> str:
    width = max(len(k) for k, _ in items)
    return "\n".join(f"{k.ljust(width)}  {v}" for k, v in items)


def _size(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{n} B"  # pragma: no cover


def _cell(value: Any) -> str:
    if value is None:
        return "NULL"
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


def format_table(table: pa.Table) -> str:
    """Aligned text: numbers right-aligned, everything else left-aligned."""
    names = table.column_names
    if not names:
        return "(no result)"
    rows = [[_cell(_text(v)) for v in row.values()] for row in _rows(table)]
    numeric = [
        pa.types.is_integer(f.type) or pa.types.is_floating(f.type) or pa.types.is_decimal(f.type)
        for f in table.schema
    ]
    widths = [max([len(n)] + [len(r[i]) for r in rows]) for i, n in enumerate(names)]

    def line(cells: list[str]) -> str:
        out = [
            c.rjust(w) if num else c.ljust(w)
            for c, w, num in zip(cells, widths, numeric, strict=True)
        ]
        return "  ".join(out).rstrip()

    parts = [line(names), "  ".join("-" * w for w in widths)]
    parts += [line(r) for r in rows]
    return "\n".join(parts)


def _jsonable(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


def _rows(table: pa.Table) -> list[dict[str, Any]]:
    """Rows as Python values, maps (such as requests.tags) as dicts."""
    maps = [f.name for f in table.schema if pa.types.is_map(f.type)]
    rows = table.to_pylist()
    for row in rows:
        for name in maps:
            if row[name] is not None:
                row[name] = dict(row[name])
    return rows


def _text(value: Any) -> Any:
    return json.dumps(_jsonable(value)) if isinstance(value, (dict, list, tuple)) else value


def format_csv(table: pa.Table) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(table.column_names)
    for row in _rows(table):
        writer.writerow(["" if v is None else _text(v) for v in row.values()])
    return buf.getvalue().rstrip("\n")


def _count_import_lines(result: CountImportResult) -> list[tuple[str, Any]]:
    return [
        ("trace", result.out),
        ("model", result.model_name),
        ("files", f"{result.files_imported} imported, "
                  f"{result.files_skipped_existing} skipped (already present)"),
        ("counts", f"{result.counted} expert activations over {result.passes} forward passes "
                   "(counts only: a count trace)"),
        ("inferred", ", ".join(result.inferred) or "nothing"),
        ("time", f"{result.seconds:.1f} s"),
    ]  # fmt: skip


@click.command("import")
@click.argument("format", metavar="FORMAT")
@click.argument("src", type=click.Path(path_type=str))
@click.argument("out", type=click.Path(path_type=str))
@click.option("--model-name", help="Model name (default: from SRC's folder names).")
@click.option("--num-layers", type=click.IntRange(min=1), help="Decoder layers of the model.")
@click.option("--num-experts", type=click.IntRange(min=1), help="Routed experts per MoE layer.")
@click.option("--top-k", type=click.IntRange(min=1), help="Experts selected per token.")
@click.option("--shared-experts", type=click.IntRange(min=0), help="Shared experts (not logged).")
@click.option("--bytes-per-expert", type=click.IntRange(min=1), help="Bytes of one routed expert.")
@click.option("--skip-bad", is_flag=True, help="Skip malformed files (listed at the end).")
@click.option("--no-progress", is_flag=True, help="No progress bar.")
def import_cmd(
    format: str,
    src: str,
    out: str,
    model_name: str | None,
    num_layers: int | None,
    num_experts: int | None,
    top_k: int | None,
    shared_experts: int | None,
    bytes_per_expert: int | None,
    skip_bad: bool,
    no_progress: bool,
) -> None:
    """Import published trace files at SRC into the moetrace trace OUT.

    FORMAT is patterns-behind-chaos (per-request JSON), moe-beyond (per-prompt CSV),
    vllm-offline (LLM.generate outputs saved as JSONL), sglang-dump (SGLang's expert
    distribution recorder, per_token .pt), byo (your own Parquet / CSV / JSONL table) or
    sglang-counts (SGLang's stat-mode .pt: a count trace of per-expert counts).

    Facts the files lack come from the flags, from the trace already in OUT, from the
    known-models table (llama4-maverick, deepseek-v2-lite, ...) or from the data; the
    summary lists which were inferred. Requests already in OUT are skipped, so an
    interrupted import can be rerun: by request id, and by file name and content, so the
    same files copied to another folder are not imported twice. See docs/importers.md.

    \b
    Example:
      moetrace import moe-beyond traces/deepseek-v2-lite-chat/puffin-1-1000 out/ds
      moetrace import patterns-behind-chaos traces/llama4 out/l4 --skip-bad
    """
    result = import_trace(
        format,
        src,
        out,
        model_name=model_name,
        num_layers=num_layers,
        num_experts=num_experts,
        top_k=top_k,
        shared_experts=shared_experts,
        bytes_per_expert=bytes_per_expert,
        skip_bad=skip_bad,
        progress=not no_progress,
        on_progress=plain_progress("import", "files"),
    )
    if isinstance(result, CountImportResult):
        click.echo(_kv_lines(_count_import_lines(result)))
        for field_name, reason in result.inferred.items():
            click.echo(f"  {field_name}: {reason}")
        return
    same = result.requests_skipped_same_content
    items: list[tuple[str, Any]] = [
        ("trace", result.out),
        ("model", result.model_name),
        (
            "requests",
            f"{result.requests_imported} imported, "
            f"{result.requests_skipped_existing} skipped (already present"
            + (f"; {same} of them the same files from another path" if same else "")
            + ")",
        ),
        ("tokens", f"{result.prefill_tokens} prefill, {result.decode_tokens} decode"),
        ("activations", result.activations),
        ("bad files", len(result.bad_files)),
        ("inferred", ", ".join(result.inferred) or "nothing"),
        ("time", f"{result.seconds:.1f} s"),
    ]
    click.echo(_kv_lines(items))
    for field_name, reason in result.inferred.items():
        click.echo(f"  {field_name}: {reason}")
    for bad in result.bad_files:
        click.echo(f"skipped bad file: {bad.reason}")


@click.command("inspect")
@click.argument("trace", type=click.Path(path_type=str))
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
def inspect_cmd(trace: str, as_json: bool) -> None:
    """Summarize the trace at TRACE: model, requests, tokens, layers, size.

    \b
    Example:
      moetrace inspect out/ds
      moetrace inspect out/ds --json
    """
    s = summarize(trace)
    if as_json:
        click.echo(json.dumps(_jsonable(s.to_dict()), indent=2, sort_keys=True))
        return
    layers = list(s.moe_layers)
    shown = ", ".join(map(str, layers[:12])) + (", ..." if len(layers) > 12 else "")
    items: list[tuple[str, Any]] = [
        ("trace", s.path),
        ("model", s.model_name + (f" ({s.architecture})" if s.architecture else "")),
        ("requests", s.requests),
        ("tokens", f"{s.prefill_tokens} prefill, {s.decode_tokens} decode"),
        ("activations", s.activations),
        ("layers", f"{s.num_layers} ({s.num_moe_layers} MoE: {shown})"),
        ("experts", f"{s.num_experts} routed, top-{s.top_k}, {s.shared_experts} shared"),
        ("bytes/expert", s.bytes_per_expert if s.bytes_per_expert else "unknown"),
        ("weights", "yes" if s.has_weights else "no"),
        ("speculative", "yes" if s.speculative else "no"),
        ("parts", s.parts),
        ("size", f"{_size(s.size_bytes)} ({s.bytes_per_activation:.2f} B/activation)"),
        ("inferred", ", ".join(s.inferred) or "nothing"),
        (
            "source",
            f"{s.source.get('kind')} {s.source.get('origin') or ''} "
            f"{s.source.get('path') or ''}".strip(),
        ),
    ]
    if s.content == "counts":
        items[2:5] = [
            ("content", "per-expert counts only (no token-level routing)"),
            ("counts", f"{s.counted} expert activations from {s.count_sources} source(s)"),
        ]
    if s.incomplete_import:
        items.append(("WARNING", "an import into this trace did not finish; rerun it"))
    click.echo(_kv_lines(items))


@click.command("sql")
@click.argument("trace", type=click.Path(path_type=str))
@click.argument("query")
@click.option(
    "--format", "fmt", type=click.Choice(OUTPUT_FORMATS), default="table", show_default=True
)
@click.option(
    "--limit",
    type=click.IntRange(min=0),
    default=None,
    help=f"Rows to print (default {TABLE_DEFAULT_LIMIT} for table, all for csv/json).",
)
def sql_cmd(trace: str, query: str, fmt: str, limit: int | None) -> None:
    """Run a DuckDB SQL QUERY on the trace at TRACE.

    Views: activations (one row per request, token, MoE layer; experts and weights
    lists), activations_raw (columns e0.., w0..), activations_long (one row per
    selected expert), requests, manifest, moe_layers, counts (per-expert activation
    counts: the only data of a count trace).

    Read-only: only queries run (SELECT, WITH, FROM, VALUES, DESCRIBE, SUMMARIZE, SHOW,
    EXPLAIN of a query); COPY, EXPORT, ATTACH, INSTALL, LOAD, SET, CREATE, INSERT... are
    refused, and so is reading any file but the trace's own parts (no read_csv, no network,
    no extensions). Save results with --format csv or json and a shell redirect.

    \b
    Example:
      moetrace sql out/ds "SELECT layer, count(*) AS n FROM activations GROUP BY layer"
      moetrace sql out/ds "SELECT * FROM requests" --format csv --limit 10 > requests.csv
    """
    from moetrace.store.sql import open_read_only

    if limit is None and fmt == "table":
        limit = TABLE_DEFAULT_LIMIT
    table = query_trace(open_read_only(trace), query, limit=None if limit is None else limit + 1)
    more = limit is not None and table.num_rows > limit
    if limit is not None:
        table = table.slice(0, limit)
    if fmt == "csv":
        click.echo(format_csv(table))
    elif fmt == "json":
        click.echo(json.dumps(_jsonable(_rows(table)), indent=2))
    else:
        click.echo(format_table(table))
        if more:
            click.echo(f"(first {limit} rows shown; use --limit)")


def register(group: click.Group) -> None:
    """Add the store's commands to the top-level group."""
    for command in (import_cmd, inspect_cmd, sql_cmd):
        group.add_command(command)
