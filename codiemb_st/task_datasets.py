"""Step 1 of the training recipe (:mod:`codiemb_st.recipe`): record files -> one training dataset per file, with
per-dataset options (:class:`DatasetOptions`) and the IR/STS split (:class:`TaskDatasets`). Re-exported by
:mod:`codiemb_st.recipe`, the documented entry point.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from codiemb_st.data import ir_columns, ir_dataset_from_records, records_negative_count, sts_columns
from codiemb_st.record_formats import SCORE_FIELDS, RecordSource, read_ir_records, read_sts_records
from codiemb_st.validation import check_non_negative_int, check_positive_int

if TYPE_CHECKING:
    from datasets import Dataset, DatasetDict

logger = logging.getLogger("codiemb_st.recipe")

SAMPLERS = ("round_robin", "proportional")
#: The options of the IR loss a dataset may set for itself (:attr:`DatasetOptions.loss_options`); the guide model is
#: one per run.
IR_LOSS_OPTIONS = (
    "distillation_weight",
    "student_temperature",
    "teacher_temperature",
    "directions",
    "partition_mode",
    "hardness_mode",
    "hardness_strength",
    "margin_strategy",
    "margin",
)
STS_LOSSES = ("pearson_spearman", "cosent")


@dataclass
class DatasetOptions:
    """Training options of one dataset; ``None`` means the run's default (the task's).

    Args:
        batch_size: Per-device batch size of this dataset's steps (default: its task's batch size).
        instruction: Its instruction (a sentence-transformers prompt, excluded from pooling): on the query of an IR
            dataset (and on its passages when ``symmetric``), on both sentences of an STS dataset. ``""`` trains it
            without one. Default: the records' own ``prompt`` if they share one, else the task's instruction.
        num_positives: P positive columns of an IR dataset (default: the run's ``num_positives``).
        num_negatives: N hard negatives of an IR dataset (default: the run's ``num_negatives``, else the records'
            own count; 1 for FlagEmbedding ``type: only_1neg``, at most the records' own count for
            ``symmetric_class``).
        in_batch_negatives: Whether an IR dataset's queries are also ranked against the other rows' passages
            (default True; False for a FlagEmbedding file named ``*no_in_batch_neg.jsonl``). False needs N >= 1.
        symmetric: Whether an IR dataset's passages get the query's instruction too (default: True for
            FlagEmbedding ``type: symmetric_sts``/``symmetric_clustering``).
        loss_options: Options of this IR dataset's :class:`~codiemb_st.MultiPositiveCachedInfoNCELoss` that differ
            from the run's (:data:`IR_LOSS_OPTIONS`: ``distillation_weight``, ``directions``, ``hardness_mode``,
            ...). A ``distillation_weight`` above 0 makes the dataset carry its records' teacher scores.

    Example:
        ::

            data = recipe.load_task_datasets(
                ir=["scifact.jsonl", "labels_no_in_batch_neg.jsonl"],
                options={"scifact": DatasetOptions(batch_size=8, num_negatives=4, instruction="Find evidence: ")},
            )
    """

    batch_size: int | None = None
    instruction: str | None = None
    num_positives: int | None = None
    num_negatives: int | None = None
    in_batch_negatives: bool | None = None
    symmetric: bool | None = None
    loss_options: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        for name in ("batch_size", "num_positives"):
            if getattr(self, name) is not None:
                check_positive_int(name, getattr(self, name))
        if self.num_negatives is not None:
            check_non_negative_int("num_negatives", self.num_negatives)
        for name in ("in_batch_negatives", "symmetric"):
            if getattr(self, name) is not None and not isinstance(getattr(self, name), bool):
                raise TypeError(f"`{name}` must be True, False or None; got {getattr(self, name)!r}.")
        if self.instruction is not None and not isinstance(self.instruction, str):
            raise TypeError(f"`instruction` must be a string or None; got {type(self.instruction).__name__}.")
        if self.loss_options is not None:
            if not isinstance(self.loss_options, Mapping):
                raise TypeError(f"`loss_options` must be a dict; got {type(self.loss_options).__name__}.")
            unknown = sorted(set(self.loss_options) - set(IR_LOSS_OPTIONS))
            if unknown:
                raise ValueError(f"`loss_options` has unknown keys {unknown}; the keys are {list(IR_LOSS_OPTIONS)}.")

    @property
    def distillation_weight(self) -> float | None:
        """The dataset's own distillation weight (``None``: the run's)."""
        return (self.loss_options or {}).get("distillation_weight")


#: The fields of DatasetOptions, e.g. for command-line parsing.
DATASET_OPTION_FIELDS = (
    "batch_size",
    "instruction",
    "num_positives",
    "num_negatives",
    "in_batch_negatives",
    "symmetric",
    "loss_options",
)


@dataclass
class TaskDatasets:
    """The training datasets by name, which names belong to which task, and each dataset's options.

    Args:
        datasets: ``{name: Dataset}`` in training order.
        ir: The names of the IR datasets.
        sts: The names of the STS datasets.
        options: ``{name: DatasetOptions}``, resolved from the caller's options and the files (record prompts,
            FlagEmbedding types); P and N are also in the IR datasets' columns.
    """

    datasets: dict[str, Dataset] = field(default_factory=dict)
    ir: list[str] = field(default_factory=list)
    sts: list[str] = field(default_factory=list)
    options: dict[str, DatasetOptions] = field(default_factory=dict)

    def option(self, name: str) -> DatasetOptions:
        """The options of dataset ``name`` (all defaults when none were set)."""
        return self.options.get(name) or DatasetOptions()

    def batch_sizes(self) -> dict[str, int]:
        """``{name: batch size}`` of the datasets that have their own (the sampler's ``dataset_batch_sizes``)."""
        return {name: opt.batch_size for name, opt in self.options.items() if opt.batch_size is not None}

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

    def has_scores(self, name: str) -> bool:
        """Whether the IR dataset ``name`` carries teacher scores (a ``label`` column, for distillation)."""
        return "label" in self.datasets[name].column_names

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
    # The `label` column (teacher scores for distillation) is not a text column.
    columns = [column for column in dataset.column_names if column not in ("dataset_name", "label")]
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
    source: RecordSource, *, num_positives: int = 1, num_negatives: int | None = None, seed: int = 42
) -> Dataset:
    """IR records -> columns; when no record has hard negatives, the file is used with in-batch negatives only.

    Args:
        source: A record file or records in any of the three formats (see :func:`codiemb_st.record_formats.read_ir_records`);
            record prompts are written in front of the queries (:func:`load_task_datasets` makes them the dataset's
            instruction instead).
        num_positives: P positive columns.
        num_negatives: N hard-negative columns wanted (0 = in-batch negatives only; ``None``: as many as the
            records have, see :func:`codiemb_st.data.records_negative_count`). Records without negatives among
            records with some borrow other records' negatives (see :func:`codiemb_st.data.ir_columns`).
        seed: Seed of the resampling.
    """
    records = read_ir_records(source)  # any of the three formats; read once
    if num_negatives is None:
        num_negatives = records_negative_count(records)
    if num_negatives and not any(record["negatives"] for record in records.records):
        logger.warning("%s: no record has hard negatives; training with in-batch negatives only.", records.name)
        num_negatives = 0
    return ir_dataset_from_records(records, num_positives=num_positives, num_negatives=num_negatives, seed=seed)


def _load_ir(
    name: str,
    source: RecordSource,
    given: DatasetOptions,
    num_positives: int,
    num_negatives: int | None,
    seed: int,
    with_scores: bool = False,
) -> tuple[Dataset, DatasetOptions]:
    """One IR dataset and its resolved options (record prompt -> instruction, FlagEmbedding type and file name)."""
    records = read_ir_records(source)
    resolved = replace(given)
    prompt = records.common_prompt()  # different prompts in one file: refused (one instruction per dataset)
    if prompt is not None:
        if resolved.instruction is None:
            resolved.instruction = prompt
            logger.info("%s: the records' prompt %r is the dataset's instruction.", name, prompt)
        elif resolved.instruction != prompt:
            logger.warning(
                "%s: the instruction set for the dataset (%r) replaces the records' prompt (%r).",
                name,
                resolved.instruction,
                prompt,
            )
    if resolved.symmetric is None:
        resolved.symmetric = records.symmetric
    if resolved.in_batch_negatives is None and isinstance(source, (str, os.PathLike)):
        # FlagEmbedding marks data trained without in-batch negatives by the file name suffix.
        if Path(source).name.split(".")[0].endswith("no_in_batch_neg"):
            resolved.in_batch_negatives = False
            logger.info("%s: file name ends in no_in_batch_neg: training without in-batch negatives.", name)
    wanted = resolved.num_negatives
    if wanted is None:
        wanted = records_negative_count(records) if num_negatives is None else num_negatives
        if records.data_type == "only_1neg":
            wanted = min(wanted, 1) or 1
        elif records.data_type == "symmetric_class":
            wanted = min([wanted, *(len(record["negatives"]) for record in records.records)])
    positives = resolved.num_positives or num_positives
    has_negatives = any(record["negatives"] for record in records.records)
    if not has_negatives and resolved.in_batch_negatives is False:
        why = "its file name ends in no_in_batch_neg" if given.in_batch_negatives is None else "as set"
        raise ValueError(
            f"{records.records[0]['location']}: dataset {name!r} trains without in-batch negatives ({why}), "
            "which needs hard negatives, and no record has any: mine them (`codiemb-st mine`), or set "
            f"--dataset-option {name}.in_batch_negatives=true to train on in-batch negatives."
        )
    if wanted and not has_negatives:
        if resolved.num_negatives is not None:
            raise ValueError(
                f"{records.records[0]['location']}: dataset {name!r} needs {wanted} hard negatives per record but no "
                f"record has any; mine them (`codiemb-st mine`) or set {name}.num_negatives=0."
            )
        logger.warning("%s: no record has hard negatives; training with in-batch negatives only.", name)
        wanted = 0
    if resolved.in_batch_negatives is False and wanted == 0:
        raise ValueError(
            f"Dataset {name!r}: in_batch_negatives=False needs hard negatives (num_negatives >= 1); without either, "
            "a query has nothing to be ranked against."
        )
    items = records.records if prompt is not None else records.prompts_in_text()
    if with_scores and not records.has_scores:
        fields = " / ".join(dict.fromkeys(SCORE_FIELDS[records.format]))
        raise ValueError(
            f"{records.records[0]['location']}: dataset {name!r} is trained with distillation but its records carry "
            f"no teacher scores ({fields}); add them with `codiemb-st score`, or train without distillation."
        )
    dataset = ir_columns(items, records.name, positives, wanted, seed, with_scores=with_scores)
    resolved.num_positives, resolved.num_negatives = positives, wanted
    return dataset, resolved


def _load_sts(name: str, source: RecordSource, given: DatasetOptions) -> tuple[Dataset, DatasetOptions]:
    """One STS dataset and its resolved options (the pairs' shared prompt -> instruction on both sentences)."""
    for key in ("num_positives", "num_negatives", "in_batch_negatives", "symmetric", "loss_options"):
        if getattr(given, key) is not None:
            raise ValueError(f"Dataset {name!r} is STS: the option {key!r} applies to IR datasets only.")
    records = read_sts_records(source)
    resolved = replace(given)
    prompt = records.common_prompt()
    if prompt is not None and resolved.instruction is None:
        resolved.instruction = prompt
        logger.info("%s: the pairs' prompt %r is the dataset's instruction (both sentences).", name, prompt)
    return sts_columns(records.records, use_prompts=prompt is None), resolved


def load_task_datasets(
    ir: Sequence[RecordSource] | Mapping[str, RecordSource] = (),
    sts: Sequence[RecordSource] | Mapping[str, RecordSource] = (),
    *,
    num_positives: int = 1,
    num_negatives: int | None = None,
    seed: int = 42,
    options: Mapping[str, DatasetOptions | Mapping[str, Any]] | None = None,
    teacher_scores: bool = False,
) -> TaskDatasets:
    """One dataset per IR and STS source, named after its file (or by the mapping's keys).

    Sources may be in any of the three record formats (unified, FlagEmbedding, sentence-transformers columns; see
    :mod:`codiemb_st.data`). A file whose records share a ``prompt`` trains with it as the dataset's instruction;
    records with different prompts in one file are refused. FlagEmbedding's ``type`` sets defaults of the dataset's
    options (see :class:`DatasetOptions`).

    Args:
        ir: IR record files, or ``{name: source}``.
        sts: STS pair files, or ``{name: source}``.
        num_positives: P positive columns of the IR datasets (official: 2).
        num_negatives: N hard negatives of the IR datasets (official: 4). ``None`` (default): each file's own count
            (the most negatives a record has, at most :data:`codiemb_st.data.MAX_DEFAULT_NEGATIVES`). A file in
            which no record has any is used with in-batch negatives only (warned), unless its options ask for
            negatives; records without negatives among records with some borrow other records' negatives.
        seed: Seed of the IR resampling.
        options: ``{dataset name: DatasetOptions}`` (or a dict of its fields) for datasets that differ from the
            defaults.
        teacher_scores: Give every IR dataset a ``label`` column of teacher scores (``P + N`` per row, in column
            order) for distillation; every text trained on must have a score (``ValueError`` naming the record). A
            dataset's own ``loss_options["distillation_weight"]`` decides for it.

    Raises:
        ValueError: If two datasets get the same name, there is no dataset at all, or ``options`` names an unknown
            dataset or sets an IR option on an STS dataset.
    """
    check_positive_int("num_positives", num_positives)
    if num_negatives is not None:
        check_non_negative_int("num_negatives", num_negatives)
    given = _dataset_options(options)

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
    unknown = sorted(set(given) - set(ir_sources) - set(sts_sources))
    if unknown:
        raise ValueError(
            f"`options` names unknown datasets {unknown}; the datasets are {[*ir_sources, *sts_sources]}."
        )
    data = TaskDatasets()
    for name, source in ir_sources.items():
        option = given.get(name, DatasetOptions())
        data.datasets[name], data.options[name] = _load_ir(
            name, source, option, num_positives, num_negatives, seed, _wants_scores(option, teacher_scores)
        )
        data.ir.append(name)
    for name, source in sts_sources.items():
        data.datasets[name], data.options[name] = _load_sts(name, source, given.get(name, DatasetOptions()))
        data.sts.append(name)
    return data


def _wants_scores(option: DatasetOptions, teacher_scores: bool) -> bool:
    """Whether a dataset carries teacher scores: its own distillation weight decides, else the run's switch."""
    weight = option.distillation_weight
    return teacher_scores if weight is None else weight > 0


def _dataset_options(options: Mapping[str, DatasetOptions | Mapping[str, Any]] | None) -> dict[str, DatasetOptions]:
    if options is None:
        return {}
    if not isinstance(options, Mapping):
        raise TypeError(f"`options` must be a dict of dataset name -> DatasetOptions; got {type(options).__name__}.")
    resolved = {}
    for name, value in options.items():
        if isinstance(value, DatasetOptions):
            resolved[name] = value
        elif isinstance(value, Mapping):
            unknown = sorted(set(value) - set(DATASET_OPTION_FIELDS))
            if unknown:
                raise ValueError(
                    f"`options[{name!r}]` has unknown fields {unknown}; the fields are {list(DATASET_OPTION_FIELDS)}."
                )
            resolved[name] = DatasetOptions(**value)
        else:
            raise TypeError(f"`options[{name!r}]` must be a DatasetOptions or a dict; got {type(value).__name__}.")
    return resolved


def _refuse_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    names = [name for name, _ in pairs]
    duplicates = sorted({name for name in names if names.count(name) > 1})
    raise ValueError(f"Dataset file names must be unique (they name the datasets): {duplicates}.")


__all__ = [
    "DATASET_OPTION_FIELDS",
    "IR_LOSS_OPTIONS",
    "SAMPLERS",
    "STS_LOSSES",
    "DatasetOptions",
    "TaskDatasets",
    "dataset_name",
    "ir_column_counts",
    "load_ir_dataset",
    "load_task_datasets",
]
