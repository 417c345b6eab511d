"""Fixtures of the runtime tests."""

from __future__ import annotations

import pytest
import torch

torch.set_num_threads(1)


@pytest.fixture(scope="session")
def prompt_ids() -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    return torch.randint(1, 64, (1, 7), generator=g)
