"""Trace mining for ``moetrace analyze``: skewed reuse, group activation, phase disparity.

One concept per module; :func:`moetrace.tuner.analyze.analyze` combines them into an
:class:`~moetrace.tuner.mining.report.AnalysisReport`. The functions here are pure (explicit
seeds) and exported so the dashboard can recompute one layer's tables on demand.
"""

from moetrace.tuner.mining.frequency import (
    entropy_bits,
    frequency_from_routing,
    frequency_matrices,
    gini,
    hot_set_size,
    zipf_exponent,
)
from moetrace.tuner.mining.groups import greedy_groups, lift, pair_counts, top_pairs
from moetrace.tuner.mining.mrc import lru_hit_curve
from moetrace.tuner.mining.replacement import TokenStream, belady_hits, lfu_hits
from moetrace.tuner.mining.report import REPORT_VERSION, AnalysisReport
from moetrace.tuner.mining.requests import activation_matrices, cluster_requests
from moetrace.tuner.mining.reuse import stack_distances
from moetrace.tuner.mining.streams import layer_stream, layer_streams
from moetrace.tuner.mining.transitions import score_transitions, transition_counts

__all__ = [
    "REPORT_VERSION",
    "TokenStream",
    "AnalysisReport",
    "activation_matrices",
    "belady_hits",
    "cluster_requests",
    "entropy_bits",
    "frequency_from_routing",
    "frequency_matrices",
    "gini",
    "greedy_groups",
    "hot_set_size",
    "layer_stream",
    "layer_streams",
    "lfu_hits",
    "lift",
    "lru_hit_curve",
    "pair_counts",
    "score_transitions",
    "stack_distances",
    "top_pairs",
    "transition_counts",
    "zipf_exponent",
]
