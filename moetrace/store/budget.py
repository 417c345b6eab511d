"""Expert budgets, one syntax everywhere (``tune``, ``simulate``, ``run``, ``bench``, ``demo``).

A budget is written as

- ``N%``: that share of all experts of the model (``25%``, ``12.5%``), as cache slots;
- a size in bytes with a unit (``64MiB``, ``1.5GB``, ``4GiB``, ``512KB``, ``100B``): the
  bytes of expert weights allowed in the fast tier;
- a plain integer: that many expert slots.

The tuner and the simulator count cache slots: a byte budget is ``bytes // bytes_per_expert``
slots. The runtime also needs ``top_k`` staging slots for experts it streams past a full
cache: a byte budget covers the staging slots too (``bytes // bytes_per_expert - top_k`` cache
slots), while a budget in % or slots names the cache slots and the staging slots come on top.
Every budget must give at least one cache slot and at most every expert of the model;
anything else is a :class:`~moetrace.errors.ConfigError` naming what the budget amounts to.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

from moetrace.errors import ConfigError

_SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*$")
UNITS = {
    "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9,
    "t": 10**12, "tb": 10**12, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
}  # fmt: skip
SYNTAX = "N% of all experts (25%), bytes with a unit (64MiB, 4GB) or a number of slots (96)"


@dataclass(frozen=True)
class BudgetSpec:
    """A parsed budget: ``kind`` is ``percent``, ``bytes`` or ``slots``."""

    text: str
    kind: Literal["percent", "bytes", "slots"]
    value: float

    def cache_slots(
        self,
        num_layers: int,
        num_experts: int,
        bytes_per_expert: int | None,
        *,
        staging: int = 0,
    ) -> int:
        """Cache slots this budget gives a model; ``staging`` slots come out of a byte budget."""
        total = num_layers * num_experts
        if self.kind == "percent":
            slots = int(round(total * self.value / 100.0))
            what = f"{self.value:g}% of {total} experts = {slots} slots"
        elif self.kind == "slots":
            slots = int(self.value)
            what = f"{slots} slots"
        else:
            if not bytes_per_expert:
                raise ConfigError(
                    f"budget {self.text!r} is in bytes but bytes_per_expert is unknown; "
                    "give --bytes-per-expert or a budget in slots or %"
                )
            held = int(self.value) // int(bytes_per_expert)
            slots = held - staging
            what = f"{int(self.value)} bytes hold {held} experts of {bytes_per_expert} bytes"
            if staging and slots >= 1:
                what += f", {slots} cache slots after {staging} staging slots"
        if slots < 1:
            need = "1 slot"
            if self.kind == "bytes":
                need = f"top_k + 1 = {1 + staging} experts" if staging else "1 expert"
            raise ConfigError(f"budget {self.text!r} is too small: {what}; at least {need}")
        if slots > total:
            raise ConfigError(
                f"budget {self.text!r} exceeds the model: {what}, the model has {total} experts "
                f"in all (use 100% to keep every expert)"
            )
        return slots

    def device_bytes(
        self, num_layers: int, num_experts: int, bytes_per_expert: int, *, staging: int
    ) -> int:
        """Bytes of expert weights the runtime may hold (cache plus ``staging`` slots)."""
        if self.kind == "bytes":
            self.cache_slots(num_layers, num_experts, bytes_per_expert, staging=staging)
            return int(self.value)
        slots = self.cache_slots(num_layers, num_experts, bytes_per_expert)
        return (slots + staging) * int(bytes_per_expert)


def parse_budget(text: str | int | float | BudgetSpec) -> BudgetSpec:
    """Parse a budget's syntax (see the module docstring); ConfigError when malformed."""
    if isinstance(text, BudgetSpec):
        return text
    s = str(text).strip()
    if s.endswith("%"):
        try:
            pct = float(s[:-1])
        except ValueError:
            raise ConfigError(f"budget {text!r} is not a percentage; expected {SYNTAX}") from None
        if not 0 < pct <= 100:
            raise ConfigError(f"budget {text!r}: a percentage must be in (0, 100]")
        return BudgetSpec(s, "percent", pct)
    if s.isdigit():
        slots = int(s)
        if slots < 1:
            raise ConfigError(f"budget {text!r} must be at least 1 slot")
        return BudgetSpec(s, "slots", slots)
    m = _SIZE.match(s)
    unit = m.group(2).lower() if m else ""
    if m is None or unit not in UNITS:
        raise ConfigError(f"budget {text!r}: expected {SYNTAX}")
    value = int(float(m.group(1)) * UNITS[unit])
    if value <= 0:
        raise ConfigError(f"budget {text!r} must be more than 0 bytes")
    return BudgetSpec(s, "bytes", value)


def parse_size(text: str, what: str = "size") -> int:
    """Bytes from ``"64MiB"``, ``"1.5GB"`` or a plain ``"1048576"``."""
    m = _SIZE.match(str(text))
    unit = m.group(2).lower() if m else ""
    if m is None or (unit and unit not in UNITS):
        raise ConfigError(f"{what} {text!r} is not a size like 64MiB, 2GB or 1048576")
    value = int(float(m.group(1)) * UNITS.get(unit, 1))
    if value <= 0:
        raise ConfigError(f"{what} must be more than 0 bytes, got {text!r}")
    return value
