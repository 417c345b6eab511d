"""What the dashboard shows: trace, plan and runtime-stats paths, passed on the app's argv.

The launcher runs ``streamlit run app.py -- --trace T [--trace T2] [--plan P] [--stats S]``;
tests (which cannot pass argv to an in-process app) set :data:`ENV_VAR` to the same
arguments as a JSON object instead.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from moetrace.errors import ConfigError

ENV_VAR = "MOETRACE_DASHBOARD_INPUTS"
"""JSON ``{"traces": [...], "plans": [...], "stats": [...]}``; overrides argv when set."""

_FLAGS = {"--trace": "traces", "--plan": "plans", "--stats": "stats"}


@dataclass(frozen=True)
class DashboardInputs:
    """Paths the dashboard opens; traces are required, plans and runtime stats optional."""

    traces: tuple[str, ...]
    plans: tuple[str, ...] = ()
    stats: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        for name in ("traces", "plans", "stats"):
            value = getattr(self, name)
            if isinstance(value, str):
                raise ConfigError(f"dashboard {name} must be a list of paths, got {value!r}")
            object.__setattr__(self, name, tuple(str(Path(p)) for p in value))
        if not self.traces:
            raise ConfigError("the dashboard needs at least one trace directory")
        for name in ("traces", "plans", "stats"):
            paths = getattr(self, name)
            dup = sorted({p for p in paths if paths.count(p) > 1})
            if dup:
                raise ConfigError(f"dashboard {name}: {dup[0]!r} is given twice")

    def to_argv(self) -> list[str]:
        """The app's arguments (after streamlit's ``--``)."""
        out: list[str] = []
        for flag, name in _FLAGS.items():
            for path in getattr(self, name):
                out += [flag, str(Path(path).resolve())]
        return out

    def to_json(self) -> str:
        return json.dumps({"traces": self.traces, "plans": self.plans, "stats": self.stats})

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any]) -> DashboardInputs:
        unknown = sorted(set(data) - set(_FLAGS.values()))
        if unknown:
            raise ConfigError(f"dashboard inputs: unknown key {unknown[0]!r}")
        return cls(
            traces=tuple(data.get("traces", ())),
            plans=tuple(data.get("plans", ())),
            stats=tuple(data.get("stats", ())),
        )


def parse_argv(argv: Sequence[str]) -> DashboardInputs:
    """Parse ``--trace/--plan/--stats PATH`` pairs (each flag may repeat)."""
    found: dict[str, list[str]] = {name: [] for name in _FLAGS.values()}
    args = list(argv)
    i = 0
    while i < len(args):
        flag = args[i]
        if flag not in _FLAGS:
            raise ConfigError(f"dashboard: unknown argument {flag!r} (expected {sorted(_FLAGS)})")
        if i + 1 >= len(args):
            raise ConfigError(f"dashboard: {flag} needs a path")
        found[_FLAGS[flag]].append(args[i + 1])
        i += 2
    return DashboardInputs.from_mapping(found)


def current_inputs(argv: Sequence[str]) -> DashboardInputs:
    """The inputs of this app run: :data:`ENV_VAR` when set, else ``argv``."""
    raw = os.environ.get(ENV_VAR)
    if raw:
        try:
            data = json.loads(raw)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"${ENV_VAR} is not valid JSON ({exc.msg})") from None
        if not isinstance(data, dict):
            raise ConfigError(f"${ENV_VAR} must be a JSON object, got {type(data).__name__}")
        return DashboardInputs.from_mapping(data)
    return parse_argv(argv)
