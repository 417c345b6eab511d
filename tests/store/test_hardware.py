"""Hardware profiles: the RAM -> device link, the optional disk -> RAM link, validation."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from moetrace.errors import ConfigError
from moetrace.store.hardware import HardwareProfile, list_profiles, load_hardware

# a profile as written before the disk link existed (the old pcie4-x16 asset)
OLD_JSON = {
    "name": "old-box",
    "description": "Consumer GPU on PCIe 4.0 x16, experts in pinned host memory",
    "link_nominal_gbps": 31.5,
    "link_bandwidth_gbps": 25.0,
    "transfer_latency_us": 10.0,
    "layer_compute_base_us": 250.0,
    "layer_compute_per_token_us": 1.5,
    "device_memory_gib": 24.0,
    "source": "PCIe 4.0 x16",
}


def _profile(**kw: object) -> HardwareProfile:
    return HardwareProfile("box", 25.0, 10.0, 250.0, 1.5, **kw)  # type: ignore[arg-type]


def test_old_json_without_disk_fields_loads(tmp_path: Path) -> None:
    path = tmp_path / "old.json"
    path.write_text(json.dumps(OLD_JSON))
    hw = load_hardware(path)
    assert hw.link_bandwidth_gbps == 25.0 and hw.transfer_seconds(25_000_000) == 1e-3
    assert not hw.has_disk_link
    assert hw.disk_bandwidth_gbps is hw.disk_latency_us is hw.host_memory_gib is None
    with pytest.raises(ConfigError, match=r"old-box has no disk link"):
        hw.disk_bytes_per_second  # noqa: B018
    with pytest.raises(ConfigError, match=r"no disk link"):
        hw.disk_seconds(1)


def test_unknown_field_still_rejected(tmp_path: Path) -> None:
    path = tmp_path / "bad.json"
    path.write_text(json.dumps({**OLD_JSON, "disk_bandwith_gbps": 5.0}))
    with pytest.raises(ConfigError, match=r"unknown field 'disk_bandwith_gbps'"):
        load_hardware(path)


def test_disk_link_figures() -> None:
    hw = _profile(disk_bandwidth_gbps=5.0, disk_latency_us=80.0, host_memory_gib=64.0)
    assert hw.has_disk_link
    assert hw.disk_bytes_per_second == 5e9
    assert hw.disk_seconds(5_000_000) == pytest.approx(1e-3)
    assert hw.disk_latency_seconds == pytest.approx(80e-6)
    # latency not given: 0 when the bandwidth is
    assert _profile(disk_bandwidth_gbps=5.0).disk_latency_seconds == 0.0
    # round trip through JSON
    again = HardwareProfile.from_json(json.loads(json.dumps(hw.to_json())), "x")
    assert again == hw


@pytest.mark.parametrize(
    ("key", "value", "rule"),
    [
        ("disk_bandwidth_gbps", 0.0, "> 0"),
        ("disk_bandwidth_gbps", -1.0, "> 0"),
        ("disk_bandwidth_gbps", math.nan, "> 0"),
        ("disk_bandwidth_gbps", math.inf, "> 0"),
        ("disk_bandwidth_gbps", "5", "> 0"),
        ("disk_nominal_gbps", 0.0, "> 0"),
        ("disk_nominal_gbps", math.nan, "> 0"),
        ("host_memory_gib", -64.0, "> 0"),
        ("host_memory_gib", math.nan, "> 0"),
        ("disk_latency_us", -1.0, ">= 0"),
        ("disk_latency_us", math.nan, ">= 0"),
        ("disk_latency_us", math.inf, ">= 0"),
    ],
)
def test_disk_fields_validated(key: str, value: object, rule: str) -> None:
    with pytest.raises(ConfigError, match=rf"box: {key} must be {rule}, got"):
        _profile(**{key: value})


def test_zero_disk_latency_allowed_and_file_errors_name_the_file(tmp_path: Path) -> None:
    assert _profile(disk_bandwidth_gbps=1.0, disk_latency_us=0.0).disk_latency_us == 0.0
    path = tmp_path / "neg.json"
    path.write_text(json.dumps({**OLD_JSON, "disk_bandwidth_gbps": -5.0}))
    with pytest.raises(ConfigError, match=r"neg\.json: hardware profile old-box: disk_band"):
        load_hardware(path)


def test_shipped_profiles_have_disk_links() -> None:
    assert set(list_profiles()) >= {"pcie4-x16", "pcie5-x16", "h100-pcie"}
    for name in list_profiles():
        hw = load_hardware(name)
        assert hw.has_disk_link, name
        assert hw.disk_bandwidth_gbps < hw.disk_nominal_gbps  # type: ignore[operator]
        assert hw.disk_bandwidth_gbps < hw.link_bandwidth_gbps  # the disk is the slow link
        assert hw.disk_latency_us and hw.disk_latency_us > hw.transfer_latency_us
        assert hw.host_memory_gib and hw.host_memory_gib > (hw.device_memory_gib or 0)
        assert "moetrace profile" in hw.source, name
    assert (
        load_hardware("pcie5-x16").disk_bandwidth_gbps
        > load_hardware(  # type: ignore[operator]
            "pcie4-x16"
        ).disk_bandwidth_gbps
    )
