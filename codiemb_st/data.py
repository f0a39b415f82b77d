"""Unified training records -> sentence-transformers column datasets.

CoDiEmb keeps one file per sub-dataset of one task, one JSON object per line:

- IR records: ``{"query": str, "positives": [str, ...], "negatives": [str, ...]}`` (``negatives`` may be empty or
  missing; ``positive_scores``/``negative_scores`` may be present and are ignored for IR);
- STS pairs: ``{"sentence1": str, "sentence2": str, "score": float}``, or the unified form
  ``{"query": x1, "positives": [x2], "positive_scores": [y]}`` (only the first positive is used, as in the official
  code).

An optional ``task_type`` field (``"ir"``/``"sts"``, as in the official data) is checked against the conversion.
sentence-transformers cannot batch variable-length list columns, so an IR record becomes fixed columns
``anchor, positive_1..positive_P, negative_1..negative_N``: a record with more texts than needed contributes a random
subset, one with fewer is completed by resampling its own texts with replacement (the official code does the same).
"""

from __future__ import annotations

import logging
import math
import os
import random
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any, Literal

from datasets import Dataset

from codiemb_st.file_io import read_jsonl
from codiemb_st.validation import check_int

logger = logging.getLogger(__name__)

_TASK_TYPES = ("ir", "sts")

RecordSource = str | os.PathLike | Dataset | Iterable[Mapping[str, Any]]
"""A JSONL file (``.jsonl`` or gzip-compressed ``.jsonl.gz``), a ``datasets.Dataset`` or an iterable of dicts."""


def read_records(source: RecordSource) -> Iterator[tuple[str, Mapping[str, Any]]]:
    """Yield ``(location, record)`` for every record of ``source``.

    ``location`` names the record in error messages: ``"path:line"`` (1-based) for a file, ``"row i"`` (0-based)
    for a ``Dataset`` or an iterable. Blank lines in a file are skipped.

    Args:
        source: A JSONL file (``.jsonl``; ``.gz`` suffix = gzip-compressed), a ``datasets.Dataset`` or an iterable
            of dicts.

    Raises:
        FileNotFoundError: If the file does not exist.
        ValueError: On a line that is not valid JSON or not a JSON object, a file that is not UTF-8, or a ``.gz``
            file that is not gzip (naming ``path:line``).
        TypeError: If ``source`` is none of the accepted types.
    """
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if not path.is_file():
            raise FileNotFoundError(f"Record file not found: {path}")
        for location, record in read_jsonl(path):
            yield location, _check_is_object(record, location)
        return
    if isinstance(source, Mapping) or not isinstance(source, Iterable):
        raise TypeError(
            f"`source` must be a JSONL path, a datasets.Dataset or an iterable of dicts; got {type(source).__name__}."
        )
    for index, record in enumerate(source):
        location = f"row {index}"
        yield location, _check_is_object(record, location)


def ir_dataset_from_records(
    source: RecordSource,
    num_positives: int = 1,
    num_negatives: int = 0,
    seed: int = 0,
) -> Dataset:
    """Turn IR records into a dataset with columns ``anchor, positive_1..positive_P, negative_1..negative_N``.

    Each record gives one row: its query and ``num_positives`` positives and ``num_negatives`` hard negatives. A
    record with more texts than needed contributes a random subset; one with fewer gets all of its texts plus
    random ones of its own drawn again with replacement, as the official CoDiEmb code does. How many records were
    padded (and how many texts were left out) is logged. The draw is fixed by ``seed`` (unlike the official code,
    which redraws every epoch, an ST dataset is static).

    Args:
        source: JSONL path (``.jsonl``/``.jsonl.gz``), ``datasets.Dataset`` or iterable of dicts with ``query``,
            ``positives`` (non-empty) and optionally ``negatives``.
        num_positives: Positive columns ``P`` (official CoDiEmb: 2). Use it with a multi-positive loss such as
            ``MultiPositiveCachedInfoNCELoss(num_positives=P)``; MNRL-style losses would read extra positives as
            negatives.
        num_negatives: Hard-negative columns ``N`` (official CoDiEmb: 4). ``0`` keeps only in-batch negatives; with
            ``N > 0`` every record must have at least one negative.
        seed: Seed of the subset/resampling draws.

    Returns:
        A ``datasets.Dataset`` with one row per record.

    Raises:
        ValueError: On a malformed record (naming ``path:line`` or ``row i``), on an empty source, or on bad
            ``num_positives``/``num_negatives``.

    Example:
        ::

            from codiemb_st import ir_dataset_from_records

            train_ir = ir_dataset_from_records("en_snli.jsonl.gz", num_positives=1, num_negatives=1)
            # columns: anchor, positive_1, negative_1
    """
    check_int("num_positives", num_positives, minimum=1)
    check_int("num_negatives", num_negatives, minimum=0)
    check_int("seed", seed)
    rng = random.Random(seed)
    columns: dict[str, list[str]] = {"anchor": []}
    columns.update({f"positive_{k}": [] for k in range(1, num_positives + 1)})
    columns.update({f"negative_{k}": [] for k in range(1, num_negatives + 1)})
    stats = {"positives": _DrawStats(), "negatives": _DrawStats()}
    warned: set[str] = set()

    for location, record in read_records(source):
        _check_task_type(record, "ir", location)
        _warn_unread_keys(record, location, warned)
        query = _text(record.get("query"), "query", location)
        positives = _texts(record.get("positives"), "positives", location, required=True)
        negatives = _texts(record.get("negatives", []), "negatives", location, required=False)
        if num_negatives and not negatives:
            raise ValueError(
                f"{location}: the record has no negatives but num_negatives={num_negatives}; add hard negatives "
                "or use num_negatives=0 (in-batch negatives only)."
            )
        columns["anchor"].append(query)
        for k, text in enumerate(_draw(positives, num_positives, rng, stats["positives"]), start=1):
            columns[f"positive_{k}"].append(text)
        for k, text in enumerate(_draw(negatives, num_negatives, rng, stats["negatives"]), start=1):
            columns[f"negative_{k}"].append(text)

    num_rows = len(columns["anchor"])
    if num_rows == 0:
        raise ValueError(f"No records in {_describe(source)}.")
    for kind, count in (("positives", num_positives), ("negatives", num_negatives)):
        stats[kind].log(_describe(source), kind, count, num_rows)
    return Dataset.from_dict(columns)


def sts_dataset_from_records(source: RecordSource) -> Dataset:
    """Turn scored pairs into a dataset with columns ``sentence1, sentence2, score``.

    Accepts ``{"sentence1", "sentence2", "score"}`` records and unified records ``{"query": x1, "positives": [x2,
    ...], "positive_scores": [y, ...]}``, of which only the first positive is used (as in the official code; the
    number of positives left out is logged). Scores are kept as given (any range; the losses use them as
    correlation targets or orderings).

    Args:
        source: JSONL path (``.jsonl``/``.jsonl.gz``), ``datasets.Dataset`` or iterable of dicts.

    Returns:
        A ``datasets.Dataset`` with one row per record.

    Raises:
        ValueError: On a malformed record (naming ``path:line`` or ``row i``), e.g. a missing or non-finite score,
            or on an empty source.

    Example:
        ::

            from codiemb_st import sts_dataset_from_records

            train_sts = sts_dataset_from_records("en_stsb.jsonl.gz")  # columns: sentence1, sentence2, score
    """
    columns: dict[str, list[Any]] = {"sentence1": [], "sentence2": [], "score": []}
    extra_positives = 0
    for location, record in read_records(source):
        _check_task_type(record, "sts", location)
        if "sentence1" in record or "sentence2" in record:
            sentence1 = _text(record.get("sentence1"), "sentence1", location)
            sentence2 = _text(record.get("sentence2"), "sentence2", location)
            score = _score(record.get("score"), "score", location)
        elif "query" in record:
            sentence1 = _text(record.get("query"), "query", location)
            positives = _texts(record.get("positives"), "positives", location, required=True)
            scores = record.get("positive_scores")
            if not isinstance(scores, list) or len(scores) != len(positives):
                raise ValueError(
                    f"{location}: a unified STS record needs `positive_scores`, a list with one score per positive; "
                    f"got {scores!r} for {len(positives)} positive(s)."
                )
            sentence2 = positives[0]
            score = _score(scores[0], "positive_scores[0]", location)
            extra_positives += len(positives) - 1
        else:
            raise ValueError(
                f"{location}: not an STS record; expected keys sentence1, sentence2, score (or query, positives, "
                f"positive_scores), got {sorted(record)}."
            )
        columns["sentence1"].append(sentence1)
        columns["sentence2"].append(sentence2)
        columns["score"].append(score)
    if not columns["score"]:
        raise ValueError(f"No records in {_describe(source)}.")
    if extra_positives:
        logger.info(
            "STS records in %s: used the first positive of each record, left out %d more.",
            _describe(source),
            extra_positives,
        )
    return Dataset.from_dict(columns)


def dataset_from_records(
    source: RecordSource,
    task: Literal["ir", "sts"] | None = None,
    **kwargs: Any,
) -> Dataset:
    """Convert records of either task; ``task=None`` infers it from the first record.

    Inference: its ``task_type`` field if present; ``sentence1``/``sentence2`` keys mean ``"sts"``; otherwise
    ``"ir"``. Unified STS records (``query``/``positives``/``positive_scores``) without ``task_type`` need
    ``task="sts"``.

    Args:
        source: See :func:`read_records`.
        task: ``"ir"``, ``"sts"`` or ``None`` (infer).
        **kwargs: Passed to :func:`ir_dataset_from_records` (``num_positives``, ``num_negatives``, ``seed``).

    Returns:
        The converted ``datasets.Dataset``.
    """
    if task is None:
        if not isinstance(source, (str, os.PathLike, Dataset)):
            source = list(source)  # read twice: once to infer the task, once to convert
        location, first = next(iter(read_records(source)), (None, None))
        if first is None:
            raise ValueError(f"No records in {_describe(source)}.")
        task = first.get("task_type")
        if task is None:
            task = "sts" if "sentence1" in first or "sentence2" in first else "ir"
        elif task not in _TASK_TYPES:
            # Blame the record's field, not the `task` argument the caller did not pass.
            raise ValueError(
                f"{location}: `task_type` must be 'ir' or 'sts'; got {task!r}. Fix the field, or pass task='ir' or "
                "task='sts' to convert every record as that task."
            )
    elif task not in _TASK_TYPES:
        raise ValueError(f"`task` must be 'ir', 'sts' or None; got {task!r}.")
    if task == "ir":
        return ir_dataset_from_records(source, **kwargs)
    if kwargs:
        raise TypeError(f"STS conversion takes no options; got {sorted(kwargs)}.")
    return sts_dataset_from_records(source)


class _DrawStats:
    """Counts, for one kind of text (positives or negatives), padded records and texts left out."""

    def __init__(self) -> None:
        self.padded_records = 0
        self.padded_texts = 0
        self.truncated_records = 0
        self.left_out_texts = 0

    def log(self, source: str, kind: str, count: int, num_rows: int) -> None:
        if self.padded_records:
            logger.info(
                "IR records in %s: %d of %d had fewer than %d %s; %d %s were resampled with replacement to fill them.",
                source,
                self.padded_records,
                num_rows,
                count,
                kind,
                self.padded_texts,
                kind,
            )
        if self.truncated_records:
            logger.info(
                "IR records in %s: %d of %d had more than %d %s; %d %s were left out (a random subset is kept).",
                source,
                self.truncated_records,
                num_rows,
                count,
                kind,
                self.left_out_texts,
                kind,
            )


def _draw(texts: list[str], count: int, rng: random.Random, stats: _DrawStats) -> list[str]:
    """``count`` texts: a random subset when there are enough, else all of them plus resampled ones."""
    if count == 0:
        return []
    if len(texts) >= count:
        if len(texts) > count:
            stats.truncated_records += 1
            stats.left_out_texts += len(texts) - count
        return rng.sample(texts, count)
    stats.padded_records += 1
    stats.padded_texts += count - len(texts)
    drawn = rng.sample(texts, len(texts)) + rng.choices(texts, k=count - len(texts))
    rng.shuffle(drawn)
    return drawn


#: Keys that mean positives or negatives in other record formats; an IR record holding one would lose those texts.
_UNREAD_IR_KEYS = {
    "pos": "positives",
    "positive": "positives",
    "neg": "negatives",
    "negs": "negatives",
    "negative": "negatives",
    "hard_negatives": "negatives",
}


def _warn_unread_keys(record: Mapping[str, Any], location: str, warned: set[str]) -> None:
    """Warn (once per key and source) about keys that look like texts to train on but are not read."""
    for key in sorted(record.keys() & _UNREAD_IR_KEYS.keys() - warned):
        warned.add(key)
        field = _UNREAD_IR_KEYS[key]
        logger.warning(
            f"{location}: the IR record has a {key!r} key, which is not read (its texts are not trained on); this "
            f"format takes them from {field!r}. Rename {key!r} to {field!r} in the records to use them."
        )


def _check_is_object(record: Any, location: str) -> Mapping[str, Any]:
    if not isinstance(record, Mapping):
        raise ValueError(f"{location}: expected a JSON object (a record), got {type(record).__name__}.")
    return record


def _check_task_type(record: Mapping[str, Any], expected: str, location: str) -> None:
    task_type = record.get("task_type")
    if task_type is None or task_type == expected:
        return
    if task_type in _TASK_TYPES:
        other = "sts_dataset_from_records" if task_type == "sts" else "ir_dataset_from_records"
        raise ValueError(
            f"{location}: record has task_type {task_type!r}, expected {expected!r}; convert this file with {other}."
        )
    raise ValueError(f"{location}: `task_type` must be 'ir' or 'sts' (or absent); got {task_type!r}.")


def _text(value: Any, field: str, location: str) -> str:
    if not isinstance(value, str) or not value.strip():
        got = "missing" if value is None else repr(value)[:80]
        raise ValueError(f"{location}: `{field}` must be a non-empty string; got {got}.")
    return value


def _texts(value: Any, field: str, location: str, required: bool) -> list[str]:
    if not isinstance(value, list):
        got = "missing" if value is None else type(value).__name__
        raise ValueError(f"{location}: `{field}` must be a list of strings; got {got}.")
    if required and not value:
        raise ValueError(f"{location}: `{field}` is empty; each record needs at least one.")
    return [_text(item, f"{field}[{i}]", location) for i, item in enumerate(value)]


def _score(value: Any, field: str, location: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        got = "missing" if value is None else repr(value)
        raise ValueError(f"{location}: `{field}` must be a finite number; got {got}.")
    return float(value)


def _describe(source: RecordSource) -> str:
    return str(source) if isinstance(source, (str, os.PathLike)) else f"the given {type(source).__name__}"


__all__ = [
    "RecordSource",
    "dataset_from_records",
    "ir_dataset_from_records",
    "read_records",
    "sts_dataset_from_records",
]
