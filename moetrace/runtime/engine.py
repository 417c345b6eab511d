"""The offloading engine: a transformers MoE model run from a budgeted cache of experts.

``OffloadEngine`` attaches to a model whose expert tensors were detached (the skeleton of
an expert store, or an in-memory model via :meth:`OffloadEngine.from_model`), switches it
to the ``moetrace_offload`` experts implementation and serves every experts call from
device slots managed by the plan's eviction policy and prefetcher. ``generate()`` and
user code run unchanged; :meth:`OffloadEngine.close` (or leaving the ``with`` block)
restores the previous implementation and removes every hook.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from moetrace.devices import check_device
from moetrace.errors import ConfigError, RuntimeEngineError
from moetrace.runtime import experts as X
from moetrace.runtime.checks import Footprint, check_plan, default_plan, model_info
from moetrace.runtime.expert_store import (
    DiskExpertSource,
    ExpertSource,
    HostExpertSource,
    detach_experts,
    load_skeleton,
    model_fingerprint,
)
from moetrace.runtime.memory import ALIGN, ExpertMemory
from moetrace.runtime.slots import SlotPool
from moetrace.runtime.stats import RuntimeStats
from moetrace.store.budget import BudgetSpec, parse_budget
from moetrace.store.plan import Plan
from moetrace.tracer.phase import PREFILL, forward_phase
from moetrace.tuner.policy.cache import ExpertCache
from moetrace.tuner.policy.core import HIT
from moetrace.tuner.policy.core import STREAMED as STREAMED_STATUS
from moetrace.tuner.policy.eviction import eviction_spec
from moetrace.tuner.policy.prefetch import get_prefetcher

log = logging.getLogger(__name__)


class OffloadEngine:
    """Runs ``model`` with only ``plan``'s expert slots on ``device``.

    ``budget_bytes`` is the device memory for experts: bytes (an int), or any budget
    :func:`moetrace.store.budget.parse_budget` reads (``"25%"``, ``"64MiB"``, ``"96"`` slots);
    a budget in bytes includes the ``top_k`` staging slots, one in % or slots does not.
    """

    def __init__(
        self,
        model: nn.Module,
        source: ExpertSource,
        plan: Plan | None,
        *,
        device: str | torch.device,
        budget_bytes: int | str | BudgetSpec | None = None,
        fingerprint: str | None = None,
        implementation: str | None = None,
        prefetch: bool = True,
        async_prefetch: bool = True,
        log_accesses: bool = False,
    ):
        self.model = model
        self.device = check_device(device)
        self.layers = X.find_moe_layers(model)
        config = model.config
        num_layers = int(getattr(config.get_text_config(), "num_hidden_layers", 0) or 0)
        num_layers = max(num_layers, self.layers[-1].layer_id + 1)
        self.info = model_info(
            self.layers,
            num_layers,
            fingerprint or model_fingerprint(model),
            str(getattr(config, "_name_or_path", "") or config.model_type),
        )
        if budget_bytes is not None:
            spec = budget_bytes
            if isinstance(spec, int):
                spec = BudgetSpec(f"{spec}B", "bytes", spec)
            budget_bytes = parse_budget(spec).device_bytes(
                len(self.layers),
                self.info.num_experts,
                int(self.info.bytes_per_expert or 1),
                staging=self.info.top_k,
            )
        if plan is None:
            bpe = self.info.bytes_per_expert or 1
            if budget_bytes is None:
                slots = len(self.layers) * self.info.num_experts
            else:
                slots = budget_bytes // bpe - self.info.top_k
            plan = default_plan(self.info, slots)
        self.plan = plan
        self.footprint: Footprint = check_plan(plan, self.info, self.device, budget_bytes)
        L, E = len(self.layers), self.info.num_experts
        spec = eviction_spec(plan.eviction, L, E, plan.phase_overrides, plan.adaptation)
        try:
            self.cache = ExpertCache(plan.layout, spec, E)
            self.prefetcher = get_prefetcher(plan.prefetch, L, E) if prefetch else None
        except ConfigError as exc:
            raise RuntimeEngineError(f"plan cannot run online: {exc}") from None
        if self.prefetcher is not None and not self.prefetcher.online:
            raise RuntimeEngineError(
                f"prefetcher {plan.prefetch.name!r} needs the future; it is simulator-only"
            )
        if self.prefetcher is not None and plan.prefetch.name == "none":
            self.prefetcher = None
        self.fetch = self._fetch_per_phase(plan)
        self.inner = implementation or X.current_implementation(model)
        if self.inner == X.OFFLOAD_IMPLEMENTATION:
            raise RuntimeEngineError("model is already attached to an offloading engine")
        if self.inner not in X.INNER_IMPLEMENTATIONS:
            raise RuntimeEngineError(
                f"experts implementation {self.inner!r} is not supported under offloading; "
                f"use one of {X.INNER_IMPLEMENTATIONS}"
            )
        params = self.layers[0].params
        limit = budget_bytes if budget_bytes is not None else self.footprint.total_bytes
        self.memory = ExpertMemory(self.device, limit + ALIGN * len(params))
        """Expert memory as allocated (measured), checked after every experts call."""
        self.pool = SlotPool(
            params,
            self.footprint.slots,
            self.footprint.stream_slots,
            self.device,
            source,
            self.memory,
            async_loads=async_prefetch,
        )
        self._lut = torch.full(
            (self.info.num_experts + 1,), self.pool.total_slots, dtype=torch.long,
            device=self.device,
        )  # fmt: skip
        self.stats = RuntimeStats(tuple(r.layer_id for r in self.layers), memory=self.memory)
        self._unswitched = plan.adaptation.window > 0  # a switch still to report
        if plan.adaptation.window > 0:
            self.stats.drift_probe = self.cache.drift
        if log_accesses:
            self.stats.accesses_log = []
        self._prefetched: set[int] = set()
        self._phase = PREFILL
        self._handles: list[Any] = []
        self._previous: str | None = None
        for (layer, expert), slot in sorted(self.cache.slot_of.items(), key=lambda kv: kv[1]):
            self.pool.load(slot, layer, expert)
        self._install()

    # ------------------------------------------------------------ constructors
    @classmethod
    def from_model(
        cls,
        model: nn.Module,
        plan: Plan | None = None,
        *,
        device: str | torch.device = "cpu",
        **kw: Any,
    ) -> OffloadEngine:
        """Detach the experts of a loaded model to host memory and run it offloaded."""
        fingerprint = kw.pop("fingerprint", None) or model_fingerprint(model)
        layers = X.find_moe_layers(model)
        tensors = detach_experts(model, layers)
        dev = check_device(device)
        source = HostExpertSource(tensors, pin=dev.type == "cuda")
        model.to(dev)
        return cls(model, source, plan, device=dev, fingerprint=fingerprint, **kw)

    @classmethod
    def from_store(
        cls, store: str, plan: Plan | None = None, *, device: str | torch.device = "cpu", **kw: Any
    ) -> OffloadEngine:
        """Load an expert store's skeleton on ``device``; experts stream from disk."""
        dev = check_device(device)
        model, index = load_skeleton(store, dev)
        source = DiskExpertSource(store, index, kw.pop("read_mode", None))
        return cls(model, source, plan, device=dev, fingerprint=index.fingerprint, **kw)

    # ------------------------------------------------------------ install / remove
    def _install(self) -> None:
        X.register_implementation()
        for ref in self.layers:
            ref.experts.__dict__[X.HANDLER_ATTR] = functools.partial(self._forward, ref)
        self._handles.append(
            self.model.register_forward_pre_hook(self._phase_hook, with_kwargs=True)
        )
        self._previous = X.current_implementation(self.model)
        X.set_implementation(self.model, X.OFFLOAD_IMPLEMENTATION)

    def close(self) -> None:
        """Restore the experts implementation, remove hooks, wait for loads."""
        for h in self._handles:
            h.remove()
        self._handles.clear()
        for ref in self.layers:
            ref.experts.__dict__.pop(X.HANDLER_ATTR, None)
        if self._previous is not None:
            X.set_implementation(self.model, self._previous)
            self._previous = None
        self.pool.close()

    def __enter__(self) -> OffloadEngine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------ phases
    def _phase_hook(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        self._phase = forward_phase(args, kwargs)
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is None:
            ids = kwargs.get("inputs_embeds")
        if ids is not None:
            self.stats.tokens[self._phase] += int(ids.shape[0] * ids.shape[1])

    @staticmethod
    def _fetch_per_phase(plan: Plan) -> tuple[int, int]:
        out = []
        for phase in ("prefill", "decode"):
            ov = plan.phase_overrides.get(phase)
            f = (
                plan.prefetch.fetch
                if ov is None or ov.prefetch_fetch is None
                else ov.prefetch_fetch
            )
            out.append(int(f))
        return out[0], out[1]

    # ------------------------------------------------------------ the experts call
    def _forward(
        self,
        ref: X.MoELayerRef,
        module: nn.Module,
        hidden: torch.Tensor,
        top_k_index: torch.Tensor,
        top_k_weights: torch.Tensor,
    ) -> torch.Tensor:
        layer, ph = ref.index, self._phase
        flat = top_k_index.reshape(-1)
        uniq, counts = torch.unique(flat[flat >= 0], return_counts=True)
        need = uniq.cpu().numpy().astype(np.int64, copy=False)
        st = self.stats
        out = self.cache.event(layer, need, ph)
        status = out[:, 2]
        n, nhit = len(need), int((status == HIT).sum())
        st.add("accesses", layer, ph, n)
        st.add("hits", layer, ph, nhit)
        st.add("misses", layer, ph, n - nhit)
        stall = 0.0
        if nhit and (self._prefetched or self.pool.has_pending):
            for s in out[status == HIT, 0].tolist():
                if s in self._prefetched:
                    self._prefetched.discard(s)
                    st.add("prefetch_used", layer, ph)
                stall += self.pool.wait(s)
        streamed: list[int] = []
        if nhit < n:
            E = self.info.num_experts
            loads = []
            for j in np.flatnonzero(status != HIT).tolist():
                e, s, old = int(need[j]), int(out[j, 0]), int(out[j, 1])
                if status[j] == STREAMED_STATUS:
                    streamed.append(e)
                    continue
                self._evicted(s, None if old < 0 else (old // E, old % E), ph)
                loads.append((s, layer, e))
            if loads:
                t0 = time.perf_counter()
                st.add("bytes_demand", layer, ph, self.pool.load_many(loads))
                stall += time.perf_counter() - t0
            st.add("streamed", layer, ph, len(streamed))
        if self._unswitched and self.cache.switched:
            self._report_switch()
        if st.accesses_log is not None:
            st.accesses_log.append(
                (layer, ph, tuple(need.tolist()), tuple((status == HIT).tolist()))
            )
        if self.prefetcher is not None:
            self._issue_prefetch(ref, hidden, uniq, counts, ph)
        t0 = time.perf_counter()
        if streamed:
            result, s = self._compute_streaming(
                ref, module, hidden, top_k_index, top_k_weights, set(streamed)
            )
            stall += s
        else:
            result = self._compute(ref, module, hidden, top_k_index, top_k_weights, need, {})
        self.memory.check()
        st.add("compute_s", layer, ph, time.perf_counter() - t0)
        st.add("stall_s", layer, ph, stall)
        return result

    def _report_switch(self) -> None:
        self._unswitched = False
        d = self.cache.drift()
        log.warning(
            "drift: the plan's hit rate %.3f trailed LRU's %.3f over the last %d accesses; "
            "switched to the fallback policy %r at access %d",
            d["plan_hit_rate"], d["lru_hit_rate"], d["window"],
            self.plan.adaptation.fallback, d["switched_at_access"],
        )  # fmt: skip

    def _evicted(self, slot: int, evicted: tuple[int, int] | None, ph: int) -> None:
        if evicted is not None and slot in self._prefetched:
            self.stats.add("prefetch_wasted", evicted[0], ph)
        self._prefetched.discard(slot)

    # ------------------------------------------------------------ prefetch
    def _issue_prefetch(
        self,
        ref: X.MoELayerRef,
        hidden: torch.Tensor,
        uniq: torch.Tensor,
        counts: torch.Tensor,
        ph: int,
    ) -> None:
        assert self.prefetcher is not None
        target = ref.index + self.prefetcher.lookahead
        if target >= len(self.layers):
            return
        fetch = self.fetch[ph]
        if self.plan.prefetch.name == "speculative":
            nxt = self.layers[target]
            if nxt.router is None:
                return
            with torch.no_grad():
                logits = nn.functional.linear(hidden, nxt.router.weight.to(hidden.dtype))
                pick = torch.topk(logits, nxt.top_k, dim=-1).indices.reshape(-1)
            e_ids, c = torch.unique(pick, return_counts=True)
            order = torch.argsort(-c, stable=True)
            predicted = e_ids[order].tolist()
            if fetch > 0:
                predicted = predicted[:fetch]
        else:
            predicted = self.prefetcher.predict(
                ref.index,
                uniq.cpu().numpy(),
                counts.cpu().numpy().astype(np.float64),
                tokens=int(hidden.reshape(-1, hidden.shape[-1]).shape[0]),
                fetch=fetch,
            ).tolist()
        predicted = [int(e) for e in predicted]
        issued = self.cache.prefetch(target, predicted, ph)
        placed = {e for e, _, _ in issued}
        for e in predicted:
            if e not in placed and not self.cache.resident(target, e):
                self.stats.add("prefetch_dropped", target, ph)
        for e, slot, evicted in issued:
            self._evicted(slot, evicted, ph)
            moved = self.pool.load_async(slot, target, e)
            self._prefetched.add(slot)
            self.stats.add("prefetch_issued", target, ph)
            self.stats.add("bytes_prefetch", target, ph, moved)

    # ------------------------------------------------------------ compute
    def _compute(
        self,
        ref: X.MoELayerRef,
        module: nn.Module,
        hidden: torch.Tensor,
        top_k_index: torch.Tensor,
        top_k_weights: torch.Tensor,
        need: np.ndarray | Sequence[int],
        extra_slots: dict[int, int],
    ) -> torch.Tensor:
        """The model's own experts implementation, reading the slots in place.

        ``batched_mm``/``grouped_mm`` get the whole slot storage as their expert tensors
        and the routing mapped to slot numbers (their per-pair arithmetic does not depend
        on which row holds an expert); ``eager`` sums experts in ascending expert order,
        so it gets the ``need`` experts (ascending) as :class:`SlotRows` views."""
        E = ref.num_experts
        where = self.cache.state.where[ref.index * E : (ref.index + 1) * E]
        fn = X.inner_forward(module, self.inner)
        if self.inner == "eager":
            slots = [extra_slots.get(int(e), int(where[e])) for e in need]
            rank = torch.full((E + 1,), len(slots), dtype=torch.long, device=self.device)
            rank[torch.as_tensor(need, dtype=torch.long).to(self.device)] = torch.arange(
                len(slots), device=self.device
            )
            rows = {name: X.SlotRows(t, slots) for name, t in self.pool.storage.items()}
            proxy = X.ExpertsProxy(module, rows, len(slots))
            local = rank[top_k_index]  # -1 (dropped) reads the sentinel at rank[-1]
            return fn(proxy, hidden, local.to(top_k_index.dtype), top_k_weights)
        lut = self._lut
        lut[:E].copy_(torch.from_numpy(where))
        for e, s in extra_slots.items():
            lut[e] = s
        slot_index = lut[top_k_index]  # -1 (dropped) reads the sentinel at lut[-1]
        proxy = X.ExpertsProxy(module, self.pool.storage, self.pool.total_slots)
        return fn(proxy, hidden, slot_index.to(top_k_index.dtype), top_k_weights)

    def _compute_streaming(
        self,
        ref: X.MoELayerRef,
        module: nn.Module,
        hidden: torch.Tensor,
        top_k_index: torch.Tensor,
        top_k_weights: torch.Tensor,
        streamed: set[int],
    ) -> tuple[torch.Tensor, float]:
        """Expert chunks whose streamed experts fit the streaming slots.

        Each (token, expert) pair is computed as its own row (the model's implementation
        with top-k 1), every expert's rows in one call so each matmul sees the same rows
        as without offloading; the k outputs of a token are then summed the way the inner
        implementation sums them (ascending expert order for ``eager``).
        """
        T, k = top_k_index.shape
        flat = top_k_index.reshape(-1)
        weights = top_k_weights.reshape(-1, 1)
        rep = hidden.repeat_interleave(k, dim=0)
        cached = sorted({int(e) for e in flat.tolist() if e >= 0} - streamed)
        stream = sorted(streamed)
        size = self.pool.stream_slots
        groups = [stream[i : i + size] for i in range(0, len(stream), size)] or [[]]
        pair_out = torch.zeros_like(rep)
        stall = 0.0
        for n, group in enumerate(groups):
            extra_slots = {e: self.pool.stream_slot(i) for i, e in enumerate(group)}
            t0 = time.perf_counter()
            moved = self.pool.load_many([(s, ref.index, e) for e, s in extra_slots.items()])
            stall += time.perf_counter() - t0
            self.stats.add("bytes_demand", ref.index, self._phase, moved)
            need = sorted(group + (cached if n == 0 else []))
            mask = torch.isin(flat, torch.tensor(need, dtype=flat.dtype, device=flat.device))
            if not bool(mask.any()):
                continue
            pair_out[mask] = self._compute(
                ref, module, rep[mask], flat[mask].view(-1, 1), weights[mask], need, extra_slots
            )
        per_token = pair_out.view(T, k, -1)
        if self.inner == "eager":
            order = torch.argsort(top_k_index, dim=1, stable=True)
            per_token = torch.gather(per_token, 1, order.unsqueeze(-1).expand_as(per_token))
            out = torch.zeros_like(hidden)
            for j in range(k):
                out += per_token[:, j]
            return out, stall
        return per_token.sum(dim=1).to(hidden.dtype), stall
