"""A config value read from YAML, checked against its field's type hint: what `merge` applies to each key.

YAML 1.1 reads `1e-5` (no dot) as a string and bare on/off/yes/no as booleans; infinite floats and integers
beyond what TensorFlow takes as steps and seeds parse fine and fail much later. Each is settled or refused
here, with a ConfigError naming the key and where it came from.
"""

from __future__ import annotations

import math
import re
import sys
import types
import typing
from typing import Any, Literal

from resnet18.runtime.errors import ConfigError

DEPRECATED_VALUES = {"data.augmentation": {"seed": "rotate_shift_zoom_flip"}}
LARGEST_INT = 2**31 - 1  # TensorFlow takes steps and seeds as fixed-width integers
FLOAT_TEXT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


def checked_value(value: Any, hint: Any, key: str, source: str) -> Any:
    """Accepts `value` if it fits `hint` (int, float, str, bool, a Literal, or X | None)."""
    allowed = typing.get_args(hint) if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union \
        else (hint,)
    if value is None and type(None) in allowed:
        return None
    for kind in allowed:
        if typing.get_origin(kind) is Literal:
            value = _undeprecate(value, key, source)
            if isinstance(value, str) and value in typing.get_args(kind):
                return value
            continue
        if kind is bool and isinstance(value, bool):
            return value
        if kind is int and isinstance(value, int) and not isinstance(value, bool):
            if abs(value) > LARGEST_INT:
                raise ConfigError(f"{source}: {key} must be at most {LARGEST_INT}, got {value}")
            return value
        if kind is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return _finite(float(value) if abs(value) < 1e308 else math.inf, key, source)  # float(10**400) raises
        if kind is float and isinstance(value, str) and FLOAT_TEXT.fullmatch(value.strip()):
            return _finite(float(value), key, source)  # YAML 1.1 reads 1e-5 (no dot) as a string
        if kind is str and isinstance(value, str):
            return value
    names = " or ".join(_type_name(kind) for kind in allowed)
    hint_text = ""
    if isinstance(value, bool) and any(kind is str or typing.get_origin(kind) is Literal for kind in allowed):
        # YAML 1.1 reads bare on/off/yes/no as booleans (Model Garden warns of the same).
        hint_text = " (YAML reads bare on/off/yes/no as booleans: quote the value)"
    raise ConfigError(
        f"{source}: {key} must be {names}, got {type(value).__name__} {value!r}{hint_text}"
    )


def _finite(value: float, key: str, source: str) -> float:
    """`value`, refused if infinite (YAML's .inf, or 1e400): no key has a use for it (NaN fails the range
    checks of config.validate)."""
    if math.isinf(value):
        raise ConfigError(f"{source}: {key} must be a finite number, got {value}")
    return value


def _type_name(kind: Any) -> str:
    if kind is type(None):
        return "null"
    if typing.get_origin(kind) is Literal:
        return "one of " + ", ".join(repr(value) for value in typing.get_args(kind))
    return kind.__name__


def _undeprecate(value: Any, key: str, source: str) -> Any:
    replacement = DEPRECATED_VALUES.get(key, {}).get(value) if isinstance(value, str) else None
    if replacement is None:
        return value
    print(f"warning: {source}: {key} {value!r} is deprecated; use {replacement!r} (same behaviour)",
          file=sys.stderr, flush=True)
    return replacement
