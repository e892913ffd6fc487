"""Argument checks shared across the library: a bad value raises with its name, the value and what is allowed.

Configs call these from `__post_init__` (the name passed is `Config.field`), entry points on their arguments.
Bools are refused where a number is expected (`True` is an int in Python, but never a meaningful count).
"""

from __future__ import annotations

import math
import numbers
import operator
from collections.abc import Collection, Iterable
from typing import Any

import jax
import numpy as np


def is_int(value: Any) -> bool:
    """An integer that is not a bool (`True` is an int to Python, never a size or count here)."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def is_real(value: Any) -> bool:
    """A finite real number that is not a bool."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def check_field(config: str, cond: bool, field: str, value: Any, allowed: str) -> None:
    """The config-validation error every frozen config raises: `Config.field=value is invalid: allowed`."""
    if not cond:
        raise ValueError(f"{config}.{field}={value!r} is invalid: {allowed}")


def int_arg(name: str, value: Any, minimum: int | None = None, maximum: int | None = None) -> int:
    """`value` as an int in [minimum, maximum] (bools and non-integers are refused with TypeError)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {value!r} ({type(value).__name__})")
    value = operator.index(value)
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    if maximum is not None and value > maximum:
        raise ValueError(f"{name} must be <= {maximum}, got {value}")
    return value


def optional_int_arg(name: str, value: Any, minimum: int | None = None, maximum: int | None = None) -> int | None:
    """None, or `int_arg(name, value, minimum, maximum)`."""
    return None if value is None else int_arg(name, value, minimum, maximum)


def float_arg(name: str, value: Any, *, low: float | None = None, high: float | None = None,
              low_open: bool = False, high_open: bool = False) -> float:
    """`value` as a finite float within [low, high] (`low_open` / `high_open` exclude the bound).

    Accepts Python and numpy reals and concrete 0-d jax arrays; refuses bools, NaN, infinities and tracers.
    """
    if isinstance(value, jax.core.Tracer):
        raise TypeError(f"{name} must be a concrete number, not a traced value (pass it outside jit)")
    if isinstance(value, (jax.Array, np.ndarray)) and np.ndim(value) == 0:
        value = np.asarray(value).item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {value!r} ({type(value).__name__})")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    if low is not None and (value <= low if low_open else value < low):
        raise ValueError(f"{name} must be {'>' if low_open else '>='} {low}, got {value}")
    if high is not None and (value >= high if high_open else value > high):
        raise ValueError(f"{name} must be {'<' if high_open else '<='} {high}, got {value}")
    return value


def optional_float_arg(name: str, value: Any, **bounds) -> float | None:
    """None, or `float_arg(name, value, **bounds)`."""
    return None if value is None else float_arg(name, value, **bounds)


def floats_arg(name: str, values: Any, **bounds) -> tuple[float, ...]:
    """A non-empty sequence of finite reals (each as `float_arg(f"{name}[i]", ..., **bounds)`) as a tuple."""
    if isinstance(values, (str, bytes)) or not isinstance(values, Iterable):
        raise TypeError(f"{name} must be a sequence of numbers, got {values!r} ({type(values).__name__})")
    out = tuple(float_arg(f"{name}[{i}]", v, **bounds) for i, v in enumerate(values))
    if not out:
        raise ValueError(f"{name} must hold at least one number, got an empty sequence")
    return out


def choice_arg(name: str, value: Any, allowed: Collection) -> Any:
    """`value` if it is one of `allowed`, else ValueError listing them."""
    if value not in allowed:
        raise ValueError(f"{name}={value!r} is not allowed; choose one of {tuple(allowed)}")
    return value


def bool_arg(name: str, value: Any) -> bool:
    """`value` if it is a bool (numbers and strings are refused: `"false"` would read as True)."""
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be True or False, got {value!r} ({type(value).__name__})")
    return bool(value)


def assert_finite(name: str, value) -> None:
    """Raise ValueError when a concrete array holds NaN or Inf (a no-op on tracers: check before jit)."""
    if isinstance(value, jax.core.Tracer):
        return
    arr = np.asarray(value)
    if not np.all(np.isfinite(arr)):
        bad = int(np.size(arr) - np.count_nonzero(np.isfinite(arr)))
        raise ValueError(f"{name} holds {bad} non-finite values (NaN or Inf) out of {arr.size}")
