"""Load an evaluation task from a local folder into an mteb task object, without the Hugging Face hub.

Folder layout (as in ``shared/data/eval/<Task>/``):

- ``task.json``: ``{"name", "type": "sts" | "retrieval", "split", "language", "main_score", "mteb_task"}`` and,
  for STS, optionally ``"min_score"``/``"max_score"``.
- STS: ``<split>.jsonl`` with rows ``{"sentence1", "sentence2", "score"}``.
- Retrieval (BEIR layout): ``corpus.jsonl`` (``_id``, ``title``, ``text``), ``queries.jsonl`` (``_id``, ``text``),
  ``qrels/<split>.tsv`` with a ``query-id<TAB>corpus-id<TAB>score`` header.

Bad data is refused with the file (and line) to fix: a gold score that is missing, ``null``, a string, NaN or
infinite; a text that is not a string; a repeated id; a qrels judgment of a passage that is not in ``corpus.jsonl``
(mteb would count it as relevant but never retrievable and lower nDCG without a word). A folder whose corpus is
knowingly incomplete can opt in with ``"missing_passages": "drop"`` in ``task.json``: those judgments are then
dropped with a warning, and nDCG is computed over the passages that exist.

When ``mteb_task`` names an mteb task, that task's own class is used (``mteb.get_task(mteb_task,
eval_splits=[split])``) and the data is injected, so the score is mteb's own computation. Otherwise a generic task of
the right kind is built from the folder's metadata.
"""

from __future__ import annotations

import csv
import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from codiemb_st.file_io import read_jsonl

if TYPE_CHECKING:
    from datasets import Dataset
    from mteb.abstasks import AbsTask

logger = logging.getLogger(__name__)

# ISO 639-1 codes used in task.json -> the mteb "<ISO 639-3>-<script>" codes a generic task needs.
_MTEB_LANGUAGES = {"zh": "cmn-Hans", "en": "eng-Latn"}
_KINDS = {"sts": ("STS", "cosine_spearman"), "retrieval": ("Retrieval", "ndcg_at_10")}
# task.json "missing_passages": what to do with qrels judgments of passages that are not in corpus.jsonl.
_MISSING_PASSAGES = ("error", "drop")


@dataclass(frozen=True)
class LocalTaskInfo:
    """The contents of a local task folder's ``task.json``.

    Args:
        name: The task's name (also the generic task's mteb name when ``mteb_task`` is ``None``).
        type: ``"sts"`` or ``"retrieval"``.
        split: The split to evaluate.
        language: The language code (``"zh"``, ``"en"`` or an mteb code such as ``"fra-Latn"``).
        main_score: The mteb metric reported for this task.
        mteb_task: The mteb task whose data this folder holds exactly, or ``None``.
        path: The folder.
        min_score: Lowest possible STS gold score (``None``: taken from the data).
        max_score: Highest possible STS gold score (``None``: taken from the data).
        missing_passages: ``"error"`` (default): a qrels judgment of a passage missing from the corpus is an
            error; ``"drop"``: such judgments are dropped with a warning.
    """

    name: str
    type: str
    split: str
    language: str
    main_score: str
    mteb_task: str | None
    path: Path
    min_score: float | None = None
    max_score: float | None = None
    missing_passages: str = "error"

    @classmethod
    def from_folder(cls, folder: str | Path) -> LocalTaskInfo:
        """Read and check ``<folder>/task.json``.

        Raises:
            FileNotFoundError: If the folder has no ``task.json``.
            ValueError: If a required field is missing or has an unsupported value.
        """
        folder = Path(folder)
        meta_path = folder / "task.json"
        if not meta_path.is_file():
            raise FileNotFoundError(
                f"{meta_path} not found: a local task folder needs a task.json (see local_data.py)."
            )
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
        except UnicodeDecodeError as error:
            raise ValueError(f"{meta_path} is not UTF-8 text ({error.reason}); save it as UTF-8.") from None
        except json.JSONDecodeError as error:
            raise ValueError(f"{meta_path} is not valid JSON: {error}") from None
        if not isinstance(meta, dict):
            raise ValueError(
                f"{meta_path} must hold a JSON object (name, type, split, ...); got {type(meta).__name__}."
            )
        missing = [key for key in ("name", "type", "split") if not meta.get(key)]
        if missing:
            raise ValueError(f"{meta_path} lacks the required field(s) {missing}.")
        for key in ("name", "type", "split", "language", "main_score", "mteb_task"):
            if meta.get(key) is not None and not isinstance(meta[key], str):
                raise ValueError(f"{meta_path}: `{key}` must be a string; got {meta[key]!r}.")
        kind = meta["type"]
        if kind not in _KINDS:
            raise ValueError(f"{meta_path}: type must be one of {sorted(_KINDS)}, got {kind!r}.")
        for key in ("min_score", "max_score"):
            value = meta.get(key)
            if value is not None and not _is_finite_number(value):
                raise ValueError(f"{meta_path}: `{key}` must be a finite number; got {value!r}.")
        if meta.get("min_score") is not None and meta.get("max_score") is not None:
            if meta["min_score"] > meta["max_score"]:
                raise ValueError(
                    f"{meta_path}: `min_score` ({meta['min_score']}) is above `max_score` ({meta['max_score']})."
                )
        missing_passages = meta.get("missing_passages", "error")
        if missing_passages not in _MISSING_PASSAGES:
            raise ValueError(
                f"{meta_path}: `missing_passages` must be one of {list(_MISSING_PASSAGES)}; got {missing_passages!r}."
            )
        return cls(
            name=meta["name"],
            type=kind,
            split=meta["split"],
            language=meta.get("language") or "en",
            main_score=meta.get("main_score") or _KINDS[kind][1],
            mteb_task=meta.get("mteb_task"),
            path=folder,
            min_score=meta.get("min_score"),
            max_score=meta.get("max_score"),
            missing_passages=missing_passages,
        )


def _is_finite_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def find_local_tasks(data_dir: str | Path) -> list[LocalTaskInfo]:
    """Every task folder (a sub-folder with a ``task.json``) directly under ``data_dir``, sorted by name.

    Raises:
        FileNotFoundError: If ``data_dir`` is not a directory.
    """
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise FileNotFoundError(f"Evaluation data directory {data_dir} does not exist.")
    infos = [LocalTaskInfo.from_folder(sub) for sub in sorted(data_dir.iterdir()) if (sub / "task.json").is_file()]
    return sorted(infos, key=lambda info: info.name)


def _read_jsonl(
    path: Path, required: tuple[str, ...], *, texts: tuple[str, ...] = (), unique_id: str | None = None
) -> list[dict[str, Any]]:
    """The rows of a task's JSONL file, each checked: ``required`` fields present, ``texts`` fields strings and the
    ``unique_id`` field a string or integer that no other row repeats (errors name ``path:line``)."""
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found.")
    rows = []
    seen: dict[str, str] = {}
    for location, row in read_jsonl(path):
        if not isinstance(row, dict):
            raise ValueError(f"{location}: expected a JSON object, got {type(row).__name__}.")
        missing = [key for key in required if key not in row]
        if missing:
            raise ValueError(f"{location} lacks the field(s) {missing}.")
        for key in texts:
            value = row.get(key)
            if value is not None and not isinstance(value, str):
                raise ValueError(f"{location}: `{key}` must be a string; got {value!r}.")
            if key in required and value is None:
                raise ValueError(f"{location}: `{key}` must be a string; got null.")
        if unique_id is not None:
            value = row[unique_id]
            if isinstance(value, bool) or not isinstance(value, (str, int)) or str(value) == "":
                raise ValueError(f"{location}: `{unique_id}` must be a non-empty string or integer; got {value!r}.")
            key = str(value)
            if key in seen:
                raise ValueError(
                    f"{location}: `{unique_id}` {value!r} repeats the id of {seen[key]}; ids must be unique."
                )
            seen[key] = location
        rows.append(row)
    if not rows:
        raise ValueError(f"{path} has no rows.")
    return rows


def read_sts_split(info: LocalTaskInfo) -> Dataset:
    """The STS pairs of ``<folder>/<split>.jsonl`` as a ``Dataset(sentence1, sentence2, score)``.

    Raises:
        ValueError: If a row lacks a field, a sentence is not a string or a score is not a finite number (``null``,
            a string, NaN, infinite), naming ``path:line``.
    """
    from datasets import Dataset

    path = info.path / f"{info.split}.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found.")
    columns: dict[str, list[Any]] = {"sentence1": [], "sentence2": [], "score": []}
    for location, row in read_jsonl(path):
        if not isinstance(row, dict):
            raise ValueError(f"{location}: expected a JSON object, got {type(row).__name__}.")
        missing = [key for key in columns if key not in row]
        if missing:
            raise ValueError(f"{location} lacks the field(s) {missing}.")
        for key in ("sentence1", "sentence2"):
            if not isinstance(row[key], str):
                raise ValueError(f"{location}: `{key}` must be a string; got {row[key]!r}.")
        # A NaN score would make Spearman (and every mean over tasks) NaN without a word; null or a string would
        # fail later without the line.
        if not _is_finite_number(row["score"]):
            raise ValueError(f"{location}: `score` must be a finite number; got {row['score']!r}.")
        for key in columns:
            columns[key].append(float(row[key]) if key == "score" else row[key])
    if not columns["score"]:
        raise ValueError(f"{path} has no rows.")
    return Dataset.from_dict(columns)


def read_qrels(path: Path) -> dict[str, dict[str, int]]:
    """A BEIR qrels TSV (``query-id``, ``corpus-id``, ``score`` header) as ``{query_id: {doc_id: score}}``."""
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found.")
    qrels: dict[str, dict[str, int]] = {}
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise ValueError(f"{path} is not UTF-8 text ({error.reason}); save it as UTF-8.") from None
    reader = csv.reader(text.splitlines(), delimiter="\t")
    header = next(reader, None)
    if header is None or [column.strip() for column in header[:3]] != ["query-id", "corpus-id", "score"]:
        raise ValueError(f"{path} must start with the header 'query-id<TAB>corpus-id<TAB>score', got {header!r}.")
    for line_number, row in enumerate(reader, start=2):
        if not row:
            continue
        location = f"{path}:{line_number}"
        if len(row) < 3:
            raise ValueError(f"{location} needs three tab-separated columns, got {row!r}.")
        if not row[0] or not row[1]:
            raise ValueError(f"{location}: empty query-id or corpus-id in {row!r}.")
        try:
            value = float(row[2])
        except ValueError:
            raise ValueError(f"{location}: score {row[2]!r} is not a number.") from None
        # int() would turn a grade of 0.5 into 0 (not relevant) and fail on NaN/inf: refuse them instead.
        if not math.isfinite(value) or value != int(value):
            raise ValueError(f"{location}: score {row[2]!r} must be an integer relevance grade.")
        if row[1] in qrels.get(row[0], {}):
            raise ValueError(f"{location}: query {row[0]!r} judges passage {row[1]!r} twice.")
        qrels.setdefault(row[0], {})[row[1]] = int(value)
    if not qrels:
        raise ValueError(f"{path} has no judgments.")
    return qrels


def read_retrieval_split(info: LocalTaskInfo) -> dict[str, Any]:
    """The BEIR folder's split as mteb retrieval data: ``{"corpus", "queries", "relevant_docs", "top_ranked"}``.

    Only the queries judged in ``qrels/<split>.tsv`` are kept (``queries.jsonl`` may hold every split's queries).
    """
    from datasets import Dataset

    qrels = read_qrels(info.path / "qrels" / f"{info.split}.tsv")
    corpus_rows = _read_jsonl(info.path / "corpus.jsonl", ("_id", "text"), texts=("title", "text"), unique_id="_id")
    query_rows = _read_jsonl(info.path / "queries.jsonl", ("_id", "text"), texts=("text",), unique_id="_id")
    corpus = Dataset.from_dict(
        {
            "id": [str(row["_id"]) for row in corpus_rows],
            "title": [row.get("title") or "" for row in corpus_rows],
            "text": [row["text"] for row in corpus_rows],
        }
    )
    queries = [row for row in query_rows if str(row["_id"]) in qrels]
    unknown_queries = len(qrels) - len(queries)
    if unknown_queries:
        raise ValueError(
            f"{info.path}: {unknown_queries} query id(s) in qrels/{info.split}.tsv are not in queries.jsonl."
        )
    corpus_ids = set(corpus["id"])
    missing_docs = sorted({doc for docs in qrels.values() for doc in docs} - corpus_ids)
    if missing_docs:
        # mteb counts such a judgment as relevant but never retrievable: nDCG drops (0.8 instead of 1.0) silently.
        qrels_file = info.path / "qrels" / f"{info.split}.tsv"
        if info.missing_passages != "drop":
            raise ValueError(
                f"{qrels_file} judges {len(missing_docs)} passage id(s) that are not in {info.path / 'corpus.jsonl'} "
                f"(e.g. {missing_docs[:5]}); they would lower every score. Add the passages, remove those lines, or "
                'set "missing_passages": "drop" in task.json to drop them.'
            )
        logger.warning(
            "%s: dropped the judgments of %d passage id(s) not in corpus.jsonl (missing_passages=drop), e.g. %s.",
            qrels_file,
            len(missing_docs),
            missing_docs[:5],
        )
        qrels = {
            query: kept
            for query, docs in qrels.items()
            if (kept := {doc: grade for doc, grade in docs.items() if doc in corpus_ids})
        }
        queries = [row for row in queries if str(row["_id"]) in qrels]
    return {
        "corpus": corpus,
        "queries": Dataset.from_dict(
            {"id": [str(row["_id"]) for row in queries], "text": [row["text"] for row in queries]}
        ),
        "relevant_docs": qrels,
        "top_ranked": None,
    }


def _mteb_language(language: str) -> str:
    if language in _MTEB_LANGUAGES:
        return _MTEB_LANGUAGES[language]
    if "-" in language:
        return language
    raise ValueError(
        f"Unsupported language {language!r} in task.json: use one of {sorted(_MTEB_LANGUAGES)} or an mteb code "
        "such as 'fra-Latn'."
    )


def build_generic_task(info: LocalTaskInfo, sts_score_range: tuple[float, float] | None = None) -> AbsTask:
    """An mteb task (``AbsTaskSTS`` or ``AbsTaskRetrieval`` subclass) described by the folder's metadata, no data.

    Args:
        info: The folder's metadata.
        sts_score_range: ``(min, max)`` gold score used when ``task.json`` does not give them (STS only).
    """
    from mteb.abstasks import AbsTaskRetrieval, AbsTaskSTS
    from mteb.abstasks.task_metadata import TaskMetadata

    mteb_type, _ = _KINDS[info.type]
    metadata = TaskMetadata(
        name=info.name,
        description=f"Local {info.type} task loaded from {info.path}.",
        dataset={"path": str(info.path), "revision": "local"},
        type=mteb_type,
        category="t2t",
        modalities=["text"],
        eval_splits=[info.split],
        eval_langs=[_mteb_language(info.language)],
        main_score=info.main_score,
        license="not specified",
        annotations_creators="derived",
        sample_creation="found",
        bibtex_citation="",
    )
    if info.type == "sts":
        low, high = sts_score_range or (0.0, 1.0)
        attributes = {
            "metadata": metadata,
            "min_score": info.min_score if info.min_score is not None else low,
            "max_score": info.max_score if info.max_score is not None else high,
        }
        return type(f"Local{info.name}", (AbsTaskSTS,), attributes)()
    return type(f"Local{info.name}", (AbsTaskRetrieval,), {"metadata": metadata})()


def load_local_task(source: str | Path | LocalTaskInfo) -> AbsTask:
    """An mteb task with the folder's data injected (``task.dataset`` set, ``task.data_loaded = True``).

    Args:
        source: A task folder or its :class:`LocalTaskInfo`.

    Returns:
        The real mteb task class when ``mteb_task`` is set, otherwise a generic task of the folder's kind.

    Raises:
        FileNotFoundError, ValueError: If the folder's files are missing or malformed, or ``mteb_task`` is unknown
            to mteb or does not evaluate the folder's split.
    """
    import mteb

    info = source if isinstance(source, LocalTaskInfo) else LocalTaskInfo.from_folder(source)
    data = read_sts_split(info) if info.type == "sts" else read_retrieval_split(info)
    if info.mteb_task:
        try:
            task = mteb.get_task(info.mteb_task, eval_splits=[info.split])
        except (KeyError, ValueError) as error:
            raise ValueError(f"{info.path}/task.json: mteb_task {info.mteb_task!r} is not usable: {error}") from None
        if info.split not in task.metadata.eval_splits:
            raise ValueError(
                f"{info.path}/task.json: mteb task {info.mteb_task!r} does not evaluate split {info.split!r}; "
                f"its splits are {task.metadata.eval_splits}."
            )
        expected_type = _KINDS[info.type][0]
        if task.metadata.type != expected_type:
            raise ValueError(
                f"{info.path}/task.json says type {info.type!r} but mteb task {info.mteb_task!r} is "
                f"{task.metadata.type!r}."
            )
    else:
        score_range = None
        if info.type == "sts":
            score_range = (min(data["score"]), max(data["score"]))
            if score_range[0] == score_range[1] and (info.min_score is None or info.max_score is None):
                raise ValueError(f"{info.path}: every gold score is {score_range[0]}; give min_score and max_score.")
        task = build_generic_task(info, score_range)
    task.dataset = {"default": {info.split: data}}
    task.data_loaded = True
    return task
