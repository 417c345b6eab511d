"""Host-side row attribution: which (request, token, phase, step) each routed token is.

Vectorised over a whole run of forward passes: the positions of consecutive forward passes
of one layer stack over the same batch are laid side by side as columns of one
``(B, S_total)`` matrix, and one call attributes them all. State is kept per request slot
and per layer stack (a decoder-only model has one stack; an encoder-decoder model two).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

PREFILL, DECODE = 0, 1


def eos_ids(eos: int | Sequence[int] | None) -> np.ndarray:
    """End-of-sequence token ids as an int64 array (empty: none)."""
    if eos is None:
        return np.zeros(0, np.int64)
    return np.atleast_1d(np.asarray(eos, np.int64))


@dataclass(frozen=True)
class Rows:
    """Recorded positions of a run of forward passes, ordered by batch row, then column.

    ``row[i]`` / ``col[i]`` locate recorded position ``i`` in the run's ``(B, S_total)``
    matrix; ``forward[i]`` is the index of its forward pass within the run; ``token``,
    ``step`` and ``phase`` are what it is recorded as. ``counts[b]`` positions belong to
    batch row ``b`` (so row ``b``'s positions are the ``b``-th slice of ``counts``).
    """

    row: np.ndarray  # (n,)
    col: np.ndarray  # (n,)
    forward: np.ndarray  # (n,)
    token: np.ndarray  # (n,) int64
    step: np.ndarray  # (n,) int32
    phase: np.ndarray  # (n,) int8
    counts: np.ndarray  # (B,)


class Attributor:
    """Token counters, step counters and finished flags per request slot and stack."""

    def __init__(self, roles: Sequence[str]) -> None:
        self.roles = tuple(roles)
        self._encoder = self.roles.index("encoder") if "encoder" in self.roles else None
        self._cap = 0
        self.tokens = np.zeros((len(roles), 0), np.int64)
        self.steps = np.zeros((len(roles), 0), np.int64)
        self.finished = np.zeros((len(roles), 0), bool)

    def ensure(self, slots: int) -> None:
        if slots <= self._cap:
            return
        cap = max(slots, 2 * self._cap, 16)
        grow = cap - self._cap
        pad = ((0, 0), (0, grow))
        self.tokens = np.pad(self.tokens, pad)
        self.steps = np.pad(self.steps, pad)
        self.finished = np.pad(self.finished, pad)
        self._cap = cap

    def reset(self, slot: int) -> None:
        self.tokens[:, slot] = 0
        self.steps[:, slot] = 0
        self.finished[:, slot] = False

    def attribute(
        self,
        stack: int,
        slots: np.ndarray,
        valid: np.ndarray,
        ids: np.ndarray | None,
        eos: np.ndarray,
        bounds: np.ndarray,
    ) -> Rows:
        """Attribute the positions of consecutive forward passes of ``stack``.

        ``valid`` and ``ids`` are ``(B, S_total)``: forward pass ``f`` of the run occupies
        columns ``bounds[f]:bounds[f + 1]``. A position is recorded when the attention mask
        says it is real (not padding) and its request has not finished; an
        end-of-sequence token fed back after the request's first recorded forward pass
        (its prefill) marks the request finished from that position on.
        """
        role = self.roles[stack]
        tokens = self.tokens[stack, slots]
        steps = self.steps[stack, slots]
        finished = self.finished[stack, slots]
        b, s = valid.shape
        n_fwd = len(bounds) - 1
        col_fwd = np.repeat(np.arange(n_fwd), np.diff(bounds))
        keep = valid & ~finished[:, None]
        if ids is not None and eos.size and role != "encoder" and s:
            is_eos = np.isin(ids, eos)
            fresh = steps == 0
            if fresh.any():  # an EOS counts only after the row's first forward with a token
                has_valid = valid.any(axis=1)
                first = np.where(has_valid, col_fwd[valid.argmax(axis=1)], n_fwd)
                is_eos &= ~fresh[:, None] | (col_fwd[None, :] > first[:, None])
            ended = np.logical_or.accumulate(is_eos, axis=1)
            keep &= ~ended
            self.finished[stack, slots] = finished | ended[:, -1]
        # per (row, forward) counts from a running count of kept positions
        run = np.cumsum(keep, axis=1)
        padded = np.concatenate([np.zeros((b, 1), run.dtype), run], axis=1)
        per_fwd = padded[:, bounds[1:]] - padded[:, bounds[:-1]]  # (B, F)
        has = per_fwd > 0
        steps_at = steps[:, None] + np.cumsum(has, axis=1) - has  # (B, F)
        counts = padded[:, -1]
        row, col = np.nonzero(keep)
        fwd = col_fwd[col]
        start = tokens
        if role == "decoder" and self._encoder is not None:
            start = tokens + self.tokens[self._encoder, slots]
            step = steps_at[row, fwd] + 1
            phase = np.full(len(row), DECODE, np.int8)
        elif role == "encoder":
            step = np.zeros(len(row), np.int64)
            phase = np.full(len(row), PREFILL, np.int8)
        else:
            step = steps_at[row, fwd]
            phase = (step > 0).astype(np.int8)
        token = start[row] + run[row, col] - 1
        self.tokens[stack, slots] = tokens + counts
        self.steps[stack, slots] = steps + has.sum(axis=1)
        return Rows(row, col, fwd, token, step.astype(np.int32), phase, counts)


class LiveRows:
    """Which positions of a causal model's forward passes the tracer records (*live*):
    real tokens (attention mask) of rows that have not finished (EOS fed back), decided
    by :class:`Attributor` as for a recording, for a caller that knows no requests (the
    offloading runtime): each batch row is one request, begun by a pass with ``new``.
    """

    def __init__(self) -> None:
        self._attr = Attributor(("causal",))
        self._rows = 0

    def skip(self, shape: tuple[int, int], *, new: bool) -> bool:
        """A pass of one row with every position real and no EOS fed: all live. Its
        attribution is skipped (the row cannot have finished); returns True, so the
        caller may keep skipping until a pass needs :meth:`update`. The next
        :meth:`update` of this row starts from the row's unfinished state."""
        if new or self._rows != shape[0]:
            self._attr.ensure(shape[0])
            for slot in range(shape[0]):
                self._attr.reset(slot)
            self._rows = shape[0]
        return True

    def update(
        self,
        shape: tuple[int, int],
        ids: np.ndarray | None,
        valid: np.ndarray | None,
        eos: np.ndarray,
        *,
        new: bool,
    ) -> np.ndarray:
        """``(B, S)`` bool: the live positions of the next forward pass of ``shape``.

        ``ids`` are its input ids (None: no EOS detection), ``valid`` its attention mask
        columns (None: every position real); ``new`` (or another batch size) starts fresh
        rows, as a prefill does.
        """
        b, s = shape
        if new or b != self._rows:
            self._attr.ensure(b)
            for slot in range(b):
                self._attr.reset(slot)
            self._rows = b
        if valid is None:
            valid = np.ones(shape, bool)
        rows = self._attr.attribute(0, np.arange(b), valid, ids, eos, np.asarray([0, s], np.int64))
        live = np.zeros(shape, bool)
        live[rows.row, rows.col] = True
        return live
