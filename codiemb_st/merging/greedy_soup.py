"""Greedy soup (Wortsman et al., 2022): add checkpoints to the soup one by one, keeping each only if it helps.

Unlike the data-free methods of :mod:`codiemb_st.merging` (ModelSoup, DeltaSoup, ...), a greedy soup needs an evaluator (held-out data):
it is built on top of any :class:`~codiemb_st.merging.MergeMethod` (the soup of the chosen checkpoints is merged by
that method, uniform :class:`~codiemb_st.merging.ModelSoup` by default), so greedy DeltaSoup or greedy ModelStock
are one argument away. Every trial soup is streamed to disk by the method, so memory stays at about one model.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from numbers import Real
from pathlib import Path
from typing import Any

from codiemb_st._compat import SentenceTransformer
from codiemb_st.merging.base import MergeMethod, check_checkpoint_count, merge_model_folders
from codiemb_st.merging.soup import ModelSoup
from codiemb_st.merging.streaming_merge import (
    check_output_path,
    checkpoint_inputs,
    make_parents,
    remove_created,
    remove_stale_work_folders,
    work_folder_prefix,
)

logger = logging.getLogger(__name__)

ModelInput = str | Path | SentenceTransformer


@dataclass
class GreedySoupStep:
    """One candidate of the greedy pass.

    Attributes:
        index: Its position in the ``checkpoints`` given.
        checkpoint: The checkpoint (as given).
        score: Its own score.
        soup_score: The score of the soup with it added (its own score for the first, best, candidate).
        accepted: Whether it stayed in the soup (``soup_score`` >= the soup's score before it).
    """

    index: int
    checkpoint: ModelInput
    score: float
    soup_score: float
    accepted: bool


@dataclass
class GreedySoupResult:
    """The outcome of a greedy soup.

    Attributes:
        path: The merged model folder (None when :meth:`GreedySoup.merge` wrote it to a temporary folder).
        model: The merged model (:meth:`GreedySoup.merge`; None from :meth:`GreedySoup.merge_to_folder`).
        chosen: The checkpoints in the soup, in the order they were added.
        score: The final soup's score.
        steps: Every candidate, best first, with its own score and the soup's score when it was tried.
    """

    path: Path | None
    model: SentenceTransformer | None
    chosen: list[ModelInput]
    score: float
    steps: list[GreedySoupStep] = field(default_factory=list)

    @property
    def ingredient_scores(self) -> dict[str, float]:
        """``{checkpoint name: own score}`` (paths as strings; objects as ``checkpoints[i]``)."""
        return {_label(step.checkpoint, step.index): step.score for step in self.steps}


def _label(checkpoint: ModelInput, index: int) -> str:
    return str(checkpoint) if isinstance(checkpoint, (str, Path)) else f"checkpoints[{index}]"


class GreedySoup:
    """Greedy soup: rank the checkpoints by their own score, then add each to the soup if the soup's score does not
    drop (Wortsman et al., 2022, Algorithm 1, with any merge method in place of the uniform average).

    Algorithm, for checkpoints sorted by score s(θ_c) (best first, ties in input order):

        soup = [θ_(1)]
        for c in 2..K:   if s(merge(soup + [θ_(c)])) >= s(merge(soup)):  soup = soup + [θ_(c)]
        return merge(soup)

    A one-checkpoint soup is the checkpoint itself (copied bit for bit), whatever the method (so methods that need
    two or more checkpoints, like ModelStock, work too). The score is the evaluator's primary metric.

    Args:
        evaluator: Called with a ``SentenceTransformer``; returns a number, or a metrics dictionary (a
            sentence-transformers evaluator such as :class:`~codiemb_st.MTEBEvaluator` on dev data) read at
            ``primary_metric``. Never use the test data here: the greedy choice is a fit to the evaluator's data.
        method: The merge method of the soup. Defaults to :class:`~codiemb_st.merging.ModelSoup`.
        primary_metric: The key of the metrics dictionary to maximise. Defaults to ``evaluator.primary_metric``
            (the evaluator's own, with or without its name prefix).

    References:
        - Wortsman et al., "Model soups: averaging weights of multiple fine-tuned models improves accuracy without
          increasing inference time", ICML 2022. https://arxiv.org/abs/2203.05482

    Example:
        ::

            from codiemb_st import MTEBEvaluator
            from codiemb_st.merging import DeltaSoup, GreedySoup

            dev = MTEBEvaluator(["dev/dev-en_stsb", "dev/dev-ir"], primary_metric="mean_task_type")
            result = GreedySoup(dev, method=DeltaSoup()).merge(
                ["runs/a", "runs/b", "runs/c"], base_model="models/base", output_path="models/greedy"
            )
            print(result.chosen, result.score, result.ingredient_scores)
    """

    def __init__(
        self,
        evaluator: Callable[[SentenceTransformer], Any],
        method: MergeMethod | None = None,
        *,
        primary_metric: str | None = None,
    ) -> None:
        if not callable(evaluator):
            raise TypeError(f"evaluator must be callable with a SentenceTransformer, got {type(evaluator).__name__}.")
        method = ModelSoup() if method is None else method
        if not isinstance(method, MergeMethod):
            raise TypeError(f"method must be a MergeMethod (ModelSoup(), DeltaSoup(), ...), got {method!r}.")
        if primary_metric is not None and not isinstance(primary_metric, str):
            raise TypeError(f"primary_metric must be a metric name, got {type(primary_metric).__name__}.")
        self.evaluator = evaluator
        self.method = method
        self.primary_metric = primary_metric

    def __repr__(self) -> str:
        return f"GreedySoup(method={self.method!r})"

    def get_config_dict(self) -> dict[str, Any]:
        return {"method": type(self.method).__name__, "parameters": self.method.get_config_dict()}

    def score(self, model: SentenceTransformer) -> float:
        """The evaluator's primary metric for ``model``.

        Raises:
            ValueError: If the evaluator returns neither a number nor a dictionary holding the primary metric, or a
                non-finite score.
        """
        result = self.evaluator(model)
        if isinstance(result, Mapping):
            key = self.primary_metric or getattr(self.evaluator, "primary_metric", None)
            if key is None:
                raise ValueError(
                    "The evaluator returned a dictionary and has no primary_metric: pass primary_metric=."
                )
            name = getattr(self.evaluator, "name", "")
            candidates = [key, f"{name}_{key}"] if name else [key]
            found = next((c for c in candidates if c in result), None)
            if found is None:
                raise ValueError(f"The evaluator's metrics hold no {key!r}; available: {sorted(result)}.")
            result = result[found]
        if isinstance(result, bool) or not isinstance(result, Real) or not math.isfinite(float(result)):
            raise ValueError(f"The evaluator must give a finite score, got {result!r}.")
        return float(result)

    def merge(
        self,
        checkpoints: Sequence[ModelInput],
        *,
        base_model: ModelInput | None = None,
        output_path: str | Path | None = None,
        ingredient_scores: Sequence[float] | None = None,
        show_progress_bar: bool = False,
    ) -> GreedySoupResult:
        """Build the greedy soup and load it; see :meth:`merge_to_folder` for the arguments.

        Returns:
            The result with ``model`` set (and ``path`` None when ``output_path`` is None).
        """
        if output_path is not None:
            result = self.merge_to_folder(
                checkpoints,
                output_path,
                base_model=base_model,
                ingredient_scores=ingredient_scores,
                show_progress_bar=show_progress_bar,
            )
            result.model = SentenceTransformer(str(result.path))
            return result
        with tempfile.TemporaryDirectory(prefix="codiemb_greedy_") as tmp:
            result = self.merge_to_folder(
                checkpoints,
                Path(tmp) / "soup",
                base_model=base_model,
                ingredient_scores=ingredient_scores,
                show_progress_bar=show_progress_bar,
            )
            result.model = SentenceTransformer(str(result.path))
            result.path = None
            return result

    def merge_to_folder(
        self,
        checkpoints: Sequence[ModelInput],
        output_path: str | Path,
        *,
        base_model: ModelInput | None = None,
        ingredient_scores: Sequence[float] | None = None,
        show_progress_bar: bool = False,
    ) -> GreedySoupResult:
        """Build the greedy soup into ``output_path`` (the model is not loaded).

        Args:
            checkpoints: The K >= 1 candidate models (folders or ``SentenceTransformer`` objects).
            output_path: The folder to create (it must not exist, or be empty).
            base_model: The pre-trained model, when the method needs one.
            ingredient_scores: The candidates' own scores, if already known (same order as ``checkpoints``); by
                default each candidate is evaluated.
            show_progress_bar: Show the merge progress bars.

        Returns:
            The result (``model`` is None).

        Raises:
            TypeError / ValueError: Bad arguments, e.g. ``ingredient_scores`` of the wrong length.
        """
        if isinstance(checkpoints, (str, Path, SentenceTransformer)) or not isinstance(checkpoints, Sequence):
            raise TypeError("checkpoints must be a list of model folders or SentenceTransformer objects.")
        checkpoints = list(checkpoints)
        if not checkpoints:
            raise ValueError("checkpoints is empty: pass at least one candidate model.")
        check_checkpoint_count(self, checkpoints)
        output_path = Path(output_path).absolute()
        # Before any candidate is scored: the output must not be, hold or lie inside an input (or the dev data).
        check_output_path(
            output_path, [*checkpoint_inputs(checkpoints, base_model), *evaluator_inputs(self.evaluator)]
        )
        if ingredient_scores is None:
            scores = [self.score(_load(checkpoint)) for checkpoint in checkpoints]
        else:
            scores = [float(s) for s in ingredient_scores]
            if len(scores) != len(checkpoints) or not all(math.isfinite(s) for s in scores):
                raise ValueError(
                    f"ingredient_scores must hold one finite score per checkpoint ({len(checkpoints)}), got {scores}."
                )
        order = sorted(range(len(checkpoints)), key=lambda i: (-scores[i], i))

        created_parents = make_parents(output_path.parent)
        done = False
        remove_stale_work_folders(output_path, ".greedy")
        work = Path(tempfile.mkdtemp(prefix=work_folder_prefix(output_path), suffix=".greedy", dir=output_path.parent))
        try:
            first = order[0]
            soup = [first]
            best = work / "soup-0"
            # One checkpoint: copied through ModelSoup (bit for bit), whatever the method needs.
            merge_model_folders(
                ModelSoup(),
                [checkpoints[first]],
                best,
                base_model=base_model,
                show_progress_bar=show_progress_bar,
                copy_single=True,
            )
            best_score = scores[first]
            steps = [GreedySoupStep(first, checkpoints[first], scores[first], best_score, True)]
            for trial, index in enumerate(order[1:], start=1):
                candidate = work / f"soup-{trial}"
                self.method.merge_to_folder(
                    [checkpoints[i] for i in [*soup, index]],
                    candidate,
                    base_model=base_model,
                    show_progress_bar=show_progress_bar,
                )
                soup_score = self.score(_load(candidate))
                accepted = soup_score >= best_score
                steps.append(GreedySoupStep(index, checkpoints[index], scores[index], soup_score, accepted))
                logger.info(f"Greedy soup: {_label(checkpoints[index], index)} -> {soup_score:.4f} (kept: {accepted})")
                if accepted:
                    shutil.rmtree(best)
                    soup, best, best_score = [*soup, index], candidate, soup_score
                else:
                    shutil.rmtree(candidate)
            if output_path.is_dir():
                output_path.rmdir()  # an empty folder the caller prepared
            record = {
                "method": repr(self),
                "chosen": [_label(checkpoints[i], i) for i in soup],
                "score": best_score,
                "steps": [
                    {
                        "checkpoint": _label(s.checkpoint, s.index),
                        "score": s.score,
                        "soup_score": s.soup_score,
                        "accepted": s.accepted,
                    }
                    for s in steps
                ],
            }
            (best / "greedy_soup.json").write_text(json.dumps(record, indent=2) + "\n", encoding="utf8")
            os.rename(best, output_path)
            done = True
        except (ValueError, OSError) as error:
            # The trial soups live in a hidden work folder: name the caller's output_path instead.
            renamed = _naming_output(error, work, output_path)
            if renamed is error:
                raise
            raise renamed from error
        finally:
            shutil.rmtree(work, ignore_errors=True)
            if not done:
                remove_created(created_parents)  # a failed soup leaves nothing, not even the parents it created
        return GreedySoupResult(
            path=output_path, model=None, chosen=[checkpoints[i] for i in soup], score=best_score, steps=steps
        )


def evaluator_inputs(evaluator: Any) -> list[tuple[str, str | Path | None]]:
    """``(role, path)`` of the local data an evaluator reads (an :class:`~codiemb_st.MTEBEvaluator`'s ``data_dir``
    and local task folders), for the output rule; none for other callables."""
    inputs: list[tuple[str, str | Path | None]] = [("the evaluator's data_dir", getattr(evaluator, "data_dir", None))]
    for task in getattr(evaluator, "tasks", None) or []:
        source = getattr(task, "source", None)
        if isinstance(source, (str, Path)) and source != "mteb" and Path(source).exists():
            inputs.append((f"the evaluator's task {getattr(task, 'name', source)}", source))
    return inputs


def _naming_output(error: Exception, work: Path, output_path: Path) -> Exception:
    """``error`` with the hidden work folder's trial paths replaced by ``output_path`` (``error`` itself when it names
    none)."""
    # A trial soup is <work>/soup-<n>, written through its own hidden <work>/.soup-<n>.<pid>.<random>.partial.
    pattern = re.compile(re.escape(str(work)) + r"(/\.?soup-\d+[^/'\"]*)?")
    if isinstance(error, OSError):
        filename = error.filename
        if isinstance(filename, str):
            filename = pattern.sub(str(output_path), filename)
        if error.errno is None:
            return type(error)(pattern.sub(str(output_path), str(error)))
        return type(error)(error.errno, f"{error.strerror} (writing the greedy soup {output_path})", filename)
    if str(work) not in str(error):
        return error
    return type(error)(pattern.sub(str(output_path), str(error)))


def _load(model: ModelInput) -> SentenceTransformer:
    return model if isinstance(model, SentenceTransformer) else SentenceTransformer(str(model))


__all__ = ["GreedySoup", "GreedySoupResult", "GreedySoupStep"]
