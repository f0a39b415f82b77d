"""``codiemb-st score``: add teacher scores to IR records, for distillation (codiemb_st.scoring).

Every (query, positive) and (query, negative) pair of the input is scored by the teacher: a cross-encoder (its raw
logit; sentence-transformers' CrossEncoder) or a bi-encoder (the cosine similarity of its query and document
embeddings, with its own prompts). The output is the input's format with the scores in its score fields
(positive_scores/negative_scores, pos_scores/neg_scores, or a list `label` column), ready for
`codiemb-st train --distill-weight`. Finished records are kept in a hidden progress file beside the output: a run
killed part-way continues where it stopped when started again; the output is written once, at the end.

Examples:
    codiemb-st score pairs_mined.jsonl --teacher models/bge-reranker-base --output pairs_scored.jsonl
    codiemb-st score flag_train.jsonl --teacher models/e5-large --teacher-type bi-encoder --output flag_scored.jsonl
"""

from __future__ import annotations

import argparse
from pathlib import Path

from codiemb_st.cli.model_source import resolve_model_folder
from codiemb_st.cli.options import positive_int
from codiemb_st.cli.output_rule import check_output_apart
from codiemb_st.cli.usage_error import UsageError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``codiemb-st score``."""
    parser.add_argument("input", type=Path, help="IR record file (unified, FlagEmbedding or sentence-transformers)")
    parser.add_argument("--teacher", required=True, help="teacher model folder or hub name")
    parser.add_argument(
        "--teacher-type",
        choices=["auto", "cross-encoder", "bi-encoder"],
        default="auto",
        help="how to load the teacher; auto: a CrossEncoder folder (or *ForSequenceClassification) is a "
        "cross-encoder, anything else a bi-encoder",
    )
    parser.add_argument(
        "--output", type=Path, required=True, help="output file (.jsonl, .jsonl.gz; columns: .csv/.parquet)"
    )
    parser.add_argument("--batch-size", type=positive_int, default=32, help="pairs per teacher batch")
    parser.add_argument("--chunk-size", type=positive_int, default=256, help="records scored between progress saves")
    parser.add_argument(
        "--max-seq-length", type=positive_int, default=None, help="truncate pairs to N tokens (default: the teacher's)"
    )
    parser.add_argument(
        "--restart", action="store_true", help="ignore the progress of an earlier run and score everything again"
    )
    parser.add_argument(
        "--cache-dir",
        type=Path,
        default=None,
        help="embedding cache of a bi-encoder teacher, shared with `codiemb-st mine --cache-dir` (default: none)",
    )
    parser.add_argument(
        "--cache-dtype",
        choices=["float32", "float16"],
        default="float32",
        help="dtype of embeddings added to the cache",
    )


def progress_path(output: Path) -> Path:
    """The hidden progress file of an output: ``.NAME.score-progress.jsonl`` beside it."""
    return output.with_name(f".{output.name}.score-progress.jsonl")


def run(args: argparse.Namespace) -> int:
    """Run ``codiemb-st score`` with parsed arguments; returns the exit code."""
    if not args.input.is_file():
        raise UsageError(f"Input file {args.input} not found.")
    inputs = [("input file", args.input)]
    if Path(args.teacher).expanduser().exists():
        inputs.append(("--teacher", args.teacher))
    check_output_apart(args.output, "--output", inputs)
    if args.cache_dir is not None:
        check_output_apart(args.cache_dir, "--cache-dir", inputs)
    teacher_name, note = resolve_model_folder(args.teacher, "--teacher")
    if note:
        print(f"note: {note}")

    import torch

    from codiemb_st.file_io import folder_fingerprint
    from codiemb_st.mining import check_records_path, write_ir_records
    from codiemb_st.record_formats import read_ir_records
    from codiemb_st.scoring import load_teacher, score_records

    try:
        records = read_ir_records(args.input)  # bad records are reported before the teacher is loaded
        check_records_path(args.output, records.format)
    except (ValueError, TypeError) as error:
        raise UsageError(str(error)) from None
    try:
        teacher = load_teacher(teacher_name, args.teacher_type, device="cuda" if torch.cuda.is_available() else "cpu")
    except (OSError, ValueError) as error:
        first_line = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise UsageError(f"Could not load --teacher {teacher_name!r}: {first_line}") from None
    if args.max_seq_length:
        teacher.max_seq_length = args.max_seq_length
    folder = Path(teacher_name)
    teacher_id = f"{type(teacher).__name__}:{folder.resolve() if folder.is_dir() else teacher_name}"
    if folder.is_dir():
        teacher_id += f":{folder_fingerprint(folder)}"
    teacher_id += f":{teacher.max_seq_length}"
    progress = progress_path(args.output)
    if args.restart:
        progress.unlink(missing_ok=True)
    try:
        scored = score_records(
            records,
            teacher,
            batch_size=args.batch_size,
            chunk_size=args.chunk_size,
            progress_file=progress,
            teacher_id=teacher_id,
            cache_dir=args.cache_dir,
            cache_dtype=args.cache_dtype,
        )
    except (ValueError, TypeError) as error:
        raise UsageError(str(error)) from None
    try:
        write_ir_records(scored, args.output)
    except ValueError as error:
        raise UsageError(str(error)) from None
    except OSError as error:  # a full disk: the progress file is kept, a rerun only writes the output
        raise UsageError(
            f"Could not write --output {args.output}: {error.strerror or error}; nothing was written (the scores are "
            f"kept in {progress}: run the command again)."
        ) from None
    progress.unlink(missing_ok=True)
    pairs = sum(len(r["positives"]) + len(r["negatives"]) for r in scored.records)
    print(
        f"Scored {args.output}: {len(scored.records)} queries ({scored.format} format), {pairs} pairs, teacher "
        f"{type(teacher).__name__} {teacher_name}."
    )
    return 0


__all__ = ["add_arguments", "progress_path", "run"]
