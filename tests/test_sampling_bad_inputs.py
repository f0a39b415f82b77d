"""Bad options of RoundRobinTaskBatchSampler: the right exception naming the option.

Part of the bad-input tables (shared pieces: tests/bad_input_cases.py; the count: tests/test_bad_input_count.py).
"""

from __future__ import annotations

from typing import Any

import pytest
from bad_input_cases import (
    Case,
    Env,
    run_case,
)
from datasets import Dataset, DatasetDict
from sentence_transformers import SentenceTransformerTrainer, SentenceTransformerTrainingArguments
from sentence_transformers.sentence_transformer.losses import CoSENTLoss
from torch.utils.data import ConcatDataset, RandomSampler

from codiemb_st import (
    MultiPositiveCachedInfoNCELoss,
    RoundRobinTaskBatchSampler,
)
from codiemb_st._compat import DefaultBatchSampler


def _sampler_datasets(sizes: dict[str, int] | None = None) -> DatasetDict:
    sizes = sizes or {"ir": 24, "sts": 24}
    return DatasetDict(
        {
            "ir": Dataset.from_dict(
                {"anchor": [f"q {i}" for i in range(sizes["ir"])], "positive": [f"p {i}" for i in range(sizes["ir"])]}
            ),
            "sts": Dataset.from_dict(
                {
                    "sentence1": [f"a {i}" for i in range(sizes["sts"])],
                    "sentence2": [f"b {i}" for i in range(sizes["sts"])],
                    "score": [i / sizes["sts"] for i in range(sizes["sts"])],
                }
            ),
        }
    )


def _build_sampler(sizes: dict[str, int] | None = None, **options) -> RoundRobinTaskBatchSampler:
    data = _sampler_datasets(sizes)
    children = [DefaultBatchSampler(RandomSampler(d), batch_size=4, drop_last=False) for d in data.values()]
    options = {"tasks": {"ir": ["ir"], "sts": ["sts"]}, "dataset_names": list(data), **options}
    return RoundRobinTaskBatchSampler.with_options(**options)(ConcatDataset(list(data.values())), children, seed=0)


def _trainer_dataloader(env: Env, trainer_accumulation: int, **sampler_options) -> Any:
    data = _sampler_datasets()
    args = SentenceTransformerTrainingArguments(
        output_dir=str(env.tmp / "trainer"),
        per_device_train_batch_size=4,
        gradient_accumulation_steps=trainer_accumulation,
        multi_dataset_batch_sampler=RoundRobinTaskBatchSampler.with_options(
            tasks={"ir": ["ir"], "sts": ["sts"]}, **sampler_options
        ),
        report_to="none",
        use_cpu=True,
    )
    loss = {"ir": MultiPositiveCachedInfoNCELoss(env.model), "sts": CoSENTLoss(env.model)}
    trainer = SentenceTransformerTrainer(model=env.model, args=args, train_dataset=data, loss=loss)
    return trainer.get_train_dataloader()


SAMPLER_CASES = [
    Case(
        "accumulation-differs-from-trainer",
        lambda e: _trainer_dataloader(e, 2, gradient_accumulation_steps=1),
        ValueError,
        r"`gradient_accumulation_steps`=1 but the trainer has gradient_accumulation_steps=2.*mix",
    ),
    Case(
        "world-size-differs-from-trainer",
        lambda e: _trainer_dataloader(e, 1, world_size=2),
        ValueError,
        r"`world_size`=2 but the trainer has world_size=1",
    ),
    Case(
        "accumulation-zero",
        lambda e: _build_sampler(gradient_accumulation_steps=0),
        ValueError,
        "`gradient_accumulation_steps` must be an integer >= 1",
    ),
    Case(
        "tasks-unknown-dataset",
        lambda e: _build_sampler(tasks={"ir": ["ir", "typo"], "sts": ["sts"]}),
        ValueError,
        r"unknown datasets \['typo'\]",
    ),
    Case(
        "tasks-member-is-a-string",
        lambda e: _build_sampler(tasks={"ir": "ir", "sts": ["sts"]}),
        TypeError,
        r"`tasks\['ir'\]`.*write \['ir'\]",
    ),
    Case("tasks-not-a-dict", lambda e: _build_sampler(tasks=["ir", "sts"]), TypeError, "`tasks` must be a non-empty"),
    Case(
        "tasks-dataset-missing",
        lambda e: _build_sampler(tasks={"ir": ["ir"]}),
        ValueError,
        r"gives no task for datasets \['sts'\]",
    ),
    Case(
        "batch-sizes-unknown-task",
        lambda e: _build_sampler(batch_sizes={"nli": 4}),
        ValueError,
        r"`batch_sizes` names unknown tasks \['nli'\]",
    ),
    Case(
        "batch-size-zero",
        lambda e: _build_sampler(batch_sizes={"ir": 0}),
        ValueError,
        r"`batch_sizes\['ir'\]` must be an integer >= 1",
    ),
    Case(
        "dataset-smaller-than-a-step",
        lambda e: _build_sampler(world_size=4, batch_sizes={"ir": 8}),
        ValueError,
        r"Dataset 'ir' \(task 'ir'\) has 24 rows, fewer than one step needs",
    ),
    Case(
        "dataset-names-in-another-order",
        lambda e: _trainer_dataloader(e, 1, dataset_names=["sts", "ir"]),
        ValueError,
        r"`dataset_names` \['sts', 'ir'\] does not match the training datasets, which are, in order, \['ir', 'sts'\]",
    ),
    Case(
        "dataset-names-count",
        lambda e: _build_sampler(dataset_names=["ir"], tasks={"ir": ["ir"]}),
        ValueError,
        "`dataset_names` has 1 names but the training data has 2 datasets",
    ),
]


def test_sampler_takes_the_trainers_accumulation_steps(env):
    sampler = _trainer_dataloader(env, 3).batch_sampler
    assert isinstance(sampler, RoundRobinTaskBatchSampler)
    assert sampler.gradient_accumulation_steps == 3 and sampler.batches_per_step == 3
    # Outside a trainer, the default is still 1.
    assert _build_sampler().gradient_accumulation_steps == 1


@pytest.mark.parametrize("case", SAMPLER_CASES, ids=[f"sampler:{case.id}" for case in SAMPLER_CASES])
def test_bad_input_gets_a_clear_answer(case, env):
    run_case(case, env)
