"""The verdict: can caching or prefetching pay off on this workload at all?"""

from __future__ import annotations

import math

from moetrace.tuner.mining.report import (
    MRCStats,
    PhaseStats,
    RequestStats,
    SkewStats,
    TransitionStats,
    Verdict,
)

MIN_LIFT = 0.02
"""A predictor has real lift when it beats the frequency baseline by this much (absolute)."""
CACHING_PAYS_FRACTION = 0.5
"""Caching pays when the optimum reaches 80% hits with at most this share of experts."""


def _size(size: int | None, num_experts: int) -> str:
    if size is None:
        return "never"
    return f"{size}/{num_experts} ({size / num_experts:.0%})"


def skew_line(skew: SkewStats, num_experts: int) -> str:
    """The verdict's line on expert skew (what per-expert counts alone can tell)."""
    hot80 = [h / num_experts for h in skew.hot_set["0.8"]]
    return (
        f"Skew: mean Gini {skew.model_gini:.2f}, 80% of activations on "
        f"{sum(hot80) / len(hot80):.0%} of experts on average, Zipf exponent "
        f"{skew.model_zipf_exponent:.2f}."
    )


def make_verdict(
    num_experts: int,
    skew: SkewStats,
    mrc: MRCStats,
    transitions: TransitionStats | None,
    requests: RequestStats | None,
    phases: PhaseStats,
    *,
    min_lift: float = MIN_LIFT,
) -> Verdict:
    """Summarize the sections in a few lines (sizes are experts cached per MoE layer)."""
    lru80, lru90 = mrc.lru_size_for.get("0.8"), mrc.lru_size_for.get("0.9")
    opt80, opt90 = mrc.belady_size_for.get("0.8"), mrc.belady_size_for.get("0.9")
    pays = opt80 is not None and opt80 <= CACHING_PAYS_FRACTION * num_experts
    lines = [
        f"Caching {'can pay off' if pays else 'pays little'}: 80% hits need "
        f"{_size(lru80, num_experts)} experts per layer under LRU, {_size(opt80, num_experts)} "
        f"under the optimum (Belady); 90% need {_size(lru90, num_experts)} / "
        f"{_size(opt90, num_experts)}.",
    ]
    if mrc.policy_sizes:
        i = len(mrc.policy_sizes) // 2
        c = mrc.policy_sizes[i]
        lines.append(
            f"At {c}/{num_experts} per layer: LRU {mrc.model_lru_at[i]:.3f}, LFU "
            f"{mrc.model_lfu[i]:.3f}, optimum {mrc.model_belady[i]:.3f} hit rate "
            f"(uniform routing would give {c / num_experts:.3f})."
        )
    lines.append(skew_line(skew, num_experts))
    lifted: list[str] = []
    parts: list[str] = []
    if transitions is not None and transitions.scores:
        gain = transitions.model_recall - transitions.model_baseline
        if gain >= min_lift:
            lifted.append("transitions")
        parts.append(
            f"next-layer transitions recall@{transitions.top_n} {transitions.model_recall:.3f} "
            f"vs frequency {transitions.model_baseline:.3f} ({gain:+.3f})"
        )
    if requests is not None and requests.predictors is not None:
        pred = requests.predictors
        i = len(pred.sizes) // 2
        base = pred.recall["frequency"][i]
        for name, rec in pred.recall.items():
            if name == "frequency":
                continue
            if rec[i] - base >= min_lift:
                lifted.append(name)
        best = max(
            (n for n in pred.recall if n != "frequency"),
            key=lambda n: pred.recall[n][i],
            default=None,
        )
        if best is not None:
            parts.append(
                f"request-level best '{best}' recall@{pred.sizes[i]} "
                f"{pred.recall[best][i]:.3f} vs frequency {base:.3f} "
                f"({pred.recall[best][i] - base:+.3f})"
            )
    if parts:
        head = f"Prefetching: predictors with real lift (>= {min_lift:.2f}): " + (
            ", ".join(lifted) if lifted else "none"
        )
        lines.append(head + "; " + "; ".join(parts) + ".")
    if phases.model_js_divergence is not None and not math.isnan(phases.model_js_divergence):
        js = phases.js_divergence or ()
        finite = [x for x in js if not math.isnan(x)]
        mean_js = sum(finite) / len(finite) if finite else float("nan")
        lines.append(
            f"Phases: prefill vs decode JS divergence {mean_js:.3f} per layer on average "
            f"({'different' if mean_js > 0.1 else 'similar'} expert mixes; 0 same, 1 disjoint)."
        )
    return Verdict(
        lines=tuple(lines),
        lru_size_80=lru80,
        lru_size_90=lru90,
        opt_size_80=opt80,
        opt_size_90=opt90,
        caching_pays=pays,
        predictors_with_lift=tuple(lifted),
    )
