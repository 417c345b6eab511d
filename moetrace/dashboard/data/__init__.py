"""The dashboard's data layer: small aggregates (layers x experts and the like) computed
with DuckDB over the trace parts and the mining functions of :mod:`moetrace.tuner.mining`.

Nothing here imports streamlit: every function takes a trace path (or a :class:`Trace`)
and returns arrays or frozen dataclasses, so it is testable and cacheable as is.
"""
