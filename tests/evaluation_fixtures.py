"""Tiny local evaluation tasks (both kinds, generic and real-mteb-class) and independent reference metrics."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from scipy.stats import spearmanr

from codiemb_st.evaluation import task_folders

STS_PAIRS = [
    ("the quick brown fox jumps over the lazy dog", "a quick brown fox jumps over a lazy dog", 4.8),
    ("a man is playing a guitar on the stage", "a man plays the guitar", 4.1),
    ("a woman is slicing an onion in the kitchen", "a woman cuts an onion", 3.9),
    ("machine learning models embed sentences into vectors", "models embed sentences", 3.2),
    ("retrieval finds relevant passages for a query", "the weather is sunny and warm today", 0.2),
    ("semantic similarity compares the meaning of two sentences", "similarity of sentences", 2.7),
    ("he drove his car to the office in the morning", "children are playing football in the park", 0.5),
    ("stock markets fell sharply after the announcement", "markets fell after the announcement", 4.4),
    ("今天天气很好 我们去公园散步", "今天天气很好", 3.0),
    ("如何办理信用卡 需要什么材料", "这个手机的电池续航怎么样", 0.1),
    ("a b c d e", "b c d e f", 2.2),
    ("the lazy dog sleeps", "the quick fox runs in the park", 1.1),
]

CORPUS = {
    "d1": ("Foxes", "the quick brown fox jumps over the lazy dog"),
    "d2": ("", "a man is playing a guitar on the stage"),
    "d3": ("Cooking", "a woman is slicing an onion in the kitchen"),
    "d4": ("", "machine learning models embed sentences into vectors"),
    "d5": ("", "retrieval finds relevant passages for a query"),
    "d6": ("Weather", "the weather is sunny and warm today"),
    "d7": ("", "he drove his car to the office in the morning"),
    "d8": ("", "children are playing football in the park"),
    "d9": ("Markets", "stock markets fell sharply after the announcement"),
    "d10": ("", "今天天气很好 我们去公园散步"),
    "d11": ("", "如何办理信用卡 需要什么材料"),
    "d12": ("", "a b c d e f g"),
}
QUERIES = {
    "q1": "quick fox and a dog",
    "q2": "guitar music on a stage",
    "q3": "sunny weather today",
    "q4": "markets after an announcement",
    "q5": "unjudged query that must be dropped",
}
# Graded judgments (gain = grade, as trec_eval's ndcg); q5 is not judged in this split.
QRELS = {
    "q1": {"d1": 2, "d12": 1},
    "q2": {"d2": 1},
    "q3": {"d6": 2, "d10": 1, "d8": 1},
    "q4": {"d9": 1},
}


def write_sts_task(folder: Path, name: str = "TinySTS", mteb_task: str | None = None, split: str = "test") -> Path:
    """The tiny STS pairs as a local task folder, written by the library's own writer."""
    return task_folders.write_sts_task(
        folder, STS_PAIRS, name=name, language="en", split=split, min_score=0, max_score=5, mteb_task=mteb_task
    )


def write_retrieval_task(
    folder: Path, name: str = "TinyRetrieval", mteb_task: str | None = None, split: str = "test"
) -> Path:
    """The tiny corpus, queries (one unjudged) and graded qrels as a BEIR task folder, by the library's writer."""
    return task_folders.write_retrieval_task(
        folder, CORPUS, QUERIES, QRELS, name=name, language="en", split=split, mteb_task=mteb_task
    )


def write_tiny_tasks(root: Path) -> Path:
    """``root`` with a generic STS task, a generic retrieval task, and tiny copies under real mteb task names."""
    write_sts_task(root / "TinySTS")
    write_retrieval_task(root / "TinyRetrieval")
    write_sts_task(root / "STSBenchmark", name="STSBenchmark", mteb_task="STSBenchmark")
    write_retrieval_task(root / "SciFact", name="SciFact", mteb_task="SciFact")
    return root


def tiny_eval_argv(model: Path, data_dir: Path, out: Path, *options: str) -> list[str]:
    """``codiemb-st eval`` arguments for one tiny model on tiny local tasks (corpus cap 8), plus ``options``."""
    argv = ["eval", "--models", f"tiny={model}", "--data-dir", str(data_dir), "--output-dir", str(out)]
    return [*argv, "--corpus-cap", "8", *options]


def _cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a / np.linalg.norm(a, axis=-1, keepdims=True)
    b = b / np.linalg.norm(b, axis=-1, keepdims=True)
    return a @ b.T


def reference_sts_spearman(model) -> float:
    """scipy Spearman between gold scores and cosines of independently encoded pairs."""
    first = model.encode([a for a, _, _ in STS_PAIRS], convert_to_numpy=True)
    second = model.encode([b for _, b, _ in STS_PAIRS], convert_to_numpy=True)
    cosines = np.diag(_cosine(first, second))
    return float(spearmanr([s for _, _, s in STS_PAIRS], cosines)[0])


def reference_ndcg_at_10(model, corpus_ids: list[str] | None = None) -> float:
    """Mean nDCG@10 over the judged queries: gain = grade, discount 1/log2(rank + 1), ideal from the qrels."""
    corpus_ids = corpus_ids or list(CORPUS)
    # mteb embeds a passage as "title text" (stripped).
    passages = [f"{CORPUS[d][0]} {CORPUS[d][1]}".strip() for d in corpus_ids]
    doc_emb = model.encode(passages, convert_to_numpy=True)
    values = []
    for qid, judged in QRELS.items():
        query_emb = model.encode([QUERIES[qid]], convert_to_numpy=True)
        scores = _cosine(query_emb, doc_emb)[0]
        ranking = [corpus_ids[i] for i in np.argsort(-scores)][:10]
        dcg = sum(judged.get(doc, 0) / math.log2(rank + 2) for rank, doc in enumerate(ranking))
        ideal = sorted(judged.values(), reverse=True)[:10]
        idcg = sum(gain / math.log2(rank + 2) for rank, gain in enumerate(ideal))
        values.append(dcg / idcg)
    return float(np.mean(values))
