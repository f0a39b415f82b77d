"""Argument checks shared by the public API and the command line, with one rule for exception types.

A value of the wrong type raises ``TypeError``; a value of the right type outside its range raises ``ValueError``.
Every message names the argument, says what was expected and shows what was given. ``bool`` is never accepted as a
number (``True`` is an ``int`` in Python, but ``batch_size=True`` is a mistake).

Bad *file content* (a field of the wrong type or value on line N of a data file) is a ``ValueError`` naming
``file:line``, in the training readers (:mod:`codiemb_st.record_formats`) and the evaluation readers
(:mod:`codiemb_st.evaluation.local_data`) alike: the argument, a path, was of the right type; the file holds a bad
value.
"""

from __future__ import annotations

import math
from typing import Any


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_real(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_int(name: str, value: Any, *, minimum: int | None = None) -> int:
    """``value`` if it is an int (not a bool) and at least ``minimum``.

    Raises:
        TypeError: If ``value`` is not an int.
        ValueError: If it is below ``minimum``.
    """
    if not _is_int(value):
        raise TypeError(f"`{name}` must be an integer; got {type(value).__name__} {value!r}.")
    if minimum is not None and value < minimum:
        raise ValueError(f"`{name}` must be an integer >= {minimum}; got {value}.")
    return value


def check_positive_int(name: str, value: Any) -> int:
    """``value`` if it is an int >= 1 (see :func:`check_int`)."""
    return check_int(name, value, minimum=1)


def check_non_negative_int(name: str, value: Any) -> int:
    """``value`` if it is an int >= 0 (see :func:`check_int`)."""
    return check_int(name, value, minimum=0)


def check_finite_float(
    name: str,
    value: Any,
    *,
    minimum: float | None = None,
    maximum: float | None = None,
    strict_minimum: bool = False,
) -> float:
    """``float(value)`` if ``value`` is a finite real number within the bounds.

    Args:
        name: The argument's name, for the message.
        value: The value to check.
        minimum: Lower bound (inclusive unless ``strict_minimum``).
        maximum: Upper bound (inclusive).
        strict_minimum: Require ``value > minimum``.

    Raises:
        TypeError: If ``value`` is not an int or float.
        ValueError: If it is NaN, infinite or out of bounds.
    """
    if not _is_real(value):
        raise TypeError(f"`{name}` must be a number; got {type(value).__name__} {value!r}.")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"`{name}` must be a finite number; got {value}.")
    if minimum is not None and (value <= minimum if strict_minimum else value < minimum):
        relation = ">" if strict_minimum else ">="
        raise ValueError(f"`{name}` must be {relation} {minimum}; got {value}.")
    if maximum is not None and value > maximum:
        raise ValueError(f"`{name}` must be <= {maximum}; got {value}.")
    return value


def check_positive_float(name: str, value: Any) -> float:
    """``float(value)`` if it is a finite number > 0 (see :func:`check_finite_float`)."""
    return check_finite_float(name, value, minimum=0.0, strict_minimum=True)


def check_bool(name: str, value: Any) -> bool:
    """``value`` if it is a bool (not 0/1, not a string).

    Raises:
        TypeError: If ``value`` is not a bool.
    """
    if not isinstance(value, bool):
        raise TypeError(f"`{name}` must be True or False; got {type(value).__name__} {value!r}.")
    return value


def check_choice(name: str, value: Any, choices: tuple[Any, ...]) -> Any:
    """``value`` if it is one of ``choices``.

    Raises:
        ValueError: Naming the argument and listing the choices.
    """
    if value not in choices:
        raise ValueError(f"`{name}` must be one of {', '.join(map(repr, choices))}; got {value!r}.")
    return value


__all__ = [
    "check_bool",
    "check_choice",
    "check_finite_float",
    "check_int",
    "check_non_negative_int",
    "check_positive_float",
    "check_positive_int",
]
