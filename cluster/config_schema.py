"""Strict types for config values read from YAML: what a dataclass field says is what it takes.

YAML gives `"false"` (a string, truthy), `1.5` for a worker count, or `two`; a frozen config's own checks would
accept the first, fail late on the second and raise a `TypeError` naming no key on the third. `check_types`
refuses each with the key, the value and what was expected, before the config is built.
"""

from __future__ import annotations

import types
import typing
from typing import Any

_NAMES = {bool: "true or false (unquoted)", int: "an integer", float: "a number", str: "a string",
          type(None): "null"}


def _accepts(kind: Any, value: Any) -> bool | None:
    """Whether `value` fits the simple type `kind`; None where `kind` is not one this module checks."""
    if kind is bool:
        return isinstance(value, bool)
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if kind is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if kind in (str, type(None)):
        return isinstance(value, kind)
    return None


def _expected(hint: Any) -> tuple[list[Any], bool]:
    """The simple types a field allows, and whether every member of its union is one of them."""
    members = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
    simple = [m for m in members if m in _NAMES]
    return simple, len(simple) == len(members)


def check_types(cls: type, data: dict[str, Any], where: str) -> None:
    """ValueError naming `where` and the key if a value in `data` does not have its field's type in `cls`.
    Fields of other types (nested configs, collections) are left to their own checks."""
    hints = typing.get_type_hints(cls)
    for key, value in data.items():
        simple, only_simple = _expected(hints.get(key))
        if not simple or not only_simple:
            continue
        if not any(_accepts(kind, value) for kind in simple):
            want = " or ".join(_NAMES[k] for k in simple)
            raise ValueError(f"{where}: `{key}` must be {want}, got {value!r} ({type(value).__name__})")
