"""One budget syntax for the tuner, the simulator and the runtime."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from moetrace.errors import ConfigError
from moetrace.store.budget import BudgetSpec, parse_budget, parse_size


def test_kinds():
    assert parse_budget("64MiB") == BudgetSpec("64MiB", "bytes", 64 * 2**20)
    assert parse_budget("1.5GB").value == 1_500_000_000
    assert parse_budget(" 4096 ") == BudgetSpec("4096", "slots", 4096)
    assert parse_budget("25%") == BudgetSpec("25%", "percent", 25.0)
    assert parse_budget(96).kind == "slots"


@pytest.mark.parametrize(
    "text, match",
    [
        ("lots", "expected N%"),
        ("", "expected N%"),
        ("-5", "expected N%"),
        ("0", "at least 1 slot"),
        ("0%", r"in \(0, 100\]"),
        ("150%", r"in \(0, 100\]"),
        ("abc%", "not a percentage"),
        ("12XB", "expected N%"),
        ("0MiB", "more than 0 bytes"),
    ],
)
def test_malformed(text, match):
    with pytest.raises(ConfigError, match=match):
        parse_budget(text)


def test_resolution_tuner_and_runtime():
    # 4 layers x 8 experts, 100-byte experts, top-2
    assert parse_budget("25%").cache_slots(4, 8, 100) == 8
    assert parse_budget("1000B").cache_slots(4, 8, 100) == 10
    assert parse_budget("1000B").cache_slots(4, 8, 100, staging=2) == 8
    assert parse_budget("25%").device_bytes(4, 8, 100, staging=2) == (8 + 2) * 100
    assert parse_budget("1000B").device_bytes(4, 8, 100, staging=2) == 1000
    assert parse_budget("100%").cache_slots(4, 8, 100) == 32


@pytest.mark.parametrize(
    "text, match",
    [
        ("1B", r"too small: 1 bytes hold 0 experts .* at least top_k \+ 1 = 3"),
        ("250B", r"too small: 250 bytes hold 2 experts of 100 bytes; at least top_k \+ 1 = 3"),
        ("33", "exceeds the model: 33 slots, the model has 32"),
        ("10KB", "exceeds the model"),
    ],
)
def test_out_of_range(text, match):
    with pytest.raises(ConfigError, match=match):
        parse_budget(text).device_bytes(4, 8, 100, staging=2)


def test_bytes_need_bytes_per_expert():
    with pytest.raises(ConfigError, match="bytes_per_expert is unknown"):
        parse_budget("4GiB").cache_slots(4, 8, None)


@given(st.integers(1, 10**12), st.sampled_from(["B", "KB", "KiB", "MB", "MiB", "GB", "GiB"]))
def test_size_round_trip(n, unit):
    spec = parse_budget(f"{n}{unit}")
    assert spec.kind == "bytes" and spec.value >= n
    assert parse_size(f"{n}{unit}") == spec.value


def test_parse_size():
    assert parse_size("4096") == 4096
    with pytest.raises(ConfigError, match="--bytes 'lots' is not a size"):
        parse_size("lots", "--bytes")
