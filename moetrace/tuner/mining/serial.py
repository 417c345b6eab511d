"""Generic ``to_dict``/``from_dict`` for the frozen report dataclasses (JSON-safe)."""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from typing import Any, TypeVar

from moetrace.errors import AnalysisError

T = TypeVar("T", bound="Serializable")


def _encode(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _encode(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, (tuple, list)):
        return [_encode(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _encode(v) for k, v in value.items()}
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if hasattr(value, "item") and callable(value.item):  # numpy scalars
        return _encode(value.item())
    return value


def _decode(tp: Any, value: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _decode(inner[0], value, where)
    if value is None:
        return float("nan") if tp is float else None
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise AnalysisError(f"{where}: expected an object for {tp.__name__}, got {value!r:.60}")
        hints = typing.get_type_hints(tp)
        kwargs = {}
        for f in dataclasses.fields(tp):
            if f.name in value:
                kwargs[f.name] = _decode(hints[f.name], value[f.name], f"{where}.{f.name}")
        try:
            return tp(**kwargs)
        except TypeError as exc:
            raise AnalysisError(f"{where}: cannot build {tp.__name__} ({exc})") from None
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise AnalysisError(f"{where}: expected a list, got {value!r:.60}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_decode(args[0], v, f"{where}[{i}]") for i, v in enumerate(value))
        return tuple(
            _decode(a, v, f"{where}[{i}]")
            for i, (a, v) in enumerate(zip(args, value, strict=False))
        )
    if origin is dict:
        if not isinstance(value, dict):
            raise AnalysisError(f"{where}: expected an object, got {value!r:.60}")
        return {
            _decode(args[0], k, where): _decode(args[1], v, f"{where}.{k}")
            for k, v in value.items()
        }
    if tp is float:
        return float(value)
    if tp is int:
        return int(value)
    return value


class Serializable:
    """Mixin for frozen dataclasses: JSON-safe ``to_dict`` and typed ``from_dict``."""

    def to_dict(self) -> dict[str, Any]:
        return _encode(self)  # type: ignore[no-any-return]

    @classmethod
    def from_dict(cls: type[T], data: Any) -> T:
        return _decode(cls, data, cls.__name__)  # type: ignore[no-any-return]
