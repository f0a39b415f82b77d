"""The CoDiEmb reproduction's runs: tracks, run kinds, budgets, and one training/merge/evaluation step each.

``benchmarks/reproduce_codiemb.py`` declares the command line and calls :func:`run_track`
(:mod:`studies.reproduction_study`); this module holds what one run, soup or evaluation is, on top of the library's
generic layer (:mod:`codiemb_st.experiments`).

Example:
    >>> from studies.reproduction import RUNS, run_steps
    >>> run_steps("codiemb", "equal-updates", 75), run_steps("ir_only", "equal-updates", 75)
    (150, 75)
"""

from __future__ import annotations

import argparse
import gc
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from codiemb_st.experiments import (
    cached_json,
    count_task_updates,
    finished_run,
    load_base,
    merge_once,
    record_fingerprint,
    train_to_folder,
)
from codiemb_st.file_io import json_safe
from codiemb_st.shared_data import find_shared_data

SHARED_DATA = find_shared_data() or Path("shared/data")
SHARED_TRAIN, SHARED_EVAL = SHARED_DATA / "train", SHARED_DATA / "eval"
E5_BUILDER = SHARED_DATA.parent / "tools" / "make_multilingual_e5_small.py"
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


def make_track(name: str) -> Track:
    """The ``en`` or ``zh`` track on ../shared/data."""
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


@dataclass(frozen=True)
class RunSpec:
    """One kind of trained run.

    Args:
        tasks: The tasks whose data it trains on.
        sampler: ``"round_robin"`` (RoundRobinTaskBatchSampler) or ``"proportional"`` (sentence-transformers').
        sts_loss: How STS data is trained: ``"pearson_spearman"``, ``"cosent"``, or ``"infonce"`` (naive: STS pairs in
            the top of their score range become InfoNCE pairs).
        sts_options: Options of PearsonSpearmanLoss (an ablation).
        ir_loss: ``"multi_positive"`` (:class:`~codiemb_st.MultiPositiveCachedInfoNCELoss`) or ``"mnrl"``
            (sentence-transformers' ``MultipleNegativesRankingLoss``: the baseline a sentence-transformers user writes).
        ablation: A baseline/ablation run (may be trained with fewer seeds: ``--ablation-seeds``).
        description: One line for the report.
    """

    tasks: tuple[str, ...]
    sampler: str
    sts_loss: str = "pearson_spearman"
    sts_options: tuple[tuple[str, Any], ...] = ()
    ir_loss: str = "multi_positive"
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
    "st_baseline": RunSpec(
        ("ir", "sts"),
        "proportional",
        sts_loss="cosent",
        ir_loss="mnrl",
        ablation=True,
        description="sentence-transformers today: MultipleNegativesRankingLoss + CoSENTLoss, PROPORTIONAL sampler",
    ),
}
MAIN_RUNS = tuple(name for name, spec in RUNS.items() if not spec.ablation)
BUDGETS = ("equal-updates", "equal-steps")


def run_steps(run: str, budget: str, steps_per_task: int) -> int:
    """Optimizer steps of a run under a budget.

    ``equal-updates`` (the paper's protocol): a specialist trains its task for ``steps_per_task`` steps; every joint
    run trains ``steps_per_task`` x (number of tasks) steps, so CoDiEmb's alternating sampler gives each task as many
    updates as its specialist, and naive co-training and the other joint runs get the same total as CoDiEmb.
    ``equal-steps``: every run gets ``steps_per_task`` steps (joint runs then give each task about half).

    Raises:
        ValueError: If ``budget`` is not one of :data:`BUDGETS`.
    """
    if budget not in BUDGETS:
        raise ValueError(f"budget must be one of {BUDGETS}, got {budget!r}.")
    return steps_per_task if budget == "equal-steps" else steps_per_task * len(RUNS[run].tasks)


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


@dataclass
class TrainData:
    """Training records after the dev hold-out, by dataset name."""

    ir: dict[str, list[dict[str, Any]]]
    sts: dict[str, list[dict[str, Any]]]


def run_config(run: str, seed: int, track: Track, base: str, args: argparse.Namespace) -> dict[str, Any]:
    """The configuration a finished run is recognised by (``run_config.json``)."""
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
    # Teacher options (issue 30) enter the key only when set, so that earlier finished runs stay valid.
    teacher = {
        "ir_loss_options": dict(getattr(args, "ir_loss_options", None) or {}),
        "guide": getattr(args, "guide", None),
        "teacher_scores": bool(getattr(args, "teacher_scores", False)),
    }
    config.update({key: value for key, value in teacher.items() if value})
    if spec.ir_loss != "multi_positive":
        config["ir_loss"] = spec.ir_loss
    if spec.sts_loss == "infonce":
        config["naive_threshold"] = args.naive_threshold
    return config


def train_run(run: str, seed: int, track: Track, base: str, data: TrainData, args, output: Path) -> dict[str, Any]:
    """Train one run into ``output`` (reused when a finished run with the same configuration is there)."""
    from codiemb_st import ir_dataset_from_records, recipe

    spec = RUNS[run]
    config = run_config(run, seed, track, base, args)
    log = finished_run(output, config)
    if log is not None:
        print(f"[{track.name}] {run} seed {seed}: reusing the finished run in {output}", file=sys.stderr)
        return log
    model = load_base(base, args.max_seq_length, args.freeze_embeddings)
    # One dataset per file: IR files (and, for naive co-training, STS files as IR pairs) and STS files.
    ir_sources = dict(data.ir) if "ir" in spec.tasks else {}
    sts_sources = dict(data.sts) if "sts" in spec.tasks and spec.sts_loss != "infonce" else {}
    ir_options = dict(getattr(args, "ir_loss_options", None) or {})
    distils = bool(ir_options.get("distillation_weight")) and spec.ir_loss == "multi_positive"
    datasets = recipe.load_task_datasets(
        ir_sources, sts_sources, num_positives=1, num_negatives=args.num_negatives, seed=seed, teacher_scores=distils
    )
    if spec.sts_loss == "infonce":
        for name, records in data.sts.items():
            pairs = naive_pairs(records, args.naive_threshold)
            if pairs:
                datasets.datasets[name] = ir_dataset_from_records(pairs, num_positives=1, num_negatives=0, seed=seed)
                datasets.ir.append(name)
    guide = None
    if getattr(args, "guide", None) and spec.ir_loss == "multi_positive":
        from sentence_transformers import SentenceTransformer

        guide = SentenceTransformer(args.guide, device="cpu")
        guide.max_seq_length = model.max_seq_length
    losses = recipe.build_task_losses(
        model,
        datasets,
        temperature=args.temperature,
        mini_batch_size=args.mini_batch_size,
        sts_loss="cosent" if spec.sts_loss == "cosent" else "pearson_spearman",
        ir_loss_options=ir_options if spec.ir_loss == "multi_positive" else None,
        guide=guide,
        **dict(spec.sts_options),
    )
    if spec.ir_loss == "mnrl":
        from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss

        mnrl = MultipleNegativesRankingLoss(model, scale=1.0 / args.temperature)
        losses.update({name: mnrl for name in datasets.ir})
    updates = count_task_updates(datasets, losses)
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
    rows = {name: len(d) for name, d in datasets.datasets.items()}
    extra = {"updates_per_task": updates, "rows": rows}
    log = train_to_folder(model, datasets, losses, training_args, output, config, extra_log=extra)
    print(
        f"[{track.name}] {run} seed {seed}: {log['steps']} steps {updates} in {log['seconds']:.0f} s", file=sys.stderr
    )
    return log


def merge_runs(method_name: str, ingredients: list[Path], base: str, output: Path, args) -> dict[str, Any]:
    """``delta_soup`` or ``model_soup`` of a seed's runs into ``output`` (redone when an ingredient changed)."""
    from codiemb_st import DeltaSoup, ModelSoup

    method = DeltaSoup(power=args.delta_power) if method_name == "delta_soup" else ModelSoup()
    config = {
        "method": repr(method),
        "ingredients": [str(p) for p in ingredients],
        "base": base,
        "fingerprints": [record_fingerprint(p) for p in ingredients],
    }
    return merge_once(method, ingredients, base, output, "soup_config.json", config)


def evaluate(label: str, path: str, tasks, prompts, geometry_texts, args, cache: Path) -> dict[str, Any]:
    """Main scores and embedding geometry of one model, cached in ``cache`` under its evaluation key (the model's
    path and :func:`~codiemb_st.experiments.store.record_fingerprint` plus the evaluation recipe)."""
    key = {
        "model": path,
        "fingerprint": record_fingerprint(path) if Path(path).is_dir() else None,
        "tasks": [t.name for t in tasks],
        "prompts": prompts,
        "max_seq_length": args.eval_max_seq_length,
        "corpus_cap": args.corpus_cap,
        "sts_pair_cap": args.sts_pair_cap,
        "eval_seed": args.eval_seed,
        "geometry": len(geometry_texts[0]),
    }

    def compute() -> dict[str, Any]:
        from sentence_transformers import SentenceTransformer

        from codiemb_st.evaluation import evaluate_model, model_geometry

        model = SentenceTransformer(path)
        model.max_seq_length = args.eval_max_seq_length
        tick = time.perf_counter()
        scores = evaluate_model(model, tasks, prompts=prompts, batch_size=args.eval_batch_size, show_progress_bar=True)
        texts, pairs = geometry_texts
        prefix = (prompts or {}).get("STS", "")
        prefixed_pairs = [(prefix + a, prefix + b) for a, b in pairs]
        geometry = model_geometry(model, [prefix + t for t in texts], prefixed_pairs, batch_size=args.eval_batch_size)
        result = {
            "label": label,
            "scores": {s.name: s.main_score for s in scores},
            "types": {s.name: s.type for s in scores},
            "geometry": json_safe(geometry),
            "seconds": time.perf_counter() - tick,
        }
        del model
        gc.collect()
        return result

    return cached_json(cache, key, compute)


__all__ = [
    "BUDGETS",
    "MAIN_RUNS",
    "RUNS",
    "TRACK_DEFAULTS",
    "RunSpec",
    "Track",
    "TrainData",
    "evaluate",
    "merge_runs",
    "naive_pairs",
    "run_config",
    "run_steps",
    "make_track",
    "train_run",
]
