"""Writing mined IR records back in their own format, teacher scores included.

Score fields per format (the agreed names the record readers keep): unified ``positive_scores``/``negative_scores``;
FlagEmbedding ``pos_scores``/``neg_scores``; sentence-transformers rows (one positive per row) a ``label`` list
``[that row's positive score, negative_1 score, ..., negative_n score]``, as sentence-transformers'
``DistillKLDivLoss`` reads it. A record dict's ``positive_scores``/``negative_scores`` are lists aligned with its
``positives``/``negatives`` or ``None`` (a missing key is ``None``); a list of another length is refused, never
written misaligned.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from codiemb_st.file_io import write_atomic, write_jsonl

if TYPE_CHECKING:
    from codiemb_st.record_formats import IRRecords

logger = logging.getLogger(__name__)

#: The score fields of each record format: (positive scores, negative scores).
SCORE_FIELDS = {
    "unified": ("positive_scores", "negative_scores"),
    "flagembedding": ("pos_scores", "neg_scores"),
}


def record_scores(record: dict[str, Any], kind: str) -> list[float] | None:
    """A record's ``positive_scores`` (``kind="positive"``) or ``negative_scores``, checked against its texts.

    Args:
        record: An IR record dict (:class:`~codiemb_st.record_formats.IRRecords`).
        kind: ``"positive"`` or ``"negative"``.

    Returns:
        The scores as floats, or ``None`` when the record has none.

    Raises:
        ValueError: If the list's length differs from the texts', naming the record.

    Example:
        ::

            record_scores({"query": "q", "positives": ["p"], "positive_scores": [0.9]}, "positive")  # [0.9]
    """
    scores = record.get(f"{kind}_scores")
    if scores is None:
        return None
    texts = record[f"{kind}s"]
    if len(scores) != len(texts):
        raise ValueError(
            f"{record.get('location', 'a record')}: {len(scores)} {kind}_scores for {len(texts)} {kind}s; the "
            f"scores must be aligned with the texts (or None)."
        )
    return [float(score) for score in scores]


def ir_records_as_rows(records: IRRecords) -> list[dict[str, Any]]:
    """The records as rows of their own format (the inverse of :func:`~codiemb_st.record_formats.read_ir_records`).

    Teacher scores (``positive_scores``/``negative_scores`` of a record) are written in the format's score fields
    (see the module docstring). sentence-transformers rows: one row per positive, ``anchor, positive,
    negative_1..n`` (the rows of a query with fewer than n negatives are left out, as sentence-transformers' n-tuple
    output does; logged) and a ``label`` column only when every row written has all its scores (a column cannot be
    half missing in Parquet; the records without scores are counted in a warning).

    Args:
        records: IR records, as :func:`~codiemb_st.mining.mine_hard_negatives` returns them.

    Returns:
        One dict per row.

    Raises:
        ValueError: If a record's scores are not aligned with its texts.

    Example:
        ::

            rows = ir_records_as_rows(mined)  # FlagEmbedding input: {"query", "pos", "neg", "pos_scores", ...}
    """
    rows: list[dict[str, Any]] = []
    extra = {"prompt": None, "type": records.data_type}
    if records.format == "sentence-transformers":
        width = max(len(record["negatives"]) for record in records.records)
        kept = [record for record in records.records if len(record["negatives"]) == width]
        if len(kept) < len(records.records):
            logger.warning(
                "%s: %d queries with fewer than %d negatives are left out of the sentence-transformers rows.",
                records.name,
                len(records.records) - len(kept),
                width,
            )
        scores = [(record_scores(record, "positive"), record_scores(record, "negative")) for record in kept]
        scored = sum(positive is not None and negative is not None for positive, negative in scores)
        with_label = bool(kept) and scored == len(kept)
        if scored and not with_label:
            logger.warning(
                "%s: %d of %d queries lack positive or negative scores, so no `label` column is written (it would "
                "be half empty); write the scores of every query with `mine --output-scores`.",
                records.name,
                len(kept) - scored,
                len(kept),
            )
        for record, (positive_scores, negative_scores) in zip(kept, scores):
            negatives = {f"negative_{k}": text for k, text in enumerate(record["negatives"], start=1)}
            for p, positive in enumerate(record["positives"]):
                row = {"anchor": record["query"], "positive": positive, **negatives}
                if with_label:
                    row["label"] = [positive_scores[p], *negative_scores]
                if record["prompt"]:
                    row["prompt"] = record["prompt"]
                rows.append(row)
        return rows
    names = ("query", "positives", "negatives") if records.format == "unified" else ("query", "pos", "neg")
    positive_field, negative_field = SCORE_FIELDS["unified" if records.format == "unified" else "flagembedding"]
    for record in records.records:
        row = dict(zip(names, (record["query"], record["positives"], record["negatives"])))
        for field, kind in ((positive_field, "positive"), (negative_field, "negative")):
            scores = record_scores(record, kind)
            if scores is not None:
                row[field] = scores
        extra["prompt"] = record["prompt"]
        row.update({key: value for key, value in extra.items() if value})
        rows.append(row)
    return rows


def write_ir_records(records: IRRecords, path: str | os.PathLike) -> Path:
    """Write records in their own format (see :func:`ir_records_as_rows`), atomically.

    ``.jsonl`` (or ``.jsonl.gz``) for every format; sentence-transformers rows may also go to ``.csv``/``.parquet``.

    Args:
        records: IR records.
        path: The output file; its parent folders are created. A run killed mid-write leaves only a hidden
            temporary file, which the next write of the same path removes.

    Returns:
        ``path`` as a ``Path``.

    Raises:
        ValueError: For a file name the format cannot be written to (see :func:`check_records_path`) or scores not
            aligned with their texts.

    Example:
        ::

            write_ir_records(mined, "pairs_mined.jsonl")
    """
    import gzip
    import json

    from datasets import Dataset

    path = Path(path)
    check_records_path(path, records.format)
    rows = ir_records_as_rows(records)
    if path.name.endswith(".jsonl.gz"):

        def write(tmp: Path) -> None:
            with gzip.open(tmp, "wt", encoding="utf-8") as handle:
                handle.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)

        return write_atomic(path, write)
    if path.suffix in (".csv", ".parquet"):
        table = Dataset.from_list(rows)
        return write_atomic(path, lambda tmp: getattr(table, f"to_{path.suffix[1:]}")(str(tmp)))
    return write_jsonl(path, rows)


def check_records_path(path: str | os.PathLike, record_format: str) -> None:
    """Raise ``ValueError`` if records of ``record_format`` cannot be written to ``path`` (by its suffix): checked
    before any work, so that hours of mining never end in a refused file name.

    Args:
        path: The output file.
        record_format: ``"unified"``, ``"flagembedding"`` or ``"sentence-transformers"``.

    Raises:
        ValueError: For a suffix other than ``.jsonl``/``.jsonl.gz`` (``.csv``/``.parquet`` for
            sentence-transformers columns).

    Example:
        ::

            check_records_path("mined.parquet", "unified")  # ValueError: write them as .jsonl
    """
    path = Path(path)
    if path.suffix in (".csv", ".parquet"):
        if record_format != "sentence-transformers":
            raise ValueError(f"{path}: {record_format} records have list fields; write them as .jsonl.")
    elif not path.name.endswith((".jsonl", ".jsonl.gz")):
        raise ValueError(f"{path}: write mined records as .jsonl, .jsonl.gz (or .csv/.parquet for columns).")


__all__ = ["SCORE_FIELDS", "check_records_path", "ir_records_as_rows", "record_scores", "write_ir_records"]
