"""Evaluation: the paper's 15 C-MTEB tasks through mteb, local (offline) task data, and embedding geometry."""

from __future__ import annotations

from codiemb_st.evaluation.aggregates import MEAN_TASK, MEAN_TASK_TYPE, aggregate_main_scores, type_mean_key
from codiemb_st.evaluation.corpus_subsample import CorpusSubsample, subsample_corpus, subsample_task_corpus
from codiemb_st.evaluation.geometry import (
    alignment,
    anisotropy,
    condition_number,
    effective_rank,
    embedding_geometry,
    geometry_text_sample,
    model_geometry,
    numerical_rank,
    singular_values,
    svd_entropy,
    uniformity,
)
from codiemb_st.evaluation.local_data import LocalTaskInfo, build_generic_task, find_local_tasks, load_local_task
from codiemb_st.evaluation.mteb_evaluator import MTEBEvaluator
from codiemb_st.evaluation.prompts import DOCUMENT_PROMPT_NAMES, SAVED_PROMPT_TARGETS, PromptPlan, plan_prompts
from codiemb_st.evaluation.runner import TaskScore, evaluate_model, summarize_scores
from codiemb_st.evaluation.task_folders import write_retrieval_task, write_sts_task
from codiemb_st.evaluation.tasks import (
    CMTEB_TASK_NAMES,
    CMTEB_TASKS,
    OFFICIAL_INSTRUCTION_TEMPLATE,
    PreparedTask,
    TaskSpec,
    check_task_name,
    get_task_spec,
    instruction_prompts,
    prepare_task,
    prepare_tasks,
    task_kind,
)

__all__ = [
    "MEAN_TASK",
    "MEAN_TASK_TYPE",
    "aggregate_main_scores",
    "geometry_text_sample",
    "type_mean_key",
    "write_retrieval_task",
    "write_sts_task",
    "CMTEB_TASKS",
    "CMTEB_TASK_NAMES",
    "OFFICIAL_INSTRUCTION_TEMPLATE",
    "CorpusSubsample",
    "DOCUMENT_PROMPT_NAMES",
    "SAVED_PROMPT_TARGETS",
    "PromptPlan",
    "LocalTaskInfo",
    "MTEBEvaluator",
    "PreparedTask",
    "TaskScore",
    "TaskSpec",
    "alignment",
    "anisotropy",
    "build_generic_task",
    "check_task_name",
    "condition_number",
    "effective_rank",
    "embedding_geometry",
    "evaluate_model",
    "find_local_tasks",
    "get_task_spec",
    "instruction_prompts",
    "load_local_task",
    "model_geometry",
    "numerical_rank",
    "plan_prompts",
    "prepare_task",
    "prepare_tasks",
    "singular_values",
    "subsample_corpus",
    "subsample_task_corpus",
    "summarize_scores",
    "svd_entropy",
    "task_kind",
    "uniformity",
]
