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
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from codiemb_st.data import RecordSource, ir_dataset_from_records, read_ir_records, sts_dataset_from_records
from codiemb_st.validation import check_choice, check_finite_float, check_non_negative_int, check_positive_int

if TYPE_CHECKING:
    from datasets import Dataset, DatasetDict
    from sentence_transformers import SentenceTransformer, SentenceTransformerTrainingArguments
    from torch import nn

logger = logging.getLogger(__name__)

#: Instructions in the official format ("Instruction: ... Query: ") for English training; pass "" to train without.
DEFAULT_IR_INSTRUCTION = (
    "Instruction: Given a claim or a sentence, retrieve passages that support or entail it Query: "
)
DEFAULT_STS_INSTRUCTION = "Instruction: Retrieve semantically similar text Query: "

SAMPLERS = ("round_robin", "proportional")
STS_LOSSES = ("pearson_spearman", "cosent")


@dataclass
class TaskDatasets:
    """The training datasets by name, and which names belong to which task.

    Args:
        datasets: ``{name: Dataset}`` in training order.
        ir: The names of the IR datasets.
        sts: The names of the STS datasets.
    """

    datasets: dict[str, Dataset] = field(default_factory=dict)
    ir: list[str] = field(default_factory=list)
    sts: list[str] = field(default_factory=list)

    def dataset_dict(self) -> DatasetDict:
        """The datasets as a ``DatasetDict`` (the trainer's ``train_dataset``)."""
        from datasets import DatasetDict

        return DatasetDict(self.datasets)

    def tasks(self) -> dict[str, list[str]]:
        """``{"ir": names, "sts": names}`` without empty tasks (the sampler's ``tasks``)."""
        return {task: names for task, names in (("ir", self.ir), ("sts", self.sts)) if names}

    def num_positives(self, name: str) -> int:
        """P of the IR dataset ``name``, read from its columns (the data is the one record of it)."""
        return ir_column_counts(self.datasets[name], name)[0]

    def num_negatives(self, name: str) -> int:
        """N (hard negatives) of the IR dataset ``name``, read from its columns; 0 = in-batch negatives only."""
        return ir_column_counts(self.datasets[name], name)[1]


def ir_column_counts(dataset: Dataset, name: str = "dataset") -> tuple[int, int]:
    """``(P, N)`` of an IR dataset with columns ``anchor, positive_1..positive_P, negative_1..negative_N``.

    The columns are where P and N are recorded: they survive ``DatasetDict``, the trainer and any dataset swapped
    into :class:`TaskDatasets` by hand, so the loss built from them cannot disagree with the data.

    Args:
        dataset: An IR dataset (:func:`load_ir_dataset`, :func:`codiemb_st.ir_dataset_from_records`).
        name: The dataset's name, for the error message.

    Raises:
        ValueError: If the columns are not ``anchor, positive_1..positive_P, negative_1..negative_N`` (P >= 1).

    Example:
        ::

            ir_column_counts(ir_dataset_from_records(records, num_positives=2, num_negatives=4))  # (2, 4)
    """
    columns = [column for column in dataset.column_names if column != "dataset_name"]
    num_positives = sum(1 for column in columns if column.startswith("positive_"))
    num_negatives = len(columns) - 1 - num_positives
    expected = [
        "anchor",
        *(f"positive_{k}" for k in range(1, num_positives + 1)),
        *(f"negative_{k}" for k in range(1, num_negatives + 1)),
    ]
    if num_positives < 1 or columns != expected:
        raise ValueError(
            f"IR dataset {name!r} has columns {columns}; the recipe needs anchor, positive_1..positive_P, "
            "negative_1..negative_N (P >= 1, N >= 0), as codiemb_st.ir_dataset_from_records builds them."
        )
    return num_positives, num_negatives


def dataset_name(path: str | os.PathLike) -> str:
    """A dataset's name from its file: ``train/en_stsb.jsonl.gz`` -> ``en_stsb``."""
    return Path(path).name.split(".")[0]


def load_ir_dataset(
    source: RecordSource, *, num_positives: int = 1, num_negatives: int = 1, seed: int = 42
) -> Dataset:
    """IR records -> columns; when any record lacks hard negatives, the file is used with in-batch negatives only.

    Args:
        source: A record file or records (see :func:`codiemb_st.ir_dataset_from_records`).
        num_positives: P positive columns.
        num_negatives: N hard-negative columns wanted (0 = in-batch negatives only).
        seed: Seed of the resampling.
    """
    records = read_ir_records(source)  # any of the three formats; read once
    if num_negatives and not all(record["negatives"] for record in records.records):
        logger.info("%s: not every record has hard negatives; training with in-batch negatives only.", records.name)
        num_negatives = 0
    return ir_dataset_from_records(records, num_positives=num_positives, num_negatives=num_negatives, seed=seed)


def load_task_datasets(
    ir: Sequence[RecordSource] | Mapping[str, RecordSource] = (),
    sts: Sequence[RecordSource] | Mapping[str, RecordSource] = (),
    *,
    num_positives: int = 1,
    num_negatives: int = 1,
    seed: int = 42,
) -> TaskDatasets:
    """One dataset per IR and STS source, named after its file (or by the mapping's keys).

    Args:
        ir: IR record files, or ``{name: source}``.
        sts: STS pair files, or ``{name: source}``.
        num_positives: P positive columns of the IR datasets (official: 2).
        num_negatives: N hard negatives of the IR datasets (official: 4); see :func:`load_ir_dataset`.
        seed: Seed of the IR resampling.

    Raises:
        ValueError: If two datasets get the same name, or there is no dataset at all.
    """
    check_positive_int("num_positives", num_positives)
    check_non_negative_int("num_negatives", num_negatives)

    def named(sources: Sequence[RecordSource] | Mapping[str, RecordSource], argument: str) -> dict[str, Any]:
        if isinstance(sources, Mapping):
            return dict(sources)
        if isinstance(sources, (str, os.PathLike)):
            raise TypeError(f"`{argument}` must be a list of files (or a dict name -> source), not one path.")
        pairs = [(dataset_name(source), source) for source in sources]
        return dict(pairs) if len({n for n, _ in pairs}) == len(pairs) else _refuse_duplicates(pairs)

    ir_sources, sts_sources = named(ir, "ir"), named(sts, "sts")
    clash = set(ir_sources) & set(sts_sources)
    if clash:
        raise ValueError(f"Dataset names must be unique across tasks (they route batches to losses): {sorted(clash)}.")
    if not ir_sources and not sts_sources:
        raise ValueError("No training data: give at least one IR or STS source.")
    data = TaskDatasets()
    for name, source in ir_sources.items():
        data.datasets[name] = load_ir_dataset(
            source, num_positives=num_positives, num_negatives=num_negatives, seed=seed
        )
        data.ir.append(name)
    for name, source in sts_sources.items():
        data.datasets[name] = sts_dataset_from_records(source)
        data.sts.append(name)
    return data


def _refuse_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    names = [name for name, _ in pairs]
    duplicates = sorted({name for name in names if names.count(name) > 1})
    raise ValueError(f"Dataset file names must be unique (they name the datasets): {duplicates}.")


def use_instructions(model: SentenceTransformer, *, query: str = "", sts: str = "", document: str = "") -> None:
    """Make task instructions the model's prompts, excluded from mean pooling (as the official code masks them).

    The prompts are saved with the model, so inference uses them: ``model.encode(q, prompt_name="query")``,
    ``prompt_name="sts"``. Empty instructions are left out (``document`` is always set, possibly to "").
    """
    from codiemb_st._compat import Pooling

    for module in model:
        if isinstance(module, Pooling):
            module.include_prompt = False
    model.prompts = {
        name: prompt
        for name, prompt in (("query", query), ("sts", sts), ("document", document))
        if prompt or name == "document"
    }


def training_prompts(
    data: TaskDatasets, *, query: str = "", passage: str = "", sts: str = ""
) -> dict[str, dict[str, str]]:
    """Per-dataset, per-column prompts for ``SentenceTransformerTrainingArguments(prompts=...)``.

    IR datasets get ``query`` on ``anchor`` and ``passage`` on every positive/negative column; STS datasets get
    ``sts`` on both sentences. Empty prompts are left out.
    """
    prompts: dict[str, dict[str, str]] = {}
    for name in data.ir:
        columns = data.datasets[name].column_names
        prompts[name] = {column: query if column == "anchor" else passage for column in columns}
    for name in data.sts:
        prompts[name] = {"sentence1": sts, "sentence2": sts}
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
    losses: dict[str, nn.Module] = {}
    ir_losses: dict[int, nn.Module] = {}
    for name in data.ir:
        num_positives = data.num_positives(name)
        if num_positives not in ir_losses:
            ir_losses[num_positives] = MultiPositiveCachedInfoNCELoss(
                model,
                num_positives=num_positives,
                temperature=temperature,
                mini_batch_size=mini_batch_size,
                gather_across_devices=gather_across_devices,
            )
        losses[name] = ir_losses[num_positives]
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
        )
    else:
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
    "DEFAULT_IR_INSTRUCTION",
    "DEFAULT_STS_INSTRUCTION",
    "TaskDatasets",
    "build_task_losses",
    "dataset_name",
    "ir_column_counts",
    "load_ir_dataset",
    "load_task_datasets",
    "training_arguments",
    "training_prompts",
    "use_instructions",
]
