"""Training records -> sentence-transformers column datasets (the converters).

The record formats (``unified``, ``flagembedding``, ``sentence-transformers``), their detection and readers live in
:mod:`codiemb_st.record_formats`. sentence-transformers cannot batch variable-length list columns, so an IR record becomes fixed columns
``anchor, positive_1..positive_P, negative_1..negative_N``: a record with more texts than needed contributes a random
subset, one with fewer is completed by resampling its own texts with replacement (the official code does the same).
"""

from __future__ import annotations

import logging
import os
import random
from typing import Any, Literal

from datasets import Dataset

from codiemb_st._record_fields import TASK_TYPES, describe_source
from codiemb_st.record_formats import (
    IRRecords,
    RecordSource,
    STSRecords,
    read_ir_records,
    read_records,
    read_sts_records,
)
from codiemb_st.validation import check_int

logger = logging.getLogger(__name__)


#: The most hard-negative columns a dataset gets when N is not given: its records' own count, capped here (FlagEmbedding's
#: default train_group_size of 8 is 7 negatives; the official CoDiEmb N is 4).
MAX_DEFAULT_NEGATIVES = 8


def records_negative_count(records: IRRecords) -> int:
    """The N a dataset of these records trains with when none is given: the most negatives any record has, at most
    :data:`MAX_DEFAULT_NEGATIVES` (``codiemb-st mine --num-negatives 4`` output -> 4)."""
    return min(max(len(record["negatives"]) for record in records.records), MAX_DEFAULT_NEGATIVES)


def ir_dataset_from_records(
    source: RecordSource | IRRecords,
    num_positives: int = 1,
    num_negatives: int | None = None,
    seed: int = 0,
    *,
    with_scores: bool = False,
) -> Dataset:
    """Turn IR records into a dataset with columns ``anchor, positive_1..positive_P, negative_1..negative_N``.

    The records may be in any of the three formats (see :func:`read_ir_records`: detected per file, duplicate
    queries merged). A record's own ``prompt`` is written in front of its query (and of its passages for
    FlagEmbedding's symmetric types), as FlagEmbedding does; the recipe instead makes a file's prompt the dataset's
    instruction (excluded from pooling).

    Each record gives one row: its query and ``num_positives`` positives and ``num_negatives`` hard negatives. A
    record with more texts than needed contributes a random subset; one with fewer gets all of its texts plus
    random ones of its own drawn again with replacement, as the official CoDiEmb code does. How many records were
    padded (and how many texts were left out) is logged. The draw is fixed by ``seed`` (unlike the official code,
    which redraws every epoch, an ST dataset is static).

    Args:
        source: A record file (see :func:`read_records`), ``datasets.Dataset``, iterable of dicts, or
            :class:`IRRecords`.
        num_positives: Positive columns ``P`` (official CoDiEmb: 2). Use it with a multi-positive loss such as
            ``MultiPositiveCachedInfoNCELoss(num_positives=P)``; MNRL-style losses would read extra positives as
            negatives.
        num_negatives: Hard-negative columns ``N`` (official CoDiEmb: 4). ``None`` (default): as many as the
            records have (:func:`records_negative_count`; 0 when none has any). ``0`` keeps only in-batch negatives.
            A record without negatives (when others have some) gets ``N`` negatives of other records, drawn at
            random, like in-batch negatives (counted in a warning); a record with fewer than ``N`` repeats its own.
        seed: Seed of the subset/resampling draws.
        with_scores: Add a ``label`` column of teacher scores (``P + N`` per row, in column order) for
            distillation; every text drawn must have one (``positive_scores``/``negative_scores``, ``pos_scores``/
            ``neg_scores`` or a list ``label``), else a ``ValueError`` names the record.

    Returns:
        A ``datasets.Dataset`` with one row per (merged) record.

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
    if num_negatives is not None:
        check_int("num_negatives", num_negatives, minimum=0)
    check_int("seed", seed)
    ir_records = read_ir_records(source)
    if num_negatives is None:
        num_negatives = records_negative_count(ir_records)
    records = ir_records.prompts_in_text()
    prompted = sum(1 for record in ir_records.records if record["prompt"])
    if prompted:
        logger.info(
            "%s: wrote the `prompt` of %d records in front of their %s.",
            ir_records.name,
            prompted,
            "texts (symmetric type)" if ir_records.symmetric else "queries",
        )
    return ir_columns(records, ir_records.name, num_positives, num_negatives, seed, with_scores=with_scores)


def ir_columns(
    records: list[dict[str, Any]],
    name: str,
    num_positives: int,
    num_negatives: int,
    seed: int,
    *,
    with_scores: bool = False,
) -> Dataset:
    """Columns ``anchor, positive_1..P, negative_1..N`` from :attr:`IRRecords.records` (texts used as they are).

    A record without negatives, in records of which some have negatives, is trained with ``N`` negatives of other
    records (random, like in-batch negatives; never one of its own positives): its row is kept and the other records
    keep their hard negatives. When no record has any, ``N > 0`` is refused.

    With ``with_scores``, a ``label`` column holds each row's teacher scores, ``P + N`` floats in column order (the
    labels of distillation, :class:`~codiemb_st.MultiPositiveCachedInfoNCELoss`'s ``distillation_weight``): every
    text drawn must have a score. Without it, scores the records carry are left out (counted in a warning).
    """
    rng = random.Random(seed)
    columns: dict[str, list[Any]] = {"anchor": []}
    columns.update({f"positive_{k}": [] for k in range(1, num_positives + 1)})
    columns.update({f"negative_{k}": [] for k in range(1, num_negatives + 1)})
    if with_scores:
        columns["label"] = []
    stats = {"positives": _DrawStats(), "negatives": _DrawStats()}
    lacking = [record for record in records if not record["negatives"]] if num_negatives else []
    pool: list[str] = []
    if lacking:
        pool = list(dict.fromkeys(text for record in records for text in record["negatives"]))
        if not pool:
            raise ValueError(
                f"{lacking[0]['location']}: no record has negatives but num_negatives={num_negatives}; add hard "
                "negatives (e.g. with `codiemb-st mine`) or use num_negatives=0 (in-batch negatives only)."
            )
        if with_scores:
            raise ValueError(
                f"{lacking[0]['location']}: the record has no hard negatives, so there are no teacher scores to "
                "distil from; mine and score negatives for it (`codiemb-st mine --keep-negatives`, then "
                "`codiemb-st score`), or train without distillation."
            )
    borrowed = scored_unused = 0
    for record in records:
        negatives, negative_scores = record["negatives"], record.get("negative_scores")
        if num_negatives and not negatives:
            positives = set(record["positives"]) | {record["query"]}
            negatives = [text for text in rng.sample(pool, min(len(pool), 4 * num_negatives)) if text not in positives]
            negatives = negatives[:num_negatives] or [text for text in pool if text not in positives][:1]
            if not negatives:
                raise ValueError(
                    f"{record['location']}: the record has no negatives and every other record's negative is one of "
                    "its positives; add hard negatives or use num_negatives=0."
                )
            borrowed += 1
        columns["anchor"].append(record["query"])
        label: list[float] = []
        for kind, texts, scores, count in (
            ("positive", record["positives"], record.get("positive_scores"), num_positives),
            ("negative", negatives, negative_scores, num_negatives),
        ):
            for k, index in enumerate(_draw(len(texts), count, rng, stats[f"{kind}s"]), start=1):
                columns[f"{kind}_{k}"].append(texts[index])
                if with_scores:
                    score = scores[index] if scores is not None else None
                    if score is None:
                        raise ValueError(
                            f"{record['location']}: {kind} {texts[index][:60]!r} has no teacher score; distillation "
                            "needs one for every text trained on: score the records (`codiemb-st score`) or train "
                            "without distillation."
                        )
                    label.append(score)
        if with_scores:
            columns["label"].append(label)
        elif record.get("positive_scores") or record.get("negative_scores"):
            scored_unused += 1
    num_rows = len(columns["anchor"])
    if borrowed:
        logger.warning(
            "IR records in %s: %d of %d have no hard negatives (first: %s); each is trained with %d negatives drawn "
            "from other records' negatives (like in-batch negatives); the other records keep their own. Mine "
            "negatives for them (`codiemb-st mine --keep-negatives`) to train on hard ones.",
            name,
            borrowed,
            num_rows,
            lacking[0]["location"],
            num_negatives,
        )
    if scored_unused:
        logger.warning(
            "IR records in %s: the teacher scores of %d of %d records are not used (no distillation); set a "
            "distillation weight (`--distill-weight`) to train on them.",
            name,
            scored_unused,
            num_rows,
        )
    for kind, count in (("positives", num_positives), ("negatives", num_negatives)):
        stats[kind].log(name, kind, count, num_rows)
    return Dataset.from_dict(columns)


def sts_dataset_from_records(source: RecordSource | STSRecords) -> Dataset:
    """Turn scored pairs into a dataset with columns ``sentence1, sentence2, score``.

    The records may be in any of the three formats (see :func:`read_sts_records`). A record's own ``prompt`` is
    written in front of both sentences (STS instructions are symmetric); the recipe instead makes a file's prompt
    the dataset's instruction (excluded from pooling).

    Args:
        source: A record file (see :func:`read_records`), ``datasets.Dataset``, iterable of dicts or
            :class:`STSRecords`.

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
    sts_records = read_sts_records(source)
    prompted = sum(1 for record in sts_records.records if record["prompt"])
    if prompted:
        logger.info("%s: wrote the `prompt` of %d pairs in front of both sentences.", sts_records.name, prompted)
    return sts_columns(sts_records.records, use_prompts=True)


def sts_columns(records: list[dict[str, Any]], *, use_prompts: bool) -> Dataset:
    """Columns ``sentence1, sentence2, score`` from :attr:`STSRecords.records` (``use_prompts``: prompt both)."""
    columns: dict[str, list[Any]] = {"sentence1": [], "sentence2": [], "score": []}
    for record in records:
        prompt = (record["prompt"] or "") if use_prompts else ""
        columns["sentence1"].append(prompt + record["sentence1"])
        columns["sentence2"].append(prompt + record["sentence2"])
        columns["score"].append(record["score"])
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
            raise ValueError(f"No records in {describe_source(source)}.")
        task = first.get("task_type")
        if task is None:
            task = "sts" if "sentence1" in first or "sentence2" in first else "ir"
        elif task not in TASK_TYPES:
            # Blame the record's field, not the `task` argument the caller did not pass.
            raise ValueError(
                f"{location}: `task_type` must be 'ir' or 'sts'; got {task!r}. Fix the field, or pass task='ir' or "
                "task='sts' to convert every record as that task."
            )
    elif task not in TASK_TYPES:
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
            option = "num_positives (--num-positives)" if kind == "positives" else "num_negatives (--num-negatives)"
            logger.warning(
                "IR records in %s: %d of %d had more than %d %s; %d %s were left out (a random subset is kept; raise "
                f"{option} to train on more).",
                source,
                self.truncated_records,
                num_rows,
                count,
                kind,
                self.left_out_texts,
                kind,
            )


def _draw(size: int, count: int, rng: random.Random, stats: _DrawStats) -> list[int]:
    """``count`` indices into ``size`` texts: a random subset when there are enough, else all of them plus resampled
    ones (indices, so that a text's teacher score follows it)."""
    if count == 0:
        return []
    if size >= count:
        if size > count:
            stats.truncated_records += 1
            stats.left_out_texts += size - count
        return rng.sample(range(size), count)
    stats.padded_records += 1
    stats.padded_texts += count - size
    drawn = rng.sample(range(size), size) + rng.choices(range(size), k=count - size)
    rng.shuffle(drawn)
    return drawn


__all__ = [
    "MAX_DEFAULT_NEGATIVES",
    "dataset_from_records",
    "ir_columns",
    "ir_dataset_from_records",
    "records_negative_count",
    "sts_columns",
    "sts_dataset_from_records",
]
