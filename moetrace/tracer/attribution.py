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
    """Rows of one forward pass, grouped by batch row (each group contiguous)."""

    counts: np.ndarray  # (B,) rows per batch row (tokens * layers)
    token: np.ndarray
    step: np.ndarray
    phase: np.ndarray
    layer: np.ndarray
    experts: np.ndarray  # (n, k)
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
        layer_ids: np.ndarray,
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
        done = np.broadcast_to(finished[:, None], (b, s))
        if ids is not None and eos.size and role != "encoder":
            is_eos = np.isin(ids, eos) & (steps[:, None] > 0)
            done = done | (np.cumsum(is_eos, axis=1) > 0)
        keep = valid & ~done
        per_row = keep.sum(axis=1)
        rank = np.cumsum(keep, axis=1) - 1
        bi, si = np.nonzero(keep)
        tok = tokens[bi] + rank[bi, si]
        if role == "decoder" and self._encoder is not None:
            tok = tok + self.tokens[self._encoder, slots][bi]
            step = steps[bi] + 1
            phase = np.full(bi.shape, DECODE, np.int8)
        elif role == "encoder":
            step = np.zeros_like(bi)
            phase = np.full(bi.shape, PREFILL, np.int8)
        else:
            step = steps[bi]
            phase = np.where(step == 0, PREFILL, DECODE).astype(np.int8)
        num_layers = len(layer_ids)
        flat = bi * s + si

        def rows_of(a: np.ndarray | None) -> np.ndarray | None:
            if a is None:
                return None
            return a[:, flat, :].transpose(1, 0, 2).reshape(len(flat) * num_layers, -1)

        self.tokens[stack, slots] = tokens + per_row
        self.steps[stack, slots] = steps + (per_row > 0)
        self.finished[stack, slots] = done[:, -1] if s else finished
        return Rows(
            counts=per_row * num_layers,
            token=np.repeat(tok, num_layers),
            step=np.repeat(step, num_layers),
            phase=np.repeat(phase, num_layers),
            layer=np.tile(layer_ids, len(flat)),
            experts=rows_of(experts),
            weights=rows_of(weights),
            speculative=rows_of(speculative),
        )
