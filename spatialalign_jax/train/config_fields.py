"""The typed fields of the run config (`run_sections.py`, `run_config.py`): ``RunConfigError`` and the
helpers that check values against a dataclass field's type hint (normalising ints to floats, lists to
tuples, YAML 1.1's ``1e-4`` strings to floats) and against bounds and choices, each failure naming
the key and where it was set. Nothing here knows the run's sections; the helpers are the train
package's own (underscored: not an API).
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from typing import Any, Mapping, Sequence


class RunConfigError(ValueError):
    """A run configuration that cannot be used; the message names the key, where it was set and the fix."""

    def __init__(self, message: str, *, key: str | None = None, source: str | None = None,
                 detail: str | None = None) -> None:
        super().__init__(message)
        self.key, self.source, self.detail = key, source, detail


def _fail(key: str, message: str, source: str | None = None) -> typing.NoReturn:
    where = f" (from {source})" if source else ""
    raise RunConfigError(f"{key}{where}: {message}", key=key, source=source, detail=message)


def _one_of(key: str, value: Any, choices: Sequence[Any]) -> None:
    if value not in choices:
        _fail(key, f"{value!r} is not valid; choose one of {', '.join(map(repr, choices))}")


def _at_least(key: str, value: float, low: float, *, strict: bool = False) -> None:
    if not math.isfinite(value):  # NaN compares false with everything: it would pass the bound below
        _fail(key, f"must be a finite number, got {value!r}")
    if value < low or (strict and value == low):
        _fail(key, f"must be {'>' if strict else '>='} {low}, got {value!r}")


def _default_of(f: dataclasses.Field) -> Any:
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return f.default


def _is_dict_field(cls: type, name: str) -> bool:
    hint = typing.get_type_hints(cls)[name]
    return any(typing.get_origin(t) is dict or t is dict for t in _union_members(hint))


def _union_members(hint: Any) -> tuple[Any, ...]:
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return typing.get_args(hint)
    return (hint,)


_NO_MATCH = object()


def _match(value: Any, t: Any) -> Any:
    """``value`` normalised to the type ``t`` (ints to floats, lists to tuples), or ``_NO_MATCH``."""
    origin = typing.get_origin(t) or t
    if origin in (typing.Union, types.UnionType):
        for member in typing.get_args(t):
            out = _match(value, member)
            if out is not _NO_MATCH:
                return out
        return _NO_MATCH
    if t is type(None):
        return None if value is None else _NO_MATCH
    if t is Any:
        return value
    if t is bool:
        return value if isinstance(value, bool) else _NO_MATCH
    if t is int:
        return value if isinstance(value, int) and not isinstance(value, bool) else _NO_MATCH
    if t is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads 1e-4 as a string
            try:
                return float(value)
            except ValueError:
                return _NO_MATCH
        return _NO_MATCH
    if t is str:
        return value if isinstance(value, str) else _NO_MATCH
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            return _NO_MATCH
        args = typing.get_args(t)
        element_types = [args[0]] * len(value) if len(args) == 2 and args[1] is Ellipsis else list(args)
        if len(element_types) != len(value):
            return _NO_MATCH
        out = tuple(_match(v, et) for v, et in zip(value, element_types))
        return _NO_MATCH if any(o is _NO_MATCH for o in out) else out
    if origin is dict:
        ok = isinstance(value, Mapping) and all(isinstance(k, str) for k in value)
        return dict(value) if ok else _NO_MATCH
    raise TypeError(f"run_config cannot check values of type {t!r}")


def _coerce(value: Any, hint: Any, key: str, source: str | None) -> Any:
    """``value`` checked against the field's type hint and normalised; a mismatch names the key."""
    out = _match(value, hint)
    if out is not _NO_MATCH:
        return out
    if value is None:
        _fail(key, f"must not be null; expected {_type_name(hint)}", source)
    tip = (" (quote it to make a number a string)"
           if str in _union_members(hint) and isinstance(value, (int, float)) else "")
    _fail(key, f"expected {_type_name(hint)}, got {type(value).__name__} {value!r}{tip}", source)


def _type_name(hint: Any) -> str:
    names = {int: "an integer", float: "a number", str: "a string", bool: "true/false", type(None): "null"}
    out = []
    for t in _union_members(hint):
        origin = typing.get_origin(t) or t
        if origin is tuple:
            args = typing.get_args(t)
            what = _type_name(args[0]).removeprefix("an ").removeprefix("a ")
            out.append(f"a list of {what}s" if len(args) == 2 and args[1] is Ellipsis
                       else f"a list of {len(args)} {what}s")
        else:
            out.append(names.get(t) or {dict: "a mapping"}.get(origin, str(t)))
    return " or ".join(out)


def _flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping) and prefix.count(".") < 2:
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out
