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

import inspect
import logging
import os
from collections.abc import Mapping, Sequence
from types import TracebackType
from typing import Any

import numpy as np
import torch
from torch import nn

from moetrace.errors import ModelError
from moetrace.store.schema import Manifest, RequestRecord, SourceInfo
from moetrace.store.writer import TraceWriter
from moetrace.tracer.attribution import Attributor
from moetrace.tracer.discover import ModelLayout, discover, model_info, pre_moe_norm

log = logging.getLogger(__name__)


def _eos_array(eos: int | Sequence[int] | None) -> np.ndarray:
    if eos is None:
        return np.zeros(0, np.int64)
    return np.atleast_1d(np.asarray(eos, np.int64))


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
    )


MAX_DEFERRED = 256
"""Forward passes kept on the device before they are moved to the host at the latest."""


class _Capture:
    __slots__ = ("stack", "slots", "batch", "seq", "ids", "mask", "routes", "spec")

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
        self.eos = _eos_array(eos_token_id)
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
        self._speculating = False
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
                if self.speculative and local + 1 < len(stack.sites):
                    nxt = stack.sites[local + 1]
                    hook = self._spec_hook(local, sites[nxt], self.layout.layer_modules[nxt])
                    self._handles.append(self.layout.layer_modules[pos].register_forward_hook(hook))

    def _detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._cur = None
        self._deferred = []  # forward passes of requests that were never ended

    def _stack_pre(self, si: int, stack: Any) -> Any:
        params = list(inspect.signature(stack.owner.forward).parameters)
        pos = {n: i for i, n in enumerate(params)}

        def arg(args: tuple, kwargs: dict, name: str) -> Any:
            if name in kwargs:
                return kwargs[name]
            i = pos.get(name)
            return args[i] if i is not None and i < len(args) else None

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
            mask = arg(args, kwargs, "attention_mask")
            if not (isinstance(mask, torch.Tensor) and mask.dim() == 2 and mask.shape[1] >= seq):
                mask = None
            else:
                mask = mask[:, -seq:]
            self._cur = _Capture(
                si, self._batch, batch, seq, ids if isinstance(ids, torch.Tensor) else None, mask, n
            )

        return hook

    def _sink(self, local: int) -> Any:
        def sink(idx: torch.Tensor, weights: torch.Tensor | None) -> None:
            cur = self._cur
            if cur is not None and not self._speculating:
                cur.routes[local] = (idx, weights)

        return sink

    def _spec_hook(self, local: int, nxt: Any, next_layer: nn.Module) -> Any:
        norm = pre_moe_norm(next_layer)
        if norm is None:
            log.warning(
                "no pre-MoE norm found in %s; speculating on the raw hidden state", nxt.name
            )

        def hook(mod: nn.Module, args: tuple, out: Any) -> None:
            cur = self._cur
            if cur is None or self._speculating:
                return
            hidden = out[0] if isinstance(out, (tuple, list)) else out
            self._speculating = True
            try:
                with torch.no_grad():
                    h = hidden.reshape(-1, hidden.shape[-1])
                    cur.spec[local] = nxt.adapter.predict(nxt, norm(h) if norm is not None else h)
            finally:
                self._speculating = False

        return hook

    def _stack_post(self, mod: nn.Module, args: tuple, out: Any) -> None:
        cur, self._cur = self._cur, None
        if cur is not None:
            self._deferred.append(cur)  # no work on the hot path; see _drain
            if len(self._deferred) >= MAX_DEFERRED:
                self._drain()

    # ------------------------------------------------------------------ host side
    def _parts(self, cur: _Capture) -> tuple[list[torch.Tensor], bool]:
        stack = self.layout.stacks[cur.stack]
        missing = [stack.sites[i] for i, r in enumerate(cur.routes) if r is None]
        if missing:
            names = [self.layout.sites[p].name for p in missing[:3]]
            raise ModelError(f"MoE layers {names} did not route in a forward pass")
        tokens = cur.batch * cur.seq
        k = self.manifest.top_k
        # every adapter hands (tokens, k) tensors: stack as they are, flatten once
        idx = torch.stack([r[0] for r in cur.routes])
        if idx.numel() != len(cur.routes) * tokens * k:
            raise ModelError(f"routing of {idx.shape} does not match {tokens} tokens x top-{k}")
        parts = [idx.reshape(-1).to(torch.float64)]  # torch.cat promotes the rest
        has_w = all(r[1] is not None for r in cur.routes)
        if has_w:
            parts.append(torch.stack([r[1] for r in cur.routes]).reshape(-1))
        if self.speculative:
            last = torch.full_like(cur.routes[-1][0], -1)
            spec = [s if s is not None else last for s in cur.spec]
            parts.append(torch.stack(spec).reshape(-1))
        if cur.mask is not None:
            parts.append(cur.mask.to(idx.device).reshape(-1))
        if cur.ids is not None:
            parts.append(cur.ids.to(idx.device).reshape(-1))
        return parts, has_w

    def _drain(self) -> None:
        """Move every deferred forward pass to the host in one transfer and attribute it."""
        pending, self._deferred = self._deferred, []
        if not pending:
            return
        with torch.no_grad():
            packed = [self._parts(cur) for cur in pending]
            flat = [p for parts, _ in packed for p in parts]
            host = torch.cat(flat).cpu().numpy()  # the one device -> host transfer
        off = 0
        k = self.manifest.top_k
        for cur, (_, has_w) in zip(pending, packed, strict=True):
            tokens = cur.batch * cur.seq
            shape = (len(cur.routes), tokens, k)
            n_route = shape[0] * tokens * k

            def take(count: int) -> np.ndarray:
                nonlocal off
                off += count
                return host[off - count : off]

            experts = take(n_route).reshape(shape).astype(np.int16)
            weights = take(n_route).reshape(shape).astype(np.float32) if has_w else None
            spec = take(n_route).reshape(shape).astype(np.int16) if self.speculative else None
            bs = (cur.batch, cur.seq)
            valid = take(tokens).reshape(bs) > 0 if cur.mask is not None else np.ones(bs, bool)
            ids = take(tokens).reshape(bs).astype(np.int64) if cur.ids is not None else None
            rows = self._attr.attribute(
                cur.stack, cur.slots, valid, ids, self.eos, experts, weights, spec
            )
            self._store(rows, cur.stack, cur.slots)

    def _store(self, rows: Any, stack: int, slots: np.ndarray) -> None:
        forward = self.forwards
        self.forwards += 1
        per_row = rows.counts * len(self._layer_ids[stack])
        ends = np.cumsum(per_row).tolist()
        begin = 0
        for b, slot in enumerate(slots.tolist()):
            end = ends[b]
            if end > begin:
                sl = slice(begin, end)
                self._pending[slot].append(
                    (
                        int(rows.start[b]),
                        int(rows.counts[b]),
                        int(rows.step[b]),
                        int(rows.phase[b]),
                        forward,
                        stack,
                        rows.experts[sl],
                        None if rows.weights is None else rows.weights[sl],
                        None if rows.speculative is None else rows.speculative[sl],
                    )
                )
            begin = end

    def _columns(self, chunks: list[tuple]) -> dict[str, np.ndarray]:
        """Expand a request's compact chunks into writer columns."""
        token, step, phase, forward, layer = [], [], [], [], []
        for start, n, st, ph, fw, stack, *_ in chunks:
            ids = self._layer_ids[stack]
            token.append(np.repeat(np.arange(start, start + n), len(ids)))
            layer.append(np.tile(ids, n))
            rows = n * len(ids)
            step.append(np.full(rows, st, np.int32))
            phase.append(np.full(rows, ph, np.int8))
            forward.append(np.full(rows, fw, np.int64))
        cols = {
            "token": np.concatenate(token),
            "step": np.concatenate(step),
            "phase": np.concatenate(phase),
            "forward": np.concatenate(forward),
            "layer": np.concatenate(layer),
            "experts": np.concatenate([c[6] for c in chunks]),
        }
        if chunks[0][7] is not None:
            cols["weights"] = np.concatenate([c[7] for c in chunks])
        if chunks[0][8] is not None:
            cols["speculative"] = np.concatenate([c[8] for c in chunks])
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
            self.eos = _eos_array(generate_kwargs["eos_token_id"])
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
