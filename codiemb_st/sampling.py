"""A multi-dataset batch sampler that keeps every step on one task and one dataset, on every rank.

sentence-transformers' built-in multi-dataset samplers change dataset from one batch to the next. Under DDP,
accelerate's ``BatchSamplerShard`` deals global batch ``i`` to rank ``i % world_size``, so consecutive batches of
different datasets end up on different ranks in the same step: a loss that gathers embeddings across devices then
waits for ranks that never call it (a deadlock), and a task-specific loss sees mixed gradients. This sampler emits
runs of ``world_size x gradient_accumulation_steps`` batches of one dataset, so one optimizer step is one dataset
(hence one task and one loss) on every rank.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Iterator, Mapping, Sequence
from itertools import accumulate
from typing import Any

import torch
from torch.utils.data import BatchSampler, ConcatDataset

from codiemb_st._compat import (
    DefaultBatchSampler,
    MultiDatasetDefaultBatchSampler,
    calling_trainer_args,
    get_world_size,
)

logger = logging.getLogger(__name__)

# The label columns sentence-transformers' data collator recognises (DEFAULT_LABEL_COLUMNS); a dataset with one of
# them is a scored-pair (STS) dataset when tasks are inferred.
_LABEL_COLUMNS = ("label", "labels", "score", "scores")


class RoundRobinTaskBatchSampler(MultiDatasetDefaultBatchSampler):
    def __init__(
        self,
        dataset: ConcatDataset,
        batch_samplers: list[BatchSampler],
        generator: torch.Generator | None = None,
        seed: int | None = 0,
        *,
        tasks: Mapping[str, Sequence[str]] | None = None,
        batch_sizes: Mapping[str, int] | None = None,
        dataset_names: Sequence[str] | Mapping[str, Any] | None = None,
        world_size: int | None = None,
        gradient_accumulation_steps: int | None = None,
        dataset_batch_sizes: Mapping[str, int] | None = None,
    ) -> None:
        """
        A multi-dataset batch sampler for CoDiEmb-style training: every batch holds one dataset, every rank
        processes the same dataset at every step, and tasks (groups of datasets, e.g. ``"ir"`` and ``"sts"``) take
        turns.

        The sampler plans each epoch in *steps*. A step is a run of ``world_size x gradient_accumulation_steps``
        consecutive batches of one dataset, each of the batch size of that dataset's task. accelerate's
        ``BatchSamplerShard`` deals batch ``i`` to rank ``i % world_size``, so every rank gets a batch of the same
        dataset in every forward pass, and with ``gradient_accumulation_steps`` equal to the trainer's, every
        optimizer step is one dataset. Cross-device losses (which gather embeddings from all ranks) therefore see a
        pure global batch and never wait for a rank that is busy with another loss.

        Within an epoch:

        - Tasks take turns in the order of ``tasks`` (``ir, sts, ir, sts, ...``), so each task gets the same number
          of optimizer steps.
        - Within a task, steps are drawn from its datasets in proportion to their sizes (a random order of all of
          the task's steps, as sentence-transformers' ``PROPORTIONAL`` sampler does for batches).
        - The task with the most steps sets the epoch length: each of its examples is used exactly once per epoch.
          Smaller tasks cycle, reshuffled on every pass, to keep up.
        - A dataset's rows are shuffled and cut into full steps; the rows left over (fewer than one step) are
          dropped for that pass. The count per dataset is in :attr:`dropped_per_pass` and is logged as a
          warning. Different rows are left over each epoch because the order is reshuffled.

        The order depends only on ``seed + epoch``, so every rank builds the same plan without communicating;
        ``set_epoch`` (called by the trainer every epoch) reshuffles and is forwarded to the child samplers.

        The trainer instantiates the sampler itself, so pass the options through :meth:`with_options`::

            args = SentenceTransformerTrainingArguments(
                ...,
                multi_dataset_batch_sampler=RoundRobinTaskBatchSampler.with_options(
                    tasks={"ir": ["scifact", "snli"], "sts": ["stsb"]},
                    batch_sizes={"ir": 8, "sts": 32},
                    # gradient_accumulation_steps: taken from the trainer's arguments
                ),
            )

        This sampler builds its own batches from shuffled indices (of the task's batch size); the per-dataset
        batch samplers the trainer passes in only provide the default batch size (``per_device_train_batch_size``),
        so ``args.batch_sampler`` (e.g. ``NO_DUPLICATES``) has no effect and a warning says so.

        Args:
            dataset: The concatenation of the training datasets (built by the trainer from the ``DatasetDict``).
            batch_samplers: One batch sampler per dataset (built by the trainer); only their ``batch_size`` is used,
                as the default batch size of tasks missing from ``batch_sizes``.
            generator: Unused (accepted for the trainer's calling convention); the sampler seeds its own generator
                with ``seed + epoch`` so that it never disturbs a generator shared with other samplers.
            seed: Seed of the sampling order (the trainer passes ``args.seed``). ``None`` means 0: under DDP every
                rank must build the same order.
            tasks: Task name -> the dataset names of that task, covering every dataset of the ``DatasetDict``
                exactly once; tasks take turns in this order. Default: a dataset with a ``score``/``scores``/
                ``label``/``labels`` column is ``"sts"``, any other is ``"ir"`` (turns in order of first appearance).
            batch_sizes: Task name -> per-device batch size of that task (e.g. small for IR with long passages, larger
                for STS pairs). Tasks not listed use ``per_device_train_batch_size``.
            dataset_names: The dataset names in ``DatasetDict`` order (a list, or the ``DatasetDict`` itself). By
                default they are read from the ``dataset_name`` column the trainer adds to every row when ``loss``
                or ``prompts`` is a dict keyed by dataset name (always the case with one loss per task).
            world_size: Number of data-parallel processes. Default: ``torch.distributed``'s world size (1 when not
                distributed). A value that differs from the trainer's ``args.world_size`` raises ``ValueError``.
            gradient_accumulation_steps: Forward steps per optimizer step. ``None`` (default): the trainer's
                ``args.gradient_accumulation_steps`` when the trainer builds the sampler, else 1. A value that
                differs from the trainer's raises ``ValueError``: every optimizer step would mix datasets.
            dataset_batch_sizes: Dataset name -> per-device batch size of that dataset, overriding its task's (e.g.
                a long-passage IR dataset smaller than the task's other datasets). A step is still one dataset.

        Raises:
            ValueError: On unknown, missing or repeated dataset names in ``tasks``, unknown task names in
                ``batch_sizes``, non-positive sizes, a dataset with fewer rows than one step needs, or a
                ``gradient_accumulation_steps`` / ``world_size`` that differs from the trainer's.
            TypeError: On options of the wrong type.

        Example:
            ::

                from datasets import DatasetDict
                from sentence_transformers import (
                    SentenceTransformer,
                    SentenceTransformerTrainer,
                    SentenceTransformerTrainingArguments,
                )
                from sentence_transformers.sentence_transformer.losses import CoSENTLoss, MultipleNegativesRankingLoss

                from codiemb_st import RoundRobinTaskBatchSampler

                model = SentenceTransformer("sentence-transformers/all-MiniLM-L6-v2")
                train_dataset = DatasetDict({"snli": ir_dataset, "stsb": sts_dataset})
                loss = {"snli": MultipleNegativesRankingLoss(model), "stsb": CoSENTLoss(model)}
                args = SentenceTransformerTrainingArguments(
                    output_dir="out",
                    per_device_train_batch_size=16,
                    multi_dataset_batch_sampler=RoundRobinTaskBatchSampler.with_options(
                        tasks={"ir": ["snli"], "sts": ["stsb"]}, batch_sizes={"ir": 16, "sts": 32}
                    ),
                )
                trainer = SentenceTransformerTrainer(
                    model=model, args=args, train_dataset=train_dataset, loss=loss
                )
                trainer.train()
        """
        super().__init__(dataset, batch_samplers=batch_samplers, generator=generator, seed=seed)
        _check_options(tasks, batch_sizes, world_size, gradient_accumulation_steps)
        _check_sizes("dataset_batch_sizes", dataset_batch_sizes, "dataset")

        # The trainer calls the factory with (dataset, batch_samplers, generator, seed) only; its own settings are
        # read from the caller so that a mismatch cannot silently mix datasets within an optimizer step.
        trainer_args = calling_trainer_args()
        self.gradient_accumulation_steps = _resolve_against_trainer(
            "gradient_accumulation_steps", gradient_accumulation_steps, trainer_args, default=1
        )
        if world_size is not None:  # unset: torch.distributed's world size, as accelerate deals batches by it
            _resolve_against_trainer("world_size", world_size, trainer_args, default=None)
        self.world_size = world_size if world_size is not None else get_world_size()
        self.batches_per_step = self.world_size * self.gradient_accumulation_steps

        self.dataset_names = _resolve_dataset_names(dataset, dataset_names, explicit_tasks=tasks is not None)
        self.dataset_tasks = _resolve_tasks(dataset, self.dataset_names, tasks)
        self.task_names = list(dict.fromkeys(self.dataset_tasks.values()))
        self.task_batch_sizes = _resolve_batch_sizes(self.task_names, batch_sizes, batch_samplers)
        unknown = sorted(set(dataset_batch_sizes or {}) - set(self.dataset_names))
        if unknown:
            raise ValueError(
                f"`dataset_batch_sizes` names unknown datasets {unknown}; the datasets are {self.dataset_names}."
            )
        #: Per-device batch size of every dataset (its own, else its task's).
        self.dataset_batch_sizes = {
            name: (dataset_batch_sizes or {}).get(name, self.task_batch_sizes[task])
            for name, task in self.dataset_tasks.items()
        }

        self._num_rows = [len(sub_dataset) for sub_dataset in dataset.datasets]
        self._offsets = [0, *accumulate(self._num_rows)][:-1]
        # Steps per pass over each dataset; the leftover rows of a pass are dropped (counted and logged).
        self.steps_per_dataset: dict[str, int] = {}
        self.dropped_per_pass: dict[str, int] = {}
        for name, num_rows in zip(self.dataset_names, self._num_rows):
            task = self.dataset_tasks[name]
            rows_per_step = self.batches_per_step * self.dataset_batch_sizes[name]
            if num_rows < rows_per_step:
                raise ValueError(
                    f"Dataset {name!r} (task {task!r}) has {num_rows} rows, fewer than one step needs: "
                    f"world_size ({self.world_size}) x gradient_accumulation_steps "
                    f"({self.gradient_accumulation_steps}) x batch size ({self.dataset_batch_sizes[name]}) = "
                    f"{rows_per_step}. Lower `batch_sizes[{task!r}]` (or `dataset_batch_sizes[{name!r}]`) or leave "
                    "the dataset out."
                )
            self.steps_per_dataset[name] = num_rows // rows_per_step
            self.dropped_per_pass[name] = num_rows % rows_per_step

        self.steps_per_task = {
            task: sum(steps for name, steps in self.steps_per_dataset.items() if self.dataset_tasks[name] == task)
            for task in self.task_names
        }
        # Tasks take turns, so every task gets as many steps as the largest one; smaller tasks cycle.
        self.steps_per_epoch = len(self.task_names) * max(self.steps_per_task.values())

        # With mixed batch sizes, `batch_size` must be None: BatchSamplerShard (non-split mode) only yields a
        # round of batches when the last one has exactly `batch_size` rows, and would silently skip every round
        # that ends in a batch of another task's size.
        sizes = set(self.dataset_batch_sizes.values())
        self.batch_size = sizes.pop() if len(sizes) == 1 else None
        self.drop_last = True  # only full batches are ever emitted

        if any(type(sampler) is not DefaultBatchSampler for sampler in batch_samplers):
            logger.warning(
                "RoundRobinTaskBatchSampler builds its own batches from shuffled indices; the per-dataset batch "
                "sampler set with `batch_sampler` (%s) is not used.",
                type(batch_samplers[0]).__name__,
            )
        self._log_plan()

    @classmethod
    def with_options(
        cls,
        *,
        tasks: Mapping[str, Sequence[str]] | None = None,
        batch_sizes: Mapping[str, int] | None = None,
        dataset_names: Sequence[str] | Mapping[str, Any] | None = None,
        world_size: int | None = None,
        gradient_accumulation_steps: int | None = None,
        dataset_batch_sizes: Mapping[str, int] | None = None,
    ) -> functools.partial[RoundRobinTaskBatchSampler]:
        """Bind the options; pass the result as ``multi_dataset_batch_sampler`` in the training arguments.

        The trainer calls it with ``(dataset, batch_samplers=..., generator=..., seed=...)``. The options are
        type-checked here, so a typo fails before training starts; names are checked when the trainer builds the
        dataloader (or here already, when ``dataset_names`` is given). See :class:`RoundRobinTaskBatchSampler` for
        the options.
        """
        _check_options(tasks, batch_sizes, world_size, gradient_accumulation_steps)
        _check_sizes("dataset_batch_sizes", dataset_batch_sizes, "dataset")
        if dataset_names is not None and tasks is not None:
            names = _names_list(dataset_names)
            _check_task_names(tasks, names)
        return functools.partial(
            cls,
            tasks=tasks,
            batch_sizes=batch_sizes,
            dataset_names=dataset_names,
            world_size=world_size,
            gradient_accumulation_steps=gradient_accumulation_steps,
            dataset_batch_sizes=dataset_batch_sizes,
        )

    def __len__(self) -> int:
        """The exact number of batches per epoch (over all ranks): steps x world_size x gradient accumulation."""
        return self.steps_per_epoch * self.batches_per_step

    def __iter__(self) -> Iterator[list[int]]:
        """Yield global indices (child index + offset of its dataset), one run of a dataset per step."""
        generator = torch.Generator()
        generator.manual_seed((0 if self.seed is None else self.seed) + self.epoch)
        streams = [self._task_steps(task, generator) for task in self.task_names]
        for _ in range(max(self.steps_per_task.values())):
            for stream in streams:
                yield from next(stream)

    def _task_steps(self, task: str, generator: torch.Generator) -> Iterator[list[list[int]]]:
        """Endless passes over one task: each pass shuffles every dataset, cuts it into steps of
        ``batches_per_step`` batches, and visits all steps of all the task's datasets in random order."""
        members = [i for i, name in enumerate(self.dataset_names) if self.dataset_tasks[name] == task]
        while True:
            steps: dict[int, torch.Tensor] = {}
            for i in members:
                num_steps = self.steps_per_dataset[self.dataset_names[i]]
                batch_size = self.dataset_batch_sizes[self.dataset_names[i]]
                order = torch.randperm(self._num_rows[i], generator=generator)
                used = order[: num_steps * self.batches_per_step * batch_size]
                steps[i] = (used + self._offsets[i]).view(num_steps, self.batches_per_step, batch_size)
            step_owner = [i for i in members for _ in range(len(steps[i]))]
            next_step = dict.fromkeys(members, 0)
            for position in torch.randperm(len(step_owner), generator=generator).tolist():
                i = step_owner[position]
                yield steps[i][next_step[i]].tolist()
                next_step[i] += 1

    def _log_plan(self) -> None:
        longest = max(self.steps_per_task.values())
        for task in self.task_names:
            members = [name for name in self.dataset_names if self.dataset_tasks[name] == task]
            logger.info(
                "RoundRobinTaskBatchSampler: task %r (batch size %d, datasets %s): %d steps per pass, %.2f passes "
                "per epoch.",
                task,
                self.task_batch_sizes[task],
                [
                    name
                    if self.dataset_batch_sizes[name] == self.task_batch_sizes[task]
                    else f"{name} (batch size {self.dataset_batch_sizes[name]})"
                    for name in members
                ],
                self.steps_per_task[task],
                longest / self.steps_per_task[task],
            )
        dropped = {name: count for name, count in self.dropped_per_pass.items() if count}
        if dropped:
            logger.warning(
                "RoundRobinTaskBatchSampler drops the rows that do not fill a whole step (world_size %d x "
                "gradient_accumulation_steps %d x task batch size) on every pass over a dataset: %s. Different rows "
                "are dropped each epoch.",
                self.world_size,
                self.gradient_accumulation_steps,
                ", ".join(
                    f"{name}: {count} of {self._num_rows[self.dataset_names.index(name)]}"
                    for name, count in dropped.items()
                ),
            )
        logger.info(
            "RoundRobinTaskBatchSampler: %d optimizer steps (%d batches over all ranks) per epoch.",
            self.steps_per_epoch,
            len(self),
        )


def _is_positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _check_options(
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
            if not _is_positive_int(size):
                raise ValueError(f"`batch_sizes[{task!r}]` must be a positive integer; got {size!r}.")
    if world_size is not None and not _is_positive_int(world_size):
        raise ValueError(f"`world_size` must be a positive integer or None; got {world_size!r}.")
    if gradient_accumulation_steps is not None and not _is_positive_int(gradient_accumulation_steps):
        raise ValueError(
            f"`gradient_accumulation_steps` must be a positive integer or None; got {gradient_accumulation_steps!r}."
        )


def _check_sizes(argument: str, sizes: Mapping[str, int] | None, what: str) -> None:
    if sizes is None:
        return
    if not isinstance(sizes, Mapping):
        raise TypeError(f"`{argument}` must be a dict of {what} name -> batch size; got {sizes!r}.")
    for name, size in sizes.items():
        if not _is_positive_int(size):
            raise ValueError(f"`{argument}[{name!r}]` must be a positive integer; got {size!r}.")


def _resolve_against_trainer(name: str, value: int | None, trainer_args: Any, default: int | None) -> int | None:
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


def _names_list(dataset_names: Sequence[str] | Mapping[str, Any]) -> list[str]:
    names = list(dataset_names.keys()) if isinstance(dataset_names, Mapping) else list(dataset_names)
    if isinstance(dataset_names, str) or not all(isinstance(name, str) for name in names):
        raise TypeError(f"`dataset_names` must be a list of dataset names or a DatasetDict; got {dataset_names!r}.")
    if len(set(names)) != len(names):
        raise ValueError(f"`dataset_names` has repeated names: {names}.")
    return names


def _resolve_dataset_names(
    dataset: ConcatDataset,
    dataset_names: Sequence[str] | Mapping[str, Any] | None,
    explicit_tasks: bool,
) -> list[str]:
    num_datasets = len(dataset.datasets)
    if dataset_names is not None:
        names = _names_list(dataset_names)
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


def _check_task_names(tasks: Mapping[str, Sequence[str]], names: list[str]) -> None:
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


def _resolve_tasks(
    dataset: ConcatDataset, names: list[str], tasks: Mapping[str, Sequence[str]] | None
) -> dict[str, str]:
    if tasks is not None:
        _check_task_names(tasks, names)
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


def _resolve_batch_sizes(
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


__all__ = ["RoundRobinTaskBatchSampler"]
