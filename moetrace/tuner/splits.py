"""Validation splits that model drift, for ``moetrace tune``.

A random split of the requests judges a plan on the traffic it was tuned on; serving
traffic drifts (new users, tasks, days). Each split here cuts the requests twice:
``tune``/``validation`` (the plan's tables are fitted on ``tune`` and judged on
``validation``) and, inside ``tune``, ``fit``/``select`` (candidates are fitted on ``fit``
and scored on ``select``) with the **same kind of shift**, so the search itself sees the
drift it will be judged on:

``random``   seeded random requests (in distribution; today's split)
``time``     early requests vs late ones, in arrival order (fit on the earliest, select on
             the next, validate on the latest)
``tag:KEY``  leave one value of the request tag ``KEY`` out (e.g. ``tag:domain``): one split
             per value, for the largest few values; select on another held-out value
``source``   leave one source out: one trace of several, or one import folder/file
             (the ``source_file`` tag importers write)
``shift``    a stress test: the time split with the expert ids of the ``select`` and
             ``validation`` requests permuted per layer (seeded), so their hot experts are
             other experts than the tune requests' (what new tasks or users do to a plan
             fitted on yesterday's traffic, and what a trace of one task cannot show)

Splits come from a registry (:data:`SPLITTERS`), keyed by the part before ``:``.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import PurePath

import numpy as np

from moetrace.errors import AnalysisError, ConfigError
from moetrace.store.reader import open_trace
from moetrace.tuner.policy.events import Events

MAX_GROUPS = 3
"""Tag or source splits: at most this many held-out values (the largest ones)."""


@dataclass(frozen=True)
class Split:
    """One way to cut the requests (indices into the loaded routing's request ids)."""

    name: str
    tune: np.ndarray
    validation: np.ndarray
    fit: np.ndarray
    select: np.ndarray
    shift: int | None = None
    """Seed of the per-layer expert permutation applied to the select and validation
    requests' events (see :func:`shift_events`); None: no permutation."""


@dataclass(frozen=True)
class SplitContext:
    """What splitters may look at: request count, per-request tags and source trace."""

    num_requests: int
    tags: Sequence[dict[str, str]]
    trace_of: np.ndarray  # per request, the index of its trace among the inputs
    fraction: float
    seed: int


def _sorted(a: np.ndarray | list[int]) -> np.ndarray:
    return np.sort(np.asarray(a, dtype=np.int64))


def _random(ctx: SplitContext, arg: str | None) -> list[Split]:
    n = ctx.num_requests
    if n < 2:
        raise AnalysisError(f"tuning needs at least 2 requests to split, the traces have {n}")
    perm = np.random.default_rng(ctx.seed).permutation(n)
    n_val = min(n - 1, max(1, int(round(n * ctx.fraction))))
    tune, val = _sorted(perm[n_val:]), _sorted(perm[:n_val])
    fit, select = tune, tune
    if len(tune) >= 3:
        inner = np.random.default_rng(ctx.seed + 1).permutation(tune)
        n_sel = max(1, len(inner) // 3)
        fit, select = _sorted(inner[n_sel:]), _sorted(inner[:n_sel])
    return [Split("random", tune, val, fit, select)]


def _time(ctx: SplitContext, arg: str | None) -> list[Split]:
    n = ctx.num_requests
    if n < 2:
        raise AnalysisError(f"tuning needs at least 2 requests to split, the traces have {n}")
    n_val = min(n - 1, max(1, int(round(n * ctx.fraction))))
    order = np.arange(n)
    tune, val = order[: n - n_val], order[n - n_val :]
    fit, select = tune, tune
    if len(tune) >= 3:
        n_sel = max(1, len(tune) // 3)
        fit, select = tune[: len(tune) - n_sel], tune[len(tune) - n_sel :]
    return [Split("time", tune, val, fit, select)]


def _shift(ctx: SplitContext, arg: str | None) -> list[Split]:
    sp = _time(ctx, arg)[0]
    return [Split("shift", sp.tune, sp.validation, sp.fit, sp.select, shift=ctx.seed + 7919)]


def shift_events(events: Events, seed: int) -> Events:
    """``events`` with every layer's expert ids permuted by a seeded permutation (one per
    layer): the same routing structure with other experts hot."""
    L, E = events.num_layers, events.num_experts
    rng = np.random.default_rng(seed)
    perm = np.stack([rng.permutation(E) for _ in range(L)]).astype(np.int64)
    ev_of = np.repeat(np.arange(events.num_events), np.diff(events.ptr))
    lay = events.layer.astype(np.int64)[ev_of]
    new = perm[lay, events.experts.astype(np.int64)]
    order = np.lexsort((new, ev_of))  # keep experts sorted within each event
    tok = events.token_experts.astype(np.int64)
    layers = np.broadcast_to(np.arange(L), tok.shape[:2])[..., None]
    tok = np.where(tok >= 0, perm[np.broadcast_to(layers, tok.shape), np.maximum(tok, 0)], -1)
    spec = events.spec_experts
    if spec is not None and events.spec_ptr is not None:
        sev = np.repeat(np.arange(events.num_events), np.diff(events.spec_ptr))
        target = np.minimum(events.layer.astype(np.int64)[sev] + 1, L - 1)
        spec = perm[target, spec.astype(np.int64)].astype(events.spec_experts.dtype)  # type: ignore[union-attr]
    return replace(
        events,
        experts=new[order].astype(events.experts.dtype),
        counts=events.counts[order],
        token_experts=tok.astype(events.token_experts.dtype),
        spec_experts=spec,
    )


def _groups(name: str, keys: Sequence[str | None], ctx: SplitContext) -> list[Split]:
    """Leave-one-group-out splits over the largest groups of ``keys`` (None: no group)."""
    counts = Counter(k for k in keys if k is not None)
    if len(counts) < 2:
        seen = ", ".join(sorted(counts)) or "none"
        raise ConfigError(f"split {name!r} needs requests with at least two values; found {seen}")
    keyed = np.array([k if k is not None else "" for k in keys], dtype=object)
    ranked = sorted(counts, key=lambda k: (-counts[k], k))
    out = []
    for g in ranked[:MAX_GROUPS]:
        val = _sorted(np.flatnonzero(keyed == g))
        tune = _sorted(np.flatnonzero(keyed != g))
        if len(tune) < 2:
            continue
        others = [h for h in ranked if h != g]
        fit, select = tune, tune
        h = others[0]
        sel = _sorted(np.flatnonzero(keyed == h))
        rest = np.setdiff1d(tune, sel)
        if len(rest) >= 1 and len(sel) >= 1:
            fit, select = rest, sel
        out.append(Split(f"{name}={g}", tune, val, fit, select))
    if not out:
        raise ConfigError(f"split {name!r}: no value leaves at least 2 requests to tune on")
    return out


def _tag(ctx: SplitContext, arg: str | None) -> list[Split]:
    if not arg:
        raise ConfigError("split 'tag' needs a tag name, e.g. --split-by tag:domain")
    return _groups(f"tag:{arg}", [t.get(arg) for t in ctx.tags], ctx)


def _source(ctx: SplitContext, arg: str | None) -> list[Split]:
    if len(set(ctx.trace_of.tolist())) > 1:
        return _groups("source", [f"trace {int(i)}" for i in ctx.trace_of], ctx)
    keys = []
    for t in ctx.tags:
        f = t.get("source_file")
        keys.append(str(PurePath(f).parent) if f and str(PurePath(f).parent) != "." else f)
    return _groups("source", keys, ctx)


SPLITTERS: dict[str, Callable[[SplitContext, str | None], list[Split]]] = {
    "random": _random,
    "time": _time,
    "tag": _tag,
    "source": _source,
    "shift": _shift,
}
DEFAULT_SPLITS = ("random", "time")


def request_tags(
    paths: Sequence[str | os.PathLike[str]], request_ids: Sequence[str]
) -> tuple[list[dict[str, str]], np.ndarray]:
    """Per routing request id (``rid``, or ``i:rid`` for the i-th of several traces), its
    tags and the index of its trace."""
    by_trace = []
    for path in paths:
        table = open_trace(path, validate=False).requests()
        ids = table.column("request_id").to_pylist()
        rows = table.column("tags").to_pylist()
        by_trace.append({r: dict(t or []) for r, t in zip(ids, rows, strict=True)})
    tags: list[dict[str, str]] = []
    trace_of: list[int] = []
    for rid in request_ids:
        i, local = 0, rid
        if len(paths) > 1:
            head, _, local = rid.partition(":")
            i = int(head)
        tags.append(by_trace[i].get(local, {}))
        trace_of.append(i)
    return tags, np.asarray(trace_of, dtype=np.int64)


def make_splits(
    specs: Sequence[str],
    request_ids: Sequence[str],
    *,
    paths: Sequence[str | os.PathLike[str]] = (),
    fraction: float = 0.5,
    seed: int = 0,
) -> list[Split]:
    """The splits named by ``specs`` (``random``, ``time``, ``tag:KEY``, ``source``,
    ``shift``) of the
    requests ``request_ids`` (arrival order) of the traces at ``paths``."""
    num_requests = len(request_ids)
    tags: Sequence[dict[str, str]] = [{}] * num_requests
    trace_of = np.zeros(num_requests, dtype=np.int64)
    if any(s.split(":", 1)[0] in ("tag", "source") for s in specs):
        tags, trace_of = request_tags(paths, request_ids)
    ctx = SplitContext(num_requests, tags, trace_of, fraction, seed)
    out: list[Split] = []
    for spec in dict.fromkeys(specs):
        kind, _, arg = spec.partition(":")
        fn = SPLITTERS.get(kind)
        if fn is None:
            raise ConfigError(
                f"unknown split {spec!r}; known: random, time, tag:KEY, source, shift"
            )
        out.extend(fn(ctx, arg or None))
    return out
