"""Policy and prefetcher parameters: names each one accepts, numbers in their range.

Plans and ``--param NAME=VALUE`` reach the policies through :func:`check_params`, so a
misspelt name or a non-numeric value is a one-line ConfigError naming the valid choices,
never a silently ignored setting or a traceback deep in the simulator.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

from moetrace.errors import ConfigError

# name -> (low, high, low inclusive, integer)
BOUNDS: dict[str, tuple[float, float, bool, bool]] = {
    "decay": (0.0, 1.0, False, False),
    "pin_fraction": (0.0, 1.0, True, False),
    "alpha": (0.0, math.inf, True, False),
    "beta": (0.0, math.inf, True, False),
    "gamma": (0.0, math.inf, True, False),
    "keep": (1.0, math.inf, True, True),
    "max_refs": (1.0, math.inf, True, True),
    "neighbors": (1.0, math.inf, True, True),
    "own": (0.0, math.inf, True, False),
    "window": (0.0, 0.99, True, False),
    "protected": (0.0, 1.0, False, False),
    "sample": (1.0, math.inf, True, False),
    "step": (0.0, 1.0, False, False),
    "climb": (0.0, 1.0, True, True),
    "learning_rate": (0.0, math.inf, True, False),
    "discount": (0.0, 0.99, False, False),
    "seed": (0.0, 2.0**31, True, True),
    "repin": (0.0, math.inf, True, True),
    "prior_decay": (0.0, 1.0, False, False),
    "horizon": (1.0, 64.0, True, True),
}


def check_params(params: Mapping[str, Any], accepted: Iterable[str], what: str) -> dict[str, float]:
    """``params`` as numbers; ConfigError for unknown names, non-numbers or out-of-range values."""
    names = sorted(set(accepted))
    out: dict[str, float] = {}
    for name, value in params.items():
        if name not in names:
            valid = f"valid: {', '.join(names)}" if names else "it takes no parameters"
            raise ConfigError(f"unknown parameter {name!r} for {what}; {valid}")
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"parameter {name!r} of {what} must be a number, got {value!r}")
        v = float(value)
        lo, hi, lo_in, integer = BOUNDS.get(name, (-math.inf, math.inf, True, False))
        ok = math.isfinite(v) and (v >= lo if lo_in else v > lo) and v <= hi
        if integer and ok:
            ok = v == int(v)
        if not ok:
            rng = f"{'[' if lo_in else '('}{lo:g}, {hi:g}]"
            kind = "an integer" if integer else "a number"
            raise ConfigError(
                f"parameter {name!r} of {what} must be {kind} in {rng}, got {value!r}"
            )
        out[name] = v
    return out
