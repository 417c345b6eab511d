"""Fan independent replays out: in this process, on a local process pool, or on Ray.

A replay is a pure function of its events, plan and hardware profile, so ``tune`` hands
them out as tasks and gets the same numbers whichever executor runs them (the kernel is
deterministic; tested bit for bit). Events are large and reused by many tasks, so they
are *shared* once: registered in this process before the pool forks (each worker inherits
them), or put in Ray's object store. Tasks carry only a handle, the candidate and its
settings.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import socket
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from typing import Any

from moetrace.errors import ConfigError

log = logging.getLogger(__name__)

_SHARED: dict[str, Any] = {}
"""Events by key, in the parent and (inherited at fork) in every pool worker."""


def shared(handle: Any) -> Any:
    """The object a handle stands for (a key of this process's registry, or the object
    itself: Ray resolves object references before the task runs)."""
    return _SHARED[handle] if isinstance(handle, str) else handle


def default_workers() -> int:
    """Worker processes for this machine: the CPUs this process may use."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


class Fanout:
    """Runs ``fn(*args)`` for many argument tuples, results in order.

    ``workers``: 1 runs in this process; more use a local pool of that many processes
    (fork: workers inherit the shared events; where fork is unavailable, serial).
    ``ray``: an address (``"auto"``, ``"ray://host:10001"``, ``"local"`` for a new local
    cluster) runs the tasks on Ray instead."""

    def __init__(self, workers: int = 1, ray: str | None = None):
        if workers < 1:
            raise ConfigError(f"workers must be >= 1, got {workers}")
        self.workers = workers
        self.ray_address = ray
        self._pool: ProcessPoolExecutor | None = None
        self._keys: list[str] = []
        self._ray: Any = None
        self._remote: dict[Callable[..., Any], Any] = {}
        if ray is not None:
            self._start_ray(ray)

    @property
    def kind(self) -> str:
        if self._ray is not None:
            return "ray"
        return "pool" if self.workers > 1 and _can_fork() else "serial"

    def _start_ray(self, address: str) -> None:
        try:
            import ray
        except ImportError:
            raise ConfigError("--ray needs the ray package (pip install 'moetrace[ray]')") from None
        why = _unreachable(address)
        if why is not None:
            raise ConfigError(f"cannot connect to Ray at {address!r}: {why}")
        try:
            if not ray.is_initialized():
                if address == "local":
                    ray.init(num_cpus=self.workers, include_dashboard=False,
                             log_to_driver=False)  # fmt: skip
                else:
                    ray.init(address=address, include_dashboard=False, log_to_driver=False)
        except Exception as exc:  # ray raises ConnectionError, RuntimeError, ValueError...
            raise ConfigError(f"cannot connect to Ray at {address!r}: {exc}") from None
        self._ray = ray

    def share(self, key: str, obj: Any) -> Any:
        """Make ``obj`` available to tasks; returns the handle to pass them."""
        if self._ray is not None:
            return self._ray.put(obj)
        if key not in _SHARED or _SHARED[key] is not obj:
            _SHARED[key] = obj
            self._keys.append(key)
            self._stop_pool()  # a pool forked before this object does not have it
        return key

    def map(self, fn: Callable[..., Any], args: Sequence[tuple[Any, ...]]) -> list[Any]:
        """``[fn(*a) for a in args]``, fanned out."""
        if not args:
            return []
        if self._ray is not None:
            remote = self._remote.get(fn)
            if remote is None:
                remote = self._remote[fn] = self._ray.remote(fn)
            return list(self._ray.get([remote.remote(*a) for a in args]))
        if self.kind == "serial" or len(args) == 1:
            return [fn(*a) for a in args]
        if self._pool is None:
            self._pool = ProcessPoolExecutor(self.workers, mp_context=mp.get_context("fork"))
        return list(self._pool.map(_call, [(fn, a) for a in args]))

    def _stop_pool(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None

    def close(self) -> None:
        """Stop the pool and forget what was shared (a Ray cluster is left running)."""
        self._stop_pool()
        for key in self._keys:
            _SHARED.pop(key, None)
        self._keys.clear()

    def __enter__(self) -> Fanout:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _unreachable(address: str) -> str | None:
    """Why nothing answers at a ``host:port`` or ``ray://host:port`` address (None when
    something does, or for ``auto``/``local``), so that a wrong address fails in seconds
    rather than after Ray's own minutes of retries."""
    host, sep, port = address.removeprefix("ray://").rpartition(":")
    if not sep or not port.isdigit() or not host:
        return None
    try:
        socket.create_connection((host, int(port)), timeout=5).close()
    except OSError as exc:
        return exc.strerror or str(exc)
    return None


def _call(item: tuple[Callable[..., Any], tuple[Any, ...]]) -> Any:
    fn, args = item
    return fn(*args)


def _can_fork() -> bool:
    return "fork" in mp.get_all_start_methods()
