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
from codiemb_st._sampler_options import (
    check_options,
    check_sizes,
    check_task_names,
    names_list,
    resolve_against_trainer,
    resolve_batch_sizes,
    resolve_dataset_names,
    resolve_tasks,
)
from codiemb_st.epoch_plan import plan_epoch

logger = logging.getLogger(__name__)


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
        check_options(tasks, batch_sizes, world_size, gradient_accumulation_steps)
        check_sizes("dataset_batch_sizes", dataset_batch_sizes, "dataset")

        # The trainer calls the factory with (dataset, batch_samplers, generator, seed) only; its own settings are
        # read from the caller so that a mismatch cannot silently mix datasets within an optimizer step.
        trainer_args = calling_trainer_args()
        self.gradient_accumulation_steps = resolve_against_trainer(
            "gradient_accumulation_steps", gradient_accumulation_steps, trainer_args, default=1
        )
        if world_size is not None:  # unset: torch.distributed's world size, as accelerate deals batches by it
            resolve_against_trainer("world_size", world_size, trainer_args, default=None)
        self.world_size = world_size if world_size is not None else get_world_size()
        self.batches_per_step = self.world_size * self.gradient_accumulation_steps

        self.dataset_names = resolve_dataset_names(dataset, dataset_names, explicit_tasks=tasks is not None)
        self.dataset_tasks = resolve_tasks(dataset, self.dataset_names, tasks)
        self.task_names = list(dict.fromkeys(self.dataset_tasks.values()))
        self.task_batch_sizes = resolve_batch_sizes(self.task_names, batch_sizes, batch_samplers)
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
        #: The epoch's step counts (pure arithmetic, see :func:`codiemb_st.epoch_plan.plan_epoch`).
        self.plan = plan_epoch(
            dict(zip(self.dataset_names, self._num_rows)),
            self.dataset_tasks,
            self.dataset_batch_sizes,
            world_size=self.world_size,
            gradient_accumulation_steps=self.gradient_accumulation_steps,
        )
        self.steps_per_dataset = self.plan.steps_per_dataset
        self.dropped_per_pass = self.plan.dropped_per_pass  # leftover rows of every pass (logged)
        self.steps_per_task = self.plan.steps_per_task
        self.steps_per_epoch = self.plan.steps_per_epoch
        self.batch_size = self.plan.batch_size  # None with mixed batch sizes (see EpochPlan.batch_size)
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
        check_options(tasks, batch_sizes, world_size, gradient_accumulation_steps)
        check_sizes("dataset_batch_sizes", dataset_batch_sizes, "dataset")
        if dataset_names is not None and tasks is not None:
            names = names_list(dataset_names)
            check_task_names(tasks, names)
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


__all__ = ["RoundRobinTaskBatchSampler"]
