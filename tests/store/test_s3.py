"""Traces on object storage (``s3://bucket/prefix``), read in place, against a real local
S3-compatible server (moto's, over HTTP on 127.0.0.1; not a mock of the client)."""

from __future__ import annotations

import dataclasses
import json
import logging
import socket
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow.fs as pafs
import pytest
from click.testing import CliRunner
from storekit import make_manifest, synth_request, write_trace

from moetrace.cli import main
from moetrace.errors import QueryError, TraceFormatError, TraceLocationError, TraceWriteError
from moetrace.store import TraceWriter, location, open_trace
from moetrace.store.arrays import load_routing
from moetrace.store.counts import write_counts
from moetrace.store.schema import Manifest, ModelInfo
from moetrace.store.sql import open_read_only

moto_server = pytest.importorskip("moto.server", reason="needs moto[server] (dev extra)")

BUCKET = "traces-bucket"
KEYS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, object]]:
    """A moto S3 server with a bucket holding two routing traces, a count trace and a
    folder that is no trace; the environment points moetrace at it."""
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    with pytest.MonkeyPatch.context() as mp:
        for name in ("AWS_ENDPOINT_URL", "AWS_REGION", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
            mp.delenv(name, raising=False)
        mp.setenv("AWS_ENDPOINT_URL_S3", endpoint)
        mp.setenv("AWS_DEFAULT_REGION", "us-east-1")
        mp.setenv("AWS_EC2_METADATA_DISABLED", "true")
        for name, value in KEYS.items():
            mp.setenv(name, value)
        location._s3.cache_clear()
        admin = pafs.S3FileSystem(
            endpoint_override=f"{host}:{port}",
            scheme="http",
            region="us-east-1",
            allow_bucket_creation=True,
            **{"access_key": "testing", "secret_key": "testing"},
        )
        admin.create_dir(BUCKET)

        root = tmp_path_factory.mktemp("s3")
        m = make_manifest(top_k=3, num_experts=8, moe_layers=(0, 2, 3), num_layers=4)
        rng = np.random.default_rng(11)
        reqs = [
            synth_request(m, rng, f"q{i}", prompt_tokens=5, generated_tokens=4, forward_base=i)
            for i in range(6)
        ]
        local = root / "day-1"
        write_trace(local, m, reqs, part_rows=40, threads=0)
        counts_local = root / "counts"
        cm = Manifest(ModelInfo("tiny-moe", 4, (1, 2), 8, 2), content="counts")
        write_counts(counts_local, cm, np.arange(16, dtype=np.int64).reshape(2, 8), source="r1")

        def upload(src: Path, prefix: str) -> str:
            pafs.copy_files(
                str(src), f"{BUCKET}/{prefix}", destination_filesystem=admin, use_threads=False
            )
            return f"s3://{BUCKET}/{prefix}"

        urls = {
            "day-1": upload(local, "traces/day-1"),
            "day-2": upload(local, "traces/day-2"),
            "counts": upload(counts_local, "counts/c1"),
        }
        with admin.open_output_stream(f"{BUCKET}/traces/day-x/notes.txt") as fh:
            fh.write(b"not a trace")
        yield {
            "endpoint": endpoint,
            "admin": admin,
            "local": local,
            "counts_local": counts_local,
            "urls": urls,
        }
        location._s3.cache_clear()
    server.stop()


def test_open_validates_and_counts(s3) -> None:
    local = open_trace(s3["local"])
    remote = open_trace(s3["urls"]["day-1"])
    assert remote.is_remote and not local.is_remote
    assert str(remote.path) == s3["urls"]["day-1"]
    assert str(remote.path / "manifest.json") == s3["urls"]["day-1"] + "/manifest.json"
    assert len(remote.parts) == len(local.parts) > 1
    assert remote.num_activations == local.num_activations
    assert remote.num_requests == local.num_requests
    assert remote.size_bytes == local.size_bytes
    assert remote.manifest == local.manifest
    assert all(f.startswith("s3://") for f in remote.activation_files + remote.request_files)
    assert [Path(f).name for f in remote.activation_files] == [
        Path(f).name for f in local.activation_files
    ]


def test_read_in_place_equals_local(s3) -> None:
    local = open_trace(s3["local"])
    remote = open_trace(s3["urls"]["day-1"])
    assert remote.requests().equals(local.requests())
    assert remote.read_activations().equals(local.read_activations())
    got = [b.num_rows for b in remote.iter_activations(columns=["e0"], batch_size=7)]
    want = [b.num_rows for b in local.iter_activations(columns=["e0"], batch_size=7)]
    assert got == want
    remote.check_expert_ids()


@pytest.mark.parametrize(
    "query",
    [
        "SELECT count(*) FROM activations",
        "SELECT count(*) FROM activations_long WHERE expert >= 0",
        "SELECT request_id, prompt_tokens FROM requests ORDER BY request_id",
        "SELECT layer, expert, phase, count FROM counts ORDER BY ALL",
        "SELECT phase, count(*) AS n FROM activations WHERE layer = 2 GROUP BY 1 ORDER BY 1",
        "DESCRIBE activations",
    ],
)
def test_sql_equals_local(s3, query: str) -> None:
    local = open_trace(s3["local"]).sql(query)
    remote = open_trace(s3["urls"]["day-1"]).sql(query)
    assert remote.to_pylist() == local.to_pylist()


def test_count_trace(s3) -> None:
    remote = open_trace(s3["urls"]["counts"])
    assert remote.is_count_trace and len(remote.count_parts) == 1
    assert remote.counts().equals(open_trace(s3["counts_local"]).counts())


def test_load_routing_bit_for_bit(s3) -> None:
    local = load_routing(open_trace(s3["local"]), order="forward")
    remote = load_routing(open_trace(s3["urls"]["day-1"]), order="forward")
    for f in dataclasses.fields(local):
        a, b = getattr(local, f.name), getattr(remote, f.name)
        if isinstance(a, np.ndarray):
            assert a.dtype == b.dtype and np.array_equal(a, b), f.name
        else:
            assert a == b, f.name


@pytest.mark.parametrize("workers", [1, 2])
def test_analyze_equals_local(s3, workers: int) -> None:
    from moetrace.tuner.analyze import AnalyzeConfig, analyze

    cfg = AnalyzeConfig(seed=3, workers=workers)
    local = dataclasses.asdict(analyze(str(s3["local"]), cfg))
    remote = dataclasses.asdict(analyze(s3["urls"]["day-1"], cfg))
    assert remote.pop("trace") == s3["urls"]["day-1"]
    assert local.pop("trace") == str(s3["local"])
    local.pop("timings")
    remote.pop("timings")
    assert remote == local


def test_read_only_sql(s3) -> None:
    url = s3["urls"]["day-1"]
    trace = open_read_only(url)
    n = trace.sql("SELECT count(*) AS n FROM activations").column(0)[0].as_py()
    assert n == open_trace(s3["local"]).num_activations
    part = trace.activation_files[0]
    for query in (
        f"SELECT * FROM read_parquet('{part}')",
        f"SELECT * FROM read_parquet('{s3['local']}/activations/*.parquet')",
        "SET python_enable_replacements = true",
    ):
        with pytest.raises(QueryError, match="read-only|not allowed|SQL error"):
            trace.sql(query)
    with pytest.raises(QueryError, match="read-only"):
        trace.sql(f"COPY (SELECT 1) TO '{s3['local']}/x.csv'")
    assert not (s3["local"] / "x.csv").exists()


def test_corrupt_part_names_the_s3_file(s3) -> None:
    admin: pafs.S3FileSystem = s3["admin"]
    url = s3["urls"]["day-1"]
    good = open_trace(url)
    bad_prefix = f"{BUCKET}/broken/t"
    pafs.copy_files(
        f"{BUCKET}/traces/day-1",
        bad_prefix,
        source_filesystem=admin,
        destination_filesystem=admin,
        use_threads=False,
    )
    victim = f"s3://{bad_prefix}/activations/{Path(good.activation_files[1]).name}"
    data = admin.open_input_stream(victim[len("s3://") :]).read()
    with admin.open_output_stream(victim[len("s3://") :]) as fh:
        fh.write(data[: len(data) // 2])
    with pytest.raises(TraceFormatError, match="corrupt or truncated") as info:
        open_trace(f"s3://{bad_prefix}")
    assert str(info.value).startswith(victim + ": ")


def test_missing_bucket_and_folder(s3) -> None:
    with pytest.raises(TraceFormatError, match="no such trace directory.*no bucket 'nope'"):
        open_trace("s3://nope/traces/day-1")
    with pytest.raises(TraceFormatError, match=r"no such trace directory$"):
        open_trace(f"s3://{BUCKET}/traces/day-9")
    with pytest.raises(TraceFormatError, match="missing manifest"):
        open_trace(f"s3://{BUCKET}/traces/day-x")


def test_wrong_endpoint_is_one_error(s3, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", f"http://127.0.0.1:{_free_port()}")
    with pytest.raises(TraceLocationError, match="on object storage.*endpoint http://127"):
        open_trace(s3["urls"]["day-1"])
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "ftp://127.0.0.1:1")
    with pytest.raises(TraceLocationError, match="must be http"):
        open_trace(s3["urls"]["day-1"])


@pytest.mark.parametrize("case", ["missing-bucket", "wrong-endpoint"])
def test_cli_sql_error_is_one_line(s3, monkeypatch: pytest.MonkeyPatch, case: str) -> None:
    url = "s3://nope/t"
    if case == "wrong-endpoint":
        monkeypatch.setenv("AWS_ENDPOINT_URL_S3", f"http://127.0.0.1:{_free_port()}")
        url = s3["urls"]["day-1"]
    res = CliRunner().invoke(main, ["sql", url, "SELECT 1"])
    assert res.exit_code == 2, res.output
    err = res.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"moetrace: error: {url}"), err
    assert res.stdout == "" and "Traceback" not in res.output


def test_cli_sql_reads_s3(s3) -> None:
    res = CliRunner().invoke(
        main, ["sql", s3["urls"]["day-1"], "SELECT count(*) AS n FROM requests"]
    )
    assert res.exit_code == 0, res.output
    assert res.stdout.split()[-1] == "6"


def test_summary_and_cli_inspect(s3) -> None:
    from moetrace.store.summary import summarize

    local = dataclasses.asdict(summarize(s3["local"]))
    remote = dataclasses.asdict(summarize(s3["urls"]["day-1"]))
    assert remote.pop("path") == s3["urls"]["day-1"] and local.pop("path") == str(s3["local"])
    assert remote == local
    res = CliRunner().invoke(main, ["inspect", s3["urls"]["day-1"], "--json"])
    assert res.exit_code == 0, res.output
    assert s3["urls"]["day-1"] in res.stdout


def test_cli_import_into_s3_is_refused(s3, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    res = CliRunner().invoke(main, ["import", "byo", str(tmp_path), f"s3://{BUCKET}/imported"])
    assert res.exit_code == 2, res.output
    err = res.stderr.strip().splitlines()
    assert len(err) == 1 and "can only import into a trace in a local folder" in err[0]
    assert list(tmp_path.iterdir()) == []


def test_unknown_scheme() -> None:
    for url in ("gs://bucket/t", "http://example.com/t"):
        with pytest.raises(TraceFormatError, match="not supported.*s3://bucket/prefix"):
            open_trace(url)
    with pytest.raises(TraceFormatError, match="no bucket"):
        open_trace("s3://")


def test_location_helpers(s3) -> None:
    url = s3["urls"]["day-1"]
    fs, path = location.parse(url)
    assert isinstance(fs, pafs.S3FileSystem) and path == f"{BUCKET}/traces/day-1"
    fs, path = location.parse(s3["local"])
    assert isinstance(fs, pafs.LocalFileSystem) and path == str(s3["local"])
    assert location.exists(url) and location.is_dir(url)
    assert not location.exists(url + "-nope")
    assert location.list_dir(url) == sorted(p.name for p in s3["local"].iterdir())
    manifest = s3["local"] / "manifest.json"
    assert location.read_bytes(url + "/manifest.json") == manifest.read_bytes()
    assert location.size(url + "/manifest.json") == manifest.stat().st_size
    assert location.glob(f"s3://{BUCKET}/traces/day-*") == [
        s3["urls"]["day-1"],
        s3["urls"]["day-2"],
    ]
    assert location.glob(f"s3://{BUCKET}/*/day-?") == [s3["urls"]["day-1"], s3["urls"]["day-2"]]
    assert location.glob(f"s3://{BUCKET}/traces/none-*") == []
    assert location.glob(str(s3["local"].parent / "day-*")) == [str(s3["local"])]


def test_writing_to_s3_is_refused(s3, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    url = f"s3://{BUCKET}/new"
    with pytest.raises(TraceWriteError, match="only write a trace in a local folder"):
        TraceWriter(url, make_manifest())
    cm = Manifest(ModelInfo("tiny-moe", 4, (1, 2), 8, 2), content="counts")
    with pytest.raises(TraceWriteError, match="local folder"):
        write_counts(url, cm, np.ones((2, 8), np.int64), source="x")
    assert list(tmp_path.iterdir()) == []  # no local "s3:" folder made
    assert not location.exists(url)


def test_cli_analyze_glob_and_simulate_on_s3(s3) -> None:
    """The fleet's commands take s3:// folders and globs as they take local ones."""
    runner = CliRunner()
    glob_url = f"s3://{BUCKET}/traces/day-*"  # day-x holds no manifest: not matched
    res = runner.invoke(main, ["analyze", glob_url, "--workers", "1"])
    assert res.exit_code == 0, res.output
    assert f"s3://{BUCKET}/traces/day-1, s3://{BUCKET}/traces/day-2" in res.output
    args = ["--policy", "lru", "--cache", "4", "--json"]
    out = {}
    for name, where in (("local", str(s3["local"])), ("s3", s3["urls"]["day-1"])):
        res = runner.invoke(main, ["simulate", where, *args, f"{s3['local'].parent}/{name}.json"])
        assert res.exit_code == 0, res.output
        out[name] = json.loads(Path(f"{s3['local'].parent}/{name}.json").read_text())
    for d in out.values():
        d.pop("trace", None)
    assert out["s3"] == out["local"]
