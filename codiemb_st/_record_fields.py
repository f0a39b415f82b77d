"""Field-level checks shared by the record readers of :mod:`codiemb_st.record_formats`: every message names the
file and line (or row) and the field, and says what was expected."""

from __future__ import annotations

import logging
import math
import os
import re
from collections.abc import Mapping
from typing import Any

from codiemb_st.task_types import TRAINING_TASKS

logger = logging.getLogger("codiemb_st.data")

TASK_TYPES = TRAINING_TASKS  # "ir" / "sts" (evaluation says "retrieval" / "sts": codiemb_st.task_types)


def refuse_unknown(record: Mapping[str, Any], location: str, fields: Mapping[str, str], task: str) -> ValueError:
    needs = "; ".join(f"{name}: {need}" for name, need in fields.items())
    return ValueError(
        f"{location}: the record fits no {task} record format; fields found: {sorted(record)}. Each format needs: "
        f"{needs}."
    )


def numbered_columns(record: Mapping[str, Any]) -> set[str]:
    return {key for key in record if re.fullmatch(r"(positive|negative)_\d+", key)}


#: Keys that mean positives or negatives in other record formats; an IR record holding one would lose those texts.
_UNREAD_IR_KEYS = {
    "pos": "positives",
    "positive": "positives",
    "neg": "negatives",
    "negs": "negatives",
    "negative": "negatives",
    "hard_negatives": "negatives",
}


def warn_unread_keys(record: Mapping[str, Any], location: str, warned: set[str]) -> None:
    """Warn (once per key and source) about keys of a unified record that look like texts to train on but are not
    read (e.g. FlagEmbedding's ``neg`` next to unified ``positives``)."""
    for key in sorted(record.keys() & _UNREAD_IR_KEYS.keys() - warned):
        warned.add(key)
        field = _UNREAD_IR_KEYS[key]
        logger.warning(
            f"{location}: the IR record has a {key!r} key, which is not read (its texts are not trained on); this "
            f"format takes them from {field!r}. Rename {key!r} to {field!r} in the records to use them."
        )


def check_is_object(record: Any, location: str) -> Mapping[str, Any]:
    if not isinstance(record, Mapping):
        raise ValueError(f"{location}: expected a JSON object (a record), got {type(record).__name__}.")
    return record


def check_task_type(record: Mapping[str, Any], expected: str, location: str) -> None:
    task_type = record.get("task_type")
    if task_type is None or task_type == expected:
        return
    if task_type in TASK_TYPES:
        other = "sts_dataset_from_records" if task_type == "sts" else "ir_dataset_from_records"
        raise ValueError(
            f"{location}: record has task_type {task_type!r}, expected {expected!r}; convert this file with {other}."
        )
    raise ValueError(f"{location}: `task_type` must be 'ir' or 'sts' (or absent); got {task_type!r}.")


def text_field(value: Any, field: str, location: str) -> str:
    if not isinstance(value, str) or not value.strip():
        got = "missing" if value is None else repr(value)[:80]
        raise ValueError(f"{location}: `{field}` must be a non-empty string; got {got}.")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as error:
        # A lone surrogate (JSON "\ud800" without its pair) passes json.loads but not pyarrow; name the record here.
        raise ValueError(
            f"{location}: `{field}` holds a character that is not valid Unicode text ({error.reason} at position "
            f"{error.start}: {value[error.start]!r}); a JSON escape \\uD800-\\uDFFF must be one of a surrogate pair. "
            "Fix or drop that character."
        ) from None
    return value


def texts_field(value: Any, field: str, location: str, required: bool) -> list[str]:
    if not isinstance(value, list):
        got = "missing" if value is None else type(value).__name__
        raise ValueError(f"{location}: `{field}` must be a list of strings; got {got}.")
    if required and not value:
        raise ValueError(f"{location}: `{field}` is empty; each record needs at least one.")
    return [text_field(item, f"{field}[{i}]", location) for i, item in enumerate(value)]


def score_field(value: Any, field: str, location: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        got = "missing" if value is None else repr(value)
        raise ValueError(f"{location}: `{field}` must be a finite number; got {got}.")
    return float(value)


def describe_source(source: Any) -> str:
    return str(source) if isinstance(source, (str, os.PathLike)) else f"the given {type(source).__name__}"
