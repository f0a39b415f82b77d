"""argparse types for the command line, built on :mod:`codiemb_st.validation` (same rules, argparse messages)."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

from codiemb_st.validation import check_finite_float, check_int


def _argparse_type(parse: Callable[[str], Any], check: Callable[[Any], Any], what: str) -> Callable[[str], Any]:
    def convert(text: str) -> Any:
        try:
            return check(parse(text))
        except (TypeError, ValueError):
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None

    convert.__name__ = what  # argparse names the type in its messages
    return convert


positive_int = _argparse_type(int, lambda v: check_int("value", v, minimum=1), "a positive integer")
non_negative_int = _argparse_type(int, lambda v: check_int("value", v, minimum=0), "an integer >= 0")
positive_float = _argparse_type(
    float, lambda v: check_finite_float("value", v, minimum=0.0, strict_minimum=True), "a finite number > 0"
)
non_negative_float = _argparse_type(
    float, lambda v: check_finite_float("value", v, minimum=0.0), "a finite number >= 0"
)
finite_float = _argparse_type(float, lambda v: check_finite_float("value", v), "a finite number")
unit_interval = _argparse_type(
    float, lambda v: check_finite_float("value", v, minimum=0.0, maximum=1.0), "a number in [0, 1]"
)

__all__ = ["finite_float", "non_negative_float", "non_negative_int", "positive_float", "positive_int", "unit_interval"]
