"""MTEBEvaluator: mteb tasks (local data or hub) as a sentence-transformers evaluator."""

from __future__ import annotations

import csv
import logging
import os
import traceback
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from codiemb_st._compat import BaseEvaluator, get_rank, get_world_size, is_distributed_inference_active
from codiemb_st.evaluation.aggregates import MEAN_TASK, aggregate_keys
from codiemb_st.evaluation.local_data import LocalTaskInfo
from codiemb_st.evaluation.runner import evaluate_model, summarize_scores
from codiemb_st.evaluation.tasks import PreparedTask, instruction_prompts, prepare_tasks
from codiemb_st.validation import check_positive_int

if TYPE_CHECKING:
    from mteb.abstasks import AbsTask
    from sentence_transformers import SentenceTransformer

logger = logging.getLogger(__name__)


class MTEBEvaluator(BaseEvaluator):
    def __init__(
        self,
        tasks: Iterable[str | Path | LocalTaskInfo | AbsTask | PreparedTask],
        *,
        data_dir: str | Path | None = None,
        corpus_cap: int | None = None,
        seed: int = 0,
        instructions: bool | Literal["zh", "en"] = False,
        prompts: Mapping[str, str] | None = None,
        saved_prompts: bool = True,
        batch_size: int = 32,
        primary_metric: str = MEAN_TASK,
        name: str = "mteb",
        show_progress_bar: bool = False,
        write_csv: bool = True,
    ) -> None:
        """Evaluate a model on mteb tasks with mteb's own metrics: per-task main scores, per-type means, overall mean.

        Tasks are resolved and their data loaded once, here (local folders first, the Hugging Face hub otherwise);
        every call then encodes with the model in hand through ``mteb.evaluate(..., cache=None)``, so a result is
        never read from or written to mteb's result cache (which keys results by model name and would hand a
        fine-tuned model its base model's score).

        Under DDP inside :class:`~sentence_transformers.SentenceTransformerTrainer`, the trainer calls the evaluator
        on rank 0 only, shards its ``encode`` calls over all ranks and broadcasts the metrics. Called directly on
        every rank (e.g. a script under ``torchrun``), rank 0 does the evaluation and the metrics are broadcast with
        ``torch.distributed.broadcast_object_list``, so every rank returns the same dictionary (an error on rank 0 is
        raised on every rank). The model must be able to run forward on rank 0 alone (DDP, ZeRO-1/2; not FSDP or
        ZeRO-3).

        Args:
            tasks: Task names (matched against ``data_dir`` first, e.g. ``"ATEC"``; one of the 15 C-MTEB names is
                evaluated on the paper's split), local task folders, :class:`LocalTaskInfo`, mteb task objects with
                one evaluation split, or :class:`PreparedTask`.
            data_dir: A folder of local task folders (see :mod:`codiemb_st.evaluation.local_data`).
            corpus_cap: Subsample retrieval corpora to at most this many passages, keeping every judged one
                (seeded; the returned scores are then optimistic in absolute terms, comparable between models).
            seed: Seed of the corpus subsample.
            instructions: Prepend the official CoDiEmb task instructions (``True`` or ``"zh"``: Chinese,
                ``"en"``: English) to retrieval queries and to both STS sentences, as the paper's evaluation does.
                Only the 15 C-MTEB tasks have one. Pair with ``Pooling(include_prompt=False)`` to exclude the
                instruction from mean pooling, as the official code does.
            prompts: Explicit mteb prompts (``{"<Task>-query": ..., "<Task>": ..., "query": ...}``), applied on top
                of the instructions; they win over the model's saved prompts wherever they apply.
            saved_prompts: Apply the model's saved prompts (``model.prompts``) by task type: ``"query"`` on
                retrieval queries, ``"document"`` on retrieval documents, ``"sts"`` on both STS sentences; other
                names are ignored (see :mod:`codiemb_st.evaluation.prompts`). ``False`` applies none.
            batch_size: Encoding batch size.
            primary_metric: ``"mean_task"`` (mean over all tasks), ``"mean_task_type"`` (mean of the per-type
                means: IR and STS weigh the same), ``"<type>_mean"`` (e.g. ``"retrieval_mean"``, ``"sts_mean"``) or a
                task name. See :mod:`codiemb_st.evaluation.aggregates`.
            name: Prefix of the metric names.
            show_progress_bar: Show mteb's progress bars.
            write_csv: Append the metrics to ``mteb_evaluation_<name>_results.csv`` in ``output_path``.

        References:
            - mteb: https://github.com/embeddings-benchmark/mteb
            - CoDiEmb evaluation script: TencentCloudADP/youtu-embedding, ``training/CoDiEmb/test/eval_cmteb.py``

        Example:
            ::

                from sentence_transformers import SentenceTransformer
                from codiemb_st import MTEBEvaluator

                model = SentenceTransformer("sentence-transformers/all-MiniLM-L6-v2")
                evaluator = MTEBEvaluator(["STSBenchmark", "SciFact"], data_dir="../shared/data/eval", corpus_cap=2000)
                metrics = evaluator(model)
                print(metrics[evaluator.primary_metric])  # mteb_mean_task
                # {'mteb_STSBenchmark_cosine_spearman': 0.82, 'mteb_SciFact_ndcg_at_10': ..., 'mteb_sts_mean': ...,
                #  'mteb_retrieval_mean': ..., 'mteb_mean_task_type': ..., 'mteb_mean_task': ...}
        """
        super().__init__()
        check_positive_int("batch_size", batch_size)
        if instructions not in (False, True, "zh", "en"):
            raise ValueError(f"instructions must be False, True, 'zh' or 'en', got {instructions!r}.")
        if isinstance(tasks, (str, Path)):
            tasks = [tasks]
        self.tasks = prepare_tasks(tasks, data_dir=data_dir, corpus_cap=corpus_cap, seed=seed)
        self.data_dir = data_dir
        self.corpus_cap = corpus_cap
        self.seed = seed
        self.instructions = instructions
        self.prompts: dict[str, str] = {}
        if instructions:
            language = "zh" if instructions is True else instructions
            self.prompts.update(instruction_prompts([task.name for task in self.tasks], language=language))
        self.prompts.update(prompts or {})
        self.saved_prompts = saved_prompts
        self.batch_size = batch_size
        self.name = name
        self.show_progress_bar = show_progress_bar
        self.write_csv = write_csv
        self.primary_metric = self._resolve_primary_metric(primary_metric)
        self.csv_file = f"mteb_evaluation_{name}_results.csv" if name else "mteb_evaluation_results.csv"

    def _task_metric(self, task: PreparedTask) -> str:
        return f"{task.name}_{task.task.metadata.main_score}"

    def _resolve_primary_metric(self, primary_metric: str) -> str:
        by_name = {task.name: self._task_metric(task) for task in self.tasks}
        allowed = {*aggregate_keys([task.type for task in self.tasks]), *by_name.values()}
        resolved = by_name.get(primary_metric, primary_metric)
        if resolved not in allowed:
            raise ValueError(
                f"primary_metric must be 'mean_task', 'mean_task_type', a per-type mean or a task name; got "
                f"{primary_metric!r}, "
                f"allowed: {sorted(allowed | set(by_name))}."
            )
        return resolved

    def __call__(
        self, model: SentenceTransformer, output_path: str | None = None, epoch: int = -1, steps: int = -1
    ) -> dict[str, float]:
        if get_world_size() > 1 and not is_distributed_inference_active(model):
            metrics = self._compute_on_rank_zero_and_broadcast(model, output_path, epoch, steps)
        else:
            metrics = self._compute(model, output_path, epoch, steps)
        metrics = self.prefix_name_to_metrics(metrics, self.name)
        self.store_metrics_in_model_card_data(model, metrics, epoch, steps)
        return metrics

    def _compute_on_rank_zero_and_broadcast(
        self, model: SentenceTransformer, output_path: str | None, epoch: int, steps: int
    ) -> dict[str, float]:
        import torch.distributed as dist

        payload: list[Any] = [None]
        error: BaseException | None = None
        if get_rank() == 0:
            try:
                payload[0] = ("ok", self._compute(model, output_path, epoch, steps))
            except Exception as caught:
                # Tell the other ranks before raising, or they would wait in the broadcast forever.
                error = caught
                payload[0] = ("error", traceback.format_exc())
        dist.broadcast_object_list(payload, src=0)
        status, value = payload[0]
        if error is not None:
            raise error
        if status == "error":
            raise RuntimeError(f"MTEBEvaluator failed on rank 0:\n{value}")
        return value

    def _compute(
        self, model: SentenceTransformer, output_path: str | None, epoch: int, steps: int
    ) -> dict[str, float]:
        where = f" after epoch {epoch}" + (f", step {steps}" if steps != -1 else "") if epoch != -1 else ""
        logger.info("MTEBEvaluator: evaluating on %d task(s)%s", len(self.tasks), where)
        was_training = model.training
        try:
            scores = evaluate_model(
                model,
                self.tasks,
                prompts=self.prompts,
                saved_prompts=self.saved_prompts,
                batch_size=self.batch_size,
                show_progress_bar=self.show_progress_bar,
            )
        finally:
            model.train(was_training)
        metrics = {f"{score.name}_{score.main_score_name}": score.main_score for score in scores}
        metrics.update(summarize_scores(scores))
        for key, value in metrics.items():
            logger.info("%-40s %.4f", key, value)
        if output_path is not None and self.write_csv:
            self._append_csv(output_path, epoch, steps, metrics)
        return metrics

    def _append_csv(self, output_path: str, epoch: int, steps: int, metrics: dict[str, float]) -> None:
        os.makedirs(output_path, exist_ok=True)
        csv_path = os.path.join(output_path, self.csv_file)
        exists = os.path.isfile(csv_path)
        with open(csv_path, "a" if exists else "w", newline="", encoding="utf-8") as handle:
            writer = csv.writer(handle)
            if not exists:
                writer.writerow(["epoch", "steps", *metrics])
            writer.writerow([epoch, steps, *metrics.values()])

    @property
    def description(self) -> str:
        return "MTEB"

    def get_config_dict(self) -> dict[str, Any]:
        config: dict[str, Any] = {"tasks": [task.name for task in self.tasks]}
        if self.corpus_cap is not None:
            config["corpus_cap"] = self.corpus_cap
        if self.instructions:
            config["instructions"] = self.instructions
        if not self.saved_prompts:
            config["saved_prompts"] = False
        return config
