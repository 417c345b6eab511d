"""The simulator reproduces the shared traces' README reference table (skips without them)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from moetrace.store.hardware import load_hardware
from moetrace.store.plan import CacheLayout
from moetrace.tuner.policy import build_events
from moetrace.tuner.sim import make_plan, simulate
from moetrace.tuner.sim.trace import load_traces


@pytest.mark.shared
def test_deepseek_first_20k_tokens_match_reference(deepseek_dir: Path, tmp_path: Path) -> None:
    from moetrace.store.importers import import_trace

    out = tmp_path / "ds"
    import_trace("moe-beyond", deepseek_dir, out, progress=False)
    loaded = load_traces([out])
    r = loaded.routing
    first = np.ones(r.num_rows, bool)
    first[1:] = (r.request[1:] != r.request[:-1]) | (r.token[1:] != r.token[:-1])
    ev = build_events(r.select(np.cumsum(first) - 1 < 20000), granularity="token")
    L = ev.num_layers
    hw = load_hardware()
    # README: independent per-layer caches, requests concatenated, demand loading
    expected = {
        (16, "lru"): 0.471,
        (16, "belady"): 0.663,
        (32, "lru"): 0.708,
        (32, "belady"): 0.869,
    }
    for (cap, policy), hit in expected.items():
        plan = make_plan(ev, loaded.shape, CacheLayout("per_layer", (cap,) * L), policy)
        assert simulate(ev, plan, hw).summary()["hit_rate"] == pytest.approx(hit, abs=0.0015)
