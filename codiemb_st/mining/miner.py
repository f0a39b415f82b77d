"""The miner: for every query, the window of its filtered candidates and the negatives drawn from it.

The rules (see :func:`mine_hard_negatives`): no text of the query's own (the query, its positives, a text whose
token ids equal one of them) is a negative; the positive-aware margin; the rank window; a seeded draw. Encoding goes
through :mod:`codiemb_st.mining.cache`, the search through :mod:`codiemb_st.mining.search`, torchrun shares through
:mod:`codiemb_st.mining.distributed`.
"""

from __future__ import annotations

import logging
import math
import os
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from codiemb_st.mining.cache import CACHE_DTYPES, SHARD_SIZE, embed_texts, encoder_fingerprint, resolve_prompt
from codiemb_st.mining.corpus import read_corpus
from codiemb_st.mining.distributed import RankContext
from codiemb_st.mining.search import INDEXES, IndexOptions, build_index, import_faiss
from codiemb_st.validation import check_choice, check_finite_float, check_int, check_positive_int

if TYPE_CHECKING:
    from sentence_transformers import CrossEncoder, SentenceTransformer

    from codiemb_st.record_formats import IRRecords, RecordSource

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
        positive_score_mean: Mean query-positive score (of the model that ranked: the cross-encoder when given).
        negative_score_mean: Mean query-negative score of the mined negatives (same model).
        scores_dropped: Records whose input ``negative_scores`` were dropped because mined negatives (which have no
            input score) replaced or joined their scored ones (``output_scores=True`` scores every text).

    Example:
        ::

            records, stats = mine_hard_negatives("pairs.jsonl", model)
            print(stats.short, stats.short_reasons)
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
    scores_dropped: int = 0
    # Running sums, not lists: the stats must not grow with the number of queries.
    _sums: Counter = field(default_factory=Counter, repr=False)

    def add(self, other: MiningStats) -> None:
        """Add another rank's counts to these."""
        for name in ("short", "skipped_identical", "skipped_margin", "completed_from_own", "without_negatives"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.scores_dropped += other.scores_dropped
        self.short_reasons.update(other.short_reasons)
        self._sums.update(other._sums)

    def finish(self) -> None:
        """Turn the running sums into the means."""
        if self._sums["positive_count"]:
            self.positive_score_mean = self._sums["positive_sum"] / self._sums["positive_count"]
        if self._sums["negative_count"]:
            self.negative_score_mean = self._sums["negative_sum"] / self._sums["negative_count"]


@dataclass
class _Window:
    """One query's filtered candidates: those in the window, the rank reached, and what the filters skipped."""

    candidates: list[tuple[int, float]] = field(default_factory=list)
    rank: int = 0
    skipped_identical: int = 0
    skipped_margin: int = 0


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
    cache_dir: str | os.PathLike | None = None,
    cache_dtype: Literal["float32", "float16"] = "float32",
    cache_shard_size: int = SHARD_SIZE,
    index: Literal["dense", "flat", "ivf", "hnsw"] = "dense",
    index_options: IndexOptions | None = None,
    cross_encoder: CrossEncoder | str | None = None,
    output_scores: bool = False,
    distributed: bool | None = None,
) -> tuple[IRRecords, MiningStats]:
    """Give every IR record ``num_negatives`` mined hard negatives.

    The corpus is every positive of the records plus the texts of ``corpus`` (de-duplicated). For each query the
    candidates are ranked by the model's similarity; removed are the query itself, its positives, every text whose
    token ids equal one of them (the IR loss's own identity rule; the ids come from ``model.preprocess``, truncated at
    its ``max_seq_length``), and, with ``margin``, every candidate scoring above ``s - |s| * margin`` where ``s`` is
    the query's *lowest* positive score (NV-Retriever's TopK-PercPos filter, written as sentence-transformers
    writes its ``relative_margin``; for ``s > 0`` this is ``(1 - margin) * s``). Of the candidates left, ranks
    ``range_min`` to ``range_max`` (0-based, end excluded; FlagEmbedding's ``hn_mine`` samples from ranks 2-200)
    form the window; ``sampling="random"`` draws ``num_negatives`` of them (seeded per query), ``"top"`` takes the
    first. A query whose window is not full after the first search (the margin removed what was fetched) is searched
    again, deeper (x4), until it is or the whole corpus was searched.

    With ``cross_encoder``, the candidates the bi-encoder fetched (those not removed as the query's own texts) and
    the positives are scored by the cross-encoder (``CrossEncoder.predict``, as sentence-transformers' miner does),
    ranked by that score, and the margin and the window apply to it.

    Args:
        source: IR records in any format (see :func:`codiemb_st.record_formats.read_ir_records`).
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
        batch_size: Encoding (and cross-encoder) batch size.
        query_chunk_size: Queries searched and filtered at a time (bounds the candidate lists held).
        corpus_chunk_size: Corpus rows scored at a time by the dense search (bounds the score matrix).
        use_multi_process: Encode with a multi-process pool: ``True`` (all GPUs, or 4 CPU processes) or a list of
            devices, as in sentence-transformers (started only when something must be encoded).
        seed: Seed of the random draw (the result is the same for the same inputs and seed, whatever the chunk
            size or number of ranks: each query draws from its own seeded generator).
        show_progress_bar: Show encoding and search progress.
        cache_dir: Embedding cache folder (see :mod:`codiemb_st.mining.cache`): the corpus and queries are encoded
            once, and every later call with the same model, prompts and ``max_seq_length`` reads them, whatever its
            window, margin, sampling or N; a killed run resumes from the shards it wrote. ``None`` (default): no
            cache, nothing is written.
        cache_dtype: ``"float32"`` (default: the same negatives as without a cache) or ``"float16"`` (half the
            disk; the search reads the rounded values).
        cache_shard_size: Texts per cache shard (the most work a killed run loses).
        index: ``"dense"`` (exact torch search, default), ``"flat"`` (exact faiss: the same negatives),
            ``"ivf"`` or ``"hnsw"`` (approximate faiss; see :mod:`codiemb_st.mining.search`).
        index_options: :class:`~codiemb_st.mining.search.IndexOptions` of the approximate indexes.
        cross_encoder: A ``sentence_transformers.CrossEncoder`` (or its path or hub id) that re-scores the
            candidates and positives before the margin and the window.
        output_scores: Put the ranking model's scores (the bi-encoder's cosine, or the cross-encoder's) of every
            positive and negative into ``positive_scores``/``negative_scores`` (for distillation). Without it,
            the input's scores are kept for the texts kept; a record whose negatives include mined ones (which have
            no input score) gets ``negative_scores=None`` (counted in ``scores_dropped`` and a warning).
        distributed: Share the work among the ranks of the initialized ``torch.distributed`` group (``None``: when
            there is one): each rank encodes its shards into ``cache_dir`` (required then) and searches its query
            chunks; every rank returns the same records, equal to one process's.

    Returns:
        ``(records, stats)``: the records (same format, prompts and type as the input) with their new negatives
        (and scores), and a :class:`MiningStats`.

    Raises:
        ValueError: On bad records (see :func:`~codiemb_st.record_formats.read_ir_records`), a corpus with fewer than
            ``num_negatives + 1`` texts, a window that cannot hold ``num_negatives``, a model that cannot embed,
            or several ranks without ``cache_dir``.
        TypeError: If ``model`` is not a SentenceTransformer, or ``cross_encoder`` not a CrossEncoder.
        ImportError: For a faiss ``index`` without faiss installed (before anything is encoded).

    Example:
        ::

            from sentence_transformers import SentenceTransformer
            from codiemb_st.mining import mine_hard_negatives, write_ir_records

            model = SentenceTransformer("sentence-transformers/all-MiniLM-L6-v2")
            records, stats = mine_hard_negatives(
                "pairs.jsonl", model, num_negatives=4, corpus=["passages.txt"], cache_dir="mining-cache"
            )
            write_ir_records(records, "pairs_mined.jsonl")
            # Another window, from the cache: nothing is encoded again.
            records, stats = mine_hard_negatives(
                "pairs.jsonl", model, corpus=["passages.txt"], range_min=10, cache_dir="mining-cache"
            )
    """
    from sentence_transformers import SentenceTransformer
    from tqdm.auto import tqdm

    # Imported here: `codiemb-st --help` imports this package for its option choices, and datasets is slow to load.
    from codiemb_st.record_formats import read_ir_records

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
    check_positive_int("cache_shard_size", cache_shard_size)
    check_int("seed", seed, minimum=0)
    check_choice("cache_dtype", cache_dtype, CACHE_DTYPES)
    check_choice("index", index, INDEXES)
    if isinstance(corpus, (str, os.PathLike)):
        raise TypeError("`corpus` must be a list of corpus sources (files or lists of texts), not one path.")
    if index != "dense":
        import_faiss()  # fail before hours of encoding
    cross_encoder = _load_cross_encoder(cross_encoder, model.device)
    context = RankContext.current(distributed)
    if context.world_size > 1 and cache_dir is None:
        raise ValueError(
            f"Mining on {context.world_size} ranks shares the embeddings through the cache: give `cache_dir` "
            "(--cache-dir), a folder on a filesystem every rank sees."
        )

    read = read_ir_records(source)
    # A copy: the caller's records (when given an IRRecords) keep their negatives.
    records = replace(read, records=[dict(record) for record in read.records])
    # One dict (text -> row) and one list (row -> text) of the same string objects: no text is held twice.
    corpus_index: dict[str, int] = {}
    for record in records.records:
        for text in record["positives"]:
            corpus_index.setdefault(text, len(corpus_index))
    for extra in corpus:
        for text in read_corpus(extra):
            corpus_index.setdefault(text, len(corpus_index))
    corpus_texts = list(corpus_index)
    if len(corpus_texts) < num_negatives + 1:
        raise ValueError(
            f"The corpus has {len(corpus_texts)} distinct texts; mining {num_negatives} negatives needs at least "
            f"num_negatives + 1 = {num_negatives + 1}. Add corpus files (`corpus`) or lower num_negatives."
        )
    queries = [record["query"] for record in records.records]
    stats = MiningStats(queries=len(queries), corpus=len(corpus_texts))
    logger.info(
        "Mining %d negatives for %d queries of %s in a corpus of %d texts (window %d-%d, margin %s, %s, %s search%s).",
        num_negatives,
        len(queries),
        records.name,
        len(corpus_texts),
        range_min,
        range_max,
        margin,
        sampling,
        index,
        ", cross-encoder re-scoring" if cross_encoder is not None else "",
    )

    pool = None

    def get_pool() -> dict[str, Any] | None:
        nonlocal pool
        if use_multi_process and pool is None:
            pool = model.start_multi_process_pool(None if use_multi_process is True else list(use_multi_process))
        return pool

    encoding = {
        "batch_size": batch_size,
        "pool": get_pool,
        "cache_dir": cache_dir,
        "cache_dtype": cache_dtype,
        "shard_size": cache_shard_size,
        "fingerprint": encoder_fingerprint(model) if cache_dir is not None else None,
        "context": context,
        "show_progress_bar": show_progress_bar,
    }
    try:
        corpus_store = embed_texts(
            model, corpus_texts, side="document", prompt=corpus_prompt, prompt_name=corpus_prompt_name, **encoding
        )
        query_store = embed_texts(
            model, queries, side="query", prompt=query_prompt, prompt_name=query_prompt_name, **encoding
        )
    finally:
        if pool is not None:
            model.stop_multi_process_pool(pool)
    corpus_ids, query_ids = corpus_store.identities, query_store.identities
    identity_values, identity_counts = np.unique(corpus_ids, return_counts=True)

    def group_size(identity: int) -> int:
        at = int(np.searchsorted(identity_values, identity))
        return int(identity_counts[at]) if at < len(identity_values) and identity_values[at] == identity else 0

    # The queries are searched in fixed chunks, every world_size-th on each rank: the same chunks (and numbers)
    # whatever the number of ranks.
    starts = list(range(0, len(queries), query_chunk_size))
    mine_chunks = [start for number, start in enumerate(starts) if context.owns(number)]
    # Positive rows and bi-encoder scores of this rank's queries, computed before the index is built, so that an
    # in-memory corpus store is not needed (and can be freed) once a faiss index holds the embeddings.
    offsets = np.cumsum([0] + [len(record["positives"]) for record in records.records])
    positive_rows = np.fromiter(
        (corpus_index[text] for record in records.records for text in record["positives"]),
        dtype=np.int64,
        count=int(offsets[-1]),
    )
    positive_bi = np.zeros(int(offsets[-1]), dtype=np.float32)
    for start in mine_chunks:
        stop = min(start + query_chunk_size, len(queries))
        rows = slice(offsets[start], offsets[stop])
        owner = np.repeat(np.arange(start, stop), np.diff(offsets[start : stop + 1]))
        positive_bi[rows] = np.einsum(
            "ij,ij->i", corpus_store.rows(positive_rows[rows]), query_store.rows(owner), dtype=np.float32
        )
    search_index = build_index(
        corpus_store,
        index,
        device=model.device,
        corpus_chunk_size=corpus_chunk_size,
        options=index_options,
        show_progress_bar=show_progress_bar,
    )
    del corpus_store  # an in-memory store is now held by the index (dense) or freed (faiss)
    corpus_prompt_text = resolve_prompt(model, "document", corpus_prompt, corpus_prompt_name)

    chunk_results = []
    first_short: dict[str, tuple[int, str]] = {}
    for start in tqdm(mine_chunks, desc="Searching", disable=not show_progress_bar):
        chunk = records.records[start : start + query_chunk_size]
        query_vectors = query_store.rows(np.arange(start, start + len(chunk)))
        positive_sets = [
            set(positive_rows[offsets[start + i] : offsets[start + i + 1]].tolist()) for i in range(len(chunk))
        ]
        positive_scores = [
            positive_bi[offsets[start + i] : offsets[start + i + 1]].tolist() for i in range(len(chunk))
        ]
        if cross_encoder is not None:
            pairs = [(record["query"], text) for record in chunk for text in record["positives"]]
            flat = _predict(cross_encoder, pairs, batch_size)
            positive_scores = [flat[offsets[start + i] - offsets[start] : offsets[start + i + 1] - offsets[start]]
                               for i in range(len(chunk))]  # fmt: skip
        excluded_ids = [
            {int(query_ids[start + i]), *(int(corpus_ids[j]) for j in positives)}
            for i, positives in enumerate(positive_sets)
        ]
        own_negatives = [list(record["negatives"]) for record in chunk]
        kept_own = own_negatives if keep_negatives else [[] for _ in chunk]
        thresholds = [
            min(scores) - abs(min(scores)) * margin if margin is not None else math.inf for scores in positive_scores
        ]
        # First guess: enough candidates that range_max remain after removing every excluded text (exact: the group
        # sizes). Candidates above the margin are only known after the search, so a query whose window is not full
        # is searched again, deeper (x4), until it is or the corpus ends.
        top_k = [
            range_max + sum(group_size(identity) for identity in ids) + len(own) + 1
            for ids, own in zip(excluded_ids, kept_own)
        ]
        windows: dict[int, _Window] = {}
        reranked: dict[int, dict[int, float]] = {}  # cross-encoder scores, kept when a query is searched deeper
        pending = list(range(len(chunk)))
        while pending:
            depth = min(max(top_k[i] for i in pending), len(corpus_texts))
            hit_scores, hit_indices = search_index.search(query_vectors[pending], depth)
            allowed: dict[int, list[tuple[int, float]]] = {}
            skipped: dict[int, int] = {}
            for row, i in enumerate(pending):
                record, own = chunk[i], set(kept_own[i])
                allowed[i], skipped[i] = [], 0
                for index_value, score in zip(hit_indices[row].tolist(), hit_scores[row].tolist()):
                    if index_value < 0:
                        break
                    text = corpus_texts[index_value]
                    if text == record["query"] or index_value in positive_sets[i] or text in own:
                        continue
                    if int(corpus_ids[index_value]) in excluded_ids[i]:
                        skipped[i] += 1
                        continue
                    allowed[i].append((index_value, score))
            if cross_encoder is not None:
                _rerank(cross_encoder, chunk, pending, allowed, reranked, corpus_texts, batch_size)
            deeper = []
            for i in pending:
                window = _Window(skipped_identical=skipped[i])
                for index_value, score in allowed[i]:
                    if score > thresholds[i]:
                        window.skipped_margin += 1
                        continue
                    if window.rank >= range_min:
                        window.candidates.append((index_value, score))
                    window.rank += 1
                    if window.rank >= range_max:
                        break
                if window.rank < range_max and depth < len(corpus_texts):
                    top_k[i] = depth * 4
                    deeper.append(i)
                else:
                    windows[i] = window
            pending = deeper

        results = []
        own_to_score: list[tuple[int, int]] = []  # (query in chunk, position in its own negatives) to score
        part = MiningStats()
        for i, record in enumerate(chunk):
            window = windows[i]
            part._sums.update(
                {"positive_sum": float(sum(positive_scores[i])), "positive_count": len(positive_scores[i])}
            )
            part.skipped_identical += window.skipped_identical
            part.skipped_margin += window.skipped_margin
            wanted = num_negatives - len(kept_own[i])
            # Own negatives as -(position + 1), mined ones as their corpus row; scores None where not yet known.
            chosen: list[tuple[int, float]] = []
            if wanted <= 0:
                codes: list[int] = [-(k + 1) for k in range(num_negatives)]
            else:
                if sampling == "random" and len(window.candidates) > wanted:
                    rng = np.random.default_rng([seed, start + i])
                    picks = sorted(rng.choice(len(window.candidates), size=wanted, replace=False).tolist())
                    chosen = [window.candidates[p] for p in picks]
                else:
                    chosen = window.candidates[:wanted]
                part._sums.update({"negative_sum": float(sum(s for _, s in chosen)), "negative_count": len(chosen)})
                codes = [-(k + 1) for k in range(len(kept_own[i]))] + [index_value for index_value, _ in chosen]
                if len(chosen) < wanted:
                    part.short += 1
                    # Why: the whole corpus was searched, so what is missing was removed by the filters or lies
                    # before range_min. The margin is named when, without it, the window would have been full.
                    reason = "margin" if window.rank + window.skipped_margin >= range_min + wanted else "corpus"
                    part.short_reasons[reason] += 1
                    first_short.setdefault(reason, (start + i, record["location"]))
                    # The record's own negatives complete it rather than being replaced by fewer mined ones.
                    taken = {corpus_texts[index_value] for index_value, _ in chosen} | set(kept_own[i])
                    spare = [k for k, text in enumerate(own_negatives[i]) if text not in taken]
                    added = spare[: num_negatives - len(codes)]
                    codes += [-(k + 1) for k in added]
                    part.completed_from_own += len(added)
                    if not codes:
                        part.without_negatives += 1
            mined_scores = dict(chosen)
            negative_scores: list[float | None] = [mined_scores.get(code) if code >= 0 else None for code in codes]
            if output_scores:
                own_to_score += [(i, -code - 1) for code in codes if code < 0]
                results.append([start + i, codes, negative_scores, [float(s) for s in positive_scores[i]]])
            else:
                results.append([start + i, codes, _kept_input_scores(record, codes), None])
        if own_to_score:
            own_scores = _score_own(
                model, cross_encoder, chunk, own_negatives, own_to_score, query_vectors, corpus_prompt_text, batch_size
            )
            by_query = {}
            for (i, k), score in zip(own_to_score, own_scores):
                by_query.setdefault(i, {})[k] = score
            for result in results:
                i = result[0] - start
                result[2] = [by_query[i][-code - 1] if code < 0 else s for code, s in zip(result[1], result[2])]
        chunk_results.append((results, part))

    # Every rank's chunks, applied in chunk order (one process: its own).
    gathered = context.all_gather((chunk_results, first_short))
    for rank_results, rank_first_short in gathered:
        for results, part in rank_results:
            stats.add(part)
            for record_number, codes, negative_scores, positive_scores in results:
                record = records.records[record_number]
                own = record["negatives"]
                had_scores = record.get("negative_scores") is not None
                record["negatives"] = [corpus_texts[code] if code >= 0 else own[-code - 1] for code in codes]
                record["negative_scores"] = negative_scores
                if positive_scores is not None:
                    record["positive_scores"] = positive_scores
                elif had_scores and negative_scores is None:
                    stats.scores_dropped += 1
        for reason, (number, location) in rank_first_short.items():
            if reason not in first_short or number < first_short[reason][0]:
                first_short[reason] = (number, location)
    stats.finish()
    _log_summary(records, stats, margin, range_min, num_negatives, {k: v[1] for k, v in first_short.items()})
    return records, stats


def _load_cross_encoder(cross_encoder: CrossEncoder | str | None, device: Any) -> CrossEncoder | None:
    """``cross_encoder`` as a CrossEncoder (loaded on ``device`` when given as a path or hub id)."""
    if cross_encoder is None:
        return None
    from sentence_transformers import CrossEncoder

    if isinstance(cross_encoder, (str, os.PathLike)):
        try:
            return CrossEncoder(str(cross_encoder), device=str(device))
        except (OSError, ValueError) as error:
            first_line = str(error).splitlines()[0] if str(error) else type(error).__name__
            raise ValueError(f"Could not load `cross_encoder` {str(cross_encoder)!r}: {first_line}") from None
    if not isinstance(cross_encoder, CrossEncoder):
        raise TypeError(
            f"`cross_encoder` must be a sentence_transformers.CrossEncoder or its path; got {type(cross_encoder).__name__}."
        )
    return cross_encoder


def _predict(cross_encoder: CrossEncoder, pairs: list[tuple[str, str]], batch_size: int) -> list[float]:
    """Cross-encoder scores of ``pairs`` (one score a pair)."""
    if not pairs:
        return []
    scores = np.asarray(cross_encoder.predict(pairs, batch_size=batch_size, show_progress_bar=False))
    if scores.ndim != 1:
        raise ValueError(
            f"`cross_encoder` gives {scores.shape[-1]} scores per pair; re-scoring needs one (a model with num_labels=1)."
        )
    return scores.astype(np.float32).tolist()


def _rerank(
    cross_encoder: CrossEncoder,
    chunk: list[dict[str, Any]],
    pending: list[int],
    allowed: dict[int, list[tuple[int, float]]],
    reranked: dict[int, dict[int, float]],
    corpus_texts: list[str],
    batch_size: int,
) -> None:
    """Replace each pending query's allowed candidates' scores by cross-encoder scores, ordered by them (ties by
    corpus row); only candidates not scored in an earlier, shallower search are sent to the model."""
    new = [
        (i, index_value) for i in pending for index_value, _ in allowed[i] if index_value not in reranked.get(i, {})
    ]
    scores = _predict(
        cross_encoder, [(chunk[i]["query"], corpus_texts[index_value]) for i, index_value in new], batch_size
    )
    for (i, index_value), score in zip(new, scores):
        reranked.setdefault(i, {})[index_value] = score
    for i in pending:
        rescored = [(index_value, reranked[i][index_value]) for index_value, _ in allowed[i]]
        allowed[i] = sorted(rescored, key=lambda item: (-item[1], item[0]))


def _kept_input_scores(record: dict[str, Any], codes: list[int]) -> list[float] | None:
    """The record's input scores of the negatives it keeps, or None when it has none or a mined one is kept."""
    scores = record.get("negative_scores")
    if scores is None or any(code >= 0 for code in codes):
        return None
    return [float(scores[-code - 1]) for code in codes]


def _score_own(
    model: SentenceTransformer,
    cross_encoder: CrossEncoder | None,
    chunk: list[dict[str, Any]],
    own_negatives: list[list[str]],
    wanted: list[tuple[int, int]],
    query_vectors: np.ndarray,
    corpus_prompt: str | None,
    batch_size: int,
) -> list[float]:
    """Scores of records' own negatives (kept or completing short queries) by the ranking model."""
    texts = [own_negatives[i][k] for i, k in wanted]
    if cross_encoder is not None:
        return _predict(cross_encoder, [(chunk[i]["query"], text) for (i, _), text in zip(wanted, texts)], batch_size)
    # Not in the corpus (or not found there): encoded here, as the corpus is.
    vectors = np.asarray(
        model.encode_document(
            texts, prompt=corpus_prompt, batch_size=batch_size, convert_to_numpy=True, normalize_embeddings=True
        ),
        dtype=np.float32,
    )
    owners = np.array([i for i, _ in wanted])
    return np.einsum("ij,ij->i", vectors, query_vectors[owners], dtype=np.float32).tolist()


def _log_summary(
    records: IRRecords,
    stats: MiningStats,
    margin: float | None,
    range_min: int,
    num_negatives: int,
    first_short: dict[str, str],
) -> None:
    logger.info(
        "Mined %s: mean positive score %.4f, mean negative score %.4f; skipped %d candidates by the margin and %d "
        "token-identical to a positive.",
        records.name,
        stats.positive_score_mean,
        stats.negative_score_mean,
        stats.skipped_margin,
        stats.skipped_identical,
    )
    if stats.scores_dropped:
        logger.warning(
            "%s: %d records had negative_scores, but their negatives now include mined ones, which have no input "
            "score: their negative_scores are dropped (not written). Mine with --output-scores (output_scores=True) "
            "to score every positive and negative with the mining model.",
            records.name,
            stats.scores_dropped,
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


__all__ = ["SAMPLING", "MiningStats", "mine_hard_negatives"]
