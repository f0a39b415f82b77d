"""The epoch plan of :class:`codiemb_st.RoundRobinTaskBatchSampler` as pure arithmetic: how many steps each dataset
and task gives per pass, how many rows each pass drops, and how long an epoch is.

A *step* is a run of ``world_size x gradient_accumulation_steps`` consecutive batches of one dataset (one optimizer
step on every rank). Tasks take turns, so the task with the most steps sets the epoch length and smaller tasks
cycle. Nothing here needs torch or a dataset: the sampler resolves its options, calls :func:`plan_epoch` on the
dataset sizes, and only draws the random order itself.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass


@dataclass(frozen=True)
class EpochPlan:
    """The step counts of one epoch (see :func:`plan_epoch`).

    Attributes:
        batches_per_step: ``world_size x gradient_accumulation_steps``.
        task_names: The tasks in turn order.
        steps_per_dataset: Dataset name -> full steps per pass over it.
        dropped_per_pass: Dataset name -> rows left over on every pass (fewer than one step).
        steps_per_task: Task name -> steps per pass over all its datasets.
        steps_per_epoch: Optimizer steps per epoch: the number of tasks x the largest task's steps.
        batch_size: The one batch size of every dataset, or None when they differ (accelerate's
            ``BatchSamplerShard`` would otherwise skip rounds that end in a batch of another size).
    """

    batches_per_step: int
    task_names: tuple[str, ...]
    steps_per_dataset: dict[str, int]
    dropped_per_pass: dict[str, int]
    steps_per_task: dict[str, int]
    steps_per_epoch: int
    batch_size: int | None

    @property
    def num_batches(self) -> int:
        """Batches per epoch over all ranks: ``steps_per_epoch x batches_per_step``."""
        return self.steps_per_epoch * self.batches_per_step


def plan_epoch(
    num_rows: Mapping[str, int],
    dataset_tasks: Mapping[str, str],
    dataset_batch_sizes: Mapping[str, int],
    *,
    world_size: int = 1,
    gradient_accumulation_steps: int = 1,
) -> EpochPlan:
    """Plan one epoch of round-robin task steps.

    Args:
        num_rows: Dataset name -> number of rows, in dataset order.
        dataset_tasks: Dataset name -> its task; tasks take turns in order of first appearance.
        dataset_batch_sizes: Dataset name -> per-device batch size.
        world_size: Number of data-parallel processes.
        gradient_accumulation_steps: Forward steps per optimizer step.

    Returns:
        The :class:`EpochPlan`.

    Raises:
        ValueError: If a dataset has fewer rows than one step needs.

    Example:
        ::

            from codiemb_st.epoch_plan import plan_epoch

            plan = plan_epoch({"scifact": 100, "stsb": 50}, {"scifact": "ir", "stsb": "sts"}, {"scifact": 8, "stsb": 16})
            plan.steps_per_task  # {"ir": 12, "sts": 3}
            plan.steps_per_epoch  # 24: two tasks x 12 steps, the STS task cycles 4 times
    """
    batches_per_step = world_size * gradient_accumulation_steps
    steps_per_dataset: dict[str, int] = {}
    dropped_per_pass: dict[str, int] = {}
    for name, rows in num_rows.items():
        task = dataset_tasks[name]
        rows_per_step = batches_per_step * dataset_batch_sizes[name]
        if rows < rows_per_step:
            raise ValueError(
                f"Dataset {name!r} (task {task!r}) has {rows} rows, fewer than one step needs: "
                f"world_size ({world_size}) x gradient_accumulation_steps "
                f"({gradient_accumulation_steps}) x batch size ({dataset_batch_sizes[name]}) = "
                f"{rows_per_step}. Lower `batch_sizes[{task!r}]` (or `dataset_batch_sizes[{name!r}]`) or leave "
                "the dataset out."
            )
        steps_per_dataset[name], dropped_per_pass[name] = divmod(rows, rows_per_step)
    task_names = tuple(dict.fromkeys(dataset_tasks[name] for name in num_rows))
    steps_per_task = {
        task: sum(steps for name, steps in steps_per_dataset.items() if dataset_tasks[name] == task)
        for task in task_names
    }
    sizes = {dataset_batch_sizes[name] for name in num_rows}
    return EpochPlan(
        batches_per_step=batches_per_step,
        task_names=task_names,
        steps_per_dataset=steps_per_dataset,
        dropped_per_pass=dropped_per_pass,
        steps_per_task=steps_per_task,
        steps_per_epoch=len(task_names) * max(steps_per_task.values()),
        batch_size=sizes.pop() if len(sizes) == 1 else None,
    )


__all__ = ["EpochPlan", "plan_epoch"]
