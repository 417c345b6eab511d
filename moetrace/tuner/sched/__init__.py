"""Request scheduling: the queue model and the schedulers it compares."""

from moetrace.tuner.sched.arrivals import arrival_times
from moetrace.tuner.sched.queue import QueueResult, simulate_queue
from moetrace.tuner.sched.schedulers import REGISTRY, Scheduler, get_scheduler, register_scheduler

__all__ = [
    "REGISTRY",
    "QueueResult",
    "Scheduler",
    "arrival_times",
    "get_scheduler",
    "register_scheduler",
    "simulate_queue",
]
