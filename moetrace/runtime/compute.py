"""Experts calls computed from the slots in place: the model's own implementation over
views of the slot storage, no copy of expert weights.

- ``batched_mm`` gets the whole slot storage and the routing mapped to slot numbers (it
  gathers per (token, expert) pair itself, as it does without offloading);
- ``grouped_mm`` pays for every group of its weight tensor, used or not (about 1 us each
  on a CPU), so it gets windows of the storage around the slots in use: one call when one
  window holds them, else each (token, expert) pair as its own row with top-k 1 per
  window, summed per token afterwards the way grouped_mm sums;
- ``eager`` sums experts in ascending expert order, so it gets the needed experts in that
  order as :class:`~moetrace.runtime.experts.SlotRows` (views of their slot rows).

The arithmetic is the same as without offloading (outputs bit-identical in float32).
Experts with no cache slot (streamed, or chosen only by padding) go through the staging
slots in groups, each pair its own row (:meth:`SlotCompute.streaming`).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import NamedTuple

import numpy as np
import torch
from torch import nn

from moetrace.runtime import experts as X
from moetrace.runtime.slots import SlotPool

WINDOW_GAP = 64
"""Unused slots between two used ones above which grouped_mm gets two windows (an empty
group costs about 1 us per grouped matmul on a CPU, two per call; a second call of the
implementation about 100 us)."""


def slot_windows(slots: Sequence[int], gap: int = WINDOW_GAP) -> list[tuple[int, int]]:
    """Half-open slot ranges covering sorted ``slots``, split where more than ``gap``
    slots in a row are unused."""
    out: list[tuple[int, int]] = []
    for s in slots:
        if out and s - out[-1][1] <= gap:
            out[-1] = (out[-1][0], s + 1)
        else:
            out.append((s, s + 1))
    return out


class ExpertsCall(NamedTuple):
    """One experts call as transformers makes it, with its routing on the host."""

    layer: int
    """MoE layer index (0..L-1)."""
    module: nn.Module
    hidden: torch.Tensor
    top_k_index: torch.Tensor
    top_k_weights: torch.Tensor
    idx: np.ndarray
    """``top_k_index`` on the host."""
    dropped: bool = False
    """The routing holds -1 (dropped) entries."""


class SlotCompute:
    """Runs experts calls of one model over a :class:`SlotPool`.

    ``where`` is the cache's (layer * E + expert) -> slot array (-1: no slot), read live.
    """

    def __init__(self, pool: SlotPool, where: np.ndarray, num_experts: int, inner: str) -> None:
        self.pool = pool
        self.where = where
        self.E = num_experts
        self.inner = inner
        self.device = pool.device
        self._proxies: dict[tuple[int, int, int], X.ExpertsProxy] = {}
        self._fns: dict[type, Callable[..., torch.Tensor]] = {}

    def _index(self, idx: np.ndarray, like: torch.Tensor) -> torch.Tensor:
        t = torch.from_numpy(idx)
        if t.device != like.device:
            t = t.to(like.device, non_blocking=True)
        return t if t.dtype == like.dtype else t.to(like.dtype)

    def dense(
        self, call: ExpertsCall, need: np.ndarray, extra_slots: dict[int, int] | None = None
    ) -> torch.Tensor:
        """The call when every ``need`` expert (ascending) has a slot (cache or
        ``extra_slots``)."""
        layer, module, hidden, top_k_index, top_k_weights, idx, dropped = call
        E = self.E
        where = self.where[layer * E : (layer + 1) * E]
        fn = self._fns.get(type(module))
        if fn is None:
            fn = self._fns[type(module)] = X.inner_forward(module, self.inner)
        total = self.pool.total_slots
        if extra_slots or dropped:
            slot_of = np.empty(E + 1, np.int64)  # entry E: the sentinel -1 (dropped) reads
            slot_of[:E] = where
            slot_of[E] = total  # out of every window
            for e, s in (extra_slots or {}).items():
                slot_of[e] = s
        else:
            slot_of = where
        if self.inner == "eager":
            slots = slot_of[need].tolist()
            rank = np.full(E + 1, len(slots), np.int64)
            rank[need] = np.arange(len(slots))
            rows = {name: X.SlotRows(t, slots) for name, t in self.pool.storage.items()}
            proxy = X.ExpertsProxy(module, rows, len(slots))
            return fn(proxy, hidden, self._index(rank[idx], top_k_index), top_k_weights)
        if self.inner != "grouped_mm":  # batched_mm gathers per pair: no cost per slot
            proxy = self._proxy(module, 0, total)
            return fn(proxy, hidden, self._index(slot_of[idx], top_k_index), top_k_weights)
        windows = slot_windows(np.sort(slot_of[need]).tolist())
        if len(windows) == 1:
            lo, hi = windows[0]
            mapped = self._index(slot_of[idx] - lo, top_k_index)
            return fn(self._proxy(module, lo, hi), hidden, mapped, top_k_weights)
        T, k = top_k_index.shape
        flat = self._index(slot_of[idx].reshape(-1), top_k_index)
        rep = hidden.repeat_interleave(k, dim=0)
        weights = top_k_weights.reshape(-1, 1)
        pair_out = torch.zeros_like(rep)
        for lo, hi in windows:
            mask = (flat >= lo) & (flat < hi)
            proxy = self._proxy(module, lo, hi)
            pair_out[mask] = fn(proxy, rep[mask], (flat[mask] - lo).view(-1, 1), weights[mask])
        return pair_out.view(T, k, -1).sum(dim=1).to(hidden.dtype)

    def _proxy(self, module: nn.Module, lo: int, hi: int) -> X.ExpertsProxy:
        """``module`` over slots [lo, hi) of the storage (cached: building views costs
        more than the lookup, and decode steps reuse the same windows)."""
        key = (id(module), lo, hi)
        p = self._proxies.get(key)
        if p is None:
            if len(self._proxies) >= 4096:
                self._proxies.clear()
            views = {n: t[lo:hi] for n, t in self.pool.storage.items()}
            p = self._proxies[key] = X.ExpertsProxy(module, views, hi - lo)
        return p

    def rows(
        self, call: ExpertsCall, need: np.ndarray, streamed: Sequence[int], dead: bool
    ) -> tuple[torch.Tensor, float, int]:
        """Every row's output: ``need`` (the live tokens' experts: resident, or
        ``streamed``) and, with ``dead`` rows (padding, finished), the experts only those
        chose: not accesses, so the cache is not asked; read from their slots when
        resident, streamed otherwise. Returns the output, the seconds stalled and the bytes
        read into the staging slots."""
        stall = 0.0
        extra = set(streamed)
        if dead:
            every = np.unique(call.idx[call.idx >= 0]).astype(np.int64)
            base = call.layer * self.E
            for e in np.setdiff1d(every, need).tolist():
                slot = int(self.where[base + e])
                if slot < 0:
                    extra.add(e)
                else:
                    stall += self.pool.wait(slot)
            need = every
        if extra:
            out, s, moved = self.streaming(call, extra)
            return out, stall + s, moved
        return self.dense(call, need), stall, 0

    def streaming(self, call: ExpertsCall, streamed: set[int]) -> tuple[torch.Tensor, float, int]:
        """Expert chunks whose streamed experts fit the staging slots.

        Each (token, expert) pair is computed as its own row (the model's implementation
        with top-k 1), every expert's rows in one call so each matmul sees the same rows
        as without offloading; the k outputs of a token are then summed the way the inner
        implementation sums them (ascending expert order for ``eager``).
        """
        layer, _, hidden, top_k_index, top_k_weights, idx, _ = call
        T, k = top_k_index.shape
        flat = top_k_index.reshape(-1)
        flat_np = idx.reshape(-1)
        weights = top_k_weights.reshape(-1, 1)
        rep = hidden.repeat_interleave(k, dim=0)
        cached = sorted(set(flat_np[flat_np >= 0].tolist()) - streamed)
        stream = sorted(streamed)
        size = self.pool.stream_slots
        groups = [stream[i : i + size] for i in range(0, len(stream), size)] or [[]]
        pair_out = torch.zeros_like(rep)
        stall, moved = 0.0, 0
        for n, group in enumerate(groups):
            extra_slots = {e: self.pool.stream_slot(i) for i, e in enumerate(group)}
            t0 = time.perf_counter()
            moved += self.pool.load_many([(s, layer, e) for e, s in extra_slots.items()])
            stall += time.perf_counter() - t0
            need = np.asarray(sorted(group + (cached if n == 0 else [])), np.int64)
            mask_np = np.isin(flat_np, need)
            if not mask_np.any():
                continue
            mask = torch.from_numpy(mask_np).to(flat.device)
            part = call._replace(
                hidden=rep[mask], top_k_index=flat[mask].view(-1, 1),
                top_k_weights=weights[mask], idx=flat_np[mask_np].reshape(-1, 1),
            )  # fmt: skip
            pair_out[mask] = self.dense(part, need, extra_slots)
        per_token = pair_out.view(T, k, -1)
        if self.inner == "eager":
            order = torch.argsort(top_k_index, dim=1, stable=True)
            per_token = torch.gather(per_token, 1, order.unsqueeze(-1).expand_as(per_token))
            out = torch.zeros_like(hidden)
            for j in range(k):
                out += per_token[:, j]
            return out, stall, moved
        return per_token.sum(dim=1).to(hidden.dtype), stall, moved
