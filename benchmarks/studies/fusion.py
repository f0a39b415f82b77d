"""The fusion study's declarations and steps: ingredient runs, checkpoint sets, the merge grid, and the study that
holds them (trained here, or read from a reproduction's track folder).

``benchmarks/fusion_study.py`` parses its command line and calls :func:`studies.fusion_study.run_study`; the runs,
merges and cached evaluations go through the library's generic layer (:mod:`codiemb_st.experiments`).

Example:
    >>> from studies.fusion import GRID, SETS
    >>> SETS["S2_tasks"]
    ['codiemb_s1', 'ir_only', 'sts_only']
"""

from __future__ import annotations

import json
import random
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from codiemb_st.evaluation.aggregates import aggregate_main_scores
from codiemb_st.experiments import (
    DEFAULT_DEV_SEED,
    CachedEvaluator,
    ExperimentError,
    finished_run,
    hold_out,
    load_base,
    merge_once,
    record_fingerprint,
    train_to_folder,
    write_dev_tasks,
)
from codiemb_st.shared_data import find_shared_data

SHARED_DATA = find_shared_data() or Path("shared/data")
TRAIN, EVAL = SHARED_DATA / "train", SHARED_DATA / "eval"
IR_FILES = [TRAIN / "en_scifact.jsonl.gz", TRAIN / "en_snli.jsonl.gz"]
STS_FILES = [TRAIN / "en_stsb.jsonl.gz"]
TEST_TASKS = ["STSBenchmark", "SciFact"]
#: The trained study's hold-out seed; a study of a reproduction's runs holds out with the reproduction's
#: (:data:`~codiemb_st.experiments.held_out.DEFAULT_DEV_SEED`).
FUSION_DEV_SEED = "codiemb-fusion-dev-split"
#: The ingredient runs: kind (which losses/data), seed, learning rate (multiplies --lr), checkpoint fractions kept.
RUNS: dict[str, dict[str, Any]] = {
    "codiemb_s1": {"kind": "codiemb", "seed": 1, "lr": 1.0, "keep": (1 / 3, 2 / 3)},
    "ir_only": {"kind": "ir_only", "seed": 1, "lr": 1.0},
    "sts_only": {"kind": "sts_only", "seed": 1, "lr": 1.0},
    "codiemb_s2": {"kind": "codiemb", "seed": 2, "lr": 1.0},
    "codiemb_s3": {"kind": "codiemb", "seed": 3, "lr": 1.0},
    "codiemb_lr_low": {"kind": "codiemb", "seed": 4, "lr": 0.3},
    "codiemb_lr_high": {"kind": "codiemb", "seed": 5, "lr": 3.0},
}
SETS: dict[str, list[str]] = {
    "S1_seeds": ["codiemb_s1", "codiemb_s2", "codiemb_s3"],
    "S2_tasks": ["codiemb_s1", "ir_only", "sts_only"],
    "S3_steps": ["codiemb_s1@1", "codiemb_s1@2", "codiemb_s1"],
    "S4_lrs": ["codiemb_lr_low", "codiemb_s1", "codiemb_lr_high"],
}
_LAYER_GROUPS_20 = {"examples_per_file": 20, "layer_groups": True}
#: The method families and their dev grids: (family, label, MERGE_METHODS name, parameters).
GRID: list[tuple[str, str, str, dict[str, Any]]] = [
    ("model_soup", "model_soup", "model_soup", {}),
    ("delta_soup", "delta_soup", "delta_soup", {}),
    ("delta_soup_variant", "delta_soup_consensus", "delta_soup", {"sign_consensus": True}),
    ("delta_soup_variant", "delta_soup_tensor", "delta_soup", {"granularity": "tensor"}),
    ("delta_soup_variant", "delta_soup_rescale", "delta_soup", {"rescale": True}),
    ("model_stock", "model_stock", "model_stock", {}),
    ("ties", "ties_d0.2", "ties", {"density": 0.2}),
    ("task_arithmetic", "task_arithmetic_0.5", "task_arithmetic", {"scale": 0.5}),
    ("multi_slerp", "multi_slerp", "multi_slerp", {}),
    ("multi_slerp", "multi_slerp_weights", "multi_slerp", {"space": "weights"}),
    # Data-aware: LM-Cocktail-style weights from each ingredient's loss on N records drawn from each *training* file
    # (never dev or test; the draws are nested: the 5 are among the 20, the 20 among the 100). One family per N, so
    # every size is reported; pair them on test with --also-test cocktail_5 cocktail_20 cocktail_100.
    ("cocktail_5", "cocktail_5", "cocktail_soup", {"examples_per_file": 5}),
    ("cocktail_20", "cocktail_20", "cocktail_soup", {"examples_per_file": 20}),
    # LM-Cocktail's T = 5 on InfoNCE-scale losses (~0.1-1) gives near-uniform weights; sharper T picked on dev.
    ("cocktail_20", "cocktail_20_t1", "cocktail_soup", {"examples_per_file": 20, "temperature": 1.0}),
    ("cocktail_20", "cocktail_20_t0.2", "cocktail_soup", {"examples_per_file": 20, "temperature": 0.2}),
    ("cocktail_100", "cocktail_100", "cocktail_soup", {"examples_per_file": 100}),
    # Per layer group (embeddings / each block / head): each group's weights from the loss on that group's output.
    ("cocktail_20_layers", "cocktail_20_layers", "cocktail_soup", _LAYER_GROUPS_20),
    ("cocktail_20_layers", "cocktail_20_layers_t0.2", "cocktail_soup", {**_LAYER_GROUPS_20, "temperature": 0.2}),
]
#: Seed of the draw of CocktailSoup's example records from the training files.
EXAMPLES_SEED = "codiemb-fusion-cocktail-examples"
SEEDS = ("codiemb_s1", "codiemb_s2", "codiemb_s3")


def load_data(args) -> tuple[dict, dict, dict, dict]:
    """The en training files split into (IR train, STS train, IR dev, STS dev) by the fusion study's hold-out."""
    ir, ir_dev = hold_out(IR_FILES, args.dev_ir_records, FUSION_DEV_SEED, seed_by_file_name=True)
    sts, sts_dev = hold_out(STS_FILES, args.dev_sts_pairs, FUSION_DEV_SEED, seed_by_file_name=True)
    return ir, sts, ir_dev, sts_dev


def train_run(name: str, base: str, ir: dict, sts: dict, args, models: Path) -> dict[str, Any]:
    """Train one ingredient into models/<name> (and models/<name>@<i> for kept intermediate checkpoints)."""
    from codiemb_st import recipe

    spec = RUNS[name]
    output = models / name
    config = {"run": name, **spec, "base": base} | {
        k: getattr(args, k) for k in ("max_steps", "lr", "ir_batch_size", "sts_batch_size", "max_seq_length")
    }
    config = json.loads(json.dumps(config))
    log = finished_run(output, config)
    if log is not None:
        return log
    # Frozen word embeddings, as in the reproduction: the deltas live in the transformer blocks.
    model = load_base(base, args.max_seq_length, freeze_embeddings=True, device="cpu")
    datasets = recipe.load_task_datasets(
        ir if spec["kind"] in ("codiemb", "ir_only") else {},
        sts if spec["kind"] in ("codiemb", "sts_only") else {},
        num_positives=1,
        num_negatives=1,
        seed=spec["seed"],
    )
    losses = recipe.build_task_losses(model, datasets, temperature=0.02, mini_batch_size=32)
    keep_steps = [max(1, round(f * args.max_steps)) for f in spec.get("keep", ())]
    training_args = recipe.training_arguments(
        output / "trainer",
        datasets,
        ir_batch_size=args.ir_batch_size,
        sts_batch_size=args.sts_batch_size,
        learning_rate=args.lr * spec["lr"],
        warmup_ratio=0.1,
        prompts=recipe.training_prompts(datasets),
        seed=spec["seed"],
        max_steps=args.max_steps,
        dataloader_drop_last=True,
        logging_steps=max(1, args.max_steps // 10),
        save_strategy="steps" if keep_steps else "no",
        save_steps=keep_steps[0] if keep_steps else 500,
        save_only_model=True,
        disable_tqdm=True,
    )
    log = train_to_folder(model, datasets, losses, training_args, output, config, keep_steps=keep_steps)
    print(f"trained {name}: {log['steps']} steps in {log['seconds']:.0f} s", file=sys.stderr, flush=True)
    return log


def make_method(name: str, parameters: dict[str, Any], study: Study | None = None, out: Path | None = None):
    """The merge method of a grid row; a CocktailSoup row gets its example files drawn from the study's training
    records (``examples_per_file``)."""
    from codiemb_st.merging import MERGE_METHODS

    if "examples_per_file" in parameters:
        if study is None or out is None:
            raise ValueError(f"{name} needs the study's training records for its examples.")
        parameters = dict(parameters)
        parameters["examples"] = write_example_files(study, parameters.pop("examples_per_file"), out / "examples")
    return MERGE_METHODS[name](**parameters)


def write_example_files(study: Study, count: int, folder: Path) -> list[str]:
    """``count`` records of each training file of the study (after its dev hold-out), one JSONL file each.

    The draw is a fixed shuffle per file, of which the first ``count`` are taken, so smaller example sets are inside
    the larger ones. Returns the files' paths.
    """
    from codiemb_st.file_io import write_jsonl

    paths = []
    for name, records in study.training_records().items():
        order = list(range(len(records)))
        random.Random(f"{EXAMPLES_SEED}:{name}").shuffle(order)
        path = folder / str(count) / f"{name}.jsonl"
        if not path.is_file():
            write_jsonl(path, [records[i] for i in order[:count]])
        paths.append(str(path))
    return paths


def merge(method, ingredients: list[Path], base: str, output: Path) -> Path:
    """Merge into ``output`` unless the finished merge of these ingredients (by fingerprint) is there."""
    key = {"method": repr(method), "ingredients": [record_fingerprint(p) + str(p) for p in ingredients]}
    merge_once(method, ingredients, base, output, "study_merge.json", key)
    return output


@dataclass
class Study:
    """What the merge loop needs: where the ingredients are, which sets to merge, and how to score a model.

    Args:
        track: Language track (for the report).
        base: The base model every delta is taken against.
        models: Folder of the ingredients; an ingredient name is a path under it.
        sets: Set name -> ingredient names.
        seeds: Ingredient names of the runs that differ only in their seed (the noise level).
        dev: Scores on dev (settings are picked on it).
        test: Scores on test (only reported), ``None`` with ``--no-test``.
        logs: Training logs of the ingredients (``seconds`` at least).
        source: One line on where the ingredients come from.
    """

    track: str
    base: str
    models: Path
    sets: dict[str, list[str]]
    seeds: list[str]
    dev: CachedEvaluator
    test: CachedEvaluator | None
    logs: dict[str, Any] = field(default_factory=dict)
    source: str = ""
    #: The training records the ingredients were trained on (dev hold-out removed), by file name; read when first
    #: needed (CocktailSoup draws its examples from them).
    train_records: Callable[[], dict[str, list[dict[str, Any]]]] | None = None
    _train_records: dict[str, list[dict[str, Any]]] | None = None

    def training_records(self) -> dict[str, list[dict[str, Any]]]:
        """The training records by file name (read once, on first use)."""
        if self._train_records is None:
            if self.train_records is None:
                raise ExperimentError("this study has no training records to draw CocktailSoup's examples from.")
            self._train_records = self.train_records()
        return self._train_records


def study_from_training(args, out: Path) -> Study | None:
    """Train the en ingredient runs (``RUNS``) and evaluate on held-out training records and the en test tasks;
    ``None`` after ``--stage train``."""
    if args.base_model is None:
        from codiemb_st.default_model import default_model_path

        args.base_model = default_model_path()
    base = args.base_model
    models = out / "models"
    sets = {name: SETS[name] for name in (args.sets or SETS)}
    ir, sts, ir_dev, sts_dev = load_data(args)
    needed = {name.split("@")[0] for members in sets.values() for name in members}
    if args.stage != "eval":
        logs = {name: train_run(name, base, ir, sts, args, models) for name in RUNS if name in needed | set(SEEDS)}
    else:  # the finished runs' logs
        logs = {
            n: json.loads((models / n / "train_log.json").read_text())
            for n in RUNS
            if (models / n / "train_log.json").is_file()
        }
    if args.stage == "train":
        return None
    from codiemb_st.evaluation import prepare_task

    # Evaluate a capped subset of the held-out records (the hold-out itself, never trained on, stays fixed).
    sts_dev = {name: rows[: args.dev_eval_sts_pairs] for name, rows in sts_dev.items()}
    ir_dev = {name: rows[: args.dev_eval_ir_records] for name, rows in ir_dev.items()}
    dev_name = f"dev-{args.dev_eval_sts_pairs}-{args.dev_eval_ir_records}"
    dev_tasks = [prepare_task(p) for p in write_dev_tasks(out / dev_name, "en", sts_dev, ir_dev)]
    dev = CachedEvaluator(dev_tasks, out / "eval" / dev_name, args.eval_max_seq_length)
    test = None
    if not args.no_test:
        test_tasks = [prepare_task(t, data_dir=EVAL, corpus_cap=args.corpus_cap, seed=42) for t in TEST_TASKS]
        test = CachedEvaluator(test_tasks, out / "eval" / f"test-{args.corpus_cap}", args.eval_max_seq_length)
    seeds = [name for name in SEEDS if (models / name / "train_log.json").is_file()]
    source = f"ingredients trained by this script ({args.max_steps} steps, lr {args.lr})"
    return Study("en", base, models, sets, seeds, dev, test, logs, source, train_records=lambda: ir | sts)


def study_from_reproduction(args, out: Path) -> Study:
    """The runs of a reproduce_codiemb.py track folder, evaluated on exactly its dev and test items."""
    from codiemb_st.evaluation import prepare_task

    source = args.reproduction
    summary_path = source / "results.json"
    if not summary_path.is_file():
        raise ExperimentError(
            f"--reproduction {source}: no results.json (a finished reproduce_codiemb.py track folder)."
        )
    summary = json.loads(summary_path.read_text("utf-8"))
    evaluation = summary.get("evaluation")
    if evaluation is None:
        raise ExperimentError(
            f"{summary_path} predates the 'evaluation' record: rerun its reproduce_codiemb.py command (every run "
            "and evaluation is reused, seconds)."
        )
    models = source / "models"
    seeds = sorted(int(seed) for seed in summary["seeds"].get("codiemb", []))
    sets: dict[str, list[str]] = {}
    if len(seeds) >= 2:
        sets["S1_seeds"] = [f"codiemb/seed{seed}" for seed in seeds]
    for seed in seeds:
        members = [f"{run}/seed{seed}" for run in ("codiemb", "ir_only", "sts_only")]
        if all((models / name / "modules.json").is_file() for name in members):
            sets[f"S2_tasks@{seed}"] = members
    if args.sets:
        unknown = [name for name in args.sets if name not in sets]
        if unknown:
            raise ExperimentError(f"--sets {unknown}: {source} has the sets {list(sets)}.")
        sets = {name: sets[name] for name in args.sets}
    if not sets:
        raise ExperimentError(
            f"{source} has no checkpoint set: it needs CoDiEmb with 2 seeds or CoDiEmb + both specialists."
        )

    def prepare(refs: list[str]):
        return [
            prepare_task(
                Path(ref) if Path(ref).is_dir() else ref,
                data_dir=evaluation["data_dir"],
                corpus_cap=evaluation["corpus_cap"],
                seed=evaluation["seed"],
            )
            for ref in refs
        ]

    options = {
        "max_seq_length": evaluation["max_seq_length"],
        "prompts": evaluation["prompts"],
        "batch_size": evaluation["batch_size"],
    }
    dev = CachedEvaluator(prepare(evaluation["dev"]), out / "eval" / "dev", **options)
    test = None if args.no_test else CachedEvaluator(prepare(evaluation["test"]), out / "eval" / "test", **options)
    reused = import_reproduction_scores(source, summary, [e for e in (dev, test) if e is not None])
    print(f"reusing {reused} evaluations of {source}", file=sys.stderr, flush=True)
    logs = {
        f"{run}/seed{seed}": log
        for run, by_seed in summary.get("training", {}).items()
        for seed, log in by_seed.items()
        if run in ("codiemb", "ir_only", "sts_only")
    }
    description = (
        f"the runs of {source} ({summary['budget']['name']}, {summary['budget']['steps_per_task']} steps per task)"
    )

    def train_records() -> dict[str, list[dict[str, Any]]]:
        """The reproduction's training records: its files minus its dev hold-out (same rule and sizes)."""
        track, config = summary["track_config"], summary["config"]
        ir = hold_out(track["ir_files"], config["dev_ir_records"], DEFAULT_DEV_SEED)[0]
        return ir | hold_out(track["sts_files"], config["dev_sts_pairs"], DEFAULT_DEV_SEED)[0]

    return Study(
        summary["track"],
        summary["base"],
        models,
        sets,
        [f"codiemb/seed{s}" for s in seeds],
        dev,
        test,
        logs,
        description,
        train_records=train_records,
    )


def import_reproduction_scores(source: Path, summary: dict[str, Any], evaluators: list[CachedEvaluator]) -> int:
    """Copy the reproduction's finished evaluations into the evaluators' caches (keyed by the weights' bytes), so
    that its runs and soups are not evaluated twice. An evaluation is taken only when it was made with this
    summary's settings and after the model's weights were last written; returns how many models were taken."""
    config, evaluation = summary["config"], summary["evaluation"]
    expected = {
        "max_seq_length": evaluation["max_seq_length"],
        "prompts": evaluation["prompts"],
        "corpus_cap": config.get("corpus_cap"),
        "sts_pair_cap": config.get("sts_pair_cap"),
        "eval_seed": evaluation["seed"],
    }
    taken = 0
    for cache in sorted((source / "eval").glob("*.json")):
        record = json.loads(cache.read_text("utf-8"))
        key = record.get("key", {})
        model = Path(key.get("model", ""))
        weights = sorted(model.rglob("*.safetensors")) if model.is_dir() else []
        if not weights or any(key.get(name) != value for name, value in expected.items()):
            continue
        if cache.stat().st_mtime < max(w.stat().st_mtime for w in weights):
            continue  # the folder was rewritten after this evaluation
        used = False
        for evaluator in evaluators:
            names = [task.name for task in evaluator.tasks]
            if all(name in record["scores"] for name in names):
                metrics = {name: record["scores"][name] for name in names}
                metrics |= aggregate_main_scores(metrics, {name: record["types"][name] for name in names})
                evaluator.store(model, metrics, str(cache))
                used = True
        taken += used
    return taken
