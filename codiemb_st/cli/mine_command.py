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
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from codiemb_st.cli.model_source import resolve_model_folder
from codiemb_st.cli.options import non_negative_int, positive_int, unit_interval
from codiemb_st.cli.output_rule import check_output_apart
from codiemb_st.cli.usage_error import UsageError

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
    parser.add_argument("--seed", type=int, default=0, help="seed of the random draw")


def run(args: argparse.Namespace) -> int:
    """Run ``codiemb-st mine`` with parsed arguments; returns the exit code."""
    import torch
    from sentence_transformers import SentenceTransformer

    from codiemb_st.cli.train_command import _default_model
    from codiemb_st.data import read_ir_records
    from codiemb_st.mining import check_records_path, mine_hard_negatives, read_corpus, write_ir_records

    if not args.input.is_file():
        raise UsageError(f"Input file {args.input} not found.")
    for corpus in args.corpus:
        if not corpus.is_file():
            raise UsageError(f"--corpus file {corpus} not found.")
    inputs = [("input file", args.input), *(("--corpus file", corpus) for corpus in args.corpus)]
    if args.model is not None and Path(args.model).expanduser().exists():
        inputs.append(("--model", args.model))
    check_output_apart(args.output, "--output", inputs)
    if args.model is not None:
        # One line in seconds, not a minute of hub retries; a training output folder means its final/ model.
        args.model, note = resolve_model_folder(args.model, "--model")
        if note:
            print(f"note: {note}")
    try:
        # Bad records, corpus files and output names are reported before the model is loaded.
        records = read_ir_records(args.input)
        corpus = [read_corpus(path) for path in args.corpus]
        check_records_path(args.output, records.format)
    except (ValueError, TypeError) as error:
        raise UsageError(str(error)) from None
    model_name = args.model or _default_model()
    try:
        model = SentenceTransformer(model_name, device="cuda" if torch.cuda.is_available() else "cpu")
    except (OSError, ValueError) as error:
        first_line = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise UsageError(f"Could not load --model {model_name!r}: {first_line}") from None
    if args.max_seq_length:
        model.max_seq_length = args.max_seq_length
    multi_process: bool | list[str] = False
    if args.multi_process is not None:
        multi_process = list(args.multi_process) or True
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
        )
    except (ValueError, TypeError, FileNotFoundError) as error:
        raise UsageError(str(error)) from None
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
