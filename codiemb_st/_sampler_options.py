"""Option checks and resolution of :class:`codiemb_st.RoundRobinTaskBatchSampler`: dataset names, the task of
each dataset, batch sizes, and the trainer's own settings (which an option must not contradict)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from torch.utils.data import BatchSampler, ConcatDataset

from codiemb_st.validation import check_positive_int

# The label columns sentence-transformers' data collator recognises (DEFAULT_LABEL_COLUMNS); a dataset with one of
# them is a scored-pair (STS) dataset when tasks are inferred.
_LABEL_COLUMNS = ("label", "labels", "score", "scores")


def _is_positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def check_options(
    tasks: Mapping[str, Sequence[str]] | None,
    batch_sizes: Mapping[str, int] | None,
    world_size: int | None,
    gradient_accumulation_steps: int | None,
) -> None:
    if tasks is not None:
        if not isinstance(tasks, Mapping) or not tasks:
            raise TypeError(
                "`tasks` must be a non-empty dict of task name -> list of dataset names, e.g. "
                f"{{'ir': ['scifact'], 'sts': ['stsb']}}; got {tasks!r}."
            )
        for task, names in tasks.items():
            if not isinstance(task, str):
                raise TypeError(f"`tasks` keys must be task names (str); got {task!r}.")
            if isinstance(names, str) or not isinstance(names, Sequence) or not names:
                raise TypeError(
                    f"`tasks[{task!r}]` must be a non-empty list of dataset names; got {names!r}"
                    + (f" (write [{names!r}])." if isinstance(names, str) else ".")
                )
    if batch_sizes is not None:
        if not isinstance(batch_sizes, Mapping):
            raise TypeError(f"`batch_sizes` must be a dict of task name -> batch size; got {batch_sizes!r}.")
        for task, size in batch_sizes.items():
            check_positive_int(f"batch_sizes[{task!r}]", size)
    if world_size is not None:
        check_positive_int("world_size", world_size)
    if gradient_accumulation_steps is not None:
        check_positive_int("gradient_accumulation_steps", gradient_accumulation_steps)


def check_sizes(argument: str, sizes: Mapping[str, int] | None, what: str) -> None:
    if sizes is None:
        return
    if not isinstance(sizes, Mapping):
        raise TypeError(f"`{argument}` must be a dict of {what} name -> batch size; got {sizes!r}.")
    for name, size in sizes.items():
        check_positive_int(f"{argument}[{name!r}]", size)


def resolve_against_trainer(name: str, value: int | None, trainer_args: Any, default: int | None) -> int | None:
    """``value``, or the trainer's setting when ``value`` is None; refuses a value that differs from the trainer's."""
    trainer_value = getattr(trainer_args, name, None) if trainer_args is not None else None
    if not _is_positive_int(trainer_value):
        trainer_value = None
    if value is None:
        return trainer_value if trainer_value is not None else default
    if trainer_value is not None and value != trainer_value:
        consequence = (
            "every optimizer step would mix batches of different datasets (and tasks)"
            if name == "gradient_accumulation_steps"
            else "the ranks would be dealt batches of different datasets in the same step"
        )
        raise ValueError(
            f"RoundRobinTaskBatchSampler: `{name}`={value} but the trainer has {name}={trainer_value} "
            f"(SentenceTransformerTrainingArguments.{name}): {consequence}. Leave `{name}` unset in with_options() "
            f"(the trainer's value is used) or set it to {trainer_value}."
        )
    return value


def names_list(dataset_names: Sequence[str] | Mapping[str, Any]) -> list[str]:
    names = list(dataset_names.keys()) if isinstance(dataset_names, Mapping) else list(dataset_names)
    if isinstance(dataset_names, str) or not all(isinstance(name, str) for name in names):
        raise TypeError(f"`dataset_names` must be a list of dataset names or a DatasetDict; got {dataset_names!r}.")
    if len(set(names)) != len(names):
        raise ValueError(f"`dataset_names` has repeated names: {names}.")
    return names


def resolve_dataset_names(
    dataset: ConcatDataset,
    dataset_names: Sequence[str] | Mapping[str, Any] | None,
    explicit_tasks: bool,
) -> list[str]:
    num_datasets = len(dataset.datasets)
    if dataset_names is not None:
        names = names_list(dataset_names)
        if len(names) != num_datasets:
            raise ValueError(
                f"`dataset_names` has {len(names)} names but the training data has {num_datasets} datasets; pass "
                "the names of the DatasetDict given as `train_dataset`, in its order."
            )
        row_names = _row_dataset_names(dataset)
        if all(isinstance(name, str) for name in row_names) and row_names != names:
            raise ValueError(
                f"`dataset_names` {names} does not match the training datasets, which are, in order, {row_names} "
                "(the `dataset_name` the trainer gives each row). The names must be in the DatasetDict's order, or "
                "tasks and batch sizes would go to the wrong datasets: pass `dataset_names=train_dataset`."
            )
        if isinstance(dataset_names, Mapping):
            lengths = [len(dataset_names[name]) for name in names]
            if lengths != [len(sub_dataset) for sub_dataset in dataset.datasets]:
                raise ValueError(
                    "`dataset_names` is a DatasetDict whose dataset sizes differ from the training data's; pass the "
                    "DatasetDict given as `train_dataset`."
                )
        return names

    # The trainer adds a lazy `dataset_name` column when `loss` or `prompts` is a dict keyed by dataset name.
    names = _row_dataset_names(dataset)
    if all(isinstance(name, str) for name in names) and len(set(names)) == num_datasets:
        return names
    if explicit_tasks:
        raise ValueError(
            "Cannot match the dataset names in `tasks` to the training datasets: the rows carry no `dataset_name` "
            "(the trainer adds it only when `loss` or `prompts` is a dict keyed by dataset name). Pass "
            "`dataset_names=train_dataset` (the DatasetDict) to `RoundRobinTaskBatchSampler.with_options`."
        )
    return [f"dataset_{i}" for i in range(num_datasets)]


def _row_dataset_names(dataset: ConcatDataset) -> list[str | None]:
    """The ``dataset_name`` of each sub-dataset's first row (None where the rows carry none)."""
    names: list[str | None] = []
    for sub_dataset in dataset.datasets:
        first_row = sub_dataset[0] if len(sub_dataset) else None
        name = first_row.get("dataset_name") if isinstance(first_row, Mapping) else None
        if isinstance(name, list):  # a formatted row may hold a one-element list
            name = name[0] if name else None
        names.append(name if isinstance(name, str) else None)
    return names


def check_task_names(tasks: Mapping[str, Sequence[str]], names: list[str]) -> None:
    assigned = [name for members in tasks.values() for name in members]
    unknown = sorted({name for name in assigned if name not in names})
    if unknown:
        raise ValueError(f"`tasks` names unknown datasets {unknown}; the training datasets are {names}.")
    repeated = sorted({name for name in assigned if assigned.count(name) > 1})
    if repeated:
        raise ValueError(f"`tasks` assigns datasets {repeated} to more than one task (or twice); give each one task.")
    missing = [name for name in names if name not in assigned]
    if missing:
        raise ValueError(
            f"`tasks` gives no task for datasets {missing}; every training dataset needs one (training datasets: "
            f"{names})."
        )


def resolve_tasks(
    dataset: ConcatDataset, names: list[str], tasks: Mapping[str, Sequence[str]] | None
) -> dict[str, str]:
    if tasks is not None:
        check_task_names(tasks, names)
        return {name: task for task, members in tasks.items() for name in members}
    inferred = {}
    for name, sub_dataset in zip(names, dataset.datasets):
        columns = getattr(sub_dataset, "column_names", None)
        if columns is None:
            raise ValueError(
                f"Cannot infer the task of dataset {name!r} (it has no `column_names`); pass `tasks` explicitly."
            )
        inferred[name] = "sts" if any(column in _LABEL_COLUMNS for column in columns) else "ir"
    return inferred


def resolve_batch_sizes(
    task_names: list[str],
    batch_sizes: Mapping[str, int] | None,
    batch_samplers: list[BatchSampler],
) -> dict[str, int]:
    batch_sizes = dict(batch_sizes or {})
    unknown = sorted(set(batch_sizes) - set(task_names))
    if unknown:
        raise ValueError(f"`batch_sizes` names unknown tasks {unknown}; the tasks are {task_names}.")
    default_sizes = {sampler.batch_size for sampler in batch_samplers}
    resolved = {}
    for task in task_names:
        if task in batch_sizes:
            resolved[task] = batch_sizes[task]
        elif len(default_sizes) == 1 and _is_positive_int(next(iter(default_sizes))):
            resolved[task] = next(iter(default_sizes))
        else:
            raise ValueError(
                f"No batch size for task {task!r}: add it to `batch_sizes` (the per-dataset batch samplers have no "
                f"single batch size: {sorted(default_sizes, key=str)})."
            )
    return resolved
