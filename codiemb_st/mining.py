"""Multi-positive hard-negative mining on sentence-transformers' retrieval utilities.

sentence-transformers' :func:`~sentence_transformers.util.mine_hard_negatives` embeds a corpus, searches it and
filters candidates (rank window, NV-Retriever's positive-aware margin); its outputs hold one positive per row. This
module uses the same building blocks (``encode_query``/``encode_document`` with the model's prompts and an optional
multi-process pool, :func:`sentence_transformers.util.semantic_search`, the same relative-margin rule) on
multi-positive records, and adds the rule the IR loss relies on: no positive of a query, and no text whose token
ids equal one (the loss's duplicate rule, :mod:`codiemb_st.losses._text_identity`), is ever one of its negatives.

Memory does not grow with corpus x queries: the corpus embeddings are held once (corpus x dim), queries are searched
in chunks of ``query_chunk_size`` against corpus chunks of ``corpus_chunk_size`` (the score matrix is at most
``min(query_chunk_size, 100) x corpus_chunk_size``) and each chunk's candidates are turned into negatives before the
next chunk is searched.
"""

from __future__ import annotations

import logging
import math
import os
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from codiemb_st.data import IRRecords, RecordSource, read_ir_records, read_records
from codiemb_st.file_io import read_jsonl, write_atomic, write_jsonl
from codiemb_st.validation import check_choice, check_finite_float, check_int, check_positive_int

if TYPE_CHECKING:
    from sentence_transformers import SentenceTransformer

logger = logging.getLogger(__name__)

SAMPLING = ("random", "top")


@dataclass
class MiningStats:
    """What a mining run did (also logged).

    Args:
        queries: Queries mined.
        corpus: Distinct corpus texts searched.
        short: Queries that got fewer than ``num_negatives`` mined negatives: the whole corpus was searched and too
            few candidates passed the filters (or they lay before ``range_min``).
        short_reasons: ``{"margin": n, "corpus": n}``: short because of the margin (without it the window would have
            been full) or because the corpus has too few other texts.
        completed_from_own: Negatives of the records' own that completed short queries (their own negatives are
            kept rather than replaced by fewer mined ones).
        without_negatives: Queries left with no negative at all (training completes them per record).
        skipped_identical: Candidates skipped because their token ids equal one of the query's positives (or the
            query) without being the same string.
        skipped_margin: Candidates skipped by the margin.
        positive_score_mean: Mean query-positive score.
        negative_score_mean: Mean query-negative score of the mined negatives.
    """

    queries: int = 0
    corpus: int = 0
    short: int = 0
    skipped_identical: int = 0
    skipped_margin: int = 0
    positive_score_mean: float = float("nan")
    negative_score_mean: float = float("nan")
    short_reasons: Counter = field(default_factory=Counter)
    completed_from_own: int = 0
    without_negatives: int = 0
    _positive_scores: list[float] = field(default_factory=list, repr=False)
    _negative_scores: list[float] = field(default_factory=list, repr=False)


@dataclass
class _Window:
    """One query's filtered candidates: those in the window, the rank reached, and what the filters skipped."""

    candidates: list[tuple[int, float]] = field(default_factory=list)
    rank: int = 0
    skipped_identical: int = 0
    skipped_margin: int = 0


def read_corpus(source: str | os.PathLike | Iterable[str]) -> list[str]:
    """Extra corpus texts: a ``.txt`` (or ``.txt.gz``) file (one text a line), a table with a ``text`` column (JSONL/JSON/CSV/Parquet;
    a non-empty ``title`` is put in front as ``"title text"``, as the BEIR layout keeps documents), or strings.

    Raises:
        ValueError: On a row without a ``text`` string (naming ``path:line``) or an empty corpus.
    """
    if not isinstance(source, (str, os.PathLike)):
        texts = list(source)
        for index, text in enumerate(texts):
            if not isinstance(text, str):
                raise TypeError(f"corpus text {index} must be a string; got {type(text).__name__}.")
        return [text for text in texts if text.strip()]
    path = Path(source)
    if not path.is_file():
        raise FileNotFoundError(f"Corpus file not found: {path}")
    if path.name.endswith((".txt", ".txt.gz")):
        texts = _read_text_lines(path)
    else:
        rows = read_jsonl(path) if path.name.endswith((".jsonl", ".jsonl.gz")) else read_records(path)
        texts = []
        for location, row in rows:
            text = row.get("text") if isinstance(row, dict) else None
            if not isinstance(text, str):
                raise ValueError(f"{location}: a corpus row needs a `text` string; got fields {sorted(row)}.")
            title = row.get("title")
            texts.append(f"{title} {text}" if isinstance(title, str) and title.strip() else text)
    if not texts:
        raise ValueError(f"{path}: the corpus file has no texts.")
    return texts


def _read_text_lines(path: Path) -> list[str]:
    """The non-blank lines of a UTF-8 text file (gzip-compressed when named ``.gz``), errors naming ``path:line``."""
    import gzip

    with open(path, "rb") as raw:
        compressed = raw.read(2) == b"\x1f\x8b"
    if compressed and path.suffix != ".gz":
        raise ValueError(
            f"{path}: the corpus file is gzip-compressed but named {path.suffix}; rename it to {path.name}.gz "
            f"(read as gzip) or decompress it: gunzip -c {path} > {path.stem}.plain{path.suffix}."
        )
    texts = []
    with (gzip.open if compressed else open)(path, "rb") as handle:
        for number, line in enumerate(handle, start=1):
            try:
                text = line.decode("utf-8").rstrip("\r\n")
            except UnicodeDecodeError as error:
                raise ValueError(f"{path}:{number}: the corpus file is not UTF-8 text ({error.reason}).") from None
            if text.strip():
                texts.append(text)
    return texts


def mine_hard_negatives(
    source: RecordSource | IRRecords,
    model: SentenceTransformer,
    *,
    num_negatives: int = 4,
    corpus: Sequence[str | os.PathLike | Iterable[str]] = (),
    range_min: int = 2,
    range_max: int = 200,
    margin: float | None = 0.05,
    sampling: Literal["random", "top"] = "random",
    keep_negatives: bool = False,
    query_prompt: str | None = None,
    query_prompt_name: str | None = None,
    corpus_prompt: str | None = None,
    corpus_prompt_name: str | None = None,
    batch_size: int = 32,
    query_chunk_size: int = 1024,
    corpus_chunk_size: int = 100_000,
    use_multi_process: bool | list[str] = False,
    seed: int = 0,
    show_progress_bar: bool = True,
) -> tuple[IRRecords, MiningStats]:
    """Give every IR record ``num_negatives`` mined hard negatives.

    The corpus is every positive of the records plus the texts of ``corpus`` (de-duplicated). For each query the
    candidates are ranked by the model's similarity; removed are the query itself, its positives, every text whose
    token ids equal one of them (the IR loss's own identity rule; the ids come from ``model.preprocess``, truncated at
    its ``max_seq_length``), and, with ``margin``, every candidate scoring above ``s - |s| * margin`` where ``s`` is
    the query's *lowest* positive score (NV-Retriever's TopK-PercPos filter, written as sentence-transformers
    writes its ``relative_margin``; for ``s > 0`` this is ``(1 - margin) * s``). Of the candidates left, ranks
    ``range_min`` to ``range_max`` (0-based, end excluded; FlagEmbedding's ``hn_mine`` samples from ranks 2-200)
    form the window; ``sampling="random"`` draws ``num_negatives`` of them (seeded), ``"top"`` takes the first.

    Args:
        source: IR records in any format (see :func:`codiemb_st.data.read_ir_records`).
        model: Any SentenceTransformer (the base being trained or another). Queries are embedded with
            ``encode_query`` and the corpus with ``encode_document``, so the model's own ``query``/``document``
            prompts are used unless overridden.
        num_negatives: Negatives per query (N).
        corpus: Extra corpus sources (see :func:`read_corpus`).
        range_min: First rank of the window.
        range_max: End of the window; the search retrieves ``range_max`` plus the excluded texts per query.
        margin: Positive-aware relative margin (``None``: off).
        sampling: ``"random"`` (seeded draw from the window) or ``"top"`` (the hardest candidates).
        keep_negatives: Keep each record's own negatives first and mine only the missing ones (up to N); by default
            the mined negatives replace them.
        query_prompt: Prompt text for the queries (overrides ``query_prompt_name`` and the model's ``query``).
        query_prompt_name: Name of one of ``model.prompts`` for the queries.
        corpus_prompt: Prompt text for the corpus.
        corpus_prompt_name: Name of one of ``model.prompts`` for the corpus.
        batch_size: Encoding batch size.
        query_chunk_size: Queries searched and filtered at a time (bounds the candidate lists held).
        corpus_chunk_size: Corpus rows scored at a time (bounds the score matrix).
        use_multi_process: Encode with a multi-process pool: ``True`` (all GPUs, or 4 CPU processes) or a list of
            devices, as in sentence-transformers.
        seed: Seed of the random draw (the result is the same for the same inputs and seed).
        show_progress_bar: Show encoding and search progress.

    Returns:
        ``(records, stats)``: the records (same format, prompts and type as the input) with their new negatives,
        and a :class:`MiningStats`.

    Raises:
        ValueError: On bad records (see :func:`~codiemb_st.data.read_ir_records`), a corpus with fewer than
            ``num_negatives + 1`` texts, a window that cannot hold ``num_negatives``, or a model that cannot embed.
        TypeError: If ``model`` is not a SentenceTransformer.

    Example:
        ::

            from sentence_transformers import SentenceTransformer
            from codiemb_st.mining import mine_hard_negatives, write_ir_records

            model = SentenceTransformer("sentence-transformers/all-MiniLM-L6-v2")
            records, stats = mine_hard_negatives("pairs.jsonl", model, num_negatives=4, corpus=["passages.txt"])
            write_ir_records(records, "pairs_mined.jsonl")
    """
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.util import dot_score, semantic_search
    from tqdm.auto import tqdm

    if not isinstance(model, SentenceTransformer):
        raise TypeError(f"`model` must be a SentenceTransformer; got {type(model).__name__}.")
    check_positive_int("num_negatives", num_negatives)
    check_int("range_min", range_min, minimum=0)
    check_positive_int("range_max", range_max)
    if range_max - range_min < num_negatives:
        raise ValueError(
            f"The window range_min={range_min}..range_max={range_max} holds {max(range_max - range_min, 0)} "
            f"candidates, fewer than num_negatives={num_negatives}; widen it."
        )
    if margin is not None:
        check_finite_float("margin", margin, minimum=0.0, maximum=1.0)
    check_choice("sampling", sampling, SAMPLING)
    check_positive_int("batch_size", batch_size)
    check_positive_int("query_chunk_size", query_chunk_size)
    check_positive_int("corpus_chunk_size", corpus_chunk_size)
    check_int("seed", seed)
    if isinstance(corpus, (str, os.PathLike)):
        raise TypeError("`corpus` must be a list of corpus sources (files or lists of texts), not one path.")

    read = read_ir_records(source)
    # A copy: the caller's records (when given an IRRecords) keep their negatives.
    records = replace(read, records=[dict(record) for record in read.records])
    texts: dict[str, None] = {}
    for record in records.records:
        texts.update(dict.fromkeys(record["positives"]))
    for extra in corpus:
        texts.update(dict.fromkeys(read_corpus(extra)))
    corpus_texts = list(texts)
    if len(corpus_texts) < num_negatives + 1:
        raise ValueError(
            f"The corpus has {len(corpus_texts)} distinct texts; mining {num_negatives} negatives needs at least "
            f"num_negatives + 1 = {num_negatives + 1}. Add corpus files (`corpus`) or lower num_negatives."
        )
    corpus_index = {text: i for i, text in enumerate(corpus_texts)}
    queries = [record["query"] for record in records.records]
    stats = MiningStats(queries=len(queries), corpus=len(corpus_texts))
    logger.info(
        "Mining %d negatives for %d queries of %s in a corpus of %d texts (window %d-%d, margin %s, %s).",
        num_negatives,
        len(queries),
        records.name,
        len(corpus_texts),
        range_min,
        range_max,
        margin,
        sampling,
    )

    # Token-id identities (the loss's duplicate rule) of every corpus text and query.
    corpus_ids = _identities(model, corpus_texts, batch_size * 8)
    query_ids = _identities(model, queries, batch_size * 8)
    group_size = Counter(corpus_ids.tolist())

    pool = None
    if use_multi_process:
        pool = model.start_multi_process_pool(None if use_multi_process is True else list(use_multi_process))
    try:
        encode = {"batch_size": batch_size, "convert_to_tensor": True, "normalize_embeddings": True, "pool": pool}
        try:
            corpus_embeddings = model.encode_document(
                corpus_texts,
                prompt=corpus_prompt,
                prompt_name=corpus_prompt_name,
                show_progress_bar=show_progress_bar,
                **encode,
            )
            query_embeddings = model.encode_query(
                queries,
                prompt=query_prompt,
                prompt_name=query_prompt_name,
                show_progress_bar=show_progress_bar,
                **encode,
            )
        except (KeyError, ValueError, RuntimeError, TypeError) as error:
            raise ValueError(f"`model` could not embed the texts: {type(error).__name__}: {error}") from error
    finally:
        if pool is not None:
            model.stop_multi_process_pool(pool)
    if corpus_embeddings.ndim != 2 or len(corpus_embeddings) != len(corpus_texts):
        raise ValueError(f"`model` returned embeddings of shape {tuple(corpus_embeddings.shape)}; expected 2-D.")
    # Kept on the model's device: on a GPU the search runs there (semantic_search follows the corpus's device).
    corpus_embeddings = corpus_embeddings.float()
    query_embeddings = query_embeddings.float().to(corpus_embeddings.device)

    rng = np.random.default_rng(seed)
    chunks = range(0, len(queries), query_chunk_size)
    first_short: dict[str, str] = {}
    for start in tqdm(chunks, desc="Searching", disable=not show_progress_bar):
        chunk = records.records[start : start + query_chunk_size]
        positive_sets = [[corpus_index[text] for text in record["positives"]] for record in chunk]
        excluded_ids = [
            {int(query_ids[start + i]), *(int(corpus_ids[j]) for j in positives)}
            for i, positives in enumerate(positive_sets)
        ]
        own_negatives = [list(record["negatives"]) for record in chunk]
        kept_own = own_negatives if keep_negatives else [[] for _ in chunk]
        positive_scores = [
            (corpus_embeddings[positives] @ query_embeddings[start + i]).tolist()
            for i, positives in enumerate(positive_sets)
        ]
        thresholds = [
            min(scores) - abs(min(scores)) * margin if margin is not None else math.inf for scores in positive_scores
        ]
        # First guess: enough candidates that range_max remain after removing every excluded text (exact: the group
        # sizes). Candidates above the margin are only known after the search, so a query whose window is not full
        # is searched again, deeper (x4), until it is or the corpus ends.
        top_k = [
            range_max + sum(group_size.get(identity, 0) for identity in ids) + len(own) + 1
            for ids, own in zip(excluded_ids, kept_own)
        ]
        windows: dict[int, _Window] = {}
        pending = list(range(len(chunk)))
        while pending:
            depth = min(max(top_k[i] for i in pending), len(corpus_texts))
            hits = semantic_search(
                query_embeddings[[start + i for i in pending]],
                corpus_embeddings,
                query_chunk_size=100,
                corpus_chunk_size=corpus_chunk_size,
                top_k=depth,
                score_function=dot_score,
            )
            deeper = []
            for i, query_hits in zip(pending, hits):
                record = chunk[i]
                window = _Window()
                own = set(kept_own[i])
                for hit in query_hits:
                    index, score = hit["corpus_id"], hit["score"]
                    text = corpus_texts[index]
                    if text == record["query"] or index in positive_sets[i] or text in own:
                        continue
                    if int(corpus_ids[index]) in excluded_ids[i]:
                        window.skipped_identical += 1
                        continue
                    if score > thresholds[i]:
                        window.skipped_margin += 1
                        continue
                    if window.rank >= range_min:
                        window.candidates.append((index, score))
                    window.rank += 1
                    if window.rank >= range_max:
                        break
                if window.rank < range_max and depth < len(corpus_texts):
                    top_k[i] = depth * 4
                    deeper.append(i)
                else:
                    windows[i] = window
            pending = deeper

        for i, record in enumerate(chunk):
            window = windows[i]
            stats._positive_scores.extend(positive_scores[i])
            stats.skipped_identical += window.skipped_identical
            stats.skipped_margin += window.skipped_margin
            wanted = num_negatives - len(kept_own[i])
            if wanted <= 0:
                record["negatives"] = kept_own[i][:num_negatives]
                continue
            if sampling == "random" and len(window.candidates) > wanted:
                picks = sorted(rng.choice(len(window.candidates), size=wanted, replace=False).tolist())
                chosen = [window.candidates[p] for p in picks]
            else:
                chosen = window.candidates[:wanted]
            stats._negative_scores.extend(score for _, score in chosen)
            mined = [corpus_texts[index] for index, _ in chosen]
            negatives = kept_own[i] + mined
            if len(chosen) < wanted:
                stats.short += 1
                # Why: the whole corpus was searched, so what is missing was removed by the filters or lies before
                # range_min. The margin is named when, without it, the window would have been full.
                reason = "margin" if window.rank + window.skipped_margin >= range_min + wanted else "corpus"
                stats.short_reasons[reason] += 1
                first_short.setdefault(reason, record["location"])
                # The record's own negatives complete it rather than being replaced by fewer mined ones.
                spare = [text for text in own_negatives[i] if text not in negatives]
                added = spare[: num_negatives - len(negatives)]
                negatives += added
                stats.completed_from_own += len(added)
                if not negatives:
                    stats.without_negatives += 1
            record["negatives"] = negatives

    if stats._positive_scores:
        stats.positive_score_mean = float(np.mean(stats._positive_scores))
    if stats._negative_scores:
        stats.negative_score_mean = float(np.mean(stats._negative_scores))
    logger.info(
        "Mined %s: mean positive score %.4f, mean negative score %.4f; skipped %d candidates by the margin and %d "
        "token-identical to a positive.",
        records.name,
        stats.positive_score_mean,
        stats.negative_score_mean,
        stats.skipped_margin,
        stats.skipped_identical,
    )
    if stats.short:
        reasons = []
        if stats.short_reasons["margin"]:
            reasons.append(
                f"{stats.short_reasons['margin']} because the margin ({margin}) removed the candidates their window "
                f"needed (first: {first_short['margin']}; lower --margin or use --no-margin)"
            )
        if stats.short_reasons["corpus"]:
            reasons.append(
                f"{stats.short_reasons['corpus']} because the corpus has too few other texts past rank {range_min} "
                f"(first: {first_short['corpus']}; add --corpus files or lower --range-min)"
            )
        logger.warning(
            "%s: %d of %d queries got fewer than %d mined negatives after searching the whole corpus of %d texts: %s. "
            "%d of their own negatives completed them; %d queries have no negative (training completes those per "
            "record).",
            records.name,
            stats.short,
            stats.queries,
            num_negatives,
            stats.corpus,
            "; ".join(reasons),
            stats.completed_from_own,
            stats.without_negatives,
        )
    return records, stats


def _identities(model: SentenceTransformer, texts: list[str], batch_size: int) -> np.ndarray:
    """One int64 identity per text: the IR loss's hash of its token ids (truncated as the model truncates)."""
    from codiemb_st.losses._text_identity import hash_texts

    out = np.empty(len(texts), dtype=np.int64)
    for start in range(0, len(texts), batch_size):
        batch = texts[start : start + batch_size]
        # `preprocess` in sentence-transformers >= 6 (`tokenize` is deprecated there), `tokenize` before.
        features = model.preprocess(batch) if hasattr(model, "preprocess") else model.tokenize(batch)
        out[start : start + batch_size] = hash_texts(features).numpy()
    return out


def ir_records_as_rows(records: IRRecords) -> list[dict[str, Any]]:
    """The records as rows of their own format (the inverse of :func:`~codiemb_st.data.read_ir_records`).

    sentence-transformers rows: one row per positive, ``anchor, positive, negative_1..n`` (the rows of a query
    with fewer than n negatives are left out, as sentence-transformers' n-tuple output does; logged).
    """
    rows: list[dict[str, Any]] = []
    extra = {"prompt": None, "type": records.data_type}
    if records.format == "sentence-transformers":
        width = max(len(record["negatives"]) for record in records.records)
        left_out = 0
        for record in records.records:
            if len(record["negatives"]) < width:
                left_out += 1
                continue
            negatives = {f"negative_{k}": text for k, text in enumerate(record["negatives"], start=1)}
            for positive in record["positives"]:
                row = {"anchor": record["query"], "positive": positive, **negatives}
                if record["prompt"]:
                    row["prompt"] = record["prompt"]
                rows.append(row)
        if left_out:
            logger.warning(
                "%s: %d queries with fewer than %d negatives are left out of the sentence-transformers rows.",
                records.name,
                left_out,
                width,
            )
        return rows
    names = ("query", "positives", "negatives") if records.format == "unified" else ("query", "pos", "neg")
    for record in records.records:
        row = dict(zip(names, (record["query"], record["positives"], record["negatives"])))
        extra["prompt"] = record["prompt"]
        row.update({key: value for key, value in extra.items() if value})
        rows.append(row)
    return rows


def write_ir_records(records: IRRecords, path: str | os.PathLike) -> Path:
    """Write records in their own format (see :func:`ir_records_as_rows`), atomically.

    ``.jsonl`` (or ``.jsonl.gz``) for every format; sentence-transformers rows may also go to ``.csv``/``.parquet``.
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

    Raises:
        ValueError: For a suffix other than ``.jsonl``/``.jsonl.gz`` (``.csv``/``.parquet`` for
            sentence-transformers columns).
    """
    path = Path(path)
    if path.suffix in (".csv", ".parquet"):
        if record_format != "sentence-transformers":
            raise ValueError(f"{path}: {record_format} records have list fields; write them as .jsonl.")
    elif not path.name.endswith((".jsonl", ".jsonl.gz")):
        raise ValueError(f"{path}: write mined records as .jsonl, .jsonl.gz (or .csv/.parquet for columns).")


__all__ = [
    "MiningStats",
    "check_records_path",
    "ir_records_as_rows",
    "mine_hard_negatives",
    "read_corpus",
    "write_ir_records",
]
