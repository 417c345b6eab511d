"""The offloading engine: a transformers MoE model run from a budgeted cache of experts.

``OffloadEngine`` attaches to a model whose expert tensors were detached (the skeleton of
an expert store, or an in-memory model via :meth:`OffloadEngine.from_model`), switches it
to the ``moetrace_offload`` experts implementation and serves every experts call from
device slots managed by the plan's eviction policy and prefetcher. ``generate()`` and
user code run unchanged; :meth:`OffloadEngine.close` (or leaving the ``with`` block)
restores the previous implementation and removes every hook.

A plan with a RAM tier (``plan.ram``) over an expert store on disk runs three tiers: the
device slots, the RAM tier's slots in host memory (:class:`~moetrace.runtime.ram_tier.RamTier`)
and the store; the RAM tier decides in the simulator's order (see :meth:`OffloadEngine._forward`).
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from moetrace.devices import check_device
from moetrace.errors import ConfigError, RuntimeEngineError
from moetrace.runtime import experts as X
from moetrace.runtime.checks import Footprint, check_plan, check_ram, default_plan, model_info
from moetrace.runtime.compute import ExpertsCall, SlotCompute
from moetrace.runtime.expert_store import (
    DiskExpertSource,
    ExpertSource,
    HostExpertSource,
    detach_experts,
    load_skeleton,
    model_fingerprint,
)
from moetrace.runtime.memory import ALIGN, ExpertMemory
from moetrace.runtime.ram_tier import RamTier
from moetrace.runtime.slots import SlotPool
from moetrace.runtime.stats import RamStats, RuntimeStats, TimelineRecorder, outcome_codes
from moetrace.store.budget import BudgetSpec, parse_budget
from moetrace.store.plan import Plan
from moetrace.tracer.attribution import LiveRows, eos_ids
from moetrace.tracer.calls import argument_reader, forward_mask
from moetrace.tracer.discover import discover
from moetrace.tracer.phase import PREFILL, forward_phase
from moetrace.tracer.speculate import attach_speculation
from moetrace.tuner.policy.cache import ExpertCache
from moetrace.tuner.policy.core import HIT
from moetrace.tuner.policy.core import STREAMED as STREAMED_STATUS
from moetrace.tuner.policy.eviction import eviction_spec
from moetrace.tuner.policy.prefetch import get_prefetcher

log = logging.getLogger(__name__)


class _ProbeDone(Exception):
    """Ends a probe's forward at the first MoE layer's experts call."""


class OffloadEngine:
    """Runs ``model`` with only ``plan``'s expert slots on ``device``.

    ``budget_bytes`` is the device memory for experts: bytes (an int), or any budget
    :func:`moetrace.store.budget.parse_budget` reads (``"25%"``, ``"64MiB"``, ``"96"`` slots);
    a budget in bytes includes the ``top_k`` staging slots, one in % or slots does not.

    A plan with a RAM tier needs ``source`` to be an expert store on disk
    (:meth:`from_store`); ``prefetch=False`` turns off the RAM tier's prefetcher too.
    """

    eos_token_id: int | Sequence[int] | None = None
    """End-of-sequence ids that finish a batch row (None: the model's generation config)."""

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
        timeline_events: int = 0,
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
        self._settled = spec.pinned.reshape(L, E).all(axis=1) & (plan.adaptation.window == 0)
        """Layers with every expert pinned and no drift detector: every access a hit and
        nothing for the cache to decide, so their calls skip it."""
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
        self.ram: RamTier | None = None
        """The RAM tier (plans with ``ram``): its cache, buffers and two queues."""
        ram_stats = None
        if plan.ram is not None:
            if not isinstance(source, DiskExpertSource):
                raise RuntimeEngineError(
                    "the plan has a RAM tier over a disk store; run it from an expert store "
                    "(moetrace prepare, OffloadEngine.from_store), not from experts in memory"
                )
            ram_fp = check_ram(plan, self.info)
            ram_stats = RamStats(L)
            self.ram = RamTier(
                plan.ram, source, params, L, E, ram_fp, self.device, ram_stats,
                prefetch=prefetch,
            )  # fmt: skip
            source = self.ram
        limit = budget_bytes if budget_bytes is not None else self.footprint.total_bytes
        self.memory = ExpertMemory(self.device, limit + ALIGN * len(params))
        """Expert memory as allocated (measured), checked after every experts call."""
        try:
            self.pool = SlotPool(
                params,
                self.footprint.slots,
                self.footprint.stream_slots,
                self.device,
                source,
                self.memory,
                async_loads=async_prefetch,
            )
        except BaseException:
            if self.ram is not None:
                self.ram.close()
            raise
        self.compute = SlotCompute(
            self.pool, self.cache.state.where, self.info.num_experts, self.inner
        )
        self.stats = RuntimeStats(tuple(r.layer_id for r in self.layers), memory=self.memory)
        self.stats.ram = ram_stats
        self._unswitched = plan.adaptation.window > 0  # a switch still to report
        if plan.adaptation.window > 0:
            self.stats.drift_probe = self.cache.drift
        if log_accesses:
            self.stats.accesses_log = []
        if timeline_events < 0:
            raise ConfigError(f"timeline_events must be >= 0, got {timeline_events}")
        if timeline_events:
            self.stats.timeline = TimelineRecorder(int(timeline_events), self.stats.layer_ids)
        self._prefetched: set[int] = set()
        self._ram_pending: tuple[Any, ...] | None = None
        """The RAM tier's prefetch of the latest event, when it waits for the device's
        speculative prefetch (issued after the layer's compute)."""
        self._probing = False
        self._probe_counts: np.ndarray | None = None
        self._phase = PREFILL
        self._handles: list[Any] = []
        self._previous: str | None = None
        pins = sorted(self.cache.slot_of.items(), key=lambda kv: kv[1])
        try:
            self.pool.load_many([(slot, layer, expert) for (layer, expert), slot in pins])
        except BaseException:
            self.pool.close()
            raise
        if self.ram is not None:
            self.ram.warming = False
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
        self._speculative = self.prefetcher is not None and self.plan.prefetch.name == "speculative"
        if self._speculative:
            try:
                self._attach_speculation()  # checks first, so nothing is left attached
            except BaseException:
                self.pool.close()
                raise
        X.register_implementation()
        for ref in self.layers:
            ref.experts.__dict__[X.HANDLER_ATTR] = functools.partial(self._forward, ref)
        # live positions (not padding, rows not finished), decided as the tracer does
        self._arg = argument_reader(self.model)
        self._rows = LiveRows()
        self._one_row_live = False
        self._live: torch.Tensor | None = None  # (tokens,) of this forward; None: all live
        self._handles.append(
            self.model.register_forward_pre_hook(self._phase_hook, with_kwargs=True)
        )
        self._handles.append(self.model.register_forward_hook(self._end_hook))
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
        self._ram_pending = None
        self.pool.close()  # and the RAM tier, its source

    def set_phase(self, phase: int) -> None:
        """The phase (0 prefill, 1 decode) of the experts calls that follow, for callers
        that drive experts modules directly (the trace replay); ``generate()`` and other
        forwards of the model set it themselves."""
        self._phase = int(phase)

    def __enter__(self) -> OffloadEngine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------ phases
    def _phase_hook(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        self._live = None
        if self._probing:
            return
        self._phase = forward_phase(args, kwargs)
        ids = self._arg(args, kwargs, "input_ids")
        ids = ids if isinstance(ids, torch.Tensor) else None
        ref = ids if ids is not None else self._arg(args, kwargs, "inputs_embeds")
        if not isinstance(ref, torch.Tensor) or ref.dim() < 2:
            return
        shape = (int(ref.shape[0]), int(ref.shape[1]))
        mask = forward_mask(self._arg(args, kwargs, "attention_mask"), shape[1])
        eos = self.eos_token_id
        if eos is None:
            eos = getattr(getattr(self.model, "generation_config", None), "eos_token_id", None)
        ids_np = None if ids is None else ids.cpu().numpy()
        eos_np = eos_ids(eos)
        if (
            shape[0] == 1
            and (self._phase == PREFILL or self._one_row_live)
            and (mask is None or bool(mask.all()))
            and (ids_np is None or not set(ids_np.ravel().tolist()) & set(eos_np.tolist()))
        ):  # one row, no padding, no EOS fed: every position is live (the common case)
            self._one_row_live = self._rows.skip(shape, new=self._phase == PREFILL)
            self.stats.tokens[self._phase] += shape[1]
            return
        self._one_row_live = False
        live = self._rows.update(
            shape,
            ids_np,
            None if mask is None else mask.cpu().numpy() > 0,
            eos_np,
            new=self._phase == PREFILL,
        )
        n = int(live.sum())
        self.stats.tokens[self._phase] += n
        if n < live.size:
            self._live = torch.from_numpy(live.reshape(-1)).to(self.device)

    def _end_hook(self, module: nn.Module, args: tuple, out: Any) -> None:
        self._live = None

    def _live_rows(self, top_k_index: torch.Tensor) -> torch.Tensor | None:
        """The live token rows of this experts call as a bool mask; None when all are."""
        live = self._live
        if live is None or live.shape[0] != top_k_index.shape[0]:
            return None
        return live

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
        """One experts call, one event of the device cache. With a RAM tier the order is
        the simulator's: the device cache's event; its misses as one event of the RAM
        cache (stamped with the device event's index); the loads (RAM -> device copies,
        after disk reads for RAM misses); the device's prefetches, looked up in RAM as
        one batch; the RAM tier's own prefetches (disk -> RAM); then the compute."""
        layer, ph = ref.index, self._phase
        idx = top_k_index.cpu().numpy()  # the one host sync of the call (none on a CPU)
        if self._probing:
            flat = idx.reshape(-1)
            self._probe_counts = np.bincount(flat[flat >= 0], minlength=self.info.num_experts)
            raise _ProbeDone
        if self._ram_pending is not None:
            self._flush_ram_prefetch()
        live = self._live_rows(top_k_index)
        routed = idx if live is None else idx[live.cpu().numpy()]
        flat = routed.reshape(-1)
        dropped = bool(idx.size) and int(idx.min()) < 0
        if dropped:
            flat = flat[flat >= 0]
        count = np.bincount(flat, minlength=self.info.num_experts)
        need = np.flatnonzero(count)
        call = ExpertsCall(layer, module, hidden, top_k_index, top_k_weights, idx, dropped)
        if live is not None and routed.shape[0] == 0:  # padding, finished rows: no event
            return self.compute.rows(call, need, [], True)[0]
        st = self.stats
        if self._settled[layer]:
            return self._settled_call(call, need)
        out = self.cache.event(layer, need, ph)
        status = out[:, 2]
        n, nhit = len(need), int((status == HIT).sum())
        st.add("accesses", layer, ph, n)
        st.add("hits", layer, ph, nhit)
        st.add("misses", layer, ph, n - nhit)
        if st.timeline is not None:
            hit = status == HIT
            pf = [hit[j] and int(out[j, 0]) in self._prefetched for j in range(n)]
            codes = outcome_codes(hit, status == STREAMED_STATUS, np.asarray(pf, bool))
            st.timeline.begin(layer, ph, need.tolist(), codes)
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
            if self.ram is not None:  # the misses, in use order: one event of the RAM cache
                self.ram.decide(layer, need[status != HIT], ph, self.cache.time - 1)
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
        if self.prefetcher is not None and not self._speculative:
            self._issue_prefetch(ref, int(routed.shape[0]), need, count[need], ph)
        if self.ram is not None and self.ram.prefetcher is not None:  # after the device's
            args = (layer, need, count[need], int(routed.shape[0]), ph, self.cache.time - 1)
            if self._speculative:
                self._ram_pending = args
            else:
                self.ram.prefetch(*args, self.cache.resident)
        t0 = time.perf_counter()
        result, s, moved = self.compute.rows(call, need, streamed, live is not None)
        if moved:
            st.add("bytes_demand", layer, ph, moved)
        stall += s
        self.memory.check()
        st.add("compute_s", layer, ph, time.perf_counter() - t0)
        st.add("stall_s", layer, ph, stall)
        if st.timeline is not None:
            st.timeline.stall(stall)
        return result

    def probe(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> np.ndarray:
        """What a scheduler may know of a waiting prompt: the tokens per expert that the
        first MoE layer's router picks for it, shape (E,). The forward stops at that
        layer's experts call, so no expert is loaded and neither the cache nor the
        statistics change; only the dense layers before it and the router run."""
        self._probing, self._probe_counts = True, None
        try:
            with torch.no_grad():
                self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        except _ProbeDone:
            pass
        finally:
            self._probing = False
            self._live = None
        if self._probe_counts is None:
            raise RuntimeEngineError("the probe's forward never reached an MoE layer")
        return self._probe_counts

    def _settled_call(self, call: ExpertsCall, need: np.ndarray) -> torch.Tensor:
        """A call of a layer whose experts are all pinned: every access hits."""
        layer, ph, st = call.layer, self._phase, self.stats
        st.add("accesses", layer, ph, len(need))
        st.add("hits", layer, ph, len(need))
        if st.accesses_log is not None:
            st.accesses_log.append((layer, ph, tuple(need.tolist()), (True,) * len(need)))
        if st.timeline is not None:
            no = np.zeros(len(need), bool)
            st.timeline.begin(layer, ph, need.tolist(), outcome_codes(~no, no, no))
        t0 = time.perf_counter()
        result = self.compute.dense(call, need)
        st.add("compute_s", layer, ph, time.perf_counter() - t0)
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
            if self.stats.timeline is not None:
                self.stats.timeline.wasted()
        self._prefetched.discard(slot)

    # ------------------------------------------------------------ prefetch
    def _issue_prefetch(
        self,
        ref: X.MoELayerRef,
        tokens: int,
        uniq: np.ndarray,
        counts: np.ndarray,
        ph: int,
    ) -> None:
        """A routing-based prediction from this layer's live tokens' experts."""
        assert self.prefetcher is not None
        target = ref.index + self.prefetcher.lookahead
        if target >= len(self.layers):
            return
        predicted = self.prefetcher.predict(
            ref.index,
            uniq,
            counts.astype(np.float64),
            tokens=tokens,
            fetch=self.fetch[ph],
        ).tolist()
        self._prefetch(target, [int(e) for e in predicted], ph)

    def _attach_speculation(self) -> None:
        """The tracer's speculative pick after each MoE layer's decoder layer (its
        ``s*`` columns): the next MoE layer's router on this layer's normalised output."""
        if self.prefetcher is not None and self.prefetcher.lookahead != 1:
            raise RuntimeEngineError(
                f"prefetcher 'speculative' has lookahead 1, got {self.prefetcher.lookahead}"
            )
        layout = discover(self.model)
        if list(layout.layer_ids) != [r.layer_id for r in self.layers]:
            raise RuntimeEngineError(
                f"speculative prefetch: the tracer finds MoE layers {list(layout.layer_ids)}, "
                f"the runtime {[r.layer_id for r in self.layers]}"
            )
        self._handles += attach_speculation(layout, self._speculate)

    def _speculate(self, pos: int, predict: Callable[[], torch.Tensor]) -> None:
        """The device's speculative prefetch after layer ``pos`` (:meth:`_speculate_device`),
        then the RAM tier's prefetch of that layer's event, in the simulator's order."""
        self._speculate_device(pos, predict)
        if self._ram_pending is not None:
            self._flush_ram_prefetch()

    def _flush_ram_prefetch(self) -> None:
        args, self._ram_pending = self._ram_pending, None
        if args is not None and self.ram is not None:
            self.ram.prefetch(*args, self.cache.resident)

    def _speculate_device(self, pos: int, predict: Callable[[], torch.Tensor]) -> None:
        """Prefetch for MoE layer ``pos + 1`` what its router picks for the live tokens of
        layer ``pos``'s output, most picked first, ``fetch`` of them (0: all)."""
        if pos + 1 >= len(self.layers):
            return
        pick = predict()
        live = self._live_rows(pick)
        if live is not None:
            pick = pick[live]
        if pick.shape[0] == 0:  # no live token: the layer had no event
            return
        e_ids, c = torch.unique(pick[pick >= 0], return_counts=True)
        predicted = e_ids[torch.argsort(-c, stable=True)].tolist()
        fetch = self.fetch[self._phase]
        if fetch > 0:
            predicted = predicted[:fetch]
        self._prefetch(pos + 1, [int(e) for e in predicted], self._phase)

    def _prefetch(self, target: int, predicted: list[int], ph: int) -> None:
        """Give ``predicted`` experts of MoE layer ``target`` slots, loading asynchronously."""
        issued = self.cache.prefetch(target, predicted, ph)
        if self.ram is not None and issued:  # one lookup batch of the RAM cache
            at = max(self.cache.time - 1, 0)
            self.ram.decide_prefetch(target, [e for e, _, _ in issued], ph, at)
        placed = {e for e, _, _ in issued}
        for e in predicted:
            if e not in placed and not self.cache.resident(target, e):
                self.stats.add("prefetch_dropped", target, ph)
        for e, slot, evicted in issued:
            self._evicted(slot, evicted, ph)
            moved = self.pool.load_async(slot, target, e)
            self._prefetched.add(slot)
            self.stats.add("prefetch_issued", target, ph)
            if self.stats.timeline is not None:
                self.stats.timeline.issued()
            self.stats.add("bytes_prefetch", target, ph, moved)

    # ------------------------------------------------------------ compute
