"""Multi-positive hard-negative mining on sentence-transformers' encoders, with an embedding cache, exact or faiss
search, cross-encoder re-scoring, teacher scores out and torchrun shards.

sentence-transformers' :func:`~sentence_transformers.util.mine_hard_negatives` embeds a corpus, searches it and
filters candidates (rank window, NV-Retriever's positive-aware margin); its outputs hold one positive per row. This
package uses the same building blocks (``encode_query``/``encode_document`` with the model's prompts and an optional
multi-process pool, the same relative-margin rule, ``CrossEncoder.predict`` re-scoring, faiss) on multi-positive
records, and adds the rule the IR loss relies on: no positive of a query, and no text whose token ids equal one (the
loss's duplicate rule), is ever one of its negatives.

One concept a module: :mod:`~codiemb_st.mining.corpus` (reading corpus files), :mod:`~codiemb_st.mining.cache`
(encoding in shards, the embedding cache), :mod:`~codiemb_st.mining.search` (dense and faiss indexes),
:mod:`~codiemb_st.mining.distributed` (torchrun ranks), :mod:`~codiemb_st.mining.miner` (the filters, the window, the
draw, the scores) and :mod:`~codiemb_st.mining.output` (writing records with their score fields).

Memory does not grow with corpus x queries, nor beyond the corpus embeddings: the corpus embeddings are held once
(by the index), texts once (one dict and one list of the same strings), and queries are searched in chunks of
``query_chunk_size`` whose candidate lists are turned into negatives before the next chunk is searched.

Example:
    ::

        from codiemb_st.mining import mine_hard_negatives, write_ir_records

        records, stats = mine_hard_negatives("pairs.jsonl", model, corpus=["passages.txt"], cache_dir="cache")
        write_ir_records(records, "pairs_mined.jsonl")
"""

from __future__ import annotations

from codiemb_st.mining.cache import EmbeddingStore, embed_texts, encoder_fingerprint
from codiemb_st.mining.corpus import read_corpus
from codiemb_st.mining.miner import MiningStats, mine_hard_negatives
from codiemb_st.mining.output import check_records_path, ir_records_as_rows, write_ir_records
from codiemb_st.mining.search import IndexOptions, build_index

__all__ = [
    "EmbeddingStore",
    "IndexOptions",
    "MiningStats",
    "build_index",
    "check_records_path",
    "embed_texts",
    "encoder_fingerprint",
    "ir_records_as_rows",
    "mine_hard_negatives",
    "read_corpus",
    "write_ir_records",
]
