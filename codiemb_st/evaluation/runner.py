"""Run a SentenceTransformer on prepared mteb tasks with mteb's own metric code and no result cache.

mteb's default result cache keys results by model name and revision; a fine-tuned or local model gets its base
model's name (or "no_model_name/available"), so a second model can be handed the first model's cached score. Every
evaluation here passes ``cache=None``: scores are always computed from the model in hand.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from codiemb_st.evaluation.aggregates import aggregate_main_scores
from codiemb_st.evaluation.corpus_subsample import CorpusSubsample
from codiemb_st.evaluation.prompts import PromptPlan, plan_prompts
from codiemb_st.evaluation.tasks import PreparedTask
from codiemb_st.file_io import file_lock, json_safe, write_atomic, write_json_atomic
from codiemb_st.validation import check_positive_int

if TYPE_CHECKING:
    from mteb.results import TaskResult
    from sentence_transformers import SentenceTransformer

logger = logging.getLogger(__name__)


@dataclass
class TaskScore:
    """One task's result.

    Args:
        name: The task name.
        type: ``"retrieval"``, ``"sts"`` or another mteb type in lower case.
        split: The evaluated split.
        main_score_name: The mteb metric of the task (e.g. ``ndcg_at_10``).
        main_score: Its value (a fraction, as mteb reports it).
        corpus_subsample: The corpus subsample record, ``None`` for the full corpus.
        result: mteb's full result (every metric), ready for ``to_disk``.
        prompts: The prompt each input got and where it came from (``{"query": {"prompt", "source"}, ...}``; see
            :class:`~codiemb_st.evaluation.PromptPlan`).
    """

    name: str
    type: str
    split: str
    main_score_name: str
    main_score: float
    corpus_subsample: CorpusSubsample | None
    result: TaskResult
    prompts: dict[str, dict[str, str]] = field(default_factory=dict)


def _encoder(model: SentenceTransformer, plan: PromptPlan):
    """mteb's SentenceTransformer wrapper that uses exactly the plan's prompts, leaving ``model.prompts`` untouched.

    Passing ``model_prompts`` to the wrapper would overwrite ``model.prompts`` (and so the saved model). Built with
    the model's own prompts in view, the wrapper would validate them against mteb's task names (warning that "sts"
    is "not valid") and keep "query"/"document" for every task; so it is built with them hidden, and given the
    plan's complete table afterwards.
    """
    from mteb.models.sentence_transformer_wrapper import SentenceTransformerEncoderWrapper

    own_prompts = model.prompts
    model.prompts = {}
    try:
        encoder = SentenceTransformerEncoderWrapper(model)
    finally:
        model.prompts = own_prompts
    encoder.model_prompts = dict(plan.mteb_prompts)
    return encoder


def evaluate_model(
    model: SentenceTransformer,
    tasks: Sequence[PreparedTask],
    *,
    prompts: Mapping[str, str] | PromptPlan | None = None,
    saved_prompts: bool = True,
    batch_size: int = 32,
    show_progress_bar: bool = False,
    results_dir: str | Path | None = None,
    run_key: Mapping[str, Any] | None = None,
    reuse: bool = True,
) -> list[TaskScore]:
    """Evaluate ``model`` on every task with ``mteb.evaluate(..., cache=None)``, one task at a time.

    With ``results_dir``, each task's mteb result is written there (``<Task>.json``, plus ``<Task>.key.json``
    naming what was evaluated) as soon as that task finishes, and a task whose result is already there with the
    same key (the same ``run_key``, task, split, corpus subsample and prompts) is read back instead of evaluated
    again: an interrupted run loses at most the task in progress.

    The model's saved prompts (``model.prompts``) are applied by task type, never left to mteb: ``"query"`` on
    retrieval queries, ``"document"`` on retrieval documents, ``"sts"`` on both STS sentences (see
    :mod:`codiemb_st.evaluation.prompts`); explicit ``prompts`` win where they apply. Each task's result records the
    prompts it was evaluated with (``"prompts"`` next to the scores).

    Args:
        model: The model to evaluate.
        tasks: Tasks from :func:`~codiemb_st.evaluation.prepare_tasks`.
        prompts: Explicit mteb prompts, e.g. :func:`~codiemb_st.evaluation.instruction_prompts`, that win over the
            saved ones; or a :class:`~codiemb_st.evaluation.PromptPlan` from
            :func:`~codiemb_st.evaluation.plan_prompts` for these tasks, used as it is.
        saved_prompts: Apply the model's saved prompts by task type (ignored when ``prompts`` is a plan).
        batch_size: Encoding batch size.
        show_progress_bar: Show mteb's task and encoding progress bars.
        results_dir: Folder for per-task results (written as they finish, reused on a rerun); ``None`` keeps
            nothing on disk.
        run_key: What identifies the model and settings for reuse (e.g. the model path and a fingerprint of its
            weights, the maximum sequence length). Required with ``results_dir``.
        reuse: Read back finished results from ``results_dir``; ``False`` evaluates every task again (and still
            writes the results).

    Returns:
        One :class:`TaskScore` per task, in the order given.

    Raises:
        ValueError: If ``tasks`` is empty, ``batch_size`` is not positive, or ``results_dir`` is given without
            ``run_key``.

    Example:
        ::

            tasks = prepare_tasks(["STSBenchmark", "SciFact"], data_dir="../shared/data/eval", corpus_cap=1000)
            scores = evaluate_model(model, tasks, results_dir="results/minilm", run_key={"model": "minilm"})
            print({s.name: s.main_score for s in scores}, summarize_scores(scores))
    """
    if not tasks:
        raise ValueError("tasks is empty: give at least one PreparedTask.")
    check_positive_int("batch_size", batch_size)
    if results_dir is not None and run_key is None:
        raise ValueError("results_dir needs a run_key that identifies the model and settings (see the docstring).")
    folder = Path(results_dir) if results_dir is not None else None
    plan = (
        prompts
        if isinstance(prompts, PromptPlan)
        else plan_prompts(tasks, model.prompts, overrides=prompts, use_saved=saved_prompts)
    )
    missing = [prepared.name for prepared in tasks if prepared.name not in plan.tasks]
    if missing:
        raise ValueError(
            f"The prompt plan has no entry for task(s) {missing}; build it with plan_prompts(tasks, ...)."
        )
    scores = []
    for prepared in tasks:
        key = _task_key(prepared, plan, run_key) if folder is not None else None
        result = None
        if folder is not None and reuse:
            with file_lock(folder / f".{prepared.name}.lock"):  # never read a pair another run is writing
                result = _load_finished(folder, prepared.name, key)
            if result is not None and not _has_finite_score(result, prepared.split):
                logger.warning(
                    "%s: the stored result in %s has no finite %s score (truncated or edited); evaluating again.",
                    prepared.name,
                    folder,
                    prepared.split,
                )
                result = None
        if result is None:
            result = _evaluate_one(model, prepared, plan, batch_size, show_progress_bar)
            if folder is not None:
                # Two runs writing one folder take turns here, so a result and its key always belong together.
                with file_lock(folder / f".{prepared.name}.lock"):
                    write_atomic(folder / f"{prepared.name}.json", result.to_disk)
                    # The key is written last: it marks the result as complete.
                    write_json_atomic(folder / f"{prepared.name}.key.json", key)
        else:
            logger.info("%s: reusing the finished result in %s", prepared.name, folder)
        scores.append(
            TaskScore(
                name=prepared.name,
                type=prepared.type,
                split=prepared.split,
                main_score_name=prepared.task.metadata.main_score,
                main_score=float(result.get_score(splits=[prepared.split])),
                corpus_subsample=prepared.corpus_subsample,
                result=result,
                prompts=plan.tasks[prepared.name],
            )
        )
    return scores


def _evaluate_one(
    model: SentenceTransformer,
    prepared: PreparedTask,
    plan: PromptPlan,
    batch_size: int,
    show_progress_bar: bool,
) -> TaskResult:
    import mteb

    results = mteb.evaluate(
        _encoder(model, plan),
        [prepared.task],
        cache=None,
        co2_tracker=False,
        encode_kwargs={"batch_size": batch_size, "show_progress_bar": show_progress_bar},
        show_progress_bar=show_progress_bar,
    )
    (result,) = [result for result in results.task_results if result.task_name == prepared.name]
    for subset_scores in result.scores[prepared.split]:
        if prepared.corpus_subsample is not None:
            subset_scores["corpus_subsample"] = prepared.corpus_subsample.to_dict()
        # Which prompt each input got and why, so a stored score says what it was measured with.
        subset_scores["prompts"] = plan.tasks[prepared.name]
    return result


def _task_key(prepared: PreparedTask, plan: PromptPlan, run_key: Mapping[str, Any] | None) -> dict[str, Any]:
    # The non-empty prompts that reach this task, in mteb's key format (so a run without prompts, or with the same
    # --instructions as before, keeps the key its stored results were written under).
    relevant = plan.task_prompts(prepared.name)
    return json_safe(
        {
            "run": dict(run_key or {}),
            "task": prepared.name,
            "split": prepared.split,
            "source": prepared.source,
            "corpus_subsample": prepared.corpus_subsample.to_dict() if prepared.corpus_subsample else None,
            "prompts": relevant,
        }
    )


def _load_finished(folder: Path, name: str, key: dict[str, Any]) -> TaskResult | None:
    from mteb.results import TaskResult

    key_path, result_path = folder / f"{name}.key.json", folder / f"{name}.json"
    if not (key_path.is_file() and result_path.is_file()):
        return None
    try:
        stored = json.loads(key_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        logger.warning("%s: could not read %s (%s); evaluating again.", name, key_path, error)
        return None
    if stored != json.loads(json.dumps(key, default=str)):
        return None
    try:
        return TaskResult.from_disk(result_path)
    except Exception as error:  # a damaged result file is recomputed, not fatal
        logger.warning("%s: could not read %s (%s); evaluating again.", name, result_path, error)
        return None


def _has_finite_score(result: TaskResult, split: str) -> bool:
    try:
        return math.isfinite(float(result.get_score(splits=[split])))
    except Exception:  # a result without that split or score
        return False


def summarize_scores(scores: Sequence[TaskScore]) -> dict[str, float]:
    """The aggregates of :mod:`codiemb_st.evaluation.aggregates` over these tasks' main scores.

    Returns:
        ``{"<type>_mean": ..., "mean_task_type": ..., "mean_task": ...}``.
    """
    return aggregate_main_scores({s.name: s.main_score for s in scores}, {s.name: s.type for s in scores})
