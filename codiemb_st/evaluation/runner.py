"""Run a SentenceTransformer on prepared mteb tasks with mteb's own metric code and no result cache.

mteb's default result cache keys results by model name and revision; a fine-tuned or local model gets its base
model's name (or "no_model_name/available"), so a second model can be handed the first model's cached score. Every
evaluation here passes ``cache=None``: scores are always computed from the model in hand.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from statistics import fmean
from typing import TYPE_CHECKING

from codiemb_st.evaluation.corpus_subsample import CorpusSubsample
from codiemb_st.evaluation.tasks import PreparedTask

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
    """

    name: str
    type: str
    split: str
    main_score_name: str
    main_score: float
    corpus_subsample: CorpusSubsample | None
    result: TaskResult


def _encoder(model: SentenceTransformer, prompts: Mapping[str, str] | None):
    """mteb's SentenceTransformer wrapper with extra prompts, leaving the model's own ``prompts`` untouched.

    Passing ``model_prompts`` to the wrapper would overwrite ``model.prompts`` (and so the saved model); setting the
    wrapper's lookup table afterwards does not. Task-specific keys take precedence over the model's generic
    ``query``/``document`` prompts in mteb's lookup.
    """
    from mteb.models.sentence_transformer_wrapper import SentenceTransformerEncoderWrapper

    encoder = SentenceTransformerEncoderWrapper(model)
    if prompts:
        encoder.model_prompts = {**(encoder.model_prompts or {}), **prompts}
    return encoder


def evaluate_model(
    model: SentenceTransformer,
    tasks: Sequence[PreparedTask],
    *,
    prompts: Mapping[str, str] | None = None,
    batch_size: int = 32,
    show_progress_bar: bool = False,
) -> list[TaskScore]:
    """Evaluate ``model`` on every task with ``mteb.evaluate(..., cache=None)``.

    Args:
        model: The model to evaluate.
        tasks: Tasks from :func:`~codiemb_st.evaluation.prepare_tasks`.
        prompts: Extra mteb prompts, e.g. :func:`~codiemb_st.evaluation.instruction_prompts`.
        batch_size: Encoding batch size.
        show_progress_bar: Show mteb's task and encoding progress bars.

    Returns:
        One :class:`TaskScore` per task, in the order given.

    Raises:
        ValueError: If ``tasks`` is empty or ``batch_size`` is not positive.
    """
    import mteb

    if not tasks:
        raise ValueError("tasks is empty: give at least one PreparedTask.")
    if batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size}.")
    results = mteb.evaluate(
        _encoder(model, prompts),
        [prepared.task for prepared in tasks],
        cache=None,
        co2_tracker=False,
        encode_kwargs={"batch_size": batch_size, "show_progress_bar": show_progress_bar},
        show_progress_bar=show_progress_bar,
    )
    by_name = {result.task_name: result for result in results.task_results}
    scores = []
    for prepared in tasks:
        result = by_name[prepared.name]
        if prepared.corpus_subsample is not None:
            for subset_scores in result.scores[prepared.split]:
                subset_scores["corpus_subsample"] = prepared.corpus_subsample.to_dict()
        scores.append(
            TaskScore(
                name=prepared.name,
                type=prepared.type,
                split=prepared.split,
                main_score_name=prepared.task.metadata.main_score,
                main_score=float(result.get_score(splits=[prepared.split])),
                corpus_subsample=prepared.corpus_subsample,
                result=result,
            )
        )
    return scores


def summarize_scores(scores: Sequence[TaskScore]) -> dict[str, float]:
    """Per-type means (``"<type>_mean"``) and the mean over all tasks (``"mean"``) of the main scores."""
    by_type: dict[str, list[float]] = {}
    for score in scores:
        by_type.setdefault(score.type, []).append(score.main_score)
    summary = {f"{kind}_mean": fmean(values) for kind, values in by_type.items()}
    if scores:
        summary["mean"] = fmean(score.main_score for score in scores)
    return summary
