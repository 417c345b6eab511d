"""The offloading runtime: run a transformers MoE model from a budgeted cache of experts."""

from moetrace.runtime.checks import Footprint, all_resident_plan, check_plan, default_plan
from moetrace.runtime.engine import OffloadEngine
from moetrace.runtime.expert_store import is_store, load_skeleton, prepare_store
from moetrace.runtime.stats import RuntimeStats

__all__ = [
    "Footprint",
    "OffloadEngine",
    "RuntimeStats",
    "all_resident_plan",
    "check_plan",
    "default_plan",
    "is_store",
    "load_skeleton",
    "prepare_store",
]
