"""``codiemb-st mine``: give IR records mined hard negatives (multi-positive; see codiemb_st.mining).

The input may be in any of the three record formats (unified, FlagEmbedding, sentence-transformers columns); the
output is written in the same format. The corpus is every positive of the input plus the --corpus files (.txt one
text a line, or JSONL/JSON/CSV/Parquet with a `text` column). No positive of a query, and no text whose token ids
equal one, is ever one of its negatives; candidates scoring above (1 - margin) x the query's lowest positive score
are skipped; negatives are drawn from ranks --range-min..--range-max of what is left.

Examples:
    codiemb-st mine pairs.jsonl --output pairs_mined.jsonl --num-negatives 4
    codiemb-st mine flag_train.jsonl --corpus passages.txt --model BAAI/bge-small-en-v1.5 --output flag_mined.jsonl
    codiemb-st mine st_pairs.parquet --output st_mined.jsonl --sampling top --range-min 0 --range-max 50
    codiemb-st mine pairs.jsonl --corpus passages.txt --cache-dir cache --faiss --output pairs_mined.jsonl
    codiemb-st mine pairs.jsonl --corpus passages.txt --cache-dir cache --range-min 10 --output pairs_mined2.jsonl
    codiemb-st mine pairs.jsonl --cross-encoder cross-encoder/ms-marco-MiniLM-L6-v2 --output-scores --output s.jsonl
    torchrun --nproc_per_node 4 -m codiemb_st mine pairs.jsonl --cache-dir /shared/cache --output pairs_mined.jsonl

With --cache-dir, the corpus and query embeddings are written there once (memory-mapped shards, keyed by the
model's content, prompt, max_seq_length and texts) and every later call reads them, whatever its window, margin,
sampling or N; a killed run resumes from the shards it wrote. Under torchrun each rank encodes its share of the
shards into --cache-dir (required there) and searches its share of the queries; rank 0 writes --output.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from codiemb_st.cli.model_source import default_model_or_usage_error, resolve_model_folder
from codiemb_st.cli.options import non_negative_int, positive_int, unit_interval
from codiemb_st.cli.output_rule import check_output_apart
from codiemb_st.cli.usage_error import UsageError
from codiemb_st.mining.cache import CACHE_DTYPES, SHARD_SIZE
from codiemb_st.mining.search import INDEXES, IndexOptions

logger = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``codiemb-st mine``."""
    parser.add_argument("input", type=Path, help="IR record file (unified, FlagEmbedding or sentence-transformers)")
    parser.add_argument(
        "--output", type=Path, required=True, help="output file (.jsonl, .jsonl.gz; columns: .csv/.parquet)"
    )
    parser.add_argument("--model", default=None, help="model path or name (default: packaged all-MiniLM-L6-v2)")
    parser.add_argument(
        "--corpus",
        nargs="+",
        type=Path,
        default=[],
        help="extra corpus files: .txt(.gz) one text a line, or JSONL/JSON/CSV/Parquet with a `text` column (default: none; the corpus is then the positives of the input)",
    )
    parser.add_argument("--num-negatives", type=positive_int, default=4, help="negatives per query (N)")
    parser.add_argument("--range-min", type=non_negative_int, default=2, help="first rank of the window")
    parser.add_argument("--range-max", type=positive_int, default=200, help="end of the window")
    parser.add_argument(
        "--margin", type=unit_interval, default=0.05, help="relative margin to the lowest positive score"
    )
    parser.add_argument("--no-margin", action="store_true", help="turn the margin filter off")
    parser.add_argument(
        "--sampling",
        choices=["random", "top"],
        default="random",
        help="draw N of the window at random (seeded) or take its top N",
    )
    parser.add_argument(
        "--keep-negatives", action="store_true", help="keep each record's own negatives and mine only the missing ones"
    )
    parser.add_argument("--query-prompt", default=None, help="prompt text for queries (default: the model's 'query')")
    parser.add_argument("--corpus-prompt", default=None, help="prompt text for the corpus (default: the model's)")
    parser.add_argument("--batch-size", type=positive_int, default=32, help="encoding batch size")
    parser.add_argument("--query-chunk-size", type=positive_int, default=1024, help="queries searched at a time")
    parser.add_argument(
        "--max-seq-length", type=positive_int, default=None, help="truncate texts to N tokens (default: the model's)"
    )
    parser.add_argument(
        "--multi-process",
        nargs="*",
        default=None,
        help="encode with a process pool: no value = all GPUs or 4 CPU "
        "processes, or a list of devices (cuda:0 cuda:1 ...); default: off",
    )
    parser.add_argument("--seed", type=non_negative_int, default=0, help="seed of the random draw")
    parser.add_argument(
        "--cache-dir",
        type=Path,
        default=None,
        help="embedding cache folder: encode once, re-mine from it, resume a killed run (default: none, nothing "
        "is cached; required under torchrun)",
    )
    parser.add_argument(
        "--cache-dtype", choices=list(CACHE_DTYPES), default="float32", help="dtype of the cached embeddings"
    )
    parser.add_argument(
        "--cache-shard-size",
        type=positive_int,
        default=SHARD_SIZE,
        help="texts per cache shard (the most a kill loses)",
    )
    parser.add_argument(
        "--index",
        choices=list(INDEXES),
        default="dense",
        help="search: dense (exact, torch), flat (exact, faiss), ivf or hnsw (approximate, faiss)",
    )
    parser.add_argument("--faiss", action="store_true", help="shorthand for --index flat (exact faiss search)")
    defaults = IndexOptions()
    parser.add_argument(
        "--ivf-nlist", type=positive_int, default=None, help="IVF cells (default: 4 x sqrt(corpus size))"
    )
    parser.add_argument("--ivf-nprobe", type=positive_int, default=defaults.nprobe, help="IVF cells visited per query")
    parser.add_argument("--hnsw-m", type=positive_int, default=defaults.hnsw_m, help="HNSW links per node")
    parser.add_argument(
        "--hnsw-ef-search",
        type=positive_int,
        default=defaults.ef_search,
        help="HNSW search depth (at least the k searched)",
    )
    parser.add_argument(
        "--cross-encoder",
        default=None,
        metavar="MODEL",
        help="re-score the candidates and positives with this CrossEncoder (path or hub id) before the margin and "
        "the window (default: none, the bi-encoder's scores)",
    )
    parser.add_argument(
        "--output-scores",
        action="store_true",
        help="write the ranking model's score of every positive and negative (unified positive_scores/"
        "negative_scores, FlagEmbedding pos_scores/neg_scores, sentence-transformers label) for distillation",
    )


def run(args: argparse.Namespace) -> int:
    """Run ``codiemb-st mine`` with parsed arguments; returns the exit code."""
    import torch
    import torch.distributed as dist

    from codiemb_st.mining.distributed import init_from_environment

    started = init_from_environment()  # under torchrun: one process group for the ranks
    try:
        return _run(args, torch.device(f"cuda:{torch.cuda.current_device()}") if torch.cuda.is_available() else "cpu")
    finally:
        if started:
            dist.destroy_process_group()


def _run(args: argparse.Namespace, device: object) -> int:
    from sentence_transformers import SentenceTransformer

    from codiemb_st.mining import check_records_path, mine_hard_negatives, read_corpus, write_ir_records
    from codiemb_st.mining.distributed import RankContext
    from codiemb_st.record_formats import read_ir_records

    if not args.input.is_file():
        raise UsageError(f"Input file {args.input} not found.")
    for corpus in args.corpus:
        if not corpus.is_file():
            raise UsageError(f"--corpus file {corpus} not found.")
    inputs = [("input file", args.input), *(("--corpus file", corpus) for corpus in args.corpus)]
    if args.model is not None and Path(args.model).expanduser().exists():
        inputs.append(("--model", args.model))
    if args.cross_encoder is not None and Path(args.cross_encoder).expanduser().exists():
        inputs.append(("--cross-encoder", args.cross_encoder))
    check_output_apart(args.output, "--output", inputs)
    if args.cache_dir is not None:
        # The cache is written too: never onto, or inside, what the command reads (a model folder, say).
        check_output_apart(args.cache_dir, "--cache-dir", inputs)
        if args.cache_dir.exists() and not args.cache_dir.is_dir():
            raise UsageError(f"--cache-dir {args.cache_dir} is a file; give a folder (it is created if missing).")
    context = RankContext.current()
    if context.world_size > 1 and args.cache_dir is None:
        raise UsageError(
            f"Mining on {context.world_size} ranks (torchrun) shares the embeddings through --cache-dir: give one on "
            "a filesystem every rank sees."
        )
    index = "flat" if args.faiss and args.index == "dense" else args.index
    if index != "dense":
        from codiemb_st.mining.search import import_faiss

        try:
            import_faiss()
        except ImportError as error:
            raise UsageError(f"--index {index}: {error}") from None
    if args.model is not None:
        # One line in seconds, not a minute of hub retries; a training output folder means its final/ model.
        args.model, note = resolve_model_folder(args.model, "--model")
        if note and context.rank == 0:
            print(f"note: {note}")
    try:
        # Bad records, corpus files and output names are reported before the model is loaded.
        records = read_ir_records(args.input)
        corpus = [read_corpus(path) for path in args.corpus]
        check_records_path(args.output, records.format)
    except (ValueError, TypeError) as error:
        raise UsageError(str(error)) from None
    model_name = args.model or default_model_or_usage_error()
    try:
        model = SentenceTransformer(model_name, device=str(device))
    except (OSError, ValueError) as error:
        first_line = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise UsageError(f"Could not load --model {model_name!r}: {first_line}") from None
    if args.max_seq_length:
        model.max_seq_length = args.max_seq_length
    multi_process: bool | list[str] = False
    if args.multi_process is not None:
        multi_process = list(args.multi_process) or True
    index_options = IndexOptions(
        nlist=args.ivf_nlist, nprobe=args.ivf_nprobe, hnsw_m=args.hnsw_m, ef_search=args.hnsw_ef_search, seed=args.seed
    )
    try:
        mined, stats = mine_hard_negatives(
            records,
            model,
            num_negatives=args.num_negatives,
            corpus=corpus,
            range_min=args.range_min,
            range_max=args.range_max,
            margin=None if args.no_margin else args.margin,
            sampling=args.sampling,
            keep_negatives=args.keep_negatives,
            query_prompt=args.query_prompt,
            corpus_prompt=args.corpus_prompt,
            batch_size=args.batch_size,
            query_chunk_size=args.query_chunk_size,
            use_multi_process=multi_process,
            seed=args.seed,
            cache_dir=args.cache_dir,
            cache_dtype=args.cache_dtype,
            cache_shard_size=args.cache_shard_size,
            index=index,
            index_options=index_options,
            cross_encoder=args.cross_encoder,
            output_scores=args.output_scores,
        )
    except (ValueError, TypeError, FileNotFoundError) as error:
        raise UsageError(str(error)) from None
    if context.rank != 0:  # every rank holds the same records; rank 0 writes them
        return 0
    try:
        write_ir_records(mined, args.output)
    except ValueError as error:
        raise UsageError(str(error)) from None
    except OSError as error:  # a full disk, no permission: nothing was written (the write is atomic)
        raise UsageError(
            f"Could not write --output {args.output}: {error.strerror or error}; nothing was written."
        ) from None
    print(
        f"Mined {args.output}: {stats.queries} queries ({mined.format} format), corpus of {stats.corpus} texts; "
        f"mean score positive {stats.positive_score_mean:.4f}, negative {stats.negative_score_mean:.4f}; "
        f"{stats.short} queries got fewer than {args.num_negatives} negatives."
    )
    return 0


__all__ = ["add_arguments", "run"]
