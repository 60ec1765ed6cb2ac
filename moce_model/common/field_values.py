"""One rule for the type of a config value read from YAML or JSON, shared by `TrainingConfig` and `StudyConfig`.

Hand-written rather than pydantic: `TrainingConfig` is imported by GPU scripts that carry few wheels, and the
rule is short. pydantic's lax mode would turn "3" into 3; its strict mode refuses a YAML list for a tuple field.
Here a bool is not an int, an int may stand for a float, a list becomes a tuple, and nothing else is converted.
A float is finite: no config value means NaN or infinity, and YAML's `.nan` is easily written by mistake.
"""

from __future__ import annotations

import math
import types
import typing
from typing import Any


def conformed(value: Any, hint: Any) -> Any:
    """`value` as a field annotated `hint` holds it (list -> tuple, int -> float), or a TypeError whose message
    says what was expected ("int or None", "a list of str")."""
    options = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
    for option in options:
        if typing.get_origin(option) is tuple:
            item_hint = _item_hint(option)
            if isinstance(value, (list, tuple)) and all(_matches(item, item_hint) for item in value):
                return tuple(float(item) if item_hint is float else item for item in value)
        elif option in (type(None), bool, int, float, str):
            if _matches(value, option):
                return float(value) if option is float else value
        else:  # a field type this check does not know: let the dataclass take it as it is
            return value
    raise TypeError("expected " + " or ".join(_describe(option) for option in options))


def _matches(value: Any, kind: Any) -> bool:
    if kind is Any:
        return True
    if kind is type(None):
        return value is None
    if kind is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return False
        try:
            return math.isfinite(float(value))
        except OverflowError:  # an int past float's range
            return False
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, kind)


def _describe(option: Any) -> str:
    if option is type(None):
        return "None"
    if option is float:
        return "finite float"
    if typing.get_origin(option) is tuple:
        item_hint = _item_hint(option)
        return f"a list of {getattr(item_hint, '__name__', str(item_hint))}"
    return getattr(option, "__name__", str(option))


def _item_hint(tuple_hint: Any) -> Any:
    """The element type of `tuple[X, ...]` (Any for a bare `tuple`)."""
    arguments = typing.get_args(tuple_hint)
    return arguments[0] if arguments else Any
