"""Typed loading of config dataclasses: each scalar field's value must have the field's declared type.

    check_field_types(obj, prefix, error=RecipeError)   # call first in __post_init__

Fields annotated `int`, `float`, `bool` or `str` (optionally `| None`) are checked; other fields are
left to the class's own validation. A bool is not an int (TOML `true` for a count is refused), an
int is accepted for a float and converted, and a float must be finite (NaN and infinities are
refused). The message names the key as `prefix.field` and the value it got.
"""
from __future__ import annotations

import math
from dataclasses import fields

__all__ = ["check_field_types"]

_SCALARS = {"int", "float", "bool", "str"}


def _kind(annotation) -> tuple[str | None, bool]:
    text = annotation if isinstance(annotation, str) else getattr(annotation, "__name__", str(annotation))
    parts = [p.strip() for p in text.split("|")]
    optional = "None" in parts
    rest = [p for p in parts if p != "None"]
    return (rest[0] if len(rest) == 1 and rest[0] in _SCALARS else None), optional


def _describe(v) -> str:
    return f"{v!r} ({type(v).__name__})"


def check_field_types(obj, prefix: str, error: type[Exception] = ValueError) -> None:
    """Check (and normalise int -> float) the scalar fields of the frozen dataclass `obj` in place."""
    for f in fields(obj):
        kind, optional = _kind(f.type)
        if kind is None:
            continue
        v = getattr(obj, f.name)
        key = f"{prefix}.{f.name}" if prefix else f.name
        if v is None and optional:
            continue
        if kind == "bool":
            if not isinstance(v, bool):
                raise error(f"{key} must be true or false, got {_describe(v)}")
        elif kind == "int":
            if isinstance(v, bool) or not isinstance(v, int):
                raise error(f"{key} must be an integer, got {_describe(v)}")
        elif kind == "float":
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                raise error(f"{key} must be a number, got {_describe(v)}")
            if not math.isfinite(v):
                raise error(f"{key} must be a finite number, got {v!r}")
            object.__setattr__(obj, f.name, float(v))
        elif kind == "str" and not isinstance(v, str):
            raise error(f"{key} must be a string, got {_describe(v)}")
