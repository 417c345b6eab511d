"""Host-side row attribution: which (request, token, phase, step) each routed token is.

Vectorised over the batch: one call per forward pass. State is kept per request slot and
per layer stack (a decoder-only model has one stack; an encoder-decoder model two).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

PREFILL, DECODE = 0, 1


@dataclass(frozen=True)
class Rows:
    """Rows of one forward pass, compactly: per batch row a run of consecutive tokens.

    Batch row ``b`` contributes ``counts[b]`` tokens numbered ``start[b], start[b] + 1,
    ...``, all with ``step[b]`` and ``phase[b]``; its rows (token-major, then MoE layer)
    are the next ``counts[b] * L`` rows of ``experts`` / ``weights`` / ``speculative``.
    """

    counts: np.ndarray  # (B,) tokens recorded per batch row
    start: np.ndarray  # (B,) token index of the first one
    step: np.ndarray  # (B,)
    phase: np.ndarray  # (B,)
    experts: np.ndarray  # (n * L, k)
    weights: np.ndarray | None
    speculative: np.ndarray | None


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
        experts: np.ndarray,
        weights: np.ndarray | None,
        speculative: np.ndarray | None,
    ) -> Rows:
        """Rows of one forward of ``stack``; ``experts`` etc. are ``(L, B*S, k)``.

        A position is recorded when the attention mask says it is real (not padding) and
        its request has not finished; an end-of-sequence token fed back in a continuation
        forward marks the request finished from that position on.
        """
        role = self.roles[stack]
        tokens = self.tokens[stack, slots]
        steps = self.steps[stack, slots]
        finished = self.finished[stack, slots]
        b, s = valid.shape
        done = finished[:, None]
        if ids is not None and eos.size and role != "encoder":
            is_eos = (ids[:, :, None] == eos).any(-1) & (steps > 0)[:, None]
            done = done | (is_eos if s == 1 else np.cumsum(is_eos, axis=1) > 0)
        keep = valid & ~done
        counts = keep.sum(axis=1)
        bi, si = np.nonzero(keep)
        flat = bi * s + si
        if role == "decoder" and self._encoder is not None:
            start = tokens + self.tokens[self._encoder, slots]
            step = steps + 1
            phase = np.full(b, DECODE, np.int8)
        elif role == "encoder":
            start, step, phase = tokens, np.zeros(b, np.int64), np.full(b, PREFILL, np.int8)
        else:
            start, step, phase = tokens, steps, (steps > 0).astype(np.int8)
        self.tokens[stack, slots] = tokens + counts
        self.steps[stack, slots] = steps + (counts > 0)
        if s:
            self.finished[stack, slots] = done[:, -1]

        def rows_of(a: np.ndarray | None) -> np.ndarray | None:
            if a is None:
                return None
            return a[:, flat, :].transpose(1, 0, 2).reshape(len(flat) * a.shape[0], a.shape[2])

        return Rows(
            counts, start, step, phase, rows_of(experts), rows_of(weights), rows_of(speculative)
        )
