"""Hardware profiles for the simulator's timing model (shipped under assets/hardware)."""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from moetrace.errors import ConfigError

DEFAULT_PROFILE = "pcie4-x16"


@dataclass(frozen=True)
class HardwareProfile:
    """The links and per-layer compute time of one serving setup.

    Two links feed the device's expert slots:

    - ``link_*``: host RAM -> device slots (PCIe host-to-device copies on a GPU; a host
      memcpy into a slot when the device is the CPU). In a plan without a RAM tier it is
      the slow tier -> device link, as it always was. ``link_bandwidth_gbps`` is the
      achievable bandwidth the model uses (GB/s = 1e9 B/s), ``transfer_latency_us`` the
      fixed cost per transfer, ``link_nominal_gbps`` the spec figure, for reference.
    - ``disk_*`` (optional): disk -> host RAM, reads without the page cache.
      ``disk_bandwidth_gbps`` is the achievable read rate, ``disk_latency_us`` the fixed
      cost per read (None: 0 when the bandwidth is given), ``disk_nominal_gbps`` the spec
      figure. A profile without ``disk_bandwidth_gbps`` has no disk link
      (:attr:`has_disk_link`); a three-tier plan needs one.

    A layer computes in ``layer_compute_base_us + layer_compute_per_token_us * tokens``
    microseconds. ``device_memory_gib`` and ``host_memory_gib`` are the memory sizes, for
    reference.
    """

    name: str
    link_bandwidth_gbps: float
    transfer_latency_us: float
    layer_compute_base_us: float
    layer_compute_per_token_us: float
    link_nominal_gbps: float | None = None
    device_memory_gib: float | None = None
    disk_bandwidth_gbps: float | None = None
    disk_latency_us: float | None = None
    disk_nominal_gbps: float | None = None
    host_memory_gib: float | None = None
    description: str = ""
    source: str = ""

    def __post_init__(self) -> None:
        if not self.name:
            raise ConfigError("hardware profile name must not be empty")
        positive = ("link_bandwidth_gbps",)
        positive_opt = ("disk_bandwidth_gbps", "disk_nominal_gbps", "host_memory_gib")
        nonneg = ("transfer_latency_us", "layer_compute_base_us", "layer_compute_per_token_us")
        nonneg_opt = ("disk_latency_us",)
        for key in positive + positive_opt + nonneg + nonneg_opt:
            val = getattr(self, key)
            if val is None and (key in positive_opt or key in nonneg_opt):
                continue
            low = key in nonneg or key in nonneg_opt
            if not (_number(val) and math.isfinite(val) and (val >= 0 if low else val > 0)):
                raise ConfigError(
                    f"hardware profile {self.name}: {key} must be {'>=' if low else '>'} 0, "
                    f"got {val!r}"
                )

    @property
    def bytes_per_second(self) -> float:
        return self.link_bandwidth_gbps * 1e9

    def transfer_seconds(self, nbytes: int) -> float:
        """Time one transfer of ``nbytes`` occupies the link (latency not included)."""
        return nbytes / self.bytes_per_second

    @property
    def has_disk_link(self) -> bool:
        """Whether the profile has a disk -> host RAM link (``disk_bandwidth_gbps``)."""
        return self.disk_bandwidth_gbps is not None

    @property
    def disk_bytes_per_second(self) -> float:
        """The disk -> host RAM read rate in B/s; ConfigError without a disk link."""
        if self.disk_bandwidth_gbps is None:
            raise ConfigError(
                f"hardware profile {self.name} has no disk link (no disk_bandwidth_gbps); "
                "give one with disk figures, e.g. measured by moetrace profile"
            )
        return self.disk_bandwidth_gbps * 1e9

    @property
    def disk_latency_seconds(self) -> float:
        """The fixed cost of one disk read in seconds (0 when not given)."""
        return (self.disk_latency_us or 0.0) * 1e-6

    def disk_seconds(self, nbytes: int) -> float:
        """Time one read of ``nbytes`` occupies the disk link (latency not included)."""
        return nbytes / self.disk_bytes_per_second

    def compute_seconds(self, tokens: int) -> float:
        return (self.layer_compute_base_us + self.layer_compute_per_token_us * tokens) * 1e-6

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: Any, where: str) -> HardwareProfile:
        if not isinstance(data, dict):
            raise ConfigError(f"{where}: a hardware profile must be a JSON object")
        names = {f.name for f in dataclasses.fields(cls)}
        extra = sorted(set(data) - names)
        if extra:
            raise ConfigError(f"{where}: unknown field {extra[0]!r}")
        try:
            return cls(**data)
        except TypeError as exc:
            raise ConfigError(f"{where}: missing or invalid field ({exc})") from None
        except ConfigError as exc:
            raise ConfigError(f"{where}: {exc}") from None


def _number(val: Any) -> bool:
    return isinstance(val, (int, float)) and not isinstance(val, bool)


def _assets() -> Any:
    return resources.files("moetrace") / "assets" / "hardware"


def list_profiles() -> list[str]:
    """Names of the shipped hardware profiles."""
    return sorted(p.name[: -len(".json")] for p in _assets().iterdir() if p.name.endswith(".json"))


def load_hardware(name_or_path: str | os.PathLike[str] | None = None) -> HardwareProfile:
    """A shipped profile by name (default :data:`DEFAULT_PROFILE`) or a JSON file path."""
    name = str(name_or_path) if name_or_path is not None else DEFAULT_PROFILE
    path = Path(name)
    if path.suffix == ".json" or path.exists():
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except OSError as exc:
            raise ConfigError(f"{path}: cannot read hardware profile ({exc.strerror})") from None
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{path}: not valid JSON (line {exc.lineno}: {exc.msg})") from None
        return HardwareProfile.from_json(data, str(path))
    asset = _assets() / f"{name}.json"
    if not asset.is_file():
        raise ConfigError(
            f"unknown hardware profile {name!r}; shipped: {', '.join(list_profiles())} "
            "(or give a JSON file)"
        )
    return HardwareProfile.from_json(json.loads(asset.read_text(encoding="utf-8")), name)
