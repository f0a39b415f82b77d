"""Seeded retrieval-corpus subsampling that keeps every judged passage.

A full C-MTEB retrieval corpus has ~100k passages: tens of minutes per task on a CPU. Dropping only unjudged passages
keeps every query answerable, so the score stays comparable between models evaluated on the same subsample; it is
optimistic in absolute terms (fewer distractors), which is why every subsampled result is marked.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from codiemb_st.validation import check_positive_int

if TYPE_CHECKING:
    from datasets import Dataset
    from mteb.abstasks import AbsTask

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class CorpusSubsample:
    """What a corpus subsample kept: written into the results so a subsampled score is never mistaken for a full one.

    Args:
        max_documents: The requested cap.
        seed: The seed of the random choice of unjudged passages.
        documents_total: Passages in the full corpus.
        documents_kept: Passages evaluated (more than ``max_documents`` when the judged ones alone exceed it).
        judged_documents: Passages that appear in the qrels (all kept).
    """

    max_documents: int
    seed: int
    documents_total: int
    documents_kept: int
    judged_documents: int

    def to_dict(self) -> dict[str, int]:
        return asdict(self)


def subsample_corpus(
    corpus: Dataset,
    relevant_docs: Mapping[str, Mapping[str, Any]],
    max_documents: int,
    seed: int = 0,
) -> tuple[Dataset, CorpusSubsample | None]:
    """Keep every judged passage plus a seeded random choice of the others, up to ``max_documents`` in total.

    Args:
        corpus: An mteb corpus (a ``datasets.Dataset`` with an ``id`` column).
        relevant_docs: The qrels, ``{query_id: {doc_id: score}}``; every doc id named here counts as judged.
        max_documents: The cap on the number of passages (a positive integer).
        seed: Seed for choosing the unjudged passages.

    Returns:
        The subsampled corpus (original order kept) and what was kept, or the corpus unchanged and ``None`` when
        nothing is dropped (it fits, or every passage is judged).

    Raises:
        TypeError: If ``max_documents`` is not an integer.
        ValueError: If it is below 1.
    """
    check_positive_int("max_documents", max_documents)
    total = len(corpus)
    if total <= max_documents:
        return corpus, None
    judged = {doc_id for docs in relevant_docs.values() for doc_id in docs}
    judged_rows, other_rows = [], []
    for row, doc_id in enumerate(corpus["id"]):
        (judged_rows if doc_id in judged else other_rows).append(row)
    n_fill = max(0, max_documents - len(judged_rows))
    fill = random.Random(seed).sample(other_rows, min(n_fill, len(other_rows)))
    keep = sorted(judged_rows + fill)
    if len(judged_rows) > max_documents:
        logger.warning(
            "%d judged passages exceed max_documents=%d; keeping all judged passages.", len(judged_rows), max_documents
        )
    if len(keep) == total:
        return corpus, None
    info = CorpusSubsample(
        max_documents=max_documents,
        seed=seed,
        documents_total=total,
        documents_kept=len(keep),
        judged_documents=len(judged_rows),
    )
    return corpus.select(keep), info


def subsample_task_corpus(task: AbsTask, max_documents: int, seed: int = 0) -> CorpusSubsample | None:
    """Subsample the corpus of every subset and split of a loaded mteb retrieval task, in place.

    Every corpus that is cut is reported at WARNING with the numbers (task, passages before and after, judged
    passages kept): a score on a subsample is optimistic against the full corpus, and a cap that a corpus only just
    exceeds (the default 1,000 on a 1,460-passage collection) must not change it without a word.

    Args:
        task: An mteb retrieval task whose data is loaded.
        max_documents: See :func:`subsample_corpus`.
        seed: See :func:`subsample_corpus`.

    Returns:
        The record of the first subsampled split (single-subset tasks have exactly one), or ``None`` if every corpus
        already fits.

    Raises:
        ValueError: If the task's data is not loaded.
    """
    if not task.data_loaded:
        raise ValueError(f"Task {task.metadata.name!r} has no data loaded; load it before subsampling its corpus.")
    task.convert_v1_dataset_format_to_v2(num_proc=None)
    first = None
    name = task.metadata.name
    for subset_name, subset in task.dataset.items():
        for split_name, split_data in subset.items():
            split_data["corpus"], info = subsample_corpus(
                split_data["corpus"], split_data["relevant_docs"], max_documents, seed
            )
            if info is not None:
                where = split_name if subset_name == "default" else f"{subset_name}/{split_name}"
                logger.warning(
                    "%s (%s): corpus capped at %s passages: %s -> %s passages kept (all %s judged passages kept, "
                    "seed %d); the score is on this subsample (set the corpus cap to 0, --corpus-cap 0, for the "
                    "full corpus).",
                    name,
                    where,
                    f"{max_documents:,}",
                    f"{info.documents_total:,}",
                    f"{info.documents_kept:,}",
                    f"{info.judged_documents:,}",
                    seed,
                )
            first = first or info
    return first
