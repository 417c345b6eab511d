"""Crash safety and concurrency: SIGKILLed writers, two writers on one trace."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from storekit import make_manifest

from moetrace.errors import TraceWriteError
from moetrace.store import RequestRecord, TraceWriter, open_trace

pytestmark = pytest.mark.skipif(os.name != "posix", reason="needs POSIX signals and flock")

NUM_EXPERTS = 16
MOE_LAYERS = (1, 2, 4)

# A writer process: request i has 1 + i % 5 prompt and i % 3 generated tokens; expert ids
# are a function of (request, token, layer, rank) so readers can check every value.
WRITER = """
import sys
import numpy as np
from moetrace.store import Manifest, ModelInfo, RequestRecord, TraceWriter
path, prefix, count, part_rows, threads = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
m = Manifest(model=ModelInfo(name="tiny-moe", num_layers=5, moe_layers=(1, 2, 4), num_experts=16, top_k=2))
layers = np.array(m.model.moe_layers)
with TraceWriter(path, m, part_rows=part_rows, threads=threads) as w:
    i = 0
    while count < 0 or i < count:
        p, g = 1 + i % 5, i % 3
        tok = np.repeat(np.arange(p + g), len(layers))
        lay = np.tile(layers, p + g)
        ex = np.stack([(tok * 7 + lay * 3 + j + i) % 16 for j in range(2)], axis=1)
        step = np.where(tok < p, 0, tok - p + 1)
        w.write_request(RequestRecord(f"{prefix}{i}", p, g), token=tok, step=step,
                        phase=(step > 0).astype(np.int8), forward=step, layer=lay, experts=ex,
                        weights=np.full(ex.shape, 0.5))
        if i == 0:
            w.flush()
            print("ready", flush=True)
        i += 1
"""


def _start(path: Path, prefix: str, count: int, part_rows: int, threads: int = 2):
    return subprocess.Popen(
        [sys.executable, "-c", WRITER, str(path), prefix, str(count), str(part_rows), str(threads)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _check_trace(path: Path) -> dict[str, int]:
    """Every visible request is whole and exact; returns rows per request."""
    trace = open_trace(path)
    for f in trace.activation_files + trace.request_files:
        assert Path(f).name.startswith("part-")
    req = trace.sql(
        "SELECT request_id, prompt_tokens + generated_tokens AS tokens, arrival FROM requests"
    ).to_pylist()
    arrivals = [r["arrival"] for r in req]
    assert sorted(arrivals) == list(range(len(req)))
    got = {
        r["request_id"]: r["n"]
        for r in trace.sql(
            "SELECT request_id, count(*) AS n FROM activations GROUP BY request_id"
        ).to_pylist()
    }
    want = {r["request_id"]: r["tokens"] * len(MOE_LAYERS) for r in req}
    assert got == want
    bad = trace.sql(
        f"""SELECT count(*) FROM activations a JOIN requests r USING (request_id)
        WHERE a.e0 != (a.token * 7 + a.layer * 3 + 0 + CAST(regexp_extract(a.request_id,
        '(\\d+)$', 1) AS INTEGER)) % {NUM_EXPERTS}
        OR a.e1 != (a.token * 7 + a.layer * 3 + 1 + CAST(regexp_extract(a.request_id,
        '(\\d+)$', 1) AS INTEGER)) % {NUM_EXPERTS} OR a.w0 != 0.5"""
    ).column(0)[0]
    assert bad.as_py() == 0
    return got


def test_sigkill_at_random_moments_leaves_trace_readable(tmp_path: Path) -> None:
    path = tmp_path / "t"
    rnd = random.Random(1234)
    delays = [0.0, rnd.uniform(0.01, 0.1), rnd.uniform(0.1, 0.4), rnd.uniform(0.3, 0.8)]
    before = 0
    for round_, delay in enumerate(delays):
        proc = _start(path, f"k{round_}-", -1, part_rows=rnd.choice([3, 10, 40]))
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.strip() == "ready", proc.stderr.read() if proc.stderr else ""
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        got = _check_trace(path)
        assert len(got) > before  # the first request of each round was flushed
        before = len(got)
    # a new writer appends to the crashed trace, and arrivals continue
    m = make_manifest(num_experts=NUM_EXPERTS, moe_layers=MOE_LAYERS, num_layers=5)
    with TraceWriter(path, m) as w:
        tok = np.repeat(np.arange(2), 3)
        lay = np.tile(np.array(MOE_LAYERS), 2)
        ex = np.stack([(tok * 7 + lay * 3 + j + 0) % NUM_EXPERTS for j in range(2)], axis=1)
        w.write_request(
            RequestRecord("after-0", 2),
            token=tok,
            step=0,
            phase=0,
            forward=0,
            layer=lay,
            experts=ex,
            weights=np.full(ex.shape, 0.5),
        )
    got = _check_trace(path)
    assert got["after-0"] == 6 and len(got) == before + 1
    assert open_trace(path).requests().column("request_id").to_pylist()[-1] == "after-0"


def test_interrupted_commit_is_invisible(tmp_path: Path) -> None:
    """An activations part renamed without its requests part, and leftover temp files."""
    path = tmp_path / "t"
    proc = _start(path, "a", 4, part_rows=1, threads=0)
    assert proc.wait(timeout=120) == 0, proc.stderr.read() if proc.stderr else ""
    before = _check_trace(path)
    trace = open_trace(path)
    act = trace.parts[0].activations
    (act.parent / "part-zzzz-orphan.parquet").write_bytes(act.read_bytes())
    (act.parent / ".tmp-part-zzzz-0.parquet").write_bytes(act.read_bytes()[:100])
    (path / "requests" / ".tmp-part-zzzz-0.parquet").write_bytes(b"garbage")
    assert _check_trace(path) == before
    assert open_trace(path).num_activations == trace.num_activations


def test_two_writer_processes_on_one_trace(tmp_path: Path) -> None:
    path = tmp_path / "t"
    procs = [_start(path, prefix, 40, part_rows=7) for prefix in ("a", "b")]
    for p in procs:
        assert p.wait(timeout=120) == 0, p.stderr.read() if p.stderr else ""
    got = _check_trace(path)
    assert set(got) == {f"{p}{i}" for p in "ab" for i in range(40)}
    names = [Path(f).name for f in open_trace(path).activation_files]
    assert len(set(n.rsplit("-", 1)[0] for n in names)) == 2  # two writer ids


def test_two_writers_same_request_id(tmp_path: Path) -> None:
    m = make_manifest(top_k=2, num_experts=8, moe_layers=(1, 3))
    path = tmp_path / "t"
    rows = {
        "token": 0,
        "step": 0,
        "phase": 0,
        "forward": 0,
        "layer": np.array([1, 3]),
        "experts": np.array([[0, 1], [2, 3]]),
    }
    first, second = TraceWriter(path, m, threads=0), TraceWriter(path, m, threads=1)
    first.write_request(RequestRecord("x", 1), **rows)
    second.write_request(RequestRecord("x", 1), **rows)
    second.write_request(RequestRecord("y", 1), **rows)
    first.close()
    with pytest.raises(TraceWriteError, match="'x' was committed meanwhile by another writer"):
        second.close()
    trace = open_trace(path)
    assert trace.requests().column("request_id").to_pylist() == ["x"]
    assert trace.num_activations == 2
