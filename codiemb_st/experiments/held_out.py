"""Held-out dev sets: a fixed seeded hold-out of each training file, written as local evaluation tasks.

Settings are chosen on dev sets held out of the training files; test sets only report. The hold-out depends on a
fixed seed string and the file's name only (never on a run's seed), so every run of a study, and every study that
reads another's runs, holds out the same records.

Example:
    >>> from codiemb_st.experiments.held_out import split_dev
    >>> train, dev = split_dev([{"i": i} for i in range(10)], 5, "toy")
    >>> len(train), len(dev)
    (8, 2)
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from codiemb_st.experiments.errors import ExperimentError
from codiemb_st.file_io import read_jsonl

#: The default hold-out seed string (the one ``benchmarks/reproduce_codiemb.py`` holds out with): a study that reads
#: another's runs passes that study's seed, so that both hold out the same records.
DEFAULT_DEV_SEED = "codiemb-dev-split"


def split_dev(
    records: list[dict[str, Any]], dev_size: int, name: str, dev_seed: str = DEFAULT_DEV_SEED
) -> tuple[list, list]:
    """(train, dev): a fixed seeded hold-out of ``dev_size`` records (at most a fifth of the file).

    Args:
        records: The file's records, in file order.
        dev_size: Records to hold out (capped at a fifth of the file).
        name: The file's name in the seed (each file has its own draw).
        dev_seed: The study's hold-out seed string.

    Returns:
        The training records and the held-out records, each in file order.
    """
    order = list(range(len(records)))
    random.Random(f"{dev_seed}:{name}").shuffle(order)
    held = set(order[: min(dev_size, len(records) // 5)])
    return [r for i, r in enumerate(records) if i not in held], [r for i, r in enumerate(records) if i in held]


def read_training_file(path: Path) -> list[dict[str, Any]]:
    """All records of a training file (``codiemb_st.read_records``: JSONL or JSONL.gz, errors name the line).

    Raises:
        ExperimentError: If the file does not exist.
    """
    from codiemb_st import read_records

    if not Path(path).is_file():
        raise ExperimentError(f"Training file {path} not found.")
    return [dict(record) for _, record in read_records(path)]


def hold_out(
    paths: Sequence[Path], dev_size: int, dev_seed: str = DEFAULT_DEV_SEED, *, seed_by_file_name: bool = False
) -> tuple[dict[str, list], dict[str, list]]:
    """Read training files and split each with :func:`split_dev`.

    Args:
        paths: The training files.
        dev_size: Records held out per file.
        dev_seed: The study's hold-out seed string.
        seed_by_file_name: Seed each file's draw by its file name (``en_stsb.jsonl.gz``, the fusion study's rule)
            instead of its dataset name (``en_stsb``, the default).

    Returns:
        ``({dataset name: training records}, {dataset name: held-out records})``.
    """
    from codiemb_st.recipe import dataset_name

    train: dict[str, list] = {}
    dev: dict[str, list] = {}
    for path in map(Path, paths):
        name = dataset_name(path)
        seed_name = path.name if seed_by_file_name else name
        train[name], dev[name] = split_dev(read_training_file(path), dev_size, seed_name, dev_seed)
    return train, dev


def write_dev_tasks(folder: Path, language: str, sts_dev: dict[str, list], ir_dev: dict[str, list]) -> list[Path]:
    """Dev sets in the local task layout: one STS task per STS file, one retrieval task over all IR files.

    A passage shared by several held-out records (as positive or negative) is one corpus document.

    Returns:
        The task folders: ``dev-<name>`` per STS file, then ``dev-ir`` (when there are IR records).
    """
    from codiemb_st.evaluation import write_retrieval_task, write_sts_task

    folders = [
        write_sts_task(folder / f"dev-{name}", records, name=f"dev-{name}", language=language, split="dev")
        for name, records in sts_dev.items()
    ]
    if ir_dev:
        doc_ids: dict[str, str] = {}
        queries: dict[str, str] = {}
        qrels: dict[str, dict[str, int]] = {}
        for name, records in ir_dev.items():
            for i, record in enumerate(records):
                qid = f"{name}-{i}"
                queries[qid] = record["query"]
                for text in record.get("negatives", []) + record["positives"]:
                    doc_ids.setdefault(text, f"d{len(doc_ids)}")
                qrels[qid] = {doc_ids[text]: 1 for text in record["positives"]}
        corpus = {doc_id: text for text, doc_id in doc_ids.items()}
        folders.append(write_retrieval_task(folder / "dev-ir", corpus, queries, qrels, language=language, split="dev"))
    return folders


def sample_sts_tasks(tasks: Sequence[str], data_dir: Path, cap: int, folder: Path, seed: int) -> list[str | Path]:
    """Replace each local STS test set larger than ``cap`` pairs by a seeded sample of ``cap`` pairs.

    The sample keeps the task class and metric (the folder keeps its ``mteb_task``) and is written under ``folder``;
    other tasks, and every task when ``cap`` is 0, are returned as given.
    """
    from codiemb_st.evaluation import find_local_tasks, write_sts_task

    local = {info.name: info for info in find_local_tasks(data_dir)} if data_dir.is_dir() else {}
    resolved: list[str | Path] = []
    for name in tasks:
        info = local.get(name)
        if info is None or info.type != "sts" or not cap:
            resolved.append(name)
            continue
        rows = [row for _, row in read_jsonl(info.path / f"{info.split}.jsonl")]
        if len(rows) <= cap:
            resolved.append(name)
            continue
        total = len(rows)
        rows = random.Random(f"{seed}:{name}").sample(rows, cap)
        write_sts_task(
            folder / name,
            rows,
            name=info.name,
            language=info.language,
            split=info.split,
            min_score=info.min_score,
            max_score=info.max_score,
            mteb_task=info.mteb_task,
            metadata={"sample": {"pairs_kept": cap, "pairs_total": total, "seed": seed}},
        )
        resolved.append(folder / name)
    return resolved


__all__ = [
    "DEFAULT_DEV_SEED",
    "hold_out",
    "read_training_file",
    "sample_sts_tasks",
    "split_dev",
    "write_dev_tasks",
]
