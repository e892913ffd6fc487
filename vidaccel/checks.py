"""Argument checks shared across the library: a bad value raises with its name, the value and what is allowed."""

from __future__ import annotations

import numbers
import operator
from typing import Any


def int_arg(name: str, value: Any, minimum: int) -> int:
    """`value` as an int >= `minimum` (bools and non-integers are refused with TypeError)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {value!r} ({type(value).__name__})")
    value = operator.index(value)
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value
