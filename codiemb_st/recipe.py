"""The CoDiEmb training recipe as reusable steps: records -> datasets -> task losses -> sampler -> training arguments.

``codiemb-st train`` and the reproduction script are built from these functions, so every run trains the same way:

1. :func:`load_task_datasets`: one dataset per record file, IR files to ``anchor, positive_1..P, negative_1..N``
   columns, STS files to ``sentence1, sentence2, score`` (a file without hard negatives trains on in-batch ones).
2. :func:`use_instructions`: task instructions become sentence-transformers prompts, excluded from mean pooling as in
   the official code, and saved with the model; :func:`training_prompts` maps them onto the dataset columns.
3. :func:`build_task_losses`: one loss per dataset: :class:`~codiemb_st.MultiPositiveCachedInfoNCELoss` for IR,
   :class:`~codiemb_st.PearsonSpearmanLoss` (or CoSENT, the paper's baseline) for STS.
4. :func:`training_arguments`: version-safe ``SentenceTransformerTrainingArguments`` with the
   :class:`~codiemb_st.RoundRobinTaskBatchSampler` (every rank on one task per step) or sentence-transformers'
   PROPORTIONAL sampler (the mixed baseline).

Example:
    ::

        from sentence_transformers import SentenceTransformer, SentenceTransformerTrainer
        from codiemb_st import LossColumnCheck, recipe

        model = SentenceTransformer("intfloat/multilingual-e5-small")
        data = recipe.load_task_datasets(ir=["t2.jsonl.gz"], sts=["stsb.jsonl.gz"], num_negatives=4)
        recipe.use_instructions(model, query="Instruction: retrieve passages Query: ")
        losses = recipe.build_task_losses(model, data, mini_batch_size=32)
        args = recipe.training_arguments(
            "runs/codiemb", data, ir_batch_size=64, sts_batch_size=32, max_steps=1000,
            prompts=recipe.training_prompts(data, query=model.prompts.get("query", "")),
        )
        SentenceTransformerTrainer(
            model=model, args=args, train_dataset=data.dataset_dict(), loss=losses, callbacks=[LossColumnCheck(losses)]
        ).train()
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Literal

from codiemb_st.task_datasets import (  # noqa: F401 (re-exported: recipe is the documented entry point)
    DATASET_OPTION_FIELDS,
    IR_LOSS_OPTIONS,
    SAMPLERS,
    STS_LOSSES,
    DatasetOptions,
    TaskDatasets,
    dataset_name,
    ir_column_counts,
    load_ir_dataset,
    load_task_datasets,
)
from codiemb_st.validation import check_choice, check_finite_float, check_positive_int

if TYPE_CHECKING:
    from sentence_transformers import SentenceTransformer, SentenceTransformerTrainingArguments
    from torch import nn

logger = logging.getLogger(__name__)


def use_instructions(
    model: SentenceTransformer,
    *,
    query: str = "",
    sts: str = "",
    document: str = "",
    exclude_from_pooling: bool | None = None,
) -> None:
    """Make task instructions the model's prompts, excluded from mean pooling (as the official code masks them).

    The prompts are saved with the model under the names ``query`` (IR queries), ``document`` (IR passages) and
    ``sts`` (both STS sentences), so inference uses them: ``model.encode_query(q)``, ``model.encode(s,
    prompt_name="sts")``; ``codiemb-st eval`` applies them by task type. Empty instructions are left out
    (``document`` is always set, possibly to "", so that ``encode_document`` adds nothing).

    Args:
        model: The model being trained.
        query: The IR query instruction.
        sts: The STS instruction.
        document: The IR passage instruction.
        exclude_from_pooling: Set the Pooling module's ``include_prompt`` to False (the prompt's tokens are not
            pooled, as in the official code). Default: when any instruction is given. Pass True when the training
            prompts differ from the saved ones (per-dataset instructions), so that training excludes them too.

    Example:
        ::

            recipe.use_instructions(model, query="Instruction: retrieve passages Query: ")
            model.prompts  # {"query": "Instruction: retrieve passages Query: ", "document": ""}
    """
    from codiemb_st._compat import Pooling

    if exclude_from_pooling is None:
        exclude_from_pooling = bool(query or sts or document)
    if exclude_from_pooling:
        for module in model:
            if isinstance(module, Pooling):
                module.include_prompt = False
    model.prompts = {
        name: prompt
        for name, prompt in (("query", query), ("sts", sts), ("document", document))
        if prompt or name == "document"
    }


def saved_prompts(data: TaskDatasets, *, query: str = "", sts: str = "", passage: str = "") -> dict[str, str]:
    """The prompts a model trained on ``data`` is saved with: ``{"query", "document", "sts"}`` (see
    :func:`use_instructions`), resolved from each dataset's own instruction (record prompts, dataset options) and
    the run's defaults.

    A task whose datasets trained with one instruction saves it; datasets of one task with different instructions
    save none for that task (a model has one ``query`` prompt), with a warning naming them. A symmetric IR dataset's
    instruction is also its ``document`` prompt.

    Example:
        ::

            data = recipe.load_task_datasets(ir=["pairs.jsonl"], sts=["sts.jsonl"])
            recipe.saved_prompts(data, sts="Same meaning? ")  # {"query": <the records' prompt or "">, ...}
    """
    columns = training_prompts(data, query=query, passage=passage, sts=sts)
    chosen: dict[str, set[str]] = {"query": set(), "document": set(), "sts": set()}
    for name in data.ir:
        chosen["query"].add(columns.get(name, {}).get("anchor", ""))
        chosen["document"].add(columns.get(name, {}).get("positive_1", ""))
    for name in data.sts:
        chosen["sts"].add(columns.get(name, {}).get("sentence1", ""))
    out = {"query": "", "document": "", "sts": ""}
    for key, values in chosen.items():
        if len(values) == 1:
            out[key] = values.pop()
        elif len(values) > 1:
            logger.warning(
                "The datasets trained with different %s instructions %s; the model is saved without a %r prompt "
                "(encode with the one you need: prompt=...).",
                key,
                sorted(values),
                key,
            )
    return out


def describe_prompts(prompts: Mapping[str, Mapping[str, str]], saved: Mapping[str, str]) -> str:
    """A few lines saying which prompt each dataset column trains with and which prompts the model is saved with."""
    lines = ["Instructions (sentence-transformers prompts, excluded from pooling):"]
    prompts = {name: columns for name, columns in prompts.items() if columns}
    if not prompts:
        lines.append("  training: none")
    for name, columns in prompts.items():
        by_prompt: dict[str, list[str]] = {}
        for column, prompt in columns.items():
            by_prompt.setdefault(prompt, []).append(column)
        described = "; ".join(f"{', '.join(cols)}: {prompt!r}" for prompt, cols in by_prompt.items())
        lines.append(f"  training {name}: {described}")
    kept = {name: prompt for name, prompt in saved.items() if prompt}
    lines.append(f"  saved with the model: {kept or 'none'} (codiemb-st eval applies them by task type)")
    return "\n".join(lines)


def training_prompts(
    data: TaskDatasets, *, query: str = "", passage: str = "", sts: str = ""
) -> dict[str, dict[str, str]]:
    """Per-dataset, per-column prompts for ``SentenceTransformerTrainingArguments(prompts=...)``.

    IR datasets get ``query`` on ``anchor`` and ``passage`` on every positive/negative column; STS datasets get
    ``sts`` on both sentences. A dataset's own instruction (:class:`DatasetOptions`) replaces ``query`` (IR) or
    ``sts``; a symmetric IR dataset gets its query instruction on the passages too. Empty prompts are left out.
    """
    prompts: dict[str, dict[str, str]] = {}
    for name in data.ir:
        option = data.option(name)
        own = query if option.instruction is None else option.instruction
        columns = data.datasets[name].column_names
        other = own if option.symmetric else passage
        prompts[name] = {column: own if column == "anchor" else other for column in columns}
    for name in data.sts:
        own = data.option(name).instruction
        own = sts if own is None else own
        prompts[name] = {"sentence1": own, "sentence2": own}
    return {name: {c: p for c, p in columns.items() if p} for name, columns in prompts.items()}


def build_task_losses(
    model: SentenceTransformer,
    data: TaskDatasets,
    *,
    temperature: float = 0.02,
    mini_batch_size: int = 32,
    gather_across_devices: bool = False,
    sts_loss: Literal["pearson_spearman", "cosent"] = "pearson_spearman",
    sts_gather_across_devices: bool = False,
    ir_loss_options: Mapping[str, Any] | None = None,
    guide: SentenceTransformer | None = None,
    **sts_loss_kwargs: Any,
) -> dict[str, nn.Module]:
    """One loss per dataset: the IR loss for IR datasets, the STS loss for STS datasets (one shared instance each).

    P of each IR loss is taken from its datasets' columns (:meth:`TaskDatasets.num_positives`), never from a second
    argument: IR datasets with different P get one IR loss per P.

    Args:
        model: The model being trained.
        data: The datasets (:func:`load_task_datasets`).
        temperature: τ of the IR loss (official 0.02).
        mini_batch_size: GradCache chunk of the IR loss.
        gather_across_devices: Cross-device negatives for IR (the official setting under DDP).
        sts_loss: ``"pearson_spearman"`` (CoDiEmb) or ``"cosent"`` (sentence-transformers' CoSENTLoss, the paper's
            baseline).
        sts_gather_across_devices: Gather STS pairs across devices (official: off, per-device correlation).
        ir_loss_options: Teacher and InfoNCE options of every IR loss (:data:`IR_LOSS_OPTIONS`:
            ``distillation_weight``, ``student_temperature``, ``teacher_temperature``, ``directions``,
            ``partition_mode``, ``hardness_mode``, ``hardness_strength``, ``margin_strategy``, ``margin``); a
            dataset's :attr:`DatasetOptions.loss_options` override them for it. Distillation needs the dataset's
            teacher scores (``load_task_datasets(teacher_scores=True)``).
        guide: A guide model that masks false negatives in every IR loss (``margin``/``margin_strategy`` set how).
        **sts_loss_kwargs: Further options of :class:`~codiemb_st.PearsonSpearmanLoss`.

    Returns:
        ``{dataset name: loss}`` (the trainer's ``loss``).
    """
    from codiemb_st._compat import CoSENTLoss
    from codiemb_st.losses import MultiPositiveCachedInfoNCELoss, PearsonSpearmanLoss

    check_choice("sts_loss", sts_loss, STS_LOSSES)
    if "num_positives" in sts_loss_kwargs:
        raise TypeError(
            "build_task_losses takes num_positives from the datasets (their positive_1..positive_P columns); "
            "set it once, in load_task_datasets(num_positives=...), and drop it here."
        )
    run_options = dict(ir_loss_options or {})
    unknown = sorted(set(run_options) - set(IR_LOSS_OPTIONS))
    if unknown:
        raise ValueError(f"`ir_loss_options` has unknown keys {unknown}; the keys are {list(IR_LOSS_OPTIONS)}.")
    losses: dict[str, nn.Module] = {}
    ir_losses: dict[tuple[Any, ...], nn.Module] = {}
    for name in data.ir:
        options = {**run_options, **(data.option(name).loss_options or {})}
        if options.get("distillation_weight") and not data.has_scores(name):
            raise ValueError(
                f"IR dataset {name!r} is trained with distillation_weight={options['distillation_weight']} but has no "
                "teacher scores (`label` column): load it with load_task_datasets(teacher_scores=True) from records "
                "that carry scores (`codiemb-st score`), or set its distillation_weight to 0."
            )
        # One IR loss per distinct setting: P (from the columns), the in-batch-negatives switch and the options.
        key = (
            data.num_positives(name),
            data.option(name).in_batch_negatives is not False,
            tuple(sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in options.items())),
        )
        if key not in ir_losses:
            ir_losses[key] = MultiPositiveCachedInfoNCELoss(
                model,
                num_positives=key[0],
                temperature=temperature,
                mini_batch_size=mini_batch_size,
                gather_across_devices=gather_across_devices,
                in_batch_negatives=key[1],
                guide=guide,
                **{k: tuple(v) if k == "directions" else v for k, v in options.items()},
            )
        losses[name] = ir_losses[key]
    if data.sts:
        if sts_loss == "cosent":
            if sts_loss_kwargs or sts_gather_across_devices:
                raise ValueError("CoSENTLoss takes no PearsonSpearmanLoss options and does not gather across devices.")
            sts: nn.Module = CoSENTLoss(model)
        else:
            sts = PearsonSpearmanLoss(model, gather_across_devices=sts_gather_across_devices, **sts_loss_kwargs)
        losses.update({name: sts for name in data.sts})
    return losses


def training_arguments(
    output_dir: str | os.PathLike,
    data: TaskDatasets,
    *,
    ir_batch_size: int = 32,
    sts_batch_size: int = 32,
    sampler: Literal["round_robin", "proportional"] = "round_robin",
    gradient_accumulation_steps: int = 1,
    learning_rate: float = 5e-5,
    warmup_ratio: float = 0.1,
    prompts: Mapping[str, Mapping[str, str]] | None = None,
    seed: int = 42,
    **kwargs: Any,
) -> SentenceTransformerTrainingArguments:
    """``SentenceTransformerTrainingArguments`` for a CoDiEmb run, on any supported transformers version.

    Args:
        output_dir: The trainer's output folder.
        data: The datasets (their task split decides the sampler's tasks).
        ir_batch_size: Per-device batch size of IR steps (official 28-64).
        sts_batch_size: Per-device batch size of STS steps (official 32).
        sampler: ``"round_robin"``: :class:`~codiemb_st.RoundRobinTaskBatchSampler` (single-task steps on every
            rank, CoDiEmb); ``"proportional"``: sentence-transformers' PROPORTIONAL sampler (the mixed baseline;
            one batch size for all, do not combine with gathering losses under DDP).
        gradient_accumulation_steps: Passed to the trainer and to the sampler (one task per optimizer step).
        learning_rate: Peak learning rate (official 5e-5, 4e-5 for MiniCPM).
        warmup_ratio: Linear warm-up share of the steps (transformers 5 takes it as a float ``warmup_steps``).
        prompts: Per-dataset column prompts (:func:`training_prompts`).
        seed: Seed of the trainer and the sampler's data order.
        **kwargs: Any other ``SentenceTransformerTrainingArguments`` field (``max_steps``, ``num_train_epochs``,
            ``bf16``, ``logging_steps``, ``save_strategy``, ...).
    """
    import transformers
    from sentence_transformers import SentenceTransformerTrainingArguments

    from codiemb_st._compat import MultiDatasetBatchSamplers
    from codiemb_st.sampling import RoundRobinTaskBatchSampler

    check_choice("sampler", sampler, SAMPLERS)
    check_positive_int("ir_batch_size", ir_batch_size)
    check_positive_int("sts_batch_size", sts_batch_size)
    check_positive_int("gradient_accumulation_steps", gradient_accumulation_steps)
    check_finite_float("learning_rate", learning_rate, minimum=0.0, strict_minimum=True)
    check_finite_float("warmup_ratio", warmup_ratio, minimum=0.0, maximum=1.0)
    if sampler == "round_robin":
        tasks = data.tasks()
        batch_sampler: Any = RoundRobinTaskBatchSampler.with_options(
            tasks=tasks,
            batch_sizes={task: ir_batch_size if task == "ir" else sts_batch_size for task in tasks},
            gradient_accumulation_steps=gradient_accumulation_steps,
            dataset_batch_sizes=data.batch_sizes() or None,
        )
    else:
        if data.batch_sizes():
            raise ValueError(
                "Per-dataset batch sizes need sampler='round_robin' (the proportional sampler uses one batch size)."
            )
        batch_sampler = MultiDatasetBatchSamplers.PROPORTIONAL
    # transformers v5 takes the warmup ratio as a float `warmup_steps` (`warmup_ratio` is deprecated there).
    major = int(transformers.__version__.split(".")[0])
    warmup = {"warmup_steps": warmup_ratio} if major >= 5 else {"warmup_ratio": warmup_ratio}
    defaults: dict[str, Any] = {"weight_decay": 0.0, "report_to": "none", "data_seed": seed}
    return SentenceTransformerTrainingArguments(
        output_dir=str(output_dir),
        per_device_train_batch_size=ir_batch_size if data.ir else sts_batch_size,
        gradient_accumulation_steps=gradient_accumulation_steps,
        learning_rate=learning_rate,
        **warmup,
        seed=seed,
        prompts={name: dict(p) for name, p in (prompts or {}).items() if p} or None,
        multi_dataset_batch_sampler=batch_sampler,
        **(defaults | kwargs),
    )


__all__ = [
    "DATASET_OPTION_FIELDS",
    "IR_LOSS_OPTIONS",
    "DatasetOptions",
    "TaskDatasets",
    "build_task_losses",
    "dataset_name",
    "describe_prompts",
    "ir_column_counts",
    "load_ir_dataset",
    "load_task_datasets",
    "saved_prompts",
    "training_arguments",
    "training_prompts",
    "use_instructions",
]
