"""A replay's timeline: what happened to every access and at every event.

The simulator's kernel records it when asked (``simulate(..., record=True)``) and the
offloading runtime records the same per-event outcomes (``OffloadEngine(...,
timeline_events=N)``), so a cache timeline can show both side by side. Arrays are
aligned with :class:`~moetrace.tuner.policy.events.Events`: ``outcome`` with
``events.experts`` (one per access, CSR by ``events.ptr``), the others one per event.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from moetrace.errors import AnalysisError
from moetrace.tuner.sim.kernel import O_HIT, O_MISS, O_PF_HIT, O_STREAM

OUTCOMES = ("miss", "hit", "prefetch hit", "streamed")
"""Names of the per-access outcome codes (index = code, see kernel.O_*): a *miss* loaded
the expert into a slot; a *hit* found it resident; a *prefetch hit* found it resident
thanks to a prefetch not used before; *streamed*: a miss with no slot to keep it in."""
assert OUTCOMES[O_MISS] == "miss" and OUTCOMES[O_HIT] == "hit"
assert OUTCOMES[O_PF_HIT] == "prefetch hit" and OUTCOMES[O_STREAM] == "streamed"

FORMAT_VERSION = 1


@dataclass(frozen=True)
class Timeline:
    """Per access ``outcome`` (int8 codes, see :data:`OUTCOMES`); per event ``wasted``
    (unused prefetches evicted at that event, by its loads or the prefetches it issued),
    ``issued`` (prefetches issued after it) and ``stall_s`` (seconds the event waited for
    its experts)."""

    ptr: np.ndarray
    outcome: np.ndarray
    wasted: np.ndarray
    issued: np.ndarray
    stall_s: np.ndarray

    def __post_init__(self) -> None:
        n = self.ptr.shape[0] - 1
        if n < 0 or self.outcome.shape[0] != int(self.ptr[-1]):
            raise AnalysisError(
                f"timeline: {self.outcome.shape[0]} outcomes for a CSR of {self.ptr[-1]} accesses"
            )
        for name in ("wasted", "issued", "stall_s"):
            if getattr(self, name).shape[0] != n:
                raise AnalysisError(f"timeline: {name} must have one value per event ({n})")
        if self.outcome.size and not (0 <= int(self.outcome.min()) and self.outcome.max() < 4):
            raise AnalysisError("timeline: outcome codes must be in 0..3")

    @property
    def num_events(self) -> int:
        return int(self.ptr.shape[0] - 1)

    def counts(self) -> dict[str, float]:
        """Totals, in the counters' vocabulary: accesses, hits (prefetch hits included),
        prefetch_served, streamed, misses (streamed included), prefetch_wasted,
        prefetch_issued, stall_s."""
        per = np.bincount(self.outcome.astype(np.int64), minlength=4)
        return {
            "accesses": float(self.outcome.shape[0]),
            "hits": float(per[O_HIT] + per[O_PF_HIT]),
            "prefetch_served": float(per[O_PF_HIT]),
            "streamed": float(per[O_STREAM]),
            "misses": float(per[O_MISS] + per[O_STREAM]),
            "prefetch_wasted": float(self.wasted.sum()),
            "prefetch_issued": float(self.issued.sum()),
            "stall_s": float(self.stall_s.sum()),
        }

    def select(self, start: int, stop: int) -> Timeline:
        """Events ``start..stop-1`` (their accesses), as a timeline of their own."""
        lo, hi = int(self.ptr[start]), int(self.ptr[stop])
        return Timeline(
            ptr=self.ptr[start : stop + 1] - lo,
            outcome=self.outcome[lo:hi],
            wasted=self.wasted[start:stop],
            issued=self.issued[start:stop],
            stall_s=self.stall_s[start:stop],
        )


@dataclass(frozen=True)
class RecordedTimeline:
    """A timeline with its events' own layer, phase and experts: what the runtime writes
    under ``timeline`` in its statistics JSON (the simulator's events carry these)."""

    layer: np.ndarray  # int (n,) MoE-layer index
    phase: np.ndarray  # int (n,) 0 prefill, 1 decode
    experts: np.ndarray  # int (accesses,) CSR by timeline.ptr
    timeline: Timeline
    events_seen: int
    """Events the run had in all (more than recorded when the cap cut the recording)."""
    max_events: int
    moe_layers: tuple[int, ...] = ()
    """Model layer ids of the MoE-layer indices in ``layer``."""

    def to_json(self) -> dict[str, Any]:
        t = self.timeline
        return {
            "format_version": FORMAT_VERSION,
            "outcomes": list(OUTCOMES),
            "max_events": self.max_events,
            "events_seen": self.events_seen,
            "truncated": self.events_seen > t.num_events,
            "moe_layers": list(self.moe_layers),
            "layer": self.layer.tolist(),
            "phase": self.phase.tolist(),
            "ptr": t.ptr.tolist(),
            "experts": self.experts.tolist(),
            "outcome": t.outcome.tolist(),
            "wasted": t.wasted.tolist(),
            "issued": t.issued.tolist(),
            "stall_s": t.stall_s.tolist(),
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> RecordedTimeline:
        """Read :meth:`to_json`'s object; AnalysisError when it is malformed."""
        try:
            version = int(data.get("format_version", 0))
            if version != FORMAT_VERSION:
                raise AnalysisError(
                    f"timeline format_version {version} (expected {FORMAT_VERSION})"
                )
            tl = Timeline(
                ptr=np.asarray(data["ptr"], np.int64),
                outcome=np.asarray(data["outcome"], np.int8),
                wasted=np.asarray(data["wasted"], np.int64),
                issued=np.asarray(data["issued"], np.int64),
                stall_s=np.asarray(data["stall_s"], np.float64),
            )
            out = cls(
                layer=np.asarray(data["layer"], np.int64),
                phase=np.asarray(data["phase"], np.int64),
                experts=np.asarray(data["experts"], np.int64),
                timeline=tl,
                events_seen=int(data.get("events_seen", tl.num_events)),
                max_events=int(data.get("max_events", tl.num_events)),
                moe_layers=tuple(int(x) for x in data.get("moe_layers", ())),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise AnalysisError(f"malformed runtime timeline ({exc!r})") from None
        n = tl.num_events
        if out.layer.shape[0] != n or out.phase.shape[0] != n:
            raise AnalysisError("malformed runtime timeline: layer/phase need one value per event")
        if out.experts.shape[0] != tl.outcome.shape[0]:
            raise AnalysisError("malformed runtime timeline: one expert per outcome")
        return out
