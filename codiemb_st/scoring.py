"""Teacher scores for IR records: a cross-encoder or a bi-encoder scores every (query, positive) and (query, negative)
pair, and the scores travel with the records (``positive_scores``/``negative_scores``; FlagEmbedding's
``pos_scores``/``neg_scores``; a sentence-transformers ``label`` list) into distillation
(:class:`~codiemb_st.MultiPositiveCachedInfoNCELoss`'s ``distillation_weight``).

Scoring is resumable: finished records are appended to a progress file beside the output (flushed and synced per
chunk), a restart after a kill continues from it, and the output itself is written once, atomically, at the end.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from codiemb_st.record_formats import IRRecords, RecordSource, read_ir_records
from codiemb_st.validation import check_positive_int

if TYPE_CHECKING:
    from sentence_transformers import CrossEncoder, SentenceTransformer

logger = logging.getLogger(__name__)

TEACHER_KINDS = ("auto", "cross-encoder", "bi-encoder")
PROGRESS_VERSION = 1


def teacher_kind(path: str | os.PathLike) -> Literal["cross-encoder", "bi-encoder"]:
    """Whether a model folder holds a cross-encoder (sentence-transformers ``CrossEncoder``, or a transformers
    ``*ForSequenceClassification``) or a bi-encoder (anything else sentence-transformers loads)."""
    folder = Path(path)
    settings = folder / "config_sentence_transformers.json"
    if settings.is_file():
        try:
            if json.loads(settings.read_text(encoding="utf-8")).get("model_type") == "CrossEncoder":
                return "cross-encoder"
        except ValueError:
            pass
    config = folder / "config.json"
    if not (folder / "modules.json").is_file() and config.is_file():
        try:
            architectures = json.loads(config.read_text(encoding="utf-8")).get("architectures") or []
        except ValueError:
            architectures = []
        if any(name.endswith("ForSequenceClassification") for name in architectures):
            return "cross-encoder"
    return "bi-encoder"


def load_teacher(
    name: str, kind: Literal["auto", "cross-encoder", "bi-encoder"] = "auto", device: str | None = None
) -> CrossEncoder | SentenceTransformer:
    """Load a teacher: a ``CrossEncoder`` or a ``SentenceTransformer`` (``kind="auto"``: from the folder's files).

    Example:
        ::

            teacher = load_teacher("models/bge-reranker-base")  # a CrossEncoder
    """
    from sentence_transformers import CrossEncoder, SentenceTransformer

    if kind not in TEACHER_KINDS:
        raise ValueError(f"`kind` must be one of {TEACHER_KINDS}; got {kind!r}.")
    if kind == "auto":
        kind = teacher_kind(name) if Path(name).is_dir() else "bi-encoder"
    return CrossEncoder(name, device=device) if kind == "cross-encoder" else SentenceTransformer(name, device=device)


def score_pairs(
    teacher: CrossEncoder | SentenceTransformer,
    queries: Sequence[str],
    texts: Sequence[str],
    *,
    batch_size: int = 32,
) -> list[float]:
    """One teacher score per ``(queries[i], texts[i])``: a cross-encoder's raw logit (no sigmoid: distillation divides
    scores by a temperature, and a squashed score loses the order information near 0 and 1), or a bi-encoder's cosine
    similarity of ``encode_query(query)`` and ``encode_document(text)`` (the teacher's own prompts)."""
    import torch
    from sentence_transformers import CrossEncoder

    if not queries:
        return []
    if isinstance(teacher, CrossEncoder):
        scores = teacher.predict(
            list(zip(queries, texts)),
            batch_size=batch_size,
            activation_fn=torch.nn.Identity(),
            convert_to_numpy=True,
            show_progress_bar=False,
        )
        return [float(score) for score in scores.reshape(len(queries), -1)[:, 0]]
    distinct = list(dict.fromkeys(queries))
    query_embeddings = teacher.encode_query(
        distinct, batch_size=batch_size, convert_to_tensor=True, normalize_embeddings=True, show_progress_bar=False
    )
    text_embeddings = teacher.encode_document(
        list(texts), batch_size=batch_size, convert_to_tensor=True, normalize_embeddings=True, show_progress_bar=False
    )
    row = {query: index for index, query in enumerate(distinct)}
    index = torch.tensor([row[query] for query in queries], device=query_embeddings.device)
    return (query_embeddings[index] * text_embeddings).sum(-1).float().cpu().tolist()


def score_records(
    source: RecordSource | IRRecords,
    teacher: CrossEncoder | SentenceTransformer,
    *,
    batch_size: int = 32,
    chunk_size: int = 256,
    progress_file: str | os.PathLike | None = None,
    teacher_id: str = "",
    cache_dir: str | os.PathLike | None = None,
    cache_dtype: str = "float32",
    show_progress_bar: bool = True,
) -> IRRecords:
    """Add teacher scores to every positive and negative of IR records (replacing scores they had).

    Args:
        source: IR records in any format (see :func:`codiemb_st.record_formats.read_ir_records`).
        teacher: A ``CrossEncoder`` (scores: raw logits) or a ``SentenceTransformer`` (cosine similarities).
        batch_size: Pairs per teacher batch.
        chunk_size: Records scored between two progress saves.
        progress_file: Where finished records are appended (one JSON line each); a run that finds this file for
            the same records and teacher continues from it. ``None``: no resuming.
        teacher_id: Identifies the teacher in the progress file (a restart with another teacher starts over).
        cache_dir: For a bi-encoder teacher, the embedding cache of :mod:`codiemb_st.mining` (``codiemb-st mine
            --cache-dir``): queries and texts already embedded by this teacher (same prompt, max_seq_length) are
            read from it, new ones are added. A cross-encoder scores pairs, which no cache holds: refused.
        cache_dtype: ``"float32"`` or ``"float16"`` for texts added to the cache.
        show_progress_bar: Show a progress bar over the records.

    Returns:
        The records (same format, prompts and type) with ``positive_scores``/``negative_scores``.

    Raises:
        TypeError: If ``teacher`` is neither a ``CrossEncoder`` nor a ``SentenceTransformer``.
        ValueError: On bad records or arguments, or a teacher whose scores are not finite.

    Example:
        ::

            from sentence_transformers import CrossEncoder
            from codiemb_st.mining import write_ir_records
            from codiemb_st.scoring import score_records

            scored = score_records("pairs_mined.jsonl", CrossEncoder("models/reranker"))
            write_ir_records(scored, "pairs_scored.jsonl")
    """
    import math

    from sentence_transformers import CrossEncoder, SentenceTransformer
    from tqdm.auto import tqdm

    if not isinstance(teacher, (CrossEncoder, SentenceTransformer)):
        raise TypeError(f"`teacher` must be a CrossEncoder or a SentenceTransformer; got {type(teacher).__name__}.")
    check_positive_int("batch_size", batch_size)
    check_positive_int("chunk_size", chunk_size)
    if cache_dir is not None and isinstance(teacher, CrossEncoder):
        raise ValueError(
            "`cache_dir` applies to bi-encoder teachers (their embeddings are cached); a cross-encoder scores each "
            "(query, text) pair, which no cache holds: drop `cache_dir`."
        )
    read = read_ir_records(source)
    records = replace(read, records=[dict(record) for record in read.records])
    fingerprint = _records_fingerprint(records, teacher_id)
    done = _read_progress(Path(progress_file), fingerprint, len(records.records)) if progress_file else {}
    if done:
        logger.info(
            "Scoring %s: %d of %d records were scored before; continuing.",
            records.name,
            len(done),
            len(records.records),
        )
    handle = None
    if progress_file is not None:
        path = Path(progress_file)
        path.parent.mkdir(parents=True, exist_ok=True)
        handle = open(path, "a" if done else "w", encoding="utf-8")  # noqa: SIM115 (closed below)
        if not done:
            handle.write(json.dumps({"version": PROGRESS_VERSION, "fingerprint": fingerprint}) + "\n")
    pair_scores = score_pairs
    if cache_dir is not None:
        pair_scores = _cached_pair_scorer(
            teacher, records, done, cache_dir, cache_dtype, batch_size, show_progress_bar
        )
    try:
        todo = [index for index in range(len(records.records)) if index not in done]
        with tqdm(total=len(records.records), initial=len(done), desc="Scoring", disable=not show_progress_bar) as bar:
            for start in range(0, len(todo), chunk_size):
                chunk = todo[start : start + chunk_size]
                queries, texts = [], []
                for index in chunk:
                    record = records.records[index]
                    for text in record["positives"] + record["negatives"]:
                        queries.append(record["query"])
                        texts.append(text)
                scores = pair_scores(teacher, queries, texts, batch_size=batch_size)
                if not all(math.isfinite(score) for score in scores):
                    raise ValueError("The teacher gave a non-finite score (NaN or infinity); check the teacher model.")
                offset = 0
                lines = []
                for index in chunk:
                    record = records.records[index]
                    count = len(record["positives"])
                    total = count + len(record["negatives"])
                    done[index] = (scores[offset : offset + count], scores[offset + count : offset + total])
                    offset += total
                    lines.append(json.dumps({"index": index, "scores": done[index]}) + "\n")
                if handle is not None:
                    handle.writelines(lines)
                    handle.flush()
                    os.fsync(handle.fileno())  # a kill loses at most the chunk in progress
                bar.update(len(chunk))
    finally:
        if handle is not None:
            handle.close()
    for index, record in enumerate(records.records):
        positive_scores, negative_scores = done[index]
        record["positive_scores"] = list(positive_scores)
        record["negative_scores"] = list(negative_scores) if record["negatives"] else None
    return records


def _cached_pair_scorer(
    teacher: SentenceTransformer,
    records: IRRecords,
    done: dict[int, Any],
    cache_dir: str | os.PathLike,
    cache_dtype: str,
    batch_size: int,
    show_progress_bar: bool,
) -> Any:
    """A :func:`score_pairs` that reads the teacher's embeddings of every query and text still to score from the
    mining cache (encoding, through the cache, those it lacks)."""
    from codiemb_st.mining.cache import embed_texts

    todo = [record for index, record in enumerate(records.records) if index not in done]
    queries = list(dict.fromkeys(record["query"] for record in todo))
    texts = list(dict.fromkeys(text for record in todo for text in record["positives"] + record["negatives"]))
    options = {"batch_size": batch_size, "cache_dir": cache_dir, "cache_dtype": cache_dtype}
    query_store = embed_texts(teacher, queries, side="query", show_progress_bar=show_progress_bar, **options)
    text_store = embed_texts(teacher, texts, side="document", show_progress_bar=show_progress_bar, **options)
    query_row = {query: row for row, query in enumerate(queries)}
    text_row = {text: row for row, text in enumerate(texts)}

    def scores(_teacher: Any, pair_queries: list[str], pair_texts: list[str], **_: Any) -> list[float]:
        left = query_store.rows([query_row[query] for query in pair_queries])
        right = text_store.rows([text_row[text] for text in pair_texts])
        return (left * right).sum(axis=1).astype(float).tolist()  # normalized embeddings: the cosine

    return scores


def _records_fingerprint(records: IRRecords, teacher_id: str) -> str:
    """A digest of the records' queries and texts (in order) and the teacher: a progress file is only continued for
    the same work."""
    digest = hashlib.sha256(teacher_id.encode())
    for record in records.records:
        digest.update(json.dumps([record["query"], record["positives"], record["negatives"]]).encode())
    return digest.hexdigest()[:24]


def _read_progress(path: Path, fingerprint: str, count: int) -> dict[int, Any]:
    """The records a killed run finished (its last line may be cut short: ignored); ``{}`` when there is none or it
    belongs to other records or another teacher."""
    if not path.is_file():
        return {}
    done: dict[int, Any] = {}
    with open(path, encoding="utf-8") as handle:
        lines = handle.read().split("\n")
    try:
        header = json.loads(lines[0])
    except ValueError:
        header = {}
    if header.get("version") != PROGRESS_VERSION or header.get("fingerprint") != fingerprint:
        logger.warning("%s belongs to other records or another teacher: starting over.", path)
        return {}
    for line in lines[1:]:
        try:
            entry = json.loads(line)
        except ValueError:
            continue  # the line a kill cut short
        if isinstance(entry, dict) and isinstance(entry.get("index"), int) and 0 <= entry["index"] < count:
            done[entry["index"]] = tuple(entry["scores"])
    return done


__all__ = ["TEACHER_KINDS", "load_teacher", "score_pairs", "score_records", "teacher_kind"]
