"""Embedding-space geometry: the properties the CoDiEmb paper analyses (anisotropy, rank, conditioning).

All functions take an ``(n, d)`` embedding matrix (numpy array or torch tensor) and, by default, L2-normalise its rows
first, so they describe the cosine geometry the model is evaluated with.

- :func:`anisotropy`: mean cosine similarity over all distinct pairs of (unrelated) texts; 0 for isotropic
  embeddings, 1 when every embedding points the same way (Ethayarajh 2019).
- :func:`svd_entropy` / :func:`effective_rank`: Shannon entropy of the singular values normalised to sum to 1, and
  its exponential (Roy & Vetterli 2007); the effective rank is ``min(n, d)`` for a matrix with equal singular values
  and 1 for a rank-1 matrix.
- :func:`condition_number`: largest over smallest singular value (``inf`` for a rank-deficient matrix);
  :func:`numerical_rank` counts the singular values above rounding noise.
- :func:`alignment` and :func:`uniformity` (Wang & Isola 2020): mean ``||f(x) - f(y)||^alpha`` over positive pairs
  (lower is better) and ``log E exp(-t ||f(x) - f(y)||^2)`` over all distinct pairs (lower is more uniform; ``-2t``
  is the value for an orthonormal set).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
from scipy.special import logsumexp

if TYPE_CHECKING:
    from sentence_transformers import SentenceTransformer

    from codiemb_st.evaluation.tasks import PreparedTask

_BLOCK_ROWS = 1024
_EPS64 = float(np.finfo(np.float64).eps)


def _as_matrix(embeddings: Any, normalize: bool, name: str = "embeddings", min_rows: int = 1) -> np.ndarray:
    if hasattr(embeddings, "detach"):
        embeddings = embeddings.detach().cpu().float().numpy()
    matrix = np.asarray(embeddings, dtype=np.float64)
    if matrix.ndim != 2 or matrix.shape[0] < min_rows or matrix.shape[1] < 1:
        raise ValueError(f"{name} must be a 2-D (n, d) matrix with n >= {min_rows}, got shape {matrix.shape}.")
    if not np.isfinite(matrix).all():
        raise ValueError(f"{name} contains NaN or infinite values.")
    if normalize:
        norms = np.linalg.norm(matrix, axis=1, keepdims=True)
        if (norms == 0).any():
            raise ValueError(f"{name} has an all-zero row, which has no direction; drop it or pass normalize=False.")
        matrix = matrix / norms
    return matrix


def anisotropy(embeddings: Any) -> float:
    """Mean cosine similarity over all ``n (n - 1) / 2`` distinct pairs of rows.

    Exact in O(n d): for unit vectors ``sum_{i != j} <x_i, x_j> = ||sum_i x_i||^2 - n``.
    """
    matrix = _as_matrix(embeddings, normalize=True, min_rows=2)
    n = matrix.shape[0]
    total = matrix.sum(axis=0)
    return float((total @ total - n) / (n * (n - 1)))


def singular_values(embeddings: Any, normalize: bool = True, center: bool = False) -> np.ndarray:
    """Singular values of the (row-normalised, optionally mean-centred) embedding matrix, in descending order."""
    matrix = _as_matrix(embeddings, normalize)
    if center:
        matrix = matrix - matrix.mean(axis=0, keepdims=True)
    return np.linalg.svd(matrix, compute_uv=False)


def svd_entropy(embeddings: Any, normalize: bool = True, center: bool = False) -> float:
    """Shannon entropy (nats) of the singular values normalised to sum to 1."""
    values = singular_values(embeddings, normalize, center)
    total = values.sum()
    if total == 0:
        return 0.0
    p = values[values > 0] / total
    return float(-(p * np.log(p)).sum())


def effective_rank(embeddings: Any, normalize: bool = True, center: bool = False) -> float:
    """``exp(svd_entropy)``: between 1 (rank one) and ``min(n, d)`` (all singular values equal)."""
    return math.exp(svd_entropy(embeddings, normalize, center))


def _input_eps(embeddings: Any) -> float:
    """Machine epsilon of the input's own dtype: float32 embeddings carry float32 rounding noise."""
    if hasattr(embeddings, "detach"):  # a torch tensor
        import torch

        return float(torch.finfo(embeddings.dtype).eps) if embeddings.dtype.is_floating_point else _EPS64
    dtype = np.asarray(embeddings).dtype
    return float(np.finfo(dtype).eps) if np.issubdtype(dtype, np.floating) else _EPS64


def _null_threshold(values: np.ndarray, embeddings: Any) -> float:
    # numpy's matrix_rank tolerance, with the epsilon of the dtype the embeddings were computed in.
    return float(values[0]) * max(np.shape(embeddings)) * _input_eps(embeddings)


def numerical_rank(embeddings: Any, normalize: bool = True, center: bool = False) -> int:
    """Number of singular values above rounding noise (numpy's ``matrix_rank`` rule, in the input's precision)."""
    values = singular_values(embeddings, normalize, center)
    return int((values > _null_threshold(values, embeddings)).sum())


def condition_number(embeddings: Any, normalize: bool = True, center: bool = False) -> float:
    """``sigma_max / sigma_min`` over the ``min(n, d)`` singular values; ``inf`` when the matrix is rank-deficient
    (see :func:`numerical_rank`).

    Note that mean pooling over a final LayerNorm can leave a few exactly dead directions (all-MiniLM-L6-v2's
    embeddings span 382 of 384 dimensions), which makes this ``inf`` whatever the sample.
    """
    values = singular_values(embeddings, normalize, center)
    if values[-1] <= _null_threshold(values, embeddings):
        return math.inf
    return float(values[0] / values[-1])


def alignment(embeddings1: Any, embeddings2: Any, alpha: float = 2.0) -> float:
    """Mean ``||x_i - y_i||^alpha`` over positive pairs ``(x_i, y_i)`` of unit-normalised embeddings.

    Raises:
        ValueError: If the two matrices do not have the same shape.
    """
    x = _as_matrix(embeddings1, normalize=True, name="embeddings1")
    y = _as_matrix(embeddings2, normalize=True, name="embeddings2")
    if x.shape != y.shape:
        raise ValueError(f"embeddings1 and embeddings2 must have the same shape, got {x.shape} and {y.shape}.")
    return float((np.linalg.norm(x - y, axis=1) ** alpha).mean())


def uniformity(embeddings: Any, t: float = 2.0) -> float:
    """``log mean_{i < j} exp(-t ||x_i - x_j||^2)`` over all distinct pairs of unit-normalised rows."""
    matrix = _as_matrix(embeddings, normalize=True, min_rows=2)
    n = matrix.shape[0]
    block_logsums = []
    # Row blocks bound memory at block x n similarities instead of n x n.
    for start in range(0, n - 1, _BLOCK_ROWS):
        rows = np.arange(start, min(start + _BLOCK_ROWS, n - 1))
        cosines = matrix[rows] @ matrix.T
        upper = np.arange(n)[None, :] > rows[:, None]
        # ||a - b||^2 = 2 - 2 <a, b> for unit vectors; clip tiny negative rounding.
        squared = np.clip(2.0 - 2.0 * cosines[upper], 0.0, None)
        block_logsums.append(logsumexp(-t * squared))
    return float(logsumexp(block_logsums) - math.log(n * (n - 1) / 2))


def embedding_geometry(
    embeddings: Any,
    pairs: tuple[Any, Any] | None = None,
    center: bool = False,
) -> dict[str, float]:
    """All metrics at once.

    Args:
        embeddings: Embeddings of unrelated texts (a random sample of a corpus).
        pairs: Optional ``(embeddings1, embeddings2)`` of positive pairs, for :func:`alignment`.
        center: Mean-centre before the singular-value metrics.

    Returns:
        ``anisotropy``, ``svd_entropy``, ``effective_rank``, ``condition_number``, ``numerical_rank``,
        ``uniformity`` and, with ``pairs``, ``alignment``.
    """
    entropy = svd_entropy(embeddings, center=center)
    metrics = {
        "anisotropy": anisotropy(embeddings),
        "svd_entropy": entropy,
        "effective_rank": math.exp(entropy),
        "condition_number": condition_number(embeddings, center=center),
        "numerical_rank": numerical_rank(embeddings, center=center),
        "uniformity": uniformity(embeddings),
    }
    if pairs is not None:
        metrics["alignment"] = alignment(*pairs)
    return metrics


def model_geometry(
    model: SentenceTransformer,
    texts: Sequence[str],
    pairs: Sequence[tuple[str, str]] | None = None,
    batch_size: int = 32,
    center: bool = False,
) -> dict[str, float]:
    """Encode ``texts`` (and the positive ``pairs``) with ``model`` and return :func:`embedding_geometry`.

    Raises:
        ValueError: If fewer than two texts are given.
    """
    if len(texts) < 2:
        raise ValueError(f"texts needs at least two texts, got {len(texts)}.")
    embeddings = model.encode(list(texts), batch_size=batch_size, convert_to_numpy=True)
    pair_embeddings = None
    if pairs:
        first = model.encode([a for a, _ in pairs], batch_size=batch_size, convert_to_numpy=True)
        second = model.encode([b for _, b in pairs], batch_size=batch_size, convert_to_numpy=True)
        pair_embeddings = (first, second)
    return embedding_geometry(embeddings, pair_embeddings, center=center)


def geometry_text_sample(
    tasks: Sequence[PreparedTask], num_texts: int, seed: int = 0
) -> tuple[list[str], list[tuple[str, str]]]:
    """A seeded sample of the tasks' texts and of their positive pairs, for :func:`model_geometry`.

    Texts: every STS sentence and every retrieval query and passage, deduplicated, ``num_texts`` of them drawn.
    Positive pairs (``num_texts // 2`` drawn): STS pairs whose gold score lies in the top fifth of the task's score
    range, and retrieval queries with a passage judged relevant.

    Args:
        tasks: Prepared tasks (:func:`~codiemb_st.evaluation.prepare_tasks`).
        num_texts: How many texts to draw (fewer when the tasks hold fewer).
        seed: Seed of the draw.

    Returns:
        ``(texts, pairs)``.

    Example:
        ::

            texts, pairs = geometry_text_sample(prepare_tasks(["STSBenchmark"], data_dir=...), 1000)
            print(model_geometry(model, texts, pairs))
    """
    import random

    texts: set[str] = set()
    pairs: list[tuple[str, str]] = []
    for prepared in tasks:
        data = prepared.task.dataset["default"][prepared.split]
        if prepared.type == "sts":
            texts.update(data["sentence1"])
            texts.update(data["sentence2"])
            low, high = prepared.task.min_score, prepared.task.max_score
            threshold = low + 0.8 * (high - low)
            pairs.extend(
                (a, b)
                for a, b, score in zip(data["sentence1"], data["sentence2"], data["score"])
                if score >= threshold
            )
        elif prepared.type == "retrieval":
            passages = {row["id"]: f"{row.get('title') or ''} {row['text']}".strip() for row in data["corpus"]}
            queries = dict(zip(data["queries"]["id"], data["queries"]["text"]))
            texts.update(queries.values())
            texts.update(passages.values())
            pairs.extend(
                (queries[qid], passages[did])
                for qid, docs in data["relevant_docs"].items()
                for did, score in docs.items()
                if score > 0 and qid in queries and did in passages
            )
    rng = random.Random(seed)
    sample = rng.sample(sorted(texts), min(num_texts, len(texts)))
    pair_sample = rng.sample(pairs, min(num_texts // 2, len(pairs)))
    return sample, pair_sample
