"""The moetrace error hierarchy.

Every error a user can cause with bad input is a :class:`MoetraceError`; the CLI turns
it into one line on stderr and exit code 2.
"""

from __future__ import annotations


class MoetraceError(Exception):
    """Base class of every error moetrace raises for bad input or bad state."""


class TraceFormatError(MoetraceError):
    """A trace directory, manifest or part is missing, corrupt or of another version."""


class TraceLocationError(TraceFormatError):
    """A trace location cannot be reached: object storage unreachable, access denied, or
    a bad S3 endpoint setting (the message names the location)."""


class TraceWriteError(MoetraceError):
    """A trace could not be written (conflicting manifest, closed writer, bad rows)."""


class ImportFormatError(MoetraceError):
    """A file given to an importer is malformed; the message names the file and line."""


class OutputError(MoetraceError):
    """An output file (report, plan, statistics) cannot be written where the user asked."""


class QueryError(MoetraceError):
    """A user's SQL query failed."""


class ModelError(MoetraceError):
    """A model cannot be loaded, or it has no MoE layers moetrace understands."""


class PromptsError(MoetraceError):
    """A prompts file is malformed; the message names the file and line."""


class PlanError(MoetraceError):
    """A plan file is malformed, for another model, or does not fit the budget."""


class ConfigError(MoetraceError):
    """A configuration value (budget, hardware profile, policy name...) is invalid."""


class AnalysisError(MoetraceError):
    """A trace cannot be analyzed as asked (empty phase, no requests, ...)."""


class CountTraceError(AnalysisError):
    """A trace holds per-expert counts only, and the caller needs token-level routing."""


class RuntimeEngineError(MoetraceError):
    """The offloading runtime cannot run as asked (budget, device, architecture)."""


class DashboardError(MoetraceError):
    """The dashboard server cannot start (port in use, Streamlit failed, not ready in time)."""


class ServerError(MoetraceError):
    """An inference server could not be reached or answered with an error or bad data.

    ``transient``: a retry may help (connection reset, timeout, HTTP 5xx / 429);
    ``status``: the HTTP status, when there was one."""

    def __init__(self, message: str, *, transient: bool = False, status: int | None = None):
        super().__init__(message)
        self.transient = transient
        self.status = status
