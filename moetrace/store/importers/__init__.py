"""Importers of published expert-routing traces into moetrace traces.

Formats are found by name in a registry; see docs/importers.md::

    from moetrace.store.importers import import_trace
    result = import_trace("moe-beyond", "traces/puffin", "out/deepseek")
"""

from moetrace.store.importers.base import (
    IMPORT_MARKER,
    Importer,
    ManyRequestImporter,
    ModelHint,
    ParsedRequest,
    SourceFile,
    SourceImporter,
    available_formats,
    get_importer,
    register_importer,
)
from moetrace.store.importers.byo import ByoImporter
from moetrace.store.importers.driver import BadFile, ImportResult, import_trace
from moetrace.store.importers.known_models import KnownModel, find_known_model, register_known_model
from moetrace.store.importers.moe_beyond import MoeBeyondImporter
from moetrace.store.importers.patterns_behind_chaos import PatternsBehindChaosImporter
from moetrace.store.importers.sglang_counts import CountImportResult, SglangCountsImporter
from moetrace.store.importers.sglang_dump import SglangDumpImporter
from moetrace.store.importers.vllm_offline import VllmOfflineImporter

register_importer(PatternsBehindChaosImporter())
register_importer(MoeBeyondImporter())
register_importer(ByoImporter())
register_importer(VllmOfflineImporter())
register_importer(SglangDumpImporter())
register_importer(SglangCountsImporter())  # type: ignore[arg-type]

__all__ = [
    "IMPORT_MARKER",
    "BadFile",
    "CountImportResult",
    "ImportResult",
    "Importer",
    "KnownModel",
    "ManyRequestImporter",
    "ModelHint",
    "ParsedRequest",
    "SourceFile",
    "SourceImporter",
    "available_formats",
    "find_known_model",
    "get_importer",
    "import_trace",
    "register_importer",
    "register_known_model",
]
