"""Benchmark inputs: the project's shared data (STSBenchmark, training sets, SciFact) and seeded synthetic texts.

The shared data is optional for the library; these readers raise a clear error naming the missing path.

Example:
    ::

        from measurement.data import sample_columns

        columns, scores = sample_columns("en_stsb", batch=64)  # two text columns and their gold scores
"""

from __future__ import annotations

import random
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch


def stsb_test_rows() -> list[dict]:
    """STSBenchmark test pairs from the project's shared data (codiemb_st.shared_data finds it)."""
    from codiemb_st.file_io import read_jsonl
    from codiemb_st.shared_data import shared_data_path

    path = shared_data_path("eval", "STSBenchmark", "test.jsonl")
    if path is None or not path.is_file():
        raise FileNotFoundError("shared/data/eval/STSBenchmark/test.jsonl not found (set CODIEMB_SHARED_DATA).")
    return [row for _, row in read_jsonl(path)]


def train_rows(name: str) -> list[dict]:
    """The rows of a shared training set (``shared/data/train/NAME.jsonl.gz``)."""
    from codiemb_st.file_io import read_jsonl
    from codiemb_st.shared_data import shared_data_path

    path = shared_data_path("train", f"{name}.jsonl.gz")
    if path is None or not path.is_file():
        raise FileNotFoundError(f"shared/data/train/{name}.jsonl.gz not found (set CODIEMB_SHARED_DATA).")
    return [row for _, row in read_jsonl(path)]


def scifact_triplets() -> list[list[str]]:
    """(claim, a cited abstract, another abstract) from the SciFact evaluation set, abstracts as 'title text'."""
    from codiemb_st.file_io import read_jsonl
    from codiemb_st.shared_data import shared_data_path

    folder = shared_data_path("eval", "SciFact")
    if folder is None or not folder.is_dir():
        raise FileNotFoundError("shared/data/eval/SciFact not found (set CODIEMB_SHARED_DATA).")
    corpus = {row["_id"]: f"{row['title']} {row['text']}" for _, row in read_jsonl(folder / "corpus.jsonl")}
    queries = {row["_id"]: row["text"] for _, row in read_jsonl(folder / "queries.jsonl")}
    doc_ids = sorted(corpus)
    rng = random.Random(0)
    triplets = []
    for line in (folder / "qrels" / "test.tsv").read_text().splitlines()[1:]:
        query_id, doc_id, _ = line.split("\t")
        if query_id in queries and doc_id in corpus:
            triplets.append([queries[query_id], corpus[doc_id], corpus[rng.choice(doc_ids)]])
    return triplets


def sample_columns(dataset: str, batch: int) -> tuple[list[list[str]], list[float] | None]:
    """``batch`` rows of a dataset (a seeded sample) as text columns, and the gold scores of an STS dataset."""
    rng = random.Random(22)
    if dataset == "scifact":
        rows = rng.sample(scifact_triplets(), batch)
        return [list(column) for column in zip(*rows)], None
    rows = train_rows(dataset)
    if "score" in rows[0]:
        rows = rng.sample(rows, batch)
        return [[row["sentence1"] for row in rows], [row["sentence2"] for row in rows]], [row["score"] for row in rows]
    rows = rng.sample([row for row in rows if row["negatives"]], batch)
    return [
        [row["query"] for row in rows],
        [row["positives"][0] for row in rows],
        [row["negatives"][0] for row in rows],
    ], None


def sts_labels(kind: str, n: int, generator: torch.Generator) -> torch.Tensor:
    """``n`` gold STS scores of a kind: ``stsb`` (resampled STSBenchmark test scores), ``binary`` or ``continuous``."""
    import torch

    if kind == "stsb":  # resampled STSBenchmark test scores: 0-5, 70 distinct values
        pool = torch.tensor([row["score"] for row in stsb_test_rows()])
        return pool[torch.randint(len(pool), (n,), generator=generator)]
    if kind == "binary":
        return torch.randint(0, 2, (n,), generator=generator).float()
    if kind == "continuous":
        return torch.rand(n, generator=generator) * 5
    raise ValueError(f"unknown label kind {kind!r}")


WORDS = (
    "the a of retrieval passage query model sentence vector search relevant document answer question data train "
    "network language learning embedding similarity score rank index corpus token encoder negative positive batch"
).split()


def word_texts(count: int, num_words: int, seed: int) -> list[str]:
    """``count`` distinct seeded texts of ``num_words`` retrieval-flavoured words (a number appended)."""
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(num_words)) + f" {i}" for i in range(count)]


def synthetic_mining_records(passages: int, vocabulary: list[str], seed: int = 0) -> tuple[list[dict], list[str]]:
    """IR records (a query, two overlapping positives) over ``passages`` texts in all, and the extra corpus texts."""
    rng = random.Random(seed)
    num_queries = passages // 4  # 2 positives each: half of the corpus is positives
    records = []
    for _ in range(num_queries):
        words = rng.sample(vocabulary, 8)
        positives = [" ".join(rng.sample(words, 6) + rng.sample(vocabulary, 4)) for _ in range(2)]
        records.append({"query": " ".join(words), "positives": positives})
    extra = [" ".join(rng.sample(vocabulary, 10)) for _ in range(passages - 2 * num_queries)]
    return records, extra


def column_features(model: Any, columns: list[list[str]], device: str) -> list[dict[str, Any]]:
    """Each text column preprocessed by a SentenceTransformer ``model``, its tensors moved to ``device``."""
    import torch

    return [
        {
            key: value.to(device) if isinstance(value, torch.Tensor) else value
            for key, value in model.preprocess(texts).items()
        }
        for texts in columns
    ]
