"""Vectorised run attribution equals forward-by-forward attribution."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from moetrace.tracer.attribution import DECODE, PREFILL, Attributor

EOS = np.array([0, 1], np.int64)


class _Reference:
    """The per-forward algorithm the recorder used before runs were batched."""

    def __init__(self, roles: tuple[str, ...], slots: int) -> None:
        self.roles = roles
        self.enc = roles.index("encoder") if "encoder" in roles else None
        self.tokens = np.zeros((len(roles), slots), np.int64)
        self.steps = np.zeros((len(roles), slots), np.int64)
        self.finished = np.zeros((len(roles), slots), bool)

    def forward(self, stack, slots, valid, ids, fwd) -> list[tuple]:
        role = self.roles[stack]
        tokens, steps = self.tokens[stack, slots], self.steps[stack, slots]
        done = self.finished[stack, slots][:, None]
        b, s = valid.shape
        if ids is not None and role != "encoder":
            is_eos = np.isin(ids, EOS) & (steps > 0)[:, None]
            done = done | (is_eos if s == 1 else np.cumsum(is_eos, axis=1) > 0)
        keep = valid & ~done
        counts = keep.sum(axis=1)
        out = []
        for r in range(b):
            for i, c in enumerate(np.nonzero(keep[r])[0]):
                if role == "decoder" and self.enc is not None:
                    tok = tokens[r] + self.tokens[self.enc, slots[r]] + i
                    step, phase = steps[r] + 1, DECODE
                elif role == "encoder":
                    tok, step, phase = tokens[r] + i, 0, PREFILL
                else:
                    tok, step, phase = tokens[r] + i, steps[r], int(steps[r] > 0)
                out.append((r, fwd, int(c), int(tok), int(step), phase))
        self.tokens[stack, slots] = tokens + counts
        self.steps[stack, slots] = steps + (counts > 0)
        if s:
            self.finished[stack, slots] = done[:, -1]
        return out


forward_st = st.tuples(
    st.integers(0, 4),  # positions
    st.integers(0, 2**31 - 1),  # seed for mask and ids
)


@settings(max_examples=80, deadline=None)
@given(
    batch=st.integers(1, 4),
    runs=st.lists(st.lists(forward_st, min_size=1, max_size=6), min_size=1, max_size=3),
    encdec=st.booleans(),
    with_ids=st.booleans(),
)
def test_runs_match_forward_by_forward(batch, runs, encdec, with_ids) -> None:
    roles = ("encoder", "decoder") if encdec else ("causal",)
    slots = np.arange(batch, dtype=np.int64)[::-1].copy()
    ref = _Reference(roles, batch)
    attr = Attributor(roles)
    attr.ensure(batch)
    fwd_base = 0
    for r, forwards in enumerate(runs):
        stack = r % len(roles)
        valids, idss, expected = [], [], []
        for f, (seq, seed) in enumerate(forwards):
            rng = np.random.default_rng(seed)
            valid = rng.random((batch, seq)) < 0.8
            ids = rng.integers(0, 5, (batch, seq))  # EOS (0 or 1) fairly often
            valids.append(valid)
            idss.append(ids)
            got = ref.forward(stack, slots, valid, ids if with_ids else None, fwd_base + f)
            expected += got
        bounds = np.concatenate([[0], np.cumsum([v.shape[1] for v in valids])])
        rows = attr.attribute(
            stack,
            slots,
            np.concatenate(valids, axis=1),
            np.concatenate(idss, axis=1) if with_ids else None,
            EOS,
            bounds,
        )
        local_col = rows.col - bounds[rows.forward]
        got = list(
            zip(
                rows.row.tolist(),
                (rows.forward + fwd_base).tolist(),
                local_col.tolist(),
                rows.token.tolist(),
                rows.step.tolist(),
                rows.phase.tolist(),
                strict=True,
            )
        )
        assert got == sorted(expected, key=lambda t: (t[0], t[1], t[2]))
        assert rows.counts.tolist() == [sum(1 for t in expected if t[0] == b) for b in range(batch)]
        fwd_base += len(forwards)
    np.testing.assert_array_equal(attr.tokens[:, :batch], ref.tokens)
    np.testing.assert_array_equal(attr.steps[:, :batch], ref.steps)
    np.testing.assert_array_equal(attr.finished[:, :batch], ref.finished)


def test_eos_in_prompt_does_not_end_the_request_but_a_fed_back_eos_does() -> None:
    attr = Attributor(("causal",))
    attr.ensure(1)
    slots = np.array([0])
    # prefill [5, 0, 6] (EOS inside the prompt), then decode 7, EOS fed back, 8
    valid = np.ones((1, 6), bool)
    ids = np.array([[5, 0, 6, 7, 0, 8]])
    rows = attr.attribute(0, slots, valid, ids, np.array([0]), np.array([0, 3, 4, 5, 6]))
    assert rows.token.tolist() == [0, 1, 2, 3]
    assert rows.step.tolist() == [0, 0, 0, 1]
    assert rows.phase.tolist() == [PREFILL] * 3 + [DECODE]
    assert rows.forward.tolist() == [0, 0, 0, 1]
    assert attr.finished[0, 0] and attr.tokens[0, 0] == 4 and attr.steps[0, 0] == 2
