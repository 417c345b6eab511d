"""Many traces of one model as one workload: locations and globs, one model check, routing.

A fleet writes one trace folder per server (or per day); ``analyze`` and ``tune`` take
them all. :func:`expand_locations` turns the command line's folders and globs (quoted
``"traces/day-*"`` as well as what the shell expanded) into trace folders;
:func:`open_traces` opens them and checks they are traces of one model (same config
fingerprint, MoE layers, experts and top-k; otherwise one error naming both);
:func:`load_routing_many` concatenates their routing in the order given: the requests of
the first trace in arrival order, then those of the second, and so on. With more than one
trace a request id is prefixed with its trace's position (``"1:req-7"``), since servers
number their requests independently; so are forward passes offset past the previous
trace's.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq

from moetrace.errors import AnalysisError, TraceFormatError
from moetrace.store import location
from moetrace.store import schema as S
from moetrace.store.arrays import Routing, load_routing
from moetrace.store.location import arrow_path
from moetrace.store.reader import Trace, open_trace


def expand_locations(specs: Sequence[str | os.PathLike[str]]) -> list[str]:
    """Trace folders named by ``specs``: each a folder or a glob (sorted matches that hold
    a manifest). Order kept; a folder named twice is an error (its requests would count
    twice); a glob that matches no trace folder is an error."""
    if not specs:
        raise AnalysisError("no traces given")
    out: list[str] = []
    for spec in specs:
        text = os.fspath(spec)
        matches = location.glob(text) if location.is_glob(text) else [text]
        if not matches:
            raise TraceFormatError(f"{text}: no trace folder (with {S.MANIFEST_NAME}) matches")
        out.extend(matches)
    _check_unique(out)
    return out


def _check_unique(locations: Sequence[str]) -> None:
    seen: set[str] = set()
    for loc in locations:
        key = loc if "://" in loc else str(Path(loc).resolve())
        if key in seen:
            raise AnalysisError(f"{loc}: trace given twice (its requests would count twice)")
        seen.add(key)


def same_model(first: S.Manifest, other: S.Manifest) -> bool:
    a, b = first.model, other.model
    return (a.fingerprint, tuple(a.moe_layers), a.num_experts, a.top_k) == (
        b.fingerprint, tuple(b.moe_layers), b.num_experts, b.top_k,
    )  # fmt: skip


def open_traces(
    specs: Sequence[str | os.PathLike[str] | Trace], *, validate: bool = True
) -> list[Trace]:
    """Open every trace named by ``specs`` (folders, globs or open traces), checking that
    all are traces of one model."""
    if not specs:
        raise AnalysisError("no traces given")
    traces: list[Trace] = []
    for spec in specs:
        if isinstance(spec, Trace):
            traces.append(spec)
        else:
            traces.extend(open_trace(loc, validate=validate) for loc in expand_locations([spec]))
    _check_unique([str(t.path) for t in traces])
    first = traces[0]
    for t in traces[1:]:
        if not same_model(first.manifest, t.manifest):
            a, b = first.manifest.model, t.manifest.model
            raise AnalysisError(
                f"{t.path}: trace is of another model than {first.path} ({b.name}: fingerprint "
                f"{b.fingerprint[:12]}, {len(b.moe_layers)} MoE layers, {b.num_experts} experts, "
                f"top-{b.top_k}; vs {a.name}: {a.fingerprint[:12]}, {len(a.moe_layers)}, "
                f"{a.num_experts}, top-{a.top_k})"
            )
    return traces


def request_ids(traces: Sequence[Trace]) -> list[str]:
    """Every request id in replay order, prefixed with the trace's position when several."""
    out: list[str] = []
    for i, t in enumerate(traces):
        ids = t.requests().column("request_id").to_pylist()
        out.extend(ids if len(traces) == 1 else (f"{i}:{r}" for r in ids))
    return out


def concat_routing(parts: Sequence[Routing]) -> Routing:
    """Routing of several traces one after another (ids prefixed, forwards offset)."""
    if len(parts) == 1:
        return parts[0]
    first = parts[0]
    offs = np.cumsum([0] + [len(p.request_ids) for p in parts])
    fwd_offs = np.cumsum([0] + [int(p.forward.max()) + 1 if p.num_rows else 0 for p in parts])
    cat = np.concatenate
    spec = None
    if all(p.speculative is not None for p in parts):
        spec = cat([p.speculative for p in parts])  # type: ignore[misc]
    return Routing(
        request_ids=tuple(f"{i}:{r}" for i, p in enumerate(parts) for r in p.request_ids),
        moe_layers=first.moe_layers,
        num_experts=first.num_experts,
        top_k=first.top_k,
        request=cat([p.request + offs[i] for i, p in enumerate(parts)]).astype(np.int32),
        token=cat([p.token for p in parts]),
        step=cat([p.step for p in parts]),
        phase=cat([p.phase for p in parts]),
        forward=cat([p.forward + fwd_offs[i] for i, p in enumerate(parts)]),
        layer=cat([p.layer for p in parts]),
        experts=cat([p.experts for p in parts]),
        speculative=spec,
    )


def load_routing_many(
    traces: Sequence[Trace],
    *,
    phase: str | None = None,
    order: str = "arrival",
    layers: Sequence[int] | None = None,
) -> Routing:
    """:func:`~moetrace.store.arrays.load_routing` of every trace, concatenated in order."""
    return concat_routing(
        [load_routing(t, phase=phase, order=order, layers=layers) for t in traces]
    )


def shard_parts(trace: Trace, rows: int) -> list[tuple[int, ...]]:
    """The trace's committed parts in groups of consecutive parts holding at least
    ``rows`` activation rows (the last group may hold fewer): shards of its requests in
    replay order. That needs parts in arrival order (one writer commits them so); when
    their arrivals interleave (several writers at once), the whole trace is one shard."""
    n = len(trace.parts)
    if n <= 1:
        return [tuple(range(n))]
    spans = []
    for part in trace.parts:
        fs, where = arrow_path(part.requests)
        arrival = pq.read_table(where, columns=["arrival"], filesystem=fs).column(0)
        spans.append((pc.min(arrival).as_py(), pc.max(arrival).as_py()))
    ordered = all(
        a[1] is not None and b[0] is not None and a[1] < b[0]
        for a, b in zip(spans[:-1], spans[1:], strict=True)
    )
    if not ordered:
        return [tuple(range(n))]
    groups: list[tuple[int, ...]] = []
    current: list[int] = []
    held = 0
    for i, part in enumerate(trace.parts):
        current.append(i)
        held += part.activation_rows
        if held >= rows:
            groups.append(tuple(current))
            current, held = [], 0
    if current:
        groups.append(tuple(current))
    return groups
