"""Nearest-neighbour search for mining: exact dense search in torch, or a faiss index (exact flat, IVF or HNSW).

Every index answers ``search(queries, k)`` with the top ``k`` corpus rows per query by inner product (the
embeddings are normalized: cosine), as ``(scores, indices)`` arrays ordered by score, ties by corpus index (so the
order does not depend on the index), padded with index ``-1`` when the index returns fewer.

- ``"dense"`` (default, no extra dependency): the corpus as one float32 tensor on the model's device; queries are
  scored against corpus chunks and the top ``k`` kept (the score matrix is at most 128 x ``corpus_chunk_size``).
- ``"flat"``: ``faiss.IndexFlatIP``, exact, the same negatives as ``"dense"``; on the GPUs when faiss has them
  (faiss-gpu), where one search returns at most 2048 rows: deeper searches then run on a CPU copy.
- ``"ivf"``: ``faiss.IndexIVFFlat``: ``nlist`` k-means cells (default ``4 * sqrt(corpus)``), trained on a seeded
  sample of ``train_size`` rows (default ``min(corpus, 64 * nlist)``; faiss asks for 39-256 per cell); a search
  visits ``nprobe`` cells (default 64).
  Approximate: a candidate in an unvisited cell is missed (the window's recall is measured in
  ``benchmarks/bench_mining.py``). Stored vectors are exact, so the scores are.
- ``"hnsw"``: ``faiss.IndexHNSWFlat`` with ``hnsw_m`` links per node (default 32), ``ef_construction`` 80 and
  ``ef_search`` ``max(ef_search, k)`` (default 256). No training; slow to build on a CPU.

faiss is an optional dependency (``pip install "codiemb-st[faiss]"``); the package imports without it.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from codiemb_st.mining.cache import EmbeddingStore

logger = logging.getLogger(__name__)

INDEXES = ("dense", "flat", "ivf", "hnsw")
#: faiss on a GPU returns at most this many rows per query.
FAISS_GPU_MAX_K = 2048


@dataclass
class IndexOptions:
    """Parameters of the approximate faiss indexes (ignored by ``"dense"`` and ``"flat"``).

    Args:
        nlist: IVF cells (``None``: ``4 * sqrt(corpus)``, at most ``corpus / 39``).
        nprobe: IVF cells visited per query.
        hnsw_m: HNSW links per node.
        ef_construction: HNSW build-time search depth.
        ef_search: HNSW search depth (at least ``k``).
        train_size: IVF training rows (``None``: ``min(corpus, 64 * nlist)``).
        seed: Seed of the IVF training sample and k-means.

    Example:
        ::

            mine_hard_negatives(records, model, index="ivf", index_options=IndexOptions(nprobe=128))
    """

    nlist: int | None = None
    nprobe: int = 64
    hnsw_m: int = 32
    ef_construction: int = 80
    ef_search: int = 256
    train_size: int | None = None
    seed: int = 0


def order_hits(scores: np.ndarray, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each row's hits ordered by score (descending), ties by corpus index; ``-1`` padding last.

    Example:
        ::

            scores, indices = order_hits(np.array([[0.5, 0.9, 0.5]]), np.array([[7, 2, 3]]))  # indices [[2, 3, 7]]
    """
    scores = np.asarray(scores, dtype=np.float32)
    indices = np.asarray(indices, dtype=np.int64)
    keyed = np.where(indices < 0, -np.inf, scores)
    # lexsort: the last key is the primary one.
    order = np.lexsort((np.where(indices < 0, np.iinfo(np.int64).max, indices), -keyed.astype(np.float64)), axis=1)
    return np.take_along_axis(scores, order, axis=1), np.take_along_axis(indices, order, axis=1)


class DenseIndex:
    """Exact search with torch on the corpus held as one float32 tensor (on ``device``).

    Args:
        store: The corpus embeddings (an in-memory store's array is used without a copy on the CPU).
        device: Where the search runs (the model's device).
        corpus_chunk_size: Corpus rows scored at a time.

    Example:
        ::

            index = DenseIndex(store, "cpu")
            scores, indices = index.search(query_vectors, 10)
    """

    def __init__(self, store: EmbeddingStore, device: Any = "cpu", corpus_chunk_size: int = 100_000) -> None:
        import torch

        first = store.shards[0] if store.shards else None
        base = getattr(first, "base", None)
        if isinstance(base, np.ndarray) and base.dtype == np.float32 and base.ndim == 2 and len(base) == len(store):
            corpus = torch.from_numpy(base)  # the in-memory store's one array: no copy
        else:
            corpus = torch.empty((len(store), store.dim), dtype=torch.float32)
            for number, (start, stop) in enumerate(store.blocks()):
                corpus[start:stop] = torch.from_numpy(store.read_block(number))
        self.corpus = corpus.to(device)
        self.corpus_chunk_size = corpus_chunk_size
        self.ntotal = len(store)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """The top ``k`` rows of each query (see the module docstring)."""
        import torch

        k = min(k, self.ntotal)
        all_scores, all_indices = [], []
        for start in range(0, len(queries), 128):
            block = torch.from_numpy(np.ascontiguousarray(queries[start : start + 128], dtype=np.float32))
            block = block.to(self.corpus.device)
            best_scores = best_indices = None
            for offset in range(0, self.ntotal, self.corpus_chunk_size):
                chunk = self.corpus[offset : offset + self.corpus_chunk_size]
                scores, indices = torch.topk(block @ chunk.T, min(k, len(chunk)), dim=1)
                indices += offset
                if best_scores is not None:
                    scores = torch.cat([best_scores, scores], dim=1)
                    indices = torch.cat([best_indices, indices], dim=1)
                    scores, picked = torch.topk(scores, k, dim=1)
                    indices = torch.gather(indices, 1, picked)
                best_scores, best_indices = scores, indices
            all_scores.append(best_scores.cpu().numpy())
            all_indices.append(best_indices.cpu().numpy())
        return order_hits(np.concatenate(all_scores), np.concatenate(all_indices))


class FaissIndex:
    """A faiss inner-product index over the corpus (see the module docstring for the kinds and parameters).

    Args:
        store: The corpus embeddings, added shard by shard (the index holds the only float32 copy).
        kind: ``"flat"``, ``"ivf"`` or ``"hnsw"``.
        options: :class:`IndexOptions`.
        show_progress_bar: Show progress while adding the shards.

    Raises:
        ImportError: If faiss is not installed, with the install command.

    Example:
        ::

            index = FaissIndex(store, "ivf", IndexOptions(nprobe=32))
    """

    def __init__(
        self,
        store: EmbeddingStore,
        kind: str = "flat",
        options: IndexOptions | None = None,
        show_progress_bar: bool = False,
    ) -> None:
        from tqdm.auto import tqdm

        faiss = import_faiss()
        options = options or IndexOptions()
        dim, count = store.dim, len(store)
        self.kind, self.options, self.ntotal = kind, options, count
        self.cpu_index = None
        if kind == "flat":
            index = faiss.IndexFlatIP(dim)
        elif kind == "ivf":
            nlist = options.nlist or max(1, min(round(4 * math.sqrt(count)), count // 39))
            if nlist > count:
                raise ValueError(f"`index_options.nlist`={nlist} exceeds the corpus ({count} texts); lower it.")
            quantizer = faiss.IndexFlatIP(dim)
            index = faiss.IndexIVFFlat(quantizer, dim, nlist, faiss.METRIC_INNER_PRODUCT)
            sample = min(count, options.train_size or 64 * nlist)
            rows = np.sort(np.random.default_rng(options.seed).choice(count, size=sample, replace=False))
            index.cp.seed = options.seed
            index.train(store.rows(rows))
            index.nprobe = min(options.nprobe, nlist)
            self.quantizer = quantizer  # faiss does not own it from Python: keep it alive
            logger.info("IVF index: %d cells trained on %d rows, nprobe %d.", nlist, sample, index.nprobe)
        elif kind == "hnsw":
            index = faiss.IndexHNSWFlat(dim, options.hnsw_m, faiss.METRIC_INNER_PRODUCT)
            index.hnsw.efConstruction = options.ef_construction
        else:
            raise ValueError(f"`index` must be one of {INDEXES}; got {kind!r}.")
        for number in tqdm(range(len(store.shards)), desc=f"Building {kind} index", disable=not show_progress_bar):
            index.add(store.read_block(number))
        self.gpu = False
        if kind == "flat" and getattr(faiss, "get_num_gpus", lambda: 0)() > 0:
            self.cpu_index = index
            index = faiss.index_cpu_to_all_gpus(index)
            self.gpu = True
        self.index = index

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """The top ``k`` rows of each query (see the module docstring)."""
        k = min(k, self.ntotal)
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        index = self.index
        if self.gpu and k > FAISS_GPU_MAX_K:
            index = self.cpu_index  # deeper than a GPU search goes: the CPU copy, exact as well
        if self.kind == "hnsw":
            index.hnsw.efSearch = max(self.options.ef_search, k)
        scores, indices = index.search(queries, k)
        return order_hits(scores, indices)


def import_faiss() -> Any:
    """``import faiss``, or an ImportError that says how to install it.

    Example:
        ::

            faiss = import_faiss()
    """
    try:
        import faiss
    except ImportError:
        raise ImportError(
            'faiss is not installed: pip install "codiemb-st[faiss]" (faiss-cpu; or install faiss-gpu), or mine '
            'with index="dense" (--index dense), the exact torch search.'
        ) from None
    return faiss


def build_index(
    store: EmbeddingStore,
    kind: str = "dense",
    *,
    device: Any = "cpu",
    corpus_chunk_size: int = 100_000,
    options: IndexOptions | None = None,
    show_progress_bar: bool = False,
) -> DenseIndex | FaissIndex:
    """The index of ``kind`` over ``store`` (see the module docstring).

    Raises:
        ValueError: For an unknown ``kind``.
        ImportError: For a faiss kind without faiss.

    Example:
        ::

            index = build_index(store, "flat")
            scores, indices = index.search(store.rows([0]), 5)  # row 0 first, score 1.0
    """
    if kind == "dense":
        return DenseIndex(store, device, corpus_chunk_size)
    if kind not in INDEXES:
        raise ValueError(f"`index` must be one of {INDEXES}; got {kind!r}.")
    return FaissIndex(store, kind, options, show_progress_bar)


__all__ = ["FAISS_GPU_MAX_K", "INDEXES", "DenseIndex", "FaissIndex", "IndexOptions", "build_index", "import_faiss"]
