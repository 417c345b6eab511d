"""``moetrace profile``: both links (RAM -> device, disk -> RAM) and the layer compute."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from click.testing import CliRunner

from moetrace.cli import main
from moetrace.errors import ConfigError
from moetrace.runtime.direct_io import MODES
from moetrace.runtime.expert_store import STORE_INDEX
from moetrace.runtime.profile import (
    TOKEN_COUNTS,
    StoreSamples,
    measure_disk,
    measure_link,
    profile_hardware,
    profile_lines,
)
from moetrace.store.hardware import load_hardware

MiB = 2**20


def _finite_positive(x: float | None) -> bool:
    return x is not None and math.isfinite(x) and x > 0


def test_profile_hardware_cpu_measures_both_links(tmp_path: Path) -> None:
    hw = profile_hardware("cpu", nbytes=2 * MiB, repeats=2, directory=tmp_path)
    assert _finite_positive(hw.link_bandwidth_gbps)
    assert _finite_positive(hw.disk_bandwidth_gbps)
    assert hw.has_disk_link
    assert math.isfinite(hw.transfer_latency_us) and hw.transfer_latency_us >= 0
    assert hw.disk_latency_us is not None and math.isfinite(hw.disk_latency_us)
    assert hw.layer_compute_base_us >= 0 and hw.layer_compute_per_token_us >= 0
    assert hw.host_memory_gib and hw.host_memory_gib > 0
    mode = hw.source.split("disk read mode: ")[1].split(",")[0]
    assert mode in MODES
    assert f"{mode} reads" in hw.description and "host memcpy" in hw.description
    assert not list(tmp_path.iterdir())  # the test file is removed


@pytest.mark.parametrize("mode", MODES)
def test_measure_disk_modes(tmp_path: Path, mode: str) -> None:
    d = measure_disk(tmp_path, nbytes=MiB + 1, repeats=2, mode=mode)
    assert d.mode in MODES  # direct falls back to dontneed where the fs has no O_DIRECT
    if mode == "dontneed":
        assert d.mode == "dontneed"
    assert d.read_bytes == MiB + 4096  # whole blocks
    assert d.file_bytes == 4 * d.read_bytes
    assert _finite_positive(d.gbps) and d.latency_us >= 0
    assert d.directory == str(tmp_path) and d.mode in d.mode_text


def test_measure_link_cpu() -> None:
    link = measure_link(torch.device("cpu"), MiB, 2)
    assert _finite_positive(link.gbps) and link.latency_us >= 0 and "memcpy" in link.what


def test_measure_disk_bad_folder(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"disk test folder .*nope does not exist"):
        measure_disk(tmp_path / "nope", nbytes=MiB, repeats=1)
    afile = tmp_path / "afile"
    afile.write_text("x")
    with pytest.raises(ConfigError, match=r"disk test folder .*afile is not a folder"):
        measure_disk(afile, nbytes=MiB, repeats=1)


def test_measure_disk_unwritable_folder(tmp_path: Path) -> None:
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        if (ro / "probe").exists() or _writable_anyway(ro):
            pytest.skip("running as root: permissions are not enforced")
        with pytest.raises(ConfigError, match=r"disk test folder .*ro is not writable"):
            measure_disk(ro, nbytes=MiB, repeats=1)
    finally:
        ro.chmod(0o700)


def _writable_anyway(folder: Path) -> bool:
    try:
        (folder / "probe").write_text("x")
    except OSError:
        return False
    (folder / "probe").unlink()
    return True


def test_store_samples_profile_sets_disk_link() -> None:
    s = StoreSamples("store", 1_000_000, 2, "direct", single=[2e-3], batch=[3e-3])
    s.compute = [[1e-4] for _ in TOKEN_COUNTS]
    hw = s.profile("st")
    assert hw.link_bandwidth_gbps == pytest.approx(1.0)  # 1 ms per 1 MB read
    assert hw.transfer_latency_us == pytest.approx(1000.0)
    assert hw.disk_bandwidth_gbps == hw.link_bandwidth_gbps
    assert hw.disk_latency_us == hw.transfer_latency_us
    host = StoreSamples("store", 1_000_000, 2, "host", single=[2e-3], batch=[3e-3])
    host.compute = s.compute
    assert not host.profile("st").has_disk_link  # the replay's host tier is no disk


def test_profile_lines() -> None:
    lines = profile_lines(load_hardware("pcie4-x16"), disk_mode="direct reads")
    assert lines == [
        "RAM -> device: 25.000 GB/s, 10.00 us latency",
        "disk -> RAM: 5.000 GB/s, 80.00 us latency (direct reads)",
        "layer compute: 250.00 us + 1.500 us per token",
    ]


def test_cli_profile_writes_both_links(tmp_path: Path) -> None:
    out = tmp_path / "hw.json"
    res = CliRunner().invoke(
        main,
        ["profile", "--bytes", "1MiB", "--repeats", "2", "--dir", str(tmp_path),
         "--name", "box", "--out", str(out)],
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    hw = load_hardware(out)
    assert hw.name == "box" and hw.has_disk_link
    data = json.loads(out.read_text())
    assert {"disk_bandwidth_gbps", "disk_latency_us", "host_memory_gib"} <= set(data)
    lines = res.stdout.splitlines()
    assert lines[0].startswith("RAM -> device: ") and " GB/s, " in lines[0]
    assert lines[1].startswith("disk -> RAM: ") and " reads (" in lines[1]
    assert lines[2].startswith("layer compute: ")
    assert lines[3] == f"wrote hardware profile box to {out}"


def test_cli_profile_missing_dir_is_one_line(tmp_path: Path) -> None:
    res = CliRunner().invoke(main, ["profile", "--dir", str(tmp_path / "nope")])
    assert res.exit_code == 2
    assert res.stdout == ""
    assert res.stderr.strip().splitlines() == [
        f"moetrace: error: disk test folder {tmp_path / 'nope'} does not exist"
    ]
    assert "Traceback" not in res.output


def test_cli_profile_dir_with_store_is_usage_error(tmp_path: Path) -> None:
    store = tmp_path / "store"
    store.mkdir()
    (store / STORE_INDEX).write_text("{}")  # enough for is_store; never read
    res = CliRunner().invoke(main, ["profile", "--model", str(store), "--dir", str(tmp_path)])
    assert res.exit_code == 2
    assert "--dir does not apply to an expert store" in res.stderr
    with pytest.raises(ConfigError, match=r"disk test folder does not apply"):
        profile_hardware("cpu", model=str(store), directory=tmp_path)


def _free(blocks: int) -> SimpleNamespace:
    """An ``os.statvfs`` result of ``blocks`` free 4 KiB blocks."""
    return SimpleNamespace(f_bavail=blocks, f_frsize=4096)


def test_measure_disk_full_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "statvfs", lambda path: _free(1000))
    with pytest.raises(ConfigError, match=r"has 4096000 bytes free, too little for a 16777216"):
        measure_disk(tmp_path, nbytes=4 * MiB, repeats=1)


def test_measure_disk_folder_where_nothing_can_be_written(monkeypatch: pytest.MonkeyPatch) -> None:
    if not Path("/proc/self/mounts").exists() or not os.access("/proc", os.W_OK):
        pytest.skip("needs Linux's /proc and root (who passes the writable check)")
    monkeypatch.setattr(os, "statvfs", lambda path: _free(2**30))  # past the space check
    with pytest.raises(ConfigError, match=r"disk test folder /proc: cannot write there"):
        measure_disk("/proc", nbytes=MiB, repeats=1)
