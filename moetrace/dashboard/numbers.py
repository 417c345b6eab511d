"""Numbers as people read them on the dashboard: percentages, points, ms, bytes, rates.

Every helper takes ``None``/NaN and answers ``"—"`` (never ``None`` or ``nan`` on a page).
"""

from __future__ import annotations

import math
from typing import Any

MISSING = "—"


def _bad(v: Any) -> bool:
    return v is None or isinstance(v, bool) or not isinstance(v, (int, float)) or math.isnan(v)


def pct(fraction: float | None, digits: int = 1) -> str:
    """0.9081 -> '90.8%'."""
    return MISSING if _bad(fraction) else f"{100 * float(fraction):.{digits}f}%"


def points(delta: float | None, digits: int = 1) -> str:
    """A difference of two fractions in percentage points: 0.029 -> '+2.9 pt'."""
    return MISSING if _bad(delta) else f"{100 * float(delta):+.{digits}f} pt"


def ms(value: float | None) -> str:
    """Milliseconds with three significant digits: 0.021432 -> '0.0214 ms'."""
    return MISSING if _bad(value) else f"{float(value):.3g} ms"


def seconds(value: float | None) -> str:
    """Seconds with three significant digits: 186.40412 -> '186 s', 0.03126 -> '0.0313 s'."""
    return MISSING if _bad(value) else f"{float(value):.3g} s"


def per_s(value: float | None) -> str:
    """A rate: 2398.77 -> '2,399/s'."""
    return MISSING if _bad(value) else f"{float(value):,.0f}/s"


def nbytes(value: float | None) -> str:
    """Bytes in binary units: 3826715197440 -> '3.48 TiB'."""
    if _bad(value):
        return MISSING
    v = float(value)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(v) < 1024 or unit == "TiB":
            return f"{v:,.0f} {unit}" if unit == "B" else f"{v:.3g} {unit}"
        v /= 1024
    return MISSING  # unreachable


def ratio(value: float | None) -> str:
    """A relative change: 0.78 -> '-22%' (value 1 is no change)."""
    return MISSING if _bad(value) else f"{100 * (float(value) - 1):+.0f}%"


def plain(value: Any) -> str:
    """Any JSON value: floats with at most 4 significant digits, ``None`` as a dash."""
    if value is None:
        return MISSING
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        if math.isnan(value):
            return MISSING
        return f"{value:,.0f}" if abs(value) >= 1e4 else f"{value:.4g}"
    if isinstance(value, int):
        return f"{value:,}" if abs(value) >= 1e4 else str(value)
    return str(value)
