"""Where a trace lives: a local folder, or ``s3://bucket/prefix`` on object storage.

A trace location string becomes a ``(pyarrow filesystem, path)`` pair (:func:`parse`), or a
path object the reader walks like a :class:`pathlib.Path` (:func:`as_path`): local
locations stay plain ``Path`` s; ``s3://`` ones are :class:`RemotePath` s, which print as
their URL and support the few ``Path`` operations the reader needs (``/``, ``name``,
``exists()``, ``is_dir()``, ``iterdir()``, ``stat().st_size``, ``read_text()``).

Object storage is read in place through :class:`pyarrow.fs.S3FileSystem`, configured from
the standard AWS environment: ``AWS_ENDPOINT_URL_S3`` or ``AWS_ENDPOINT_URL`` (an
S3-compatible server; ``http://`` allowed), ``AWS_ACCESS_KEY_ID`` /
``AWS_SECRET_ACCESS_KEY`` (/ ``AWS_SESSION_TOKEN``), ``AWS_REGION`` or
``AWS_DEFAULT_REGION``. Without keys in the environment the AWS SDK's own chain is used
(profiles, instance metadata). Traces are written locally only (:func:`require_local`).
"""

from __future__ import annotations

import fnmatch
import functools
import glob as globlib
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple, Union
from urllib.parse import urlsplit

import pyarrow.fs as pafs

from moetrace.errors import TraceFormatError, TraceLocationError, TraceWriteError

SUPPORTED = "local paths and s3://bucket/prefix URLs"
MANIFEST_NAME = "manifest.json"  # = schema.MANIFEST_NAME (not imported: no cycle)

_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")
_WILDCARD = re.compile(r"[*?\[]")


class _Stat(NamedTuple):
    st_size: int


class RemotePath:
    """A file or folder on object storage: ``fs`` and ``key`` (``bucket/prefix/...``).

    Prints as ``s3://bucket/prefix/...``; compares, hashes and sorts by that URL. OSError
    from the object store becomes :class:`TraceLocationError` naming the URL."""

    __slots__ = ("fs", "scheme", "key", "_size")

    def __init__(
        self, fs: pafs.FileSystem, scheme: str, key: str, *, size: int | None = None
    ) -> None:
        self.fs = fs
        self.scheme = scheme
        self.key = key.strip("/")
        self._size = size  # known from a listing: stat() needs no request

    # ------------------------------------------------------------------ naming
    @property
    def url(self) -> str:
        return f"{self.scheme}://{self.key}"

    def __str__(self) -> str:
        return self.url

    def __repr__(self) -> str:
        return f"RemotePath({self.url!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, RemotePath) and self.url == other.url

    def __hash__(self) -> int:
        return hash(self.url)

    def __lt__(self, other: RemotePath) -> bool:
        return self.url < other.url

    def __truediv__(self, name: str | os.PathLike[str]) -> RemotePath:
        return RemotePath(self.fs, self.scheme, f"{self.key}/{os.fspath(name).strip('/')}")

    @property
    def name(self) -> str:
        return self.key.rsplit("/", 1)[-1]

    @property
    def parent(self) -> RemotePath:
        head = self.key.rsplit("/", 1)[0] if "/" in self.key else self.key
        return RemotePath(self.fs, self.scheme, head)

    @property
    def bucket(self) -> str:
        return self.key.split("/", 1)[0]

    # ------------------------------------------------------------------ queries
    def _call(self, what: str, fn, *args):  # type: ignore[no-untyped-def]
        try:
            return fn(*args)
        except OSError as exc:
            raise store_error(self, what, exc) from None

    def _info(self) -> pafs.FileInfo:
        return self._call("cannot get file info", self.fs.get_file_info, self.key)

    def exists(self) -> bool:
        return self._info().type != pafs.FileType.NotFound

    def is_dir(self) -> bool:
        return self._info().type == pafs.FileType.Directory

    def is_file(self) -> bool:
        return self._info().type == pafs.FileType.File

    def iterdir(self) -> Iterator[RemotePath]:
        sel = pafs.FileSelector(self.key, allow_not_found=True, recursive=False)
        infos = self._call("cannot list", self.fs.get_file_info, sel)
        for info in infos:
            size = info.size if info.type == pafs.FileType.File else None
            yield RemotePath(self.fs, self.scheme, info.path, size=size)

    def stat(self) -> _Stat:
        if self._size is None:
            info = self._info()
            if info.type == pafs.FileType.NotFound:
                raise TraceFormatError(f"{self}: no such file")
            self._size = int(info.size or 0)
        return _Stat(self._size)

    def read_bytes(self) -> bytes:
        def read() -> bytes:
            with self.fs.open_input_stream(self.key) as fh:
                return fh.read()

        return self._call("cannot read", read)

    def read_text(self, encoding: str = "utf-8") -> str:
        return self.read_bytes().decode(encoding)


TracePath = Union[Path, RemotePath]  # noqa: UP007 (a runtime alias; py3.10 has no `type`)


def store_error(where: RemotePath | str, what: str, exc: OSError) -> TraceLocationError:
    """One line for an object-store failure (unreachable endpoint, denied, missing bucket)."""
    detail = " ".join(str(exc).split()) or type(exc).__name__
    return TraceLocationError(f"{where}: {what} on object storage ({detail}; {_endpoint_hint()})")


def _endpoint_hint() -> str:
    endpoint = _env_endpoint()
    return f"endpoint {endpoint}" if endpoint else "AWS endpoint (AWS_ENDPOINT_URL_S3 not set)"


def _env_endpoint() -> str | None:
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None


def scheme_of(location: str | os.PathLike[str]) -> str | None:
    """The URL scheme of ``location`` (lower case), or None for a plain path."""
    if isinstance(location, RemotePath):
        return location.scheme
    if not isinstance(location, str):
        return None
    found = _SCHEME.match(location)
    return found.group(1).lower() if found else None


def is_remote(location: str | os.PathLike[str] | RemotePath) -> bool:
    return scheme_of(location) is not None


# ---------------------------------------------------------------------- filesystems
def _s3_options() -> tuple[tuple[str, str], ...]:
    """S3FileSystem keyword arguments from the environment (a hashable cache key)."""
    opts: dict[str, str] = {}
    endpoint = _env_endpoint()
    if endpoint:
        parts = urlsplit(endpoint if "://" in endpoint else f"https://{endpoint}")
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise TraceLocationError(
                f"{endpoint}: the S3 endpoint (AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL) must be "
                "http://host[:port] or https://host[:port]"
            )
        opts["endpoint_override"] = parts.netloc
        opts["scheme"] = parts.scheme
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    if region:
        opts["region"] = region
    elif endpoint:
        opts["region"] = "us-east-1"  # S3-compatible servers ignore it; skip the lookup
    key, secret = os.environ.get("AWS_ACCESS_KEY_ID"), os.environ.get("AWS_SECRET_ACCESS_KEY")
    if key and secret:
        opts["access_key"], opts["secret_key"] = key, secret
        token = os.environ.get("AWS_SESSION_TOKEN")
        if token:
            opts["session_token"] = token
    return tuple(sorted(opts.items()))


@functools.lru_cache(maxsize=8)
def _s3(options: tuple[tuple[str, str], ...]) -> pafs.S3FileSystem:
    try:
        return pafs.S3FileSystem(**dict(options))
    except (OSError, ValueError) as exc:
        raise TraceLocationError(f"cannot set up S3 access ({exc})") from None


# A forked child (the tuner's process pools fork) makes its own S3 filesystem: the parent's
# holds connections and SDK state that are not the child's to use.
if hasattr(os, "register_at_fork"):  # POSIX
    os.register_at_fork(after_in_child=_s3.cache_clear)


def s3_filesystem() -> pafs.S3FileSystem:
    """The S3 filesystem the environment describes (one per configuration)."""
    return _s3(_s3_options())


@functools.lru_cache(maxsize=1)
def _local() -> pafs.LocalFileSystem:
    return pafs.LocalFileSystem()


def parse(location: str | os.PathLike[str]) -> tuple[pafs.FileSystem, str]:
    """``(filesystem, path)`` for a trace location; unknown schemes are a TraceFormatError."""
    return arrow_path(as_path(location))


def as_path(location: str | os.PathLike[str]) -> TracePath:
    """A ``Path`` for a local location, a :class:`RemotePath` for an ``s3://`` one."""
    if isinstance(location, (Path, RemotePath)):
        return location
    scheme = scheme_of(location)
    if scheme is None:
        return Path(location)
    text = str(location)
    if scheme != "s3":
        raise TraceFormatError(
            f"{text}: {scheme}:// trace locations are not supported (supported: {SUPPORTED})"
        )
    key = text[len("s3://") :].strip("/")
    if not key or key.startswith("/"):
        raise TraceFormatError(f"{text}: no bucket in the S3 URL (expected s3://bucket/prefix)")
    return RemotePath(s3_filesystem(), "s3", key)


def arrow_path(path: TracePath) -> tuple[pafs.FileSystem, str]:
    """``(filesystem, path)`` for pyarrow calls (``filesystem=``, ``open_input_file``)."""
    if isinstance(path, RemotePath):
        return path.fs, path.key
    return _local(), str(path)


def require_local(location: str | os.PathLike[str], what: str = "write a trace") -> None:
    """Raise TraceWriteError when ``location`` is on object storage (traces are written
    locally, then uploaded)."""
    if is_remote(location):
        raise TraceWriteError(
            f"{location}: moetrace can only {what} in a local folder; write it locally and "
            "upload the folder (e.g. `aws s3 sync`), then read it in place from s3://"
        )


# ---------------------------------------------------------------------- helpers
def exists(location: str | os.PathLike[str]) -> bool:
    return as_path(location).exists()


def is_dir(location: str | os.PathLike[str]) -> bool:
    return as_path(location).is_dir()


def list_dir(location: str | os.PathLike[str]) -> list[str]:
    """The names in a folder, sorted (empty when it does not exist)."""
    path = as_path(location)
    if not path.is_dir():
        return []
    return sorted(p.name for p in path.iterdir())


def read_bytes(location: str | os.PathLike[str]) -> bytes:
    return as_path(location).read_bytes()


def size(location: str | os.PathLike[str]) -> int:
    return int(as_path(location).stat().st_size)


def missing_hint(path: TracePath) -> str:
    """Why a remote location is missing, when the bucket itself is (else "")."""
    if not isinstance(path, RemotePath):
        return ""
    bucket = RemotePath(path.fs, path.scheme, path.bucket)
    if bucket.exists():
        return ""
    return f" (there is no bucket {path.bucket!r} at the {_endpoint_hint()})"


def is_glob(pattern: str | os.PathLike[str]) -> bool:
    """Whether ``pattern`` holds a wildcard (``*``, ``?``, ``[``)."""
    return _WILDCARD.search(os.fspath(pattern)) is not None


def glob(pattern: str | os.PathLike[str]) -> list[str]:
    """The trace folders (folders holding manifest.json) matching ``pattern``, sorted.

    ``*``, ``?`` and ``[...]`` match within one path component, locally
    (``traces/day-*``) and on object storage (``s3://bucket/traces/day-*``)."""
    path = as_path(pattern)
    if not isinstance(path, RemotePath):
        found = [Path(p) for p in globlib.glob(str(path))]
        return sorted(str(p) for p in found if (p / MANIFEST_NAME).is_file())
    parts = path.key.split("/")
    first = next((i for i, part in enumerate(parts) if _WILDCARD.search(part)), len(parts))
    if first == 0:
        raise TraceFormatError(f"{pattern}: wildcards in the bucket name are not supported")
    candidates = [RemotePath(path.fs, path.scheme, "/".join(parts[:first]))]
    for part in parts[first:]:
        if not _WILDCARD.search(part):
            candidates = [c / part for c in candidates]
            continue
        candidates = [  # listed folders have no size, files do
            child
            for c in candidates
            for child in c.iterdir()
            if child._size is None and fnmatch.fnmatchcase(child.name, part)
        ]
    traces = [c for c in candidates if (c / MANIFEST_NAME).is_file()]
    return sorted(str(c) for c in traces)
