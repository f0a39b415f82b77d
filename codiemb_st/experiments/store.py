"""The result store: which model folder, made how, evaluated how, and the cached results keyed by that.

Two identities, one of each kind, replace the four that the study scripts used to compute by hand:

- :func:`record_fingerprint`: *how a folder was made*: a digest of the records a run, soup or merge writes last
  (``run_config.json``, ``train_log.json``, ``soup_config.json``, ``study_merge.json``, ``greedy_soup.json``). A
  soup or merge is redone when an ingredient's fingerprint changed; an evaluation is redone when the evaluated
  folder's did. Equal, byte for byte, to the reproduction's former ``_fingerprint`` and the fusion study's former
  ``fingerprint`` on every folder either fingerprinted, so their caches and committed results stay valid.
- :func:`weights_key`: *what a folder holds*: a digest of its weights' bytes and the evaluation length, so that equal
  merges (a greedy soup that kept every ingredient is the Model Soup) share one evaluation. Equal to the fusion
  study's former ``content_key``.

Evaluation records are kept in two layouts, both read as the old scripts wrote them: the reproduction's
``eval/<label>-seed<k>.json`` through :func:`cached_json` (key: the model path, its :func:`record_fingerprint` and the
evaluation recipe: tasks, prompts, lengths, caps, seed), and the fusion study's ``eval/<recipe>/<weights_key>.json``
through :class:`CachedEvaluator` (the folder names the recipe). ``codiemb-st eval`` keeps its own stat-based
``codiemb_st.file_io.folder_fingerprint`` (the CLI evaluates folders no run wrote, and the library does not import
this layer).

mteb's ``ResultCache`` was considered: it keys results by model name, revision and task and stores mteb's
``TaskResult`` per task, while the studies cache one record per (model, evaluation recipe) holding cross-task
aggregates and embedding geometry, and must keep reading the keys their committed results were made with; the
package's own small store serves that directly.

Example:
    >>> from codiemb_st.experiments.store import record_fingerprint
    >>> fingerprint = record_fingerprint("runs/reproduce/en/models/codiemb/seed42")  # doctest: +SKIP
"""

from __future__ import annotations

import gc
import hashlib
import json
import shutil
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from codiemb_st.evaluation.aggregates import MEAN_TASK_TYPE, aggregate_main_scores
from codiemb_st.file_io import write_json_atomic

if TYPE_CHECKING:
    from sentence_transformers import SentenceTransformer

    from codiemb_st.evaluation import PreparedTask, TaskScore
    from codiemb_st.merging import MergeMethod

#: The records that say how a folder was made, in digest order (a folder holds some of them).
RECORD_FILES = ("run_config.json", "train_log.json", "soup_config.json", "study_merge.json", "greedy_soup.json")


def record_fingerprint(folder: str | Path) -> str:
    """A 16-hex-digit digest of the folder's :data:`RECORD_FILES` (their bytes, those present, in order).

    Cheap (the weights are not read) and stable across copies of the folder; it changes when the run, soup or merge
    that wrote the folder is redone with another configuration or anew.
    """
    folder = Path(folder)
    digest = hashlib.sha256()
    for name in RECORD_FILES:
        if (folder / name).is_file():
            digest.update((folder / name).read_bytes())
    return digest.hexdigest()[:16]


def weights_key(path: str | Path, max_seq_length: int) -> str:
    """A 20-hex-digit digest of a model folder's ``*.safetensors`` bytes (with their relative paths) and the
    evaluation length: equal weights evaluated alike share one key."""
    path = Path(path)
    digest = hashlib.sha256(str(max_seq_length).encode())
    for weights in sorted(path.rglob("*.safetensors")):
        digest.update(str(weights.relative_to(path)).encode())
        with weights.open("rb") as handle:
            while chunk := handle.read(2**24):
                digest.update(chunk)
    return digest.hexdigest()[:20]


def cached_json(path: Path, key: Any, compute: Callable[[], dict[str, Any]], field: str = "key") -> dict[str, Any]:
    """The record at ``path`` when its ``field`` equals ``key``; otherwise ``compute()``, stored there with the key.

    The record is written atomically, so an interrupted computation leaves no half-written result.
    """
    if path.is_file():
        cached = json.loads(path.read_text("utf-8"))
        if cached.get(field) == key:
            return cached
    result = {field: key, **compute()}
    write_json_atomic(path, result)
    return result


def merge_once(
    method: MergeMethod, ingredients: Sequence[Path], base: str, output: Path, marker: str, record: Any
) -> Any:
    """Merge ``ingredients`` into ``output`` with ``method`` unless ``output/marker`` already holds ``record``.

    ``record`` should name the method and the ingredients' :func:`record_fingerprint`, so a changed ingredient
    redoes the merge. The marker is written last: an interrupted merge is redone. Returns ``record``.
    """
    path = output / marker
    if path.is_file() and json.loads(path.read_text("utf-8")) == record:
        return record
    if output.exists():
        shutil.rmtree(output)
    method.merge_to_folder(list(ingredients), output, base_model=base, show_progress_bar=False)
    write_json_atomic(path, record)
    return record


class CachedEvaluator:
    """Scores a model folder on prepared tasks (main scores and their means), cached on disk by :func:`weights_key`.

    Args:
        tasks: Prepared evaluation tasks (``codiemb_st.evaluation.prepare_task``).
        cache: Folder of the cached records, one ``<weights_key>.json`` each.
        max_seq_length: Tokens at evaluation.
        prompts: Prompts by task type, as ``evaluate_model`` takes them.
        batch_size: Encoding batch size.

    Example:
        >>> dev = CachedEvaluator(tasks, Path("runs/fusion/eval/dev"), 64)  # doctest: +SKIP
        >>> dev.score("runs/fusion/models/codiemb_s1")["mean_task_type"]  # doctest: +SKIP
    """

    def __init__(
        self,
        tasks: Sequence[PreparedTask],
        cache: Path,
        max_seq_length: int,
        prompts: dict[str, str] | None = None,
        batch_size: int = 64,
    ) -> None:
        self.tasks, self.cache, self.max_seq_length = tasks, cache, max_seq_length
        self.prompts, self.batch_size = prompts, batch_size
        self.primary_metric = MEAN_TASK_TYPE

    def metrics(self, scores: Sequence[TaskScore]) -> dict[str, float]:
        """Main scores by task plus their IR, STS and task-type means."""
        metrics = {s.name: s.main_score for s in scores}
        return metrics | aggregate_main_scores(metrics, {s.name: s.type for s in scores})

    def store(self, path: Path, metrics: dict[str, float], source: str) -> None:
        """Record scores measured elsewhere (another study's evaluation of the same weights on the same items)."""
        cached = self.cache / f"{weights_key(path, self.max_seq_length)}.json"
        if not cached.is_file():
            write_json_atomic(cached, {"path": str(path), "metrics": metrics, "source": source})

    def score(self, path: Path | str) -> dict[str, float]:
        """The metrics of the model folder ``path`` (evaluated once per weights and length)."""
        from sentence_transformers import SentenceTransformer

        from codiemb_st.evaluation import evaluate_model

        path = Path(path)
        cached = self.cache / f"{weights_key(path, self.max_seq_length)}.json"
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

    def __call__(self, model: SentenceTransformer) -> dict[str, float]:
        """GreedySoup's evaluator interface: a loaded model -> metrics (not cached)."""
        from codiemb_st.evaluation import evaluate_model

        model.max_seq_length = self.max_seq_length
        return self.metrics(evaluate_model(model, self.tasks, prompts=self.prompts, batch_size=self.batch_size))


__all__ = ["RECORD_FILES", "CachedEvaluator", "cached_json", "merge_once", "record_fingerprint", "weights_key"]
