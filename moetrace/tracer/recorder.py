"""RoutingRecorder: record the experts a transformers MoE model routes each token to.

Hooks are removable and attached only inside the ``with`` block. During a forward pass
they only keep references to the router's top-k tensors on the device; once per forward
pass (when the layer stack returns) the captures are concatenated and moved to the host
in one transfer, and rows are attributed to requests with vectorised numpy.

Attribution: call :meth:`RoutingRecorder.set_batch` with the request id of each batch row
before the forward passes of that batch (once per ``generate`` call, or before each step
of a continuous-batching loop), and :meth:`RoutingRecorder.end_request` when a request
is done. :meth:`RoutingRecorder.generate` does both around ``model.generate``.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping, Sequence
from types import TracebackType
from typing import Any

import numpy as np
import torch
from torch import nn

from moetrace.errors import ModelError
from moetrace.store.schema import Manifest, RequestRecord, SourceInfo
from moetrace.store.writer import TraceWriter
from moetrace.tracer.attribution import Attributor, Rows, eos_ids
from moetrace.tracer.calls import argument_reader, forward_mask
from moetrace.tracer.discover import ModelLayout, discover, model_info
from moetrace.tracer.speculate import attach_speculation, speculating

log = logging.getLogger(__name__)


def manifest_for(
    model: nn.Module,
    *,
    speculative: bool = False,
    name: str | None = None,
    tags: Mapping[str, str] | None = None,
    source: SourceInfo | None = None,
    layout: ModelLayout | None = None,
) -> Manifest:
    """The trace manifest describing ``model`` (layers, experts, top-k, expert bytes...)."""
    return Manifest(
        model=model_info(model, layout or discover(model), name),
        source=source or SourceInfo(kind="recorded", origin="RoutingRecorder"),
        tags=dict(tags or {}),
        speculative=speculative,
        gate_weights=True,
    )


MAX_DEFERRED = 256
"""Forward passes kept on the device before they are moved to the host at the latest."""


class _Capture:
    __slots__ = ("stack", "slots", "batch", "seq", "ids", "mask", "routes", "spec", "no_weights")

    def __init__(
        self, stack: int, slots: np.ndarray, batch: int, seq: int, ids: Any, mask: Any, n: int
    ) -> None:
        self.stack = stack
        self.slots = slots
        self.batch = batch
        self.seq = seq
        self.ids = ids
        self.mask = mask
        self.routes: list[Any] = [None] * n
        self.spec: list[Any] = [None] * n
        self.no_weights = False


def _run_key(cur: _Capture) -> tuple:
    """Forward passes with equal keys are attributed together."""
    return (
        cur.stack,
        id(cur.slots),
        cur.batch,
        cur.mask is None,
        cur.ids is None,
        cur.no_weights,
    )


class RoutingRecorder:
    """Context manager recording per-request, per-token, per-MoE-layer expert routing.

    ``out`` is a :class:`TraceWriter` (left open) or a trace directory (a writer is made
    from the model's manifest and closed on exit, committing every finished request).
    With ``speculative=True`` each MoE layer also records what the next MoE layer's
    router picks from this layer's output (see docs/tracer.md).
    """

    def __init__(
        self,
        model: nn.Module,
        out: TraceWriter | str | os.PathLike[str],
        *,
        speculative: bool = False,
        eos_token_id: int | Sequence[int] | None = None,
        name: str | None = None,
        tags: Mapping[str, str] | None = None,
        source: SourceInfo | None = None,
        first_forward: int = 0,
    ) -> None:
        self.model = model
        self.layout: ModelLayout = discover(model)
        self.speculative = speculative
        if eos_token_id is None:
            eos_token_id = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
        self.eos = eos_ids(eos_token_id)
        manifest = manifest_for(
            model, speculative=speculative, name=name, tags=tags, source=source, layout=self.layout
        )
        info = manifest.model
        if isinstance(out, TraceWriter):
            self.writer, self._owns_writer = out, False
            m = out.manifest.model
            if (m.moe_layers, m.num_experts, m.top_k) != (
                info.moe_layers,
                info.num_experts,
                info.top_k,
            ) or out.manifest.speculative != speculative:
                raise ModelError(
                    f"{out.path}: the writer's manifest (layers {list(m.moe_layers)}, "
                    f"{m.num_experts} experts, top-{m.top_k}, speculative={out.manifest.speculative}) "
                    f"does not match the model ({list(info.moe_layers)}, {info.num_experts}, "
                    f"top-{info.top_k}, speculative={speculative})"
                )
        else:
            self.writer, self._owns_writer = TraceWriter(out, manifest), True
        self.manifest = self.writer.manifest
        self.forwards = first_forward
        self._attr = Attributor([s.role for s in self.layout.stacks])
        self._slots: dict[str, int] = {}
        self._free: list[int] = []
        self._pending: dict[int, list[tuple]] = {}
        self._batch: np.ndarray | None = None
        self._batch_ids: tuple[str, ...] = ()
        self._cur: _Capture | None = None
        self._local = {pos: i for st in self.layout.stacks for i, pos in enumerate(st.sites)}
        self._handles: list[Any] = []
        self._warned = False
        self._deferred: list[_Capture] = []
        self.last_generated = 0
        """Tokens generated by the last :meth:`generate` call (all requests)."""
        self._layer_ids = [
            np.asarray([self.layout.layer_ids[p] for p in st.sites], np.int64)
            for st in self.layout.stacks
        ]

    # ------------------------------------------------------------------ hooks
    def __enter__(self) -> RoutingRecorder:
        try:
            self._attach()
        except BaseException:
            self._detach()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._detach()
        for rid in list(self._slots):
            self.writer.abandon_request(rid)
        if self._slots:
            log.warning("%d unfinished request(s) not recorded", len(self._slots))
        self._slots.clear()
        if self._owns_writer:
            self.writer.close()

    def _attach(self) -> None:
        sites = self.layout.sites
        for si, stack in enumerate(self.layout.stacks):
            self._handles.append(
                stack.owner.register_forward_pre_hook(self._stack_pre(si, stack), with_kwargs=True)
            )
            self._handles.append(stack.owner.register_forward_hook(self._stack_post))
            for local, pos in enumerate(stack.sites):
                site = sites[pos]
                self._handles += site.adapter.attach(site, self._sink(local))
        if self.speculative:
            self._handles += attach_speculation(self.layout, self._speculate)

    def _detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._cur = None
        self._deferred = []  # forward passes of requests that were never ended

    def _stack_pre(self, si: int, stack: Any) -> Any:
        arg = argument_reader(stack.owner)
        n = len(stack.sites)

        def hook(mod: nn.Module, args: tuple, kwargs: dict) -> None:
            self._cur = None
            if self._batch is None:
                if not self._warned:
                    log.warning("forward pass without set_batch(): not recorded")
                    self._warned = True
                return
            ids = arg(args, kwargs, "input_ids")
            ref = ids if isinstance(ids, torch.Tensor) else arg(args, kwargs, "inputs_embeds")
            if not isinstance(ref, torch.Tensor):
                return
            batch, seq = int(ref.shape[0]), int(ref.shape[1])
            if batch != len(self._batch):
                raise ModelError(
                    f"forward batch of {batch} rows but set_batch() named {len(self._batch)} requests"
                )
            mask = forward_mask(arg(args, kwargs, "attention_mask"), seq)
            self._cur = _Capture(
                si, self._batch, batch, seq, ids if isinstance(ids, torch.Tensor) else None, mask, n
            )

        return hook

    def _sink(self, local: int) -> Any:
        def sink(idx: torch.Tensor, weights: torch.Tensor | None) -> None:
            cur = self._cur
            if cur is not None and not speculating():
                cur.routes[local] = (idx, weights)
                if weights is None:
                    cur.no_weights = True

        return sink

    def _speculate(self, pos: int, predict: Callable[[], torch.Tensor]) -> None:
        cur = self._cur
        if cur is not None:
            cur.spec[self._local[pos]] = predict()

    def _stack_post(self, mod: nn.Module, args: tuple, out: Any) -> None:
        cur, self._cur = self._cur, None
        if cur is not None:
            self._deferred.append(cur)  # no work on the hot path; see _drain
            if len(self._deferred) >= MAX_DEFERRED:
                self._drain()

    # ------------------------------------------------------------------ host side
    def _drain(self) -> None:
        """Move every deferred forward pass to the host and attribute it, run by run."""
        pending, self._deferred = self._deferred, []
        begin = 0
        for i in range(1, len(pending) + 1):
            if i == len(pending) or _run_key(pending[i]) != _run_key(pending[begin]):
                self._drain_run(pending[begin:i])
                begin = i

    def _drain_run(self, run: list[_Capture]) -> None:
        """Consecutive forward passes of one stack over one batch: one transfer, one pass."""
        first = run[0]
        stack = self.layout.stacks[first.stack]
        n_layers, k, batch = len(stack.sites), self.manifest.top_k, first.batch
        for cur in run:
            if None in cur.routes:
                missing = [stack.sites[i] for i, r in enumerate(cur.routes) if r is None]
                names = [self.layout.sites[p].name for p in missing[:3]]
                raise ModelError(f"MoE layers {names} did not route in a forward pass")
        seqs = np.fromiter((cur.seq for cur in run), np.int64, len(run))
        bounds = np.zeros(len(run) + 1, np.int64)
        np.cumsum(seqs, out=bounds[1:])
        sizes = batch * seqs  # routed rows per layer of each forward pass
        routes = [r for cur in run for r in cur.routes]
        with torch.no_grad():
            try:
                idx = torch.cat([r[0] for r in routes])
            except RuntimeError as exc:
                shapes = sorted({tuple(r[0].shape) for r in routes})
                raise ModelError(
                    f"routing tensors of shapes {shapes} are not (tokens, top-{k})"
                ) from exc
            total = int(sizes.sum()) * n_layers
            if idx.dim() != 2 or idx.shape != (total, k):
                raise ModelError(
                    f"routing of {tuple(idx.shape)} does not match {total} token-layers x top-{k}"
                )
            parts = [idx.reshape(-1).to(torch.float64)]  # torch.cat promotes the rest
            has_w = not first.no_weights  # the same for the whole run
            if has_w:
                parts.append(torch.cat([r[1] for r in routes]).reshape(-1))
            spec_off = None
            if self.speculative:
                spec, spec_off = self._spec_parts(run, sizes, n_layers)
                if spec:
                    parts.append(torch.cat(spec).reshape(-1))
            device = idx.device
            if first.mask is not None:
                parts.append(torch.cat([c.mask for c in run], dim=1).to(device).reshape(-1))
            if first.ids is not None:
                parts.append(torch.cat([c.ids for c in run], dim=1).to(device).reshape(-1))
            host = torch.cat(parts).cpu().numpy()  # the one device -> host transfer
        off = 0

        def take(count: int) -> np.ndarray:
            nonlocal off
            off += count
            return host[off - count : off]

        n_route = total * k
        experts = take(n_route).reshape(total, k)
        weights = take(n_route).reshape(total, k) if has_w else None
        spec_rows = None
        if spec_off is not None:
            n_spec = int(spec_off[1])
            spec_rows = np.full((n_spec + 1, k), -1.0)  # last row: "no prediction"
            spec_rows[:n_spec] = take(n_spec * k).reshape(n_spec, k)
        cols = int(bounds[-1])
        shape = (batch, cols)
        valid = take(batch * cols).reshape(shape) > 0 if first.mask is not None else None
        ids = take(batch * cols).reshape(shape).astype(np.int64) if first.ids is not None else None
        if valid is None:
            valid = np.ones(shape, bool)
        rows = self._attr.attribute(first.stack, first.slots, valid, ids, self.eos, bounds)
        # routed row of (position, layer): forward f's layer l holds rows
        # [cap[f] + l * sizes[f], ... + sizes[f]), batch-major, each row seq[f] positions long
        fwd = rows.forward
        local = rows.row * seqs[fwd] + rows.col - bounds[fwd]
        cap = np.zeros(len(run), np.int64)
        np.cumsum(sizes[:-1] * n_layers, out=cap[1:])
        layer_step = np.arange(n_layers)
        at = (cap[fwd] + local)[:, None] + layer_step[None, :] * sizes[fwd][:, None]
        at = at.reshape(-1)
        e = experts[at].astype(np.int16)
        w = weights[at].astype(np.float32) if weights is not None else None
        sp = None
        if spec_off is not None and spec_rows is not None:
            entry = spec_off[0][fwd]  # (n, L) first spec row of each (forward, layer), -1 none
            sat = np.where(entry >= 0, entry + local[:, None], len(spec_rows) - 1).reshape(-1)
            sp = spec_rows[sat].astype(np.int16)
        self._store(rows, first.stack, first.slots, self.forwards, e, w, sp)
        self.forwards += len(run)

    def _spec_parts(
        self, run: list[_Capture], sizes: np.ndarray, n_layers: int
    ) -> tuple[list[torch.Tensor], tuple[np.ndarray, int]]:
        """Speculative tensors present, and per (forward, layer) their first row (-1: none)."""
        tensors: list[torch.Tensor] = []
        entry = np.full((len(run), n_layers), -1, np.int64)
        rows = 0
        for f, cur in enumerate(run):
            for layer, t in enumerate(cur.spec):
                if t is not None:
                    if tuple(t.shape) != (int(sizes[f]), self.manifest.top_k):
                        raise ModelError(
                            f"speculative routing of {tuple(t.shape)} does not match "
                            f"{int(sizes[f])} tokens x top-{self.manifest.top_k}"
                        )
                    tensors.append(t)
                    entry[f, layer] = rows
                    rows += int(sizes[f])
        return tensors, (entry, rows)

    def _store(
        self,
        rows: Rows,
        stack: int,
        slots: np.ndarray,
        first_forward: int,
        experts: np.ndarray,
        weights: np.ndarray | None,
        spec: np.ndarray | None,
    ) -> None:
        """Keep each batch row's recorded positions as one chunk of its request."""
        n_layers = len(self._layer_ids[stack])
        ends = np.cumsum(rows.counts).tolist()
        begin = 0
        for b, slot in enumerate(slots.tolist()):
            end = ends[b]
            if end > begin:
                sl = slice(begin, end)
                rl = slice(begin * n_layers, end * n_layers)
                self._pending[slot].append(
                    (
                        rows.token[sl],
                        rows.step[sl],
                        rows.phase[sl],
                        rows.forward[sl] + first_forward,
                        stack,
                        experts[rl],
                        None if weights is None else weights[rl],
                        None if spec is None else spec[rl],
                    )
                )
            begin = end

    def _columns(self, chunks: list[tuple]) -> dict[str, np.ndarray]:
        """Expand a request's chunks (one row per token) into writer columns (per layer)."""
        token, step, phase, forward, layer = [], [], [], [], []
        for tok, st, ph, fw, stack, *_ in chunks:
            ids = self._layer_ids[stack]
            n = len(ids)
            token.append(np.repeat(tok, n))
            step.append(np.repeat(st, n))
            phase.append(np.repeat(ph, n))
            forward.append(np.repeat(fw, n))
            layer.append(np.tile(ids, len(tok)))
        cols = {
            "token": np.concatenate(token),
            "step": np.concatenate(step),
            "phase": np.concatenate(phase),
            "forward": np.concatenate(forward),
            "layer": np.concatenate(layer),
            "experts": np.concatenate([c[5] for c in chunks]),
        }
        if chunks[0][6] is not None:
            cols["weights"] = np.concatenate([c[6] for c in chunks])
        if chunks[0][7] is not None:
            cols["speculative"] = np.concatenate([c[7] for c in chunks])
        return cols

    # ------------------------------------------------------------------ requests
    def set_batch(self, request_ids: Sequence[str]) -> None:
        """Name the request of each batch row for the following forward passes.

        A request id seen for the first time is begun; one seen before continues (its
        token counter goes on), so a continuous-batching loop may call this every step.
        """
        self._drain()
        slots = []
        for rid in request_ids:
            slot = self._slots.get(rid)
            if slot is None:
                self.writer.begin_request(rid)
                slot = self._free.pop() if self._free else len(self._slots) + len(self._free)
                self._attr.ensure(slot + 1)
                self._attr.reset(slot)
                self._slots[rid] = slot
                self._pending[slot] = []
            slots.append(slot)
        if len(set(slots)) != len(slots):
            raise ModelError(f"set_batch(): duplicate request ids in {list(request_ids)}")
        self._batch = np.asarray(slots, np.int64)
        self._batch_ids = tuple(request_ids)

    def tokens_recorded(self, request_id: str) -> int:
        """Tokens recorded so far for an open request (all stacks)."""
        self._drain()
        return int(self._attr.tokens[:, self._slots[request_id]].sum())

    def end_request(self, record: RequestRecord) -> None:
        """Hand a finished request's rows and its record to the writer."""
        self._drain()
        slot = self._slots.pop(record.request_id, None)
        if slot is None:
            raise ModelError(f"request {record.request_id!r} is not being recorded")
        chunks = self._pending.pop(slot)
        self._free.append(slot)
        if chunks:
            self.writer.add_activations(record.request_id, **self._columns(chunks))
        self.writer.end_request(record)

    def abandon(self, request_ids: Sequence[str]) -> None:
        """Drop open requests without writing them."""
        try:
            self._drain()
        except ModelError:  # a broken forward pass of the requests being dropped
            self._deferred = []
        for rid in request_ids:
            slot = self._slots.pop(rid, None)
            if slot is not None:
                self._pending.pop(slot, None)
                self._free.append(slot)
                self.writer.abandon_request(rid)

    def generate(
        self,
        request_ids: Sequence[str],
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        *,
        prompt_texts: Sequence[str | None] | None = None,
        tags: Sequence[Mapping[str, str]] | None = None,
        **generate_kwargs: Any,
    ) -> torch.Tensor:
        """``model.generate`` on one (left-padded) batch, recording and committing it."""
        default_eos = self.eos
        if "eos_token_id" in generate_kwargs:
            self.eos = eos_ids(generate_kwargs["eos_token_id"])
        try:
            return self._generate(
                request_ids, input_ids, attention_mask, prompt_texts, tags, generate_kwargs
            )
        finally:
            self.eos = default_eos

    def _generate(
        self,
        request_ids: Sequence[str],
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        prompt_texts: Sequence[str | None] | None,
        tags: Sequence[Mapping[str, str]] | None,
        generate_kwargs: dict[str, Any],
    ) -> torch.Tensor:
        self.set_batch(request_ids)
        try:
            out = self.model.generate(
                input_ids=input_ids, attention_mask=attention_mask, **generate_kwargs
            )
        except BaseException:
            self.abandon(request_ids)
            raise
        finally:
            self._batch = None
        seqs = out if isinstance(out, torch.Tensor) else out.sequences
        encdec = bool(getattr(self.model.config, "is_encoder_decoder", False))
        new = (seqs[:, 1:] if encdec else seqs[:, input_ids.shape[1] :]).cpu().numpy()
        is_eos = np.isin(new, self.eos) if self.eos.size else np.zeros(new.shape, bool)
        first = np.where(is_eos.any(axis=1), is_eos.argmax(axis=1) + 1, new.shape[1])
        mask = attention_mask if attention_mask is not None else torch.ones_like(input_ids)
        self.last_generated = int(first.sum())
        prompt_lens = mask.sum(dim=1).cpu().tolist()
        for b, rid in enumerate(request_ids):
            self.end_request(
                RequestRecord(
                    request_id=rid,
                    prompt_tokens=int(prompt_lens[b]),
                    generated_tokens=int(first[b]),
                    prompt_text=prompt_texts[b] if prompt_texts else None,
                    tags=tags[b] if tags else {},
                )
            )
        return seqs
