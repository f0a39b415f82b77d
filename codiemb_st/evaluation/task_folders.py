"""Write local evaluation task folders (the layout :mod:`codiemb_st.evaluation.local_data` reads).

Users turn their own data into mteb tasks with these; the reproduction writes its held-out dev sets and sampled test
sets with them, and the tests their fixtures. A folder is built next to its destination and renamed into place, so
a reader never sees a half-written task.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from codiemb_st.file_io import current_umask, write_jsonl, write_text_atomic
from codiemb_st.validation import check_finite_float

_MAIN_SCORES = {"sts": "cosine_spearman", "retrieval": "ndcg_at_10"}


def _publish(build, folder: Path) -> Path:
    """Build the task in a temporary sibling folder, then replace ``folder`` with it."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}.", suffix=".tmp"))
    try:
        build(staging)
        os.chmod(staging, 0o777 & ~current_umask())
        if folder.exists():
            if not (folder / "task.json").is_file():
                raise FileExistsError(
                    f"{folder} exists and is not a task folder (no task.json); refusing to replace it."
                )
            shutil.rmtree(folder)
        os.replace(staging, folder)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return folder


def _task_json(kind: str, name: str, language: str, split: str, mteb_task: str | None, extra: Mapping) -> str:
    meta = {
        "name": name,
        "type": kind,
        "language": language,
        "split": split,
        "main_score": _MAIN_SCORES[kind],
        "mteb_task": mteb_task,
        **extra,
    }
    return json.dumps(meta, ensure_ascii=False, indent=1) + "\n"


def write_sts_task(
    folder: str | Path,
    pairs: Iterable[Mapping[str, Any] | Sequence[Any]],
    *,
    name: str | None = None,
    language: str = "en",
    split: str = "test",
    min_score: float | None = None,
    max_score: float | None = None,
    mteb_task: str | None = None,
    metadata: Mapping[str, Any] | None = None,
) -> Path:
    """Write an STS task folder: ``task.json`` and ``<split>.jsonl`` rows ``{sentence1, sentence2, score}``.

    Args:
        folder: The task folder to (re)write. An existing task folder there is replaced; any other existing
            folder is refused.
        pairs: ``{"sentence1", "sentence2", "score"}`` dicts or ``(sentence1, sentence2, score)`` tuples.
        name: The task name (default: the folder's name).
        language: Language code (``"en"``, ``"zh"`` or an mteb code).
        split: The split name.
        min_score: Lowest possible gold score (default: the lowest in ``pairs``).
        max_score: Highest possible gold score (default: the highest in ``pairs``).
        mteb_task: The mteb task whose data this is exactly (then its real class is used), or ``None``.
        metadata: Extra ``task.json`` fields (e.g. how the pairs were sampled).

    Returns:
        The folder.

    Raises:
        ValueError: If there are no pairs, a pair lacks a field, a sentence is not a non-empty string or a score
            is not finite (naming the pair's index).

    Example:
        ::

            write_sts_task("my_tasks/MySTS", [("a cat", "a kitten", 4.5), ("a cat", "a car", 0.5)], language="en")
            evaluator = MTEBEvaluator(["MySTS"], data_dir="my_tasks")
    """
    folder = Path(folder)
    rows = []
    for index, pair in enumerate(pairs):
        if isinstance(pair, Mapping):
            missing = [key for key in ("sentence1", "sentence2", "score") if key not in pair]
            if missing:
                raise ValueError(f"pairs[{index}] lacks the field(s) {missing}.")
            first, second, score = pair["sentence1"], pair["sentence2"], pair["score"]
        else:
            if len(pair) != 3:
                raise ValueError(f"pairs[{index}] must be (sentence1, sentence2, score); got {len(pair)} items.")
            first, second, score = pair
        for field, text in (("sentence1", first), ("sentence2", second)):
            if not isinstance(text, str) or not text.strip():
                raise ValueError(f"pairs[{index}].{field} must be a non-empty string; got {text!r:.80}.")
        rows.append(
            {"sentence1": first, "sentence2": second, "score": check_finite_float(f"pairs[{index}].score", score)}
        )
    if not rows:
        raise ValueError("pairs is empty: an STS task needs at least two pairs.")
    scores = [row["score"] for row in rows]
    extra = {
        "min_score": min(scores) if min_score is None else min_score,
        "max_score": max(scores) if max_score is None else max_score,
        **(metadata or {}),
    }
    task_json = _task_json("sts", name or folder.name, language, split, mteb_task, extra)

    def build(staging: Path) -> None:
        write_text_atomic(staging / "task.json", task_json)
        write_jsonl(staging / f"{split}.jsonl", rows)

    return _publish(build, folder)


def write_retrieval_task(
    folder: str | Path,
    corpus: Mapping[str, str | tuple[str, str]],
    queries: Mapping[str, str],
    qrels: Mapping[str, Mapping[str, int]],
    *,
    name: str | None = None,
    language: str = "en",
    split: str = "test",
    mteb_task: str | None = None,
    metadata: Mapping[str, Any] | None = None,
) -> Path:
    """Write a retrieval task folder in the BEIR layout: corpus.jsonl, queries.jsonl, qrels/<split>.tsv.

    Args:
        folder: The task folder to (re)write (an existing task folder is replaced; any other folder is refused).
        corpus: ``{passage_id: text}`` or ``{passage_id: (title, text)}``.
        queries: ``{query_id: text}``.
        qrels: ``{query_id: {passage_id: grade}}`` (grade > 0 = relevant).
        name: The task name (default: the folder's name).
        language: Language code.
        split: The split name (the qrels file is ``qrels/<split>.tsv``).
        mteb_task: The mteb task whose data this is exactly, or ``None``.
        metadata: Extra ``task.json`` fields.

    Returns:
        The folder.

    Raises:
        ValueError: If the corpus, queries or qrels are empty, or a qrel names a query or passage that is not
            given (it would silently change nDCG), or an id contains a tab or newline.

    Example:
        ::

            write_retrieval_task(
                "my_tasks/MyRetrieval",
                corpus={"d1": "Photosynthesis turns light into sugar.", "d2": "Cats sleep a lot."},
                queries={"q1": "how do plants make food?"},
                qrels={"q1": {"d1": 1}},
            )
    """
    folder = Path(folder)
    for argument, mapping in (("corpus", corpus), ("queries", queries), ("qrels", qrels)):
        if not mapping:
            raise ValueError(f"`{argument}` is empty.")
    for query_id, judged in qrels.items():
        if query_id not in queries:
            raise ValueError(f"qrels names query {query_id!r}, which is not in `queries`.")
        unknown = [passage_id for passage_id in judged if passage_id not in corpus]
        if unknown:
            raise ValueError(f"qrels[{query_id!r}] names passage(s) {unknown[:5]} that are not in `corpus`.")
    for identifier in [*corpus, *queries]:
        if not isinstance(identifier, str) or any(c in identifier for c in "\t\n\r"):
            raise ValueError(f"Ids must be strings without tabs or newlines; got {identifier!r}.")
    corpus_rows = []
    for passage_id, value in corpus.items():
        title, text = value if isinstance(value, tuple) else ("", value)
        corpus_rows.append({"_id": passage_id, "title": title, "text": text})
    query_rows = [{"_id": query_id, "text": text} for query_id, text in queries.items()]
    qrel_lines = ["query-id\tcorpus-id\tscore"] + [
        f"{query_id}\t{passage_id}\t{int(grade)}"
        for query_id, judged in qrels.items()
        for passage_id, grade in judged.items()
    ]
    task_json = _task_json("retrieval", name or folder.name, language, split, mteb_task, dict(metadata or {}))

    def build(staging: Path) -> None:
        write_text_atomic(staging / "task.json", task_json)
        write_jsonl(staging / "corpus.jsonl", corpus_rows)
        write_jsonl(staging / "queries.jsonl", query_rows)
        write_text_atomic(staging / "qrels" / f"{split}.tsv", "\n".join(qrel_lines) + "\n")

    return _publish(build, folder)


__all__ = ["write_retrieval_task", "write_sts_task"]
