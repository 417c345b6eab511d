"""``record_server()``: send prompts to a running vLLM or SGLang server and write the
experts it routed each token to as a moetrace trace.

Requests run ``concurrency`` at a time (like real load) on worker threads, each with its
own kept-alive connection; the main thread writes finished requests and commits them at
least every ``commit_every`` seconds. Transient failures (connection reset, timeout,
HTTP 5xx / 429, a cut stream) are retried ``retries`` times with exponential backoff;
a request that still fails, or an answer with missing or mis-shaped routing, stops the
run with a :class:`ServerError` naming the prompt, after the requests already answered
are written. Ctrl-C keeps every answered request too. ``resume`` sends only the prompts
(completions) missing from the trace, so nothing is duplicated.

Trace rows: per completion one request; prefill rows from the prompt's routing (tokens
``0..P-1``, step 0), decode rows from the completion's (tokens ``P..``, steps ``1..``);
``forward`` numbers each request's passes one after another (the server's batching is
not visible). No gate weights (``gate_weights: false`` in the manifest). Requests carry
``arrival_time`` (when they were sent) and tags ``engine``, ``finish_reason``,
``latency_s``; with ``n > 1`` ids ``<prompt id>/<index>``, tags ``completion_index`` and
``prefill_shared`` (the prompt's rows are repeated in each, as if each ran alone).
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from moetrace import __version__
from moetrace.errors import ConfigError, ServerError
from moetrace.progress import OnProgress, Progress, default_interval
from moetrace.store.location import require_local
from moetrace.store.schema import DROPPED_EXPERT, Manifest, ModelInfo, RequestRecord, SourceInfo
from moetrace.store.writer import TraceWriter
from moetrace.tracer.engines import SGLANG_DTYPES, Completion, Engine, Sampling, get_engine
from moetrace.tracer.http import HttpClient
from moetrace.tracer.prompts import Prompt
from moetrace.tracer.record import (
    SETTINGS_TAG_PREFIX,
    RecordResult,
    as_prompts,
    check_resume_settings,
    existing_manifest,
    next_forward,
    prepare_out,
)
from moetrace.tracer.server_facts import (
    GivenFacts,
    layer_columns,
    model_from_answer,
    resolve_model,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServerRecordConfig:
    """How ``record_server`` talks to the server."""

    engine: str = "vllm"
    model_name: str | None = None
    """The served model to ask for (default: the only one the server lists)."""
    max_new_tokens: int = 32
    n: int = 1
    temperature: float = 0.0
    stream: bool = False
    concurrency: int = 8
    timeout: float = 600.0
    retries: int = 3
    backoff: float = 0.5
    commit_every: float = 1.0
    resume: bool = False
    routed_experts_dtype: str = "int32"
    """SGLang: the wire dtype when answers do not name it (SGLANG_ROUTED_EXPERTS_DTYPE)."""
    api_key: str | None = None
    facts: GivenFacts = field(default_factory=GivenFacts)

    def __post_init__(self) -> None:
        get_engine(self.engine)  # unknown engine -> one-line error
        if self.routed_experts_dtype not in SGLANG_DTYPES:
            raise ConfigError(f"routed_experts_dtype must be one of {sorted(SGLANG_DTYPES)}, "
                              f"got {self.routed_experts_dtype!r}")  # fmt: skip
        checks = {
            "max_new_tokens": self.max_new_tokens >= 1,
            "n": self.n >= 1,
            "concurrency": self.concurrency >= 1,
            "timeout": self.timeout > 0,
            "retries": self.retries >= 0,
            "backoff": self.backoff >= 0,
            "commit_every": self.commit_every >= 0,
            "temperature": self.temperature >= 0,
        }
        for name, ok in checks.items():
            if not ok:
                raise ConfigError(f"{name} out of range: {getattr(self, name)!r}")

    def settings(self, served: str) -> dict[str, str]:
        """The settings that shape the trace, stored as manifest tags ``record.*``."""
        return {
            "engine": self.engine,
            "server_model": served,
            "max_new_tokens": str(self.max_new_tokens),
            "n": str(self.n),
            "temperature": repr(self.temperature),
            "decoding": "greedy" if self.temperature == 0 else "sampled",
        }


def completion_id(prompt_id: str, index: int, n: int) -> str:
    return prompt_id if n == 1 else f"{prompt_id}/{index}"


def served_model(client: HttpClient, wanted: str | None, url: str) -> str:
    """The model id to ask for, from the server's ``/v1/models`` listing."""
    listing = client.get_json("/v1/models")
    data = listing.get("data") if isinstance(listing, dict) else None
    ids = [m.get("id") for m in data or [] if isinstance(m, dict) and m.get("id")]
    if not ids:
        raise ServerError(f"{url}/v1/models lists no model")
    if wanted is None:
        if len(ids) > 1:
            raise ServerError(f"{url} serves {len(ids)} models ({', '.join(ids)}): pass --model")
        return str(ids[0])
    if wanted not in ids:
        raise ServerError(f"{url} does not serve {wanted!r} (it serves {', '.join(ids)})")
    return wanted


class _Fetcher:
    """One prompt -> its completions, with retries; one connection per thread."""

    def __init__(self, url: str, cfg: ServerRecordConfig, engine: Engine, served: str) -> None:
        self.url, self.cfg, self.engine, self.served = url, cfg, engine, served
        self.sampling = Sampling(
            cfg.max_new_tokens, cfg.n, cfg.temperature, cfg.stream, cfg.routed_experts_dtype
        )
        self.width: int | None = None
        self.top_k: int | None = None
        self._local = threading.local()
        headers = {"Authorization": f"Bearer {cfg.api_key}"} if cfg.api_key else None
        self._headers = headers

    def client(self) -> HttpClient:
        c = getattr(self._local, "client", None)
        if c is None:
            c = self._local.client = HttpClient(self.url, self.cfg.timeout, self._headers)
        return c

    def __call__(self, prompt: Prompt) -> tuple[list[Completion], float, float]:
        path, body = self.engine.request(self.served, prompt.text, self.sampling)
        for attempt in range(self.cfg.retries + 1):
            sent = time.time()
            try:
                if self.sampling.stream:
                    answer: Any = list(self.client().post_events(path, body))
                else:
                    answer = self.client().post_json(path, body)
                comps = self.engine.completions(answer, self.sampling, self.width, self.top_k)
                return comps, sent, time.time() - sent
            except ServerError as exc:
                if not exc.transient or attempt == self.cfg.retries:
                    tries = f" (after {attempt + 1} attempts)" if attempt else ""
                    raise ServerError(f"{prompt.describe()}: {exc}{tries}",
                                      transient=exc.transient, status=exc.status) from None  # fmt: skip
                wait = self.cfg.backoff * 2**attempt
                log.info("%s: %s; retrying in %.1f s", prompt.id, exc, wait)
                time.sleep(wait)
        raise AssertionError("unreachable")


def _rows(comp: Completion, model: ModelInfo, where: str) -> dict[str, np.ndarray]:
    """The trace rows of one completion (forward numbers relative to its first pass)."""
    width = comp.prompt_routing.shape[1] if comp.prompt_routing.size else model.num_layers
    cols = layer_columns(model, width, where)
    parts = [r[:, cols, :] for r in (comp.prompt_routing, comp.decode_routing) if r.size]
    routing = np.concatenate(parts) if parts else np.zeros((0, len(cols), model.top_k), np.int64)
    if routing.shape[2] != model.top_k:
        raise ServerError(f"{where}: {routing.shape[2]} experts per token, the model routes "
                          f"top_k={model.top_k} (mis-shaped routing or wrong model facts)")  # fmt: skip
    bad = (routing >= model.num_experts) | (routing < DROPPED_EXPERT)
    if bad.any():
        value = int(routing[bad][0])
        raise ServerError(f"{where}: expert id {value} outside [0, {model.num_experts}) "
                          "(mis-shaped routing or wrong --num-experts)")  # fmt: skip
    p, tokens, layers = comp.prompt_tokens, routing.shape[0], len(cols)
    step = np.maximum(np.arange(tokens) - p + 1, 0)
    return {
        "token": np.repeat(np.arange(tokens, dtype=np.int64), layers),
        "step": np.repeat(step, layers),
        "phase": np.repeat((np.arange(tokens) >= p).astype(np.int8), layers),
        "forward": np.repeat(step, layers),
        "layer": np.tile(np.asarray(model.moe_layers, dtype=np.int64), tokens),
        "experts": routing.reshape(-1, model.top_k),
    }


class _Sink:
    """Writes answered prompts and commits them at least every ``commit_every`` s."""

    def __init__(self, writer: TraceWriter, model: ModelInfo, cfg: ServerRecordConfig,
                 done: frozenset[str], forward: int) -> None:  # fmt: skip
        self.writer, self.model, self.cfg, self.done = writer, model, cfg, done
        self.forward = forward
        self.generated = 0
        self._last = time.perf_counter()

    def write(self, prompt: Prompt, comps: list[Completion], sent: float, latency: float) -> None:
        for comp in comps:
            rid = completion_id(prompt.id, comp.index, self.cfg.n)
            if rid in self.done:
                continue
            rows = _rows(comp, self.model, f"{prompt.describe()} completion {comp.index}")
            rows["forward"] = rows["forward"] + self.forward
            tags = {**prompt.tags, "engine": self.cfg.engine, "latency_s": f"{latency:.4f}"}
            if comp.finish_reason:
                tags["finish_reason"] = str(comp.finish_reason)
            if self.cfg.n > 1:
                tags.update(completion_index=str(comp.index), prefill_shared="true")
            record = RequestRecord(
                request_id=rid,
                prompt_tokens=comp.prompt_tokens,
                generated_tokens=comp.generated_tokens,
                prompt_text=prompt.text,
                tags=tags,
                arrival_time=sent,
            )
            self.writer.write_request(record, **rows)
            self.forward += int(rows["step"].max()) + 1 if rows["step"].size else 0
            self.generated += comp.generated_tokens
        if time.perf_counter() - self._last >= self.cfg.commit_every:
            self.writer.flush()
            self._last = time.perf_counter()


def record_server(
    url: str,
    prompts: str | os.PathLike[str] | Sequence[Prompt | str],
    out: str | os.PathLike[str],
    *,
    config: ServerRecordConfig | None = None,
    progress: bool = True,
    on_progress: OnProgress | None = None,
) -> RecordResult:
    """Record the routing a server returns for ``prompts`` into the trace ``out``."""
    cfg = config or ServerRecordConfig()
    require_local(out, "record a trace")
    out = Path(out)
    prepare_out(out, cfg.resume)
    interval = default_interval() if progress else 0.0
    items = as_prompts(prompts)
    engine = get_engine(cfg.engine)
    existing = existing_manifest(out) if cfg.resume else None
    fetch = _Fetcher(url, cfg, engine, "")
    try:
        served = served_model(fetch.client(), cfg.model_name, url)
    except ServerError as exc:
        raise ServerError(f"cannot reach the server at {url}: {exc}") from None
    fetch.served = served
    settings = cfg.settings(served)
    model: ModelInfo | None
    if existing is not None:
        check_resume_settings(out, existing, settings)
        model = existing.model
    else:
        model = resolve_model(cfg.model_name or served, cfg.facts)
    if model is not None:
        fetch.width, fetch.top_k = model.num_layers, model.top_k
    elif cfg.engine == "sglang":  # flat routing: layers and top-k are needed to read it
        fetch.width, fetch.top_k = cfg.facts.num_layers, cfg.facts.top_k
        if fetch.width is None or fetch.top_k is None:
            raise ConfigError(f"sglang sends flat routing: pass --config DIR (the model's "
                              f"config.json), or --num-layers and --top-k for {served!r}")  # fmt: skip
    done = frozenset()
    if existing is not None:
        from moetrace.store.reader import open_trace

        done = frozenset(open_trace(out, validate=False).sql(
            "SELECT request_id FROM requests").column(0).to_pylist())  # fmt: skip
    todo = [p for p in items if any(completion_id(p.id, i, cfg.n) not in done
                                    for i in range(cfg.n))]  # fmt: skip
    skipped = len(items) - len(todo)
    start = time.perf_counter()
    bar = Progress(len(todo), label="record", unit="requests", enabled=progress,
                   on_progress=on_progress, interval=interval)  # fmt: skip
    first: tuple[Prompt, tuple[list[Completion], float, float]] | None = None
    if todo and model is None:  # the facts need the routing of a first answer
        first = (todo[0], fetch(todo[0]))
        model = model_from_answer(cfg.model_name or served, cfg.facts,
                                  first[1][0][0].prompt_routing, cfg.engine)  # fmt: skip
        todo = todo[1:]
    if model is None:  # nothing to send and no facts: nothing to write
        bar.close()
        return RecordResult(out, 0, skipped, 0, 0, 0.0)
    source = SourceInfo(kind="recorded", origin=f"moetrace record --server {url} "
                        f"--engine {cfg.engine}", tool_version=__version__)  # fmt: skip
    tags = {SETTINGS_TAG_PREFIX + k: v for k, v in settings.items()}
    manifest = existing or Manifest(model=model, source=source, tags=tags, gate_weights=False)
    writer = TraceWriter(out, manifest)
    sink = _Sink(writer, model, cfg, done, next_forward(out))
    interrupted = False
    with writer:
        try:
            if first is not None:
                sink.write(first[0], *first[1])
                bar.update(1)
            _run(todo, fetch, sink, bar, cfg.concurrency)
        except KeyboardInterrupt:
            interrupted = True
            log.warning("interrupted: every answered request is committed in %s", out)
        finally:
            bar.close()
    return RecordResult(
        path=out,
        requests_recorded=writer.requests_written,
        requests_skipped=skipped,
        generated_tokens=sink.generated,
        activations=writer.rows_written,
        seconds=time.perf_counter() - start,
        interrupted=interrupted,
    )


def _run(todo: list[Prompt], fetch: _Fetcher, sink: _Sink, bar: Progress, workers: int) -> None:
    """Fetch ``todo`` on ``workers`` daemon threads; write answers as they come.

    A failure stops the workers from taking new prompts; the answers of requests already
    in flight are written before it is raised. On Ctrl-C the answers already received are
    written and the in-flight requests dropped (their threads are daemons)."""
    tasks: queue.SimpleQueue[Prompt] = queue.SimpleQueue()
    for p in todo:
        tasks.put(p)
    results: queue.SimpleQueue[tuple[Prompt, Any, BaseException | None]] = queue.SimpleQueue()
    stop = threading.Event()

    def work() -> None:
        while not stop.is_set():
            try:
                p = tasks.get_nowait()
            except queue.Empty:
                return
            try:
                results.put((p, fetch(p), None))
            except BaseException as exc:  # handed to the main thread
                results.put((p, None, exc))

    threads = [threading.Thread(target=work, daemon=True, name=f"moetrace-fetch-{i}")
               for i in range(min(workers, len(todo)))]  # fmt: skip
    for t in threads:
        t.start()
    error: BaseException | None = None
    pending = len(todo)
    try:
        while pending and (error is None or any(t.is_alive() for t in threads)
                           or not results.empty()):  # fmt: skip
            try:
                p, answer, exc = results.get(timeout=0.2)
            except queue.Empty:
                continue
            pending -= 1
            if exc is not None:
                if error is None:
                    error = exc
                    stop.set()
                continue
            try:
                sink.write(p, *answer)
            except ServerError as bad:  # mis-shaped routing found while writing
                if error is None:
                    error = bad
                    stop.set()
                continue
            bar.update(1)
    except KeyboardInterrupt:
        stop.set()
        while not results.empty():
            p, answer, exc = results.get()
            if exc is None:
                sink.write(p, *answer)
        raise
    if error is not None:
        raise error
