"""Training record formats: detection and readers (the converters to column datasets are :mod:`codiemb_st.data`).

Three record formats are read, detected per file from its first record (and stated in the log); every record of a
file must be in the file's format:

- ``unified`` (the official CoDiEmb format, below);
- ``flagembedding``: FlagEmbedding's fine-tuning JSONL ``{"query", "pos": [...], "neg": [...]}`` with optional
  ``pos_scores``, ``neg_scores``, ``prompt`` and ``type`` (see :func:`read_ir_records` for ``prompt`` and ``type``);
- ``sentence-transformers``: column datasets ``anchor, positive (or positive_1..k), negative_1..n`` (or
  ``negative``), e.g. the output of ``sentence_transformers.util.mine_hard_negatives``, as JSONL/JSON/CSV/Parquet
  files or a ``datasets.Dataset``; STS pairs ``sentence1, sentence2, score``.

IR records that share a query (and prompt) are merged into one record: their positives and negatives are united,
and a negative equal to one of the positives is dropped (the merge is logged). This makes the one-positive-per-row
layout of sentence-transformers datasets multi-positive.

CoDiEmb keeps one file per sub-dataset of one task, one JSON object per line:

- IR records: ``{"query": str, "positives": [str, ...], "negatives": [str, ...]}`` (``negatives`` may be empty or
  missing); optional teacher scores ``positive_scores``/``negative_scores``, one per text (FlagEmbedding:
  ``pos_scores``/``neg_scores``; sentence-transformers rows: a list-valued ``label``, positives first), kept aligned
  with their texts and trained on by distillation (:mod:`codiemb_st.recipe`);
- STS pairs: ``{"sentence1": str, "sentence2": str, "score": float}``, or the unified form
  ``{"query": x1, "positives": [x2], "positive_scores": [y]}`` (only the first positive is used, as in the official
  code).

An optional ``task_type`` field (``"ir"``/``"sts"``, as in the official data) is checked against the conversion.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from datasets import Dataset

from codiemb_st._record_fields import (
    check_is_object,
    check_task_type,
    describe_source,
    numbered_columns,
    refuse_unknown,
    score_field,
    text_field,
    texts_field,
    warn_unread_keys,
)
from codiemb_st.file_io import read_jsonl

logger = logging.getLogger("codiemb_st.data")

#: The record formats, as detected per file and named in the log.
FORMATS = ("unified", "flagembedding", "sentence-transformers")

# What each format needs, for the message that refuses a record fitting none.
_IR_FIELDS = {
    "unified": "query, positives (list) [, negatives (list)]",
    "flagembedding": "query, pos (list) [, neg (list), pos_scores, neg_scores, prompt, type]",
    "sentence-transformers": "anchor, positive (or positive_1..k) [, negative (or negative_1..n)]",
}
_STS_FIELDS = {
    "unified": "sentence1, sentence2, score (or query, positives, positive_scores)",
    "flagembedding": "query, pos, pos_scores",
    "sentence-transformers": "sentence1, sentence2, score",
}
# Fields IR training uses; anything else in a record (e.g. scores) is reported once per file as not used.
_IR_USED_FIELDS = {
    "unified": {"query", "positives", "negatives", "task_type", "prompt", "positive_scores", "negative_scores"},
    "flagembedding": {"query", "pos", "neg", "prompt", "type", "pos_scores", "neg_scores"},
    "sentence-transformers": {"anchor", "positive", "negative", "prompt"},  # + a list-valued `label`
}
#: The teacher-score fields of each format (for messages): one score per positive and per negative.
SCORE_FIELDS = {
    "unified": ("positive_scores", "negative_scores"),
    "flagembedding": ("pos_scores", "neg_scores"),
    "sentence-transformers": ("label", "label"),
}
# FlagEmbedding `type` values with a meaning (FlagEmbedding/abc/finetune/embedder/AbsDataset.py): the passages of
# symmetric_sts / symmetric_clustering records get the query's instruction too; only_1neg trains with one negative;
# symmetric_class with at most as many negatives as the record has (no resampling).
SYMMETRIC_TYPES = ("symmetric_sts", "symmetric_clustering")
#: Every FlagEmbedding ``type`` value this package knows; any other is trained as "normal", with a warning.
KNOWN_TYPES = ("normal", "only_1neg", "symmetric_class", *SYMMETRIC_TYPES)

RecordSource = str | os.PathLike | Dataset | Iterable[Mapping[str, Any]]
"""A record file (``.jsonl``/``.jsonl.gz``; also ``.json``, ``.csv``, ``.parquet`` as ``datasets`` reads them), a
``datasets.Dataset`` or an iterable of dicts."""

_TABLE_SUFFIXES = {".json": "json", ".csv": "csv", ".parquet": "parquet"}


def read_records(source: RecordSource) -> Iterator[tuple[str, Mapping[str, Any]]]:
    """Yield ``(location, record)`` for every record of ``source``.

    ``location`` names the record in error messages: ``"path:line"`` (1-based) for a JSONL file, ``"path row i"``
    (0-based) for a JSON/CSV/Parquet file, ``"row i"`` (0-based) for a ``Dataset`` or an iterable. Blank lines in a
    JSONL file are skipped.

    Args:
        source: A JSONL file (``.jsonl``; ``.gz`` suffix = gzip-compressed), a ``.json``/``.csv``/``.parquet`` file
            (read with ``datasets``), a ``datasets.Dataset`` or an iterable of dicts.

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
        kind = _TABLE_SUFFIXES.get(path.suffix.lower())
        if kind is not None:
            for index, record in enumerate(_read_table(path, kind)):
                location = f"{path} row {index}"
                yield location, check_is_object(record, location)
            return
        for location, record in read_jsonl(path):
            yield location, check_is_object(record, location)
        return
    if isinstance(source, Mapping) or not isinstance(source, Iterable):
        raise TypeError(
            f"`source` must be a JSONL path, a datasets.Dataset or an iterable of dicts; got {type(source).__name__}."
        )
    for index, record in enumerate(source):
        location = f"row {index}"
        yield location, check_is_object(record, location)


def _read_table(path: Path, kind: str) -> Dataset:
    """A JSON/CSV/Parquet file as ``datasets`` reads it (a ``.json`` file may be JSON Lines or one JSON array)."""
    reader = {"json": Dataset.from_json, "csv": Dataset.from_csv, "parquet": Dataset.from_parquet}[kind]
    try:
        return reader(str(path))
    except Exception as error:  # datasets raises many types (ArrowInvalid, DatasetGenerationError, ...)
        first_line = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise ValueError(f"{path}: could not read it as {kind} with datasets ({first_line}).") from None


def detect_format(record: Mapping[str, Any]) -> str | None:
    """The format of one record: ``"unified"``, ``"flagembedding"``, ``"sentence-transformers"`` or ``None``.

    Decided by the list field: ``positives`` (unified), ``pos`` (FlagEmbedding), ``anchor``/``positive``/
    ``positive_1`` (sentence-transformers). STS pairs ``sentence1, sentence2, score`` are both the unified and the
    sentence-transformers form; they are reported as ``"unified"``.
    """
    if "positives" in record:
        return "unified"
    if "pos" in record:
        return "flagembedding"
    if "anchor" in record or "positive" in record or "positive_1" in record:
        return "sentence-transformers"
    if "sentence1" in record or "sentence2" in record:
        return "unified"
    return None


@dataclass
class IRRecords:
    """The IR records of one source, read into one form, with duplicate queries merged.

    Args:
        records: One dict per query: ``query``, ``positives``, ``negatives`` (lists of strings),
            ``positive_scores``, ``negative_scores`` (teacher scores aligned with the texts, ``None`` for a text
            without one; the whole field ``None`` when the record has none), ``prompt`` (the record's own ``prompt``
            or ``None``) and ``location`` (of its first record, for messages).
        format: The detected format (:data:`FORMATS`).
        name: The source, for messages.
        data_type: FlagEmbedding's ``type`` of the records (one per file), or ``None``.
        merged: How many records were merged into earlier ones with the same query (and prompt).
    """

    records: list[dict[str, Any]] = field(default_factory=list)
    format: str = "unified"
    name: str = "records"
    data_type: str | None = None
    merged: int = 0

    @property
    def symmetric(self) -> bool:
        """Whether the passages get the query's instruction too (FlagEmbedding's symmetric_sts/clustering)."""
        return self.data_type in SYMMETRIC_TYPES

    @property
    def has_scores(self) -> bool:
        """Whether any record carries teacher scores."""
        return any(r.get("positive_scores") or r.get("negative_scores") for r in self.records)

    def first_without_scores(self) -> dict[str, Any] | None:
        """The first record lacking a teacher score for one of its texts (``None`` when every text has one)."""
        for record in self.records:
            for kind in ("positive", "negative"):
                scores = record.get(f"{kind}_scores")
                if record[f"{kind}s"] and (scores is None or any(score is None for score in scores)):
                    return record
        return None

    def common_prompt(self) -> str | None:
        """The one ``prompt`` all records share, ``None`` when no record has one.

        Raises:
            ValueError: If the prompts differ between records (or only some records have one), naming the first two
                records that differ: a sentence-transformers prompt is per dataset column, so such a file must be
                split into one file per prompt (or converted with :func:`ir_dataset_from_records`, which writes each
                record's prompt into its text).
        """
        first = self.records[0]
        for record in self.records[1:]:
            if record["prompt"] != first["prompt"]:
                raise ValueError(
                    f"{record['location']}: its `prompt` {record['prompt']!r} differs from that of "
                    f"{first['location']} ({first['prompt']!r}). Training uses one instruction per dataset: split "
                    "the file into one file per prompt."
                )
        return first["prompt"]

    def prompts_in_text(self) -> list[dict[str, Any]]:
        """The records with each record's ``prompt`` prefixed to its query (to every text when symmetric), as
        FlagEmbedding does with its default ``query_instruction_format="{}{}"``."""
        out = []
        for record in self.records:
            prompt = record["prompt"]
            if not prompt:
                out.append(record)
                continue
            texts = {key: record[key] for key in ("positives", "negatives")}
            if self.symmetric:
                texts = {key: [prompt + text for text in value] for key, value in texts.items()}
            out.append({**record, "query": prompt + record["query"], **texts})
        return out


def read_ir_records(source: RecordSource | IRRecords) -> IRRecords:
    """Read IR records in any of the three formats (detected from the first record) into one form.

    Records with the same query and prompt are merged (positives and negatives united in order, a negative equal
    to a positive dropped); the number merged is logged. A record's ``prompt`` is kept on the record: the recipe
    makes it the dataset's instruction (:meth:`IRRecords.common_prompt`), :func:`ir_dataset_from_records` writes it
    in front of the query (:meth:`IRRecords.prompts_in_text`). FlagEmbedding's ``type`` must be the same for all
    records of a file.

    Args:
        source: See :func:`read_records`; an :class:`IRRecords` is returned unchanged.

    Returns:
        An :class:`IRRecords`.

    Raises:
        ValueError: On an empty source, a record that fits no format (naming the fields found and those each format
            needs), a record in another format than the file's first, a record without a positive, or a malformed
            field (each naming ``path:line`` or ``row i``).

    Example:
        ::

            from codiemb_st.record_formats import read_ir_records

            records = read_ir_records("flag_train.jsonl")  # {"query", "pos", "neg"} records
            print(records.format, len(records.records))
    """
    if isinstance(source, IRRecords):
        return source
    result = IRRecords(name=describe_source(source))
    by_key: dict[tuple[str | None, str], dict[str, Any]] = {}
    ignored: set[str] = set()
    warned: set[str] = set()
    first_location = None
    for location, record in read_records(source):
        check_task_type(record, "ir", location)
        record_format = detect_format(record)
        if record_format is None or (record_format == "unified" and "positives" not in record):
            error = refuse_unknown(record, location, _IR_FIELDS, "IR")
            if record_format is not None:  # sentence1/sentence2: a scored pair
                error = ValueError(f"{error} (This looks like an STS pair: give the file as STS data.)")
            raise error
        if first_location is None:
            first_location = location
            result.format = record_format
        elif record_format != result.format:
            raise ValueError(
                f"{location}: a {record_format} record in a file whose first record ({first_location}) is "
                f"{result.format}; keep one format per file."
            )
        query, positives, negatives = _IR_READERS[record_format](record, location)
        positive_scores, negative_scores = _read_scores(record, record_format, positives, negatives, location)
        prompt = _prompt(record, location)
        data_type = record.get("type") if record_format == "flagembedding" else None  # a FlagEmbedding field
        if data_type is not None:
            if not isinstance(data_type, str):
                raise ValueError(f"{location}: `type` must be a string; got {data_type!r}.")
            if location == first_location:
                result.data_type = data_type
                if data_type not in KNOWN_TYPES:
                    logger.warning(
                        "%s: FlagEmbedding `type` %r is not one this package knows (%s); the file trains as a normal, "
                        "non-symmetric type. Check the spelling.",
                        location,
                        data_type,
                        ", ".join(KNOWN_TYPES),
                    )
        if data_type != result.data_type:
            raise ValueError(
                f"{location}: `type` {data_type!r} differs from that of {first_location} ({result.data_type!r}); "
                "FlagEmbedding batches one type at a time: keep one type per file."
            )
        if record_format == "unified":
            warn_unread_keys(record, location, warned)
        used = _IR_USED_FIELDS[record_format] | ({"label"} if isinstance(record.get("label"), list) else set())
        ignored.update(set(record) - used - numbered_columns(record))
        key = (prompt, query)
        if key in by_key:
            merged = by_key[key]
            merged["positives"] = merged["positives"] + positives
            merged["negatives"] = merged["negatives"] + negatives
            _first_scores(merged["_scores"], positives + negatives, positive_scores + negative_scores)
            result.merged += 1
        else:
            by_key[key] = {
                "query": query,
                "positives": positives,
                "negatives": negatives,
                "prompt": prompt,
                "location": location,
                "_scores": _first_scores({}, positives + negatives, positive_scores + negative_scores),
            }
    if not by_key:
        raise ValueError(f"No records in {result.name}.")
    dropped, first_dropped = 0, None
    for record in by_key.values():  # a negative that is one of the query's positives is not a negative
        record["positives"] = list(dict.fromkeys(record["positives"]))
        positives = set(record["positives"])
        kept = [text for text in dict.fromkeys(record["negatives"]) if text not in positives]
        if len(kept) < len(set(record["negatives"])):
            dropped += len(set(record["negatives"])) - len(kept)
            first_dropped = first_dropped or record["location"]
        record["negatives"] = kept
        # Teacher scores stay with their texts through the merge and the drop (a text keeps its first score).
        scores = record.pop("_scores")
        for kind in ("positive", "negative"):
            texts = record[f"{kind}s"]
            record[f"{kind}_scores"] = [scores.get(text) for text in texts] if scores and texts else None
    if dropped:
        logger.warning(
            "%s: dropped %d negatives equal to a positive of their own query (first: %s); a text cannot be both.",
            result.name,
            dropped,
            first_dropped,
        )
    result.records = list(by_key.values())
    logger.info(
        "%s: %s format, %d IR records%s%s.",
        result.name,
        result.format,
        len(result.records),
        f" (type {result.data_type!r})" if result.data_type else "",
        f"; {result.merged} records with a repeated query were merged into the first one" if result.merged else "",
    )
    ignored -= warned  # keys of another format already have their own warning
    if ignored:
        logger.warning(
            "%s: fields not used for IR training (their values are not trained on): %s.", result.name, sorted(ignored)
        )
    return result


def _first_scores(scores: dict[str, float], texts: list[str], values: list[float | None]) -> dict[str, float]:
    """Add each text's score unless it has one (a text keeps its first score: a positive's over a negative's)."""
    for text, value in zip(texts, values):
        if value is not None:
            scores.setdefault(text, value)
    return scores


def _read_scores(
    record: Mapping[str, Any], record_format: str, positives: list[str], negatives: list[str], location: str
) -> tuple[list[float | None], list[float | None]]:
    """The record's teacher scores, one per positive and per negative (``None`` where the record has none)."""
    if record_format == "sentence-transformers":
        label = record.get("label")
        if not isinstance(label, list):
            return [None] * len(positives), [None] * len(negatives)
        texts = len(positives) + len(negatives)
        if len(label) != texts:
            raise ValueError(
                f"{location}: `label` has {len(label)} scores for the row's {texts} texts ({len(positives)} "
                f"positive(s), {len(negatives)} negative(s)); teacher scores need one per text, positives first."
            )
        scores = [score_field(value, f"label[{i}]", location) for i, value in enumerate(label)]
        return scores[: len(positives)], scores[len(positives) :]
    out = []
    for field_name, texts in zip(SCORE_FIELDS[record_format], (positives, negatives)):
        values = record.get(field_name)
        if values is None:
            out.append([None] * len(texts))
            continue
        if not isinstance(values, list) or len(values) != len(texts):
            got = f"{len(values)} scores" if isinstance(values, list) else type(values).__name__
            raise ValueError(
                f"{location}: `{field_name}` must be a list with one teacher score per text ({len(texts)}); got {got}."
            )
        out.append([score_field(value, f"{field_name}[{i}]", location) for i, value in enumerate(values)])
    return out[0], out[1]


def _read_unified_ir(record: Mapping[str, Any], location: str) -> tuple[str, list[str], list[str]]:
    query = text_field(record.get("query"), "query", location)
    positives = texts_field(record.get("positives"), "positives", location, required=True)
    negatives = texts_field(record.get("negatives", []), "negatives", location, required=False)
    return query, positives, negatives


def _read_flag_ir(record: Mapping[str, Any], location: str) -> tuple[str, list[str], list[str]]:
    query = text_field(record.get("query"), "query", location)
    positives = texts_field(record.get("pos"), "pos", location, required=True)
    negatives = record.get("neg")
    negatives = texts_field([] if negatives is None else negatives, "neg", location, required=False)
    return query, positives, negatives


def _read_st_ir(record: Mapping[str, Any], location: str) -> tuple[str, list[str], list[str]]:
    query = text_field(record.get("anchor"), "anchor", location)

    def column_texts(kind: str) -> list[str]:
        names = ([kind] if kind in record else []) + sorted(
            (key for key in record if re.fullmatch(rf"{kind}_\d+", key)), key=lambda key: int(key.split("_")[1])
        )
        # A missing value (None) in a numbered column is an absent text (columns of different lengths).
        return [text_field(record[name], name, location) for name in names if record[name] is not None]

    positives = column_texts("positive")
    if not positives:
        raise ValueError(f"{location}: the row has no positive (columns `positive` or `positive_1..k`).")
    return query, positives, column_texts("negative")


_IR_READERS = {"unified": _read_unified_ir, "flagembedding": _read_flag_ir, "sentence-transformers": _read_st_ir}


def _prompt(record: Mapping[str, Any], location: str) -> str | None:
    prompt = record.get("prompt")
    if prompt is None or prompt == "":
        return None
    if not isinstance(prompt, str):
        raise ValueError(f"{location}: `prompt` must be a string; got {type(prompt).__name__}.")
    return prompt


@dataclass
class STSRecords:
    """The scored pairs of one source, read into one form.

    Args:
        records: One dict per pair: ``sentence1``, ``sentence2``, ``score``, ``prompt`` (or ``None``), ``location``.
        format: The detected format (:data:`FORMATS`; ``sentence1, sentence2, score`` pairs are ``"unified"``).
        name: The source, for messages.
    """

    records: list[dict[str, Any]] = field(default_factory=list)
    format: str = "unified"
    name: str = "records"

    def common_prompt(self) -> str | None:
        """The one ``prompt`` all pairs share (``None`` if none has one); see :meth:`IRRecords.common_prompt`."""
        return IRRecords.common_prompt(self)  # type: ignore[arg-type]


def read_sts_records(source: RecordSource | STSRecords) -> STSRecords:
    """Read scored pairs in any of the three formats into one form.

    Accepts ``{"sentence1", "sentence2", "score"}`` records (unified and sentence-transformers), unified records
    ``{"query": x1, "positives": [x2, ...], "positive_scores": [y, ...]}`` and FlagEmbedding records ``{"query": x1,
    "pos": [x2, ...], "pos_scores": [y, ...]}``, of which only the first positive is used (as in the official code;
    the number of positives left out is logged). Scores are kept as given (any range; the losses use them as
    correlation targets or orderings). A record's ``prompt`` is kept on the record.

    Args:
        source: See :func:`read_records`; an :class:`STSRecords` is returned unchanged.

    Raises:
        ValueError: On a malformed record (naming ``path:line`` or ``row i``), e.g. a missing or non-finite score,
            a record fitting no format (naming the fields found and those each format needs), or an empty source.
    """
    if isinstance(source, STSRecords):
        return source
    result = STSRecords(name=describe_source(source))
    extra_positives = 0
    first_location = None
    for location, record in read_records(source):
        check_task_type(record, "sts", location)
        if "sentence1" in record or "sentence2" in record:
            record_format = "unified"
            sentence1 = text_field(record.get("sentence1"), "sentence1", location)
            sentence2 = text_field(record.get("sentence2"), "sentence2", location)
            score = score_field(record.get("score"), "score", location)
        elif "query" in record and ("positives" in record or "pos" in record):
            record_format = "unified" if "positives" in record else "flagembedding"
            texts_name, scores_field = (
                ("positives", "positive_scores") if "positives" in record else ("pos", "pos_scores")
            )
            sentence1 = text_field(record.get("query"), "query", location)
            positives = texts_field(record.get(texts_name), texts_name, location, required=True)
            scores = record.get(scores_field)
            if not isinstance(scores, list) or len(scores) != len(positives):
                raise ValueError(
                    f"{location}: a {record_format} STS record needs `{scores_field}`, a list with one score per "
                    f"positive; got {scores!r} for {len(positives)} positive(s)."
                )
            sentence2 = positives[0]
            score = score_field(scores[0], f"{scores_field}[0]", location)
            extra_positives += len(positives) - 1
        else:
            raise ValueError(
                f"{location}: not an STS record; expected keys sentence1, sentence2, score (or query, positives, "
                f"positive_scores), got {sorted(record)}. Each format needs: "
                + "; ".join(f"{name}: {need}" for name, need in _STS_FIELDS.items())
                + "."
            )
        if first_location is None:
            first_location, result.format = location, record_format
        elif record_format != result.format:
            raise ValueError(
                f"{location}: a {record_format} record in a file whose first record ({first_location}) is "
                f"{result.format}; keep one format per file."
            )
        result.records.append(
            {
                "sentence1": sentence1,
                "sentence2": sentence2,
                "score": score,
                "prompt": _prompt(record, location),
                "location": location,
            }
        )
    if not result.records:
        raise ValueError(f"No records in {result.name}.")
    logger.info("%s: %s format, %d STS pairs.", result.name, result.format, len(result.records))
    if extra_positives:
        logger.warning(
            "STS records in %s: used the first positive of each record, left out %d more.",
            result.name,
            extra_positives,
        )
    return result


__all__ = [
    "FORMATS",
    "IRRecords",
    "RecordSource",
    "STSRecords",
    "KNOWN_TYPES",
    "SCORE_FIELDS",
    "SYMMETRIC_TYPES",
    "detect_format",
    "read_ir_records",
    "read_records",
    "read_sts_records",
]
