"""Torch devices named by users: checked once, before any model is loaded."""

from __future__ import annotations

import torch

from moetrace.errors import ConfigError


def check_device(device: str | torch.device) -> torch.device:
    """The torch device for ``device``; ConfigError when it is malformed or not here."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise ConfigError(
            f"device {str(device)!r} is not a torch device (cpu, cuda, cuda:1)"
        ) from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            build = torch.__version__
            raise ConfigError(
                f"device {str(device)!r} requested but CUDA is not available here "
                f"(torch {build}); use --device cpu"
            )
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ConfigError(
                f"device {str(device)!r}: only {torch.cuda.device_count()} CUDA device(s) here"
            )
    elif dev.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"device {str(device)!r} requested but MPS is not available here")
    elif dev.type not in ("cpu", "cuda", "mps", "xpu"):
        raise ConfigError(f"device {str(device)!r}: moetrace runs on cpu, cuda, mps or xpu")
    return dev
