"""The importer contract: what an importer finds in SRC and what it parses a file into.

An :class:`Importer` turns one source file into one :class:`ParsedRequest` of plain numpy
arrays; the driver (:mod:`moetrace.store.importers.driver`) resolves the model facts,
checks every request against them and writes the trace. Formats whose files hold many
requests (server dumps, tables) also implement :class:`ManyRequestImporter`: the driver
then calls ``parse_many`` once per file instead of ``parse``. Importers are found by name
in a registry (:func:`register_importer`, :func:`get_importer`).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np

from moetrace.errors import ImportFormatError

IMPORT_MARKER = ".import-incomplete.json"
"""Present in a trace directory while an import into it runs or after one failed."""


@dataclass(frozen=True)
class SourceFile:
    """One file of SRC that becomes one request.

    For a :class:`ManyRequestImporter`, ``discover`` returns one per file with a file key
    (unique per file, e.g. its path under SRC) as ``request_id``, and each parsed request
    carries its own ``SourceFile`` (same path, its request id and tags)."""

    path: Path
    request_id: str
    tags: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.request_id:
            raise ImportFormatError(f"{self.path}: empty request id")


@dataclass(frozen=True)
class ParsedRequest:
    """The routing of one request, one row per (token, MoE layer), in source-file terms.

    ``layer`` holds model layer ids; ``experts`` is ``(n, k)`` int32 (ids >= 0, or -1 =
    dropped where the format allows it); ``weights`` the ``(n, k)`` gate weights when the
    source carries them (None otherwise: the trace's ``gate_weights`` is then false);
    ``locate(i)`` names where row ``i`` came from in the file (``line 12``,
    ``step 3, layer "5", token 0``) for error messages; ``arrival_time`` the request's
    arrival (Unix seconds) when the source has one.
    """

    source: SourceFile
    token: np.ndarray
    step: np.ndarray
    phase: np.ndarray
    layer: np.ndarray
    experts: np.ndarray
    prompt_tokens: int
    generated_tokens: int
    num_forwards: int
    moe_layers: tuple[int, ...]
    num_layers_hint: int
    locate: Callable[[int], str]
    prompt_text: str | None = None
    weights: np.ndarray | None = None
    arrival_time: float | None = None

    def __post_init__(self) -> None:
        n = self.experts.shape[0]
        for name in ("token", "step", "phase", "layer"):
            if getattr(self, name).shape != (n,):
                raise ImportFormatError(
                    f"{self.source.path}: internal: {name} has shape "
                    f"{getattr(self, name).shape}, expected ({n},)"
                )
        if self.weights is not None and self.weights.shape != self.experts.shape:
            raise ImportFormatError(
                f"{self.source.path}: internal: weights have shape {self.weights.shape}, "
                f"expected {self.experts.shape}"
            )

    @property
    def top_k(self) -> int:
        return int(self.experts.shape[1])

    @property
    def nbytes(self) -> int:
        arrays = (self.token, self.step, self.phase, self.layer, self.experts, self.weights)
        return sum(a.nbytes for a in arrays if a is not None)


class Importer(Protocol):
    """A published trace format."""

    name: str
    description: str

    def model_name_hint(self, src: Path) -> str | None:
        """A model name guessed from SRC's folder names, or None."""

    def discover(self, src: Path, model_name: str) -> list[SourceFile]:
        """The files of SRC in arrival order; raises ImportFormatError when there are none."""

    def parse(self, source: SourceFile) -> ParsedRequest:
        """Parse and structurally check one file; raises ImportFormatError naming the spot."""


@dataclass(frozen=True)
class ModelHint:
    """What the import knows of the model before parsing (caller flags, the trace already
    in OUT, the known-models table), for formats whose layout depends on it (vLLM's layer
    axis). None = unknown; the facts are resolved for good after the first file."""

    name: str
    num_layers: int | None = None
    moe_layers: tuple[int, ...] | None = None
    num_experts: int | None = None
    top_k: int | None = None


@runtime_checkable
class ManyRequestImporter(Protocol):
    """The capability of a format whose files hold many requests.

    The driver parses each file once with ``parse_many`` (never ``parse``); request ids
    come from the data, so a rerun skips the requests already in OUT one by one. A file
    that fails to parse, or any of whose requests fails the checks, is a bad file as a
    whole (nothing of it is written)."""

    def parse_many(self, source: SourceFile, hint: ModelHint) -> list[ParsedRequest]:
        """All requests of one file, in arrival order; ImportFormatError naming the spot."""


@runtime_checkable
class SourceImporter(Protocol):
    """The capability of a format that is not token-level routing (per-expert counts):
    it reads the whole of SRC and writes its own kind of trace; ``import_trace`` hands it
    SRC, OUT and the caller's model facts and returns what it returns."""

    name: str
    description: str

    def import_source(self, src: Path, out: Path, **facts: int | str | None) -> Any:
        """Import SRC into OUT; ImportFormatError naming the file for bad input."""


_REGISTRY: dict[str, Importer] = {}


def register_importer(importer: Importer) -> Importer:
    """Add an importer under its ``name`` (a later one with the same name replaces it)."""
    if not re.fullmatch(r"[a-z0-9][a-z0-9-]*", importer.name):
        raise ImportFormatError(f"importer name {importer.name!r} must be lowercase-with-dashes")
    _REGISTRY[importer.name] = importer
    return importer


def get_importer(name: str) -> Importer:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ImportFormatError(
            f"unknown import format {name!r}; available: {', '.join(available_formats())}"
        ) from None


def available_formats() -> list[str]:
    """Names of the registered import formats, sorted."""
    return sorted(_REGISTRY)


def check_counts(result: object, *names: str) -> None:
    """ImportFormatError when one of the named count fields of an import result is < 0."""
    for name in names:
        value = getattr(result, name)
        if value < 0:
            raise ImportFormatError(f"{type(result).__name__}.{name} must be >= 0, got {value}")


def require_source(src: Path) -> Path:
    """SRC as an existing path, or ImportFormatError."""
    if not src.exists():
        raise ImportFormatError(f"{src}: no such file or directory")
    return src


def natural_key(path: Path, root: Path) -> tuple[object, ...]:
    """Sort key: folder path, then the first number in the file name, then the name."""
    rel = path.relative_to(root) if path != root else Path(path.name)
    m = re.search(r"\d+", path.stem)
    number = int(m.group()) if m else float("inf")
    return (rel.parent.as_posix(), number, path.name)


def find_files(src: Path, suffix: str) -> list[Path]:
    """Files under SRC (or SRC itself) ending in ``suffix``, naturally sorted."""
    require_source(src)
    if src.is_file():
        files = [src]
    else:
        files = [
            p
            for p in src.rglob(f"*{suffix}")
            if p.is_file() and not any(part.startswith(".") for part in p.relative_to(src).parts)
        ]
    root = src if src.is_dir() else src.parent
    files.sort(key=lambda p: natural_key(p, root))
    if not files:
        raise ImportFormatError(f"{src}: no {suffix} files found")
    return files


def file_sources(src: Path, suffixes: tuple[str, ...], model_name: str) -> list[SourceFile]:
    """One SourceFile per file of SRC ending in one of ``suffixes`` (naturally sorted), for a
    :class:`ManyRequestImporter`: its key is the path under SRC, tags ``model`` and
    ``source_file`` (that path)."""
    require_source(src)
    root = src if src.is_dir() else src.parent
    if src.is_file():
        paths = [src]
    else:
        paths = [
            p
            for p in src.rglob("*")
            if p.is_file()
            and p.name.lower().endswith(suffixes)
            and not any(part.startswith(".") for part in p.relative_to(src).parts)
        ]
        paths.sort(key=lambda p: natural_key(p, root))
    if not paths:
        raise ImportFormatError(f"{src}: no {' / '.join(suffixes)} files found")
    out = []
    for path in paths:
        rel = path.relative_to(root).as_posix()
        out.append(SourceFile(path, rel, {"model": model_name, "source_file": rel}))
    return out
