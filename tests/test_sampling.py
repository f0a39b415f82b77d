from __future__ import annotations

import bisect
import logging
import math
from collections import Counter

import pytest
from accelerate.data_loader import BatchSamplerShard
from datasets import Dataset, DatasetDict
from sentence_transformers import SentenceTransformerTrainer, SentenceTransformerTrainingArguments
from sentence_transformers.base.sampler import RoundRobinBatchSampler
from sentence_transformers.sentence_transformer.losses import CoSENTLoss, MultipleNegativesRankingLoss
from torch.utils.data import ConcatDataset, RandomSampler

from codiemb_st import RoundRobinTaskBatchSampler
from codiemb_st._compat import DefaultBatchSampler

SIZES = {"ir_a": 61, "ir_b": 30, "sts": 47}
TASKS = {"ir": ["ir_a", "ir_b"], "sts": ["sts"]}
BATCH_SIZES = {"ir": 3, "sts": 5}


def make_datasets(sizes: dict[str, int] = SIZES) -> DatasetDict:
    datasets = {}
    for name, size in sizes.items():
        if name.startswith("sts"):
            columns = {"sentence1": [f"{name} s{i}" for i in range(size)], "sentence2": ["x"] * size}
            columns["score"] = [i / size for i in range(size)]
        else:
            columns = {
                "anchor": [f"{name} q{i}" for i in range(size)],
                "positive": [f"{name} p{i}" for i in range(size)],
            }
        datasets[name] = Dataset.from_dict(columns)
    return DatasetDict(datasets)


def trainer_inputs(dataset_dict: DatasetDict, batch_size: int = 4) -> tuple[ConcatDataset, list[DefaultBatchSampler]]:
    """What the trainer passes: a ConcatDataset and one DefaultBatchSampler per dataset."""
    children = [
        DefaultBatchSampler(RandomSampler(dataset), batch_size=batch_size, drop_last=False)
        for dataset in dataset_dict.values()
    ]
    return ConcatDataset(list(dataset_dict.values())), children


def build(dataset_dict: DatasetDict | None = None, seed: int = 0, **options) -> RoundRobinTaskBatchSampler:
    dataset_dict = dataset_dict if dataset_dict is not None else make_datasets()
    options = {"tasks": TASKS, "batch_sizes": BATCH_SIZES, "dataset_names": list(dataset_dict), **options}
    dataset, children = trainer_inputs(dataset_dict)
    return RoundRobinTaskBatchSampler.with_options(**options)(dataset, batch_samplers=children, seed=seed)


def shard(sampler, world_size: int, even_batches: bool = False) -> list[list[list[int]]]:
    """Per-rank batch lists, dealt by accelerate's real BatchSamplerShard (as under DDP)."""
    ranks = []
    for rank in range(world_size):
        sharded = BatchSamplerShard(sampler, world_size, rank, even_batches=even_batches)
        batches = list(sharded)
        assert len(batches) == len(sharded)
        ranks.append(batches)
    return ranks


def owner(offsets: list[int], names: list[str], index: int) -> str:
    return names[bisect.bisect_right(offsets, index) - 1]


@pytest.mark.parametrize("sizes", [SIZES, {"ir_a": 24, "ir_b": 30, "sts": 230}], ids=["ir-largest", "sts-largest"])
@pytest.mark.parametrize("grad_accum", [1, 2])
@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
def test_every_rank_on_the_same_dataset_with_task_turns_and_coverage(world_size, grad_accum, sizes):
    names = list(sizes)
    offsets = [0, sizes["ir_a"], sizes["ir_a"] + sizes["ir_b"]]
    task_of = {name: task for task, members in TASKS.items() for name in members}
    sampler = build(make_datasets(sizes), world_size=world_size, gradient_accumulation_steps=grad_accum)
    ranks = shard(sampler, world_size)

    # Independent expectations: a step is world_size x grad_accum batches of one dataset.
    batches_per_step = world_size * grad_accum
    steps = {name: sizes[name] // (batches_per_step * BATCH_SIZES[task_of[name]]) for name in names}
    task_steps = {task: sum(steps[name] for name in members) for task, members in TASKS.items()}
    longest = max(task_steps.values())
    assert len(sampler) == 2 * longest * batches_per_step
    assert sampler.dropped_per_pass == {
        name: sizes[name] % (batches_per_step * BATCH_SIZES[task_of[name]]) for name in names
    }
    assert all(len(batches) == len(sampler) // world_size for batches in ranks)

    local_steps = list(zip(*ranks))  # local_steps[k][r]: rank r's batch at forward step k
    step_datasets = []
    for batches in local_steps:
        datasets = {owner(offsets, names, index) for batch in batches for index in batch}
        assert len(datasets) == 1, f"ranks on different datasets in one step: {datasets}"
        dataset_name = datasets.pop()
        assert all(len(batch) == BATCH_SIZES[task_of[dataset_name]] for batch in batches)
        step_datasets.append(dataset_name)

    # One optimizer step = grad_accum forward steps of one dataset; tasks alternate ir, sts, ir, sts, ...
    optimizer_steps = [step_datasets[i : i + grad_accum] for i in range(0, len(step_datasets), grad_accum)]
    assert all(len(set(group)) == 1 for group in optimizer_steps)
    assert [task_of[group[0]] for group in optimizer_steps] == ["ir", "sts"] * longest

    uses = Counter(index for batches in local_steps for batch in batches for index in batch)
    for name in names:
        start = offsets[names.index(name)]
        counts = [uses[index] for index in range(start, start + sizes[name])]
        rows_per_pass = steps[name] * batches_per_step * BATCH_SIZES[task_of[name]]
        if task_steps[task_of[name]] == longest:
            # The largest task: every row at most once, all but the counted remainder used.
            assert max(counts) == 1 and sum(counts) == rows_per_pass == sizes[name] - sampler.dropped_per_pass[name]
        else:
            # A smaller task cycles: proportionally as many uses, never more than the number of passes.
            passes = longest / task_steps[task_of[name]]
            assert max(counts) <= math.ceil(passes)
            assert sum(counts) <= math.ceil(passes) * rows_per_pass
    # Within the largest task's single pass, each dataset contributes exactly its number of steps.
    largest = max(task_steps, key=task_steps.get)
    assert Counter(group[0] for group in optimizer_steps if task_of[group[0]] == largest) == {
        name: steps[name] for name in TASKS[largest]
    }
    if largest == "sts":  # the IR task cycles: both of its datasets are drawn from, in proportion
        ir_steps = Counter(group[0] for group in optimizer_steps if task_of[group[0]] == "ir")
        assert set(ir_steps) == {"ir_a", "ir_b"}


def test_smaller_task_passes_are_reshuffled_without_repeats():
    sampler = build(world_size=1)
    sts_offset = SIZES["ir_a"] + SIZES["ir_b"]
    sts_batches = [batch for batch in sampler if batch[0] >= sts_offset]
    per_pass = sampler.steps_per_task["sts"]
    assert per_pass == SIZES["sts"] // BATCH_SIZES["sts"] and len(sts_batches) == sampler.steps_per_task["ir"]
    passes = [sts_batches[i : i + per_pass] for i in range(0, len(sts_batches), per_pass)]
    assert len(passes) >= 3
    for rows in ([index for batch in batches for index in batch] for batches in passes):
        assert len(rows) == len(set(rows))  # no row twice within a pass
    full = [[index for batch in batches for index in batch] for batches in passes if len(batches) == per_pass]
    assert full[0] != full[1]  # each pass is reshuffled


def test_st_round_robin_puts_ranks_on_different_datasets():
    """The trap this sampler avoids: ST's ROUND_ROBIN under BatchSamplerShard with two ranks."""
    dataset_dict = make_datasets()
    dataset, children = trainer_inputs(dataset_dict)
    ranks = shard(RoundRobinBatchSampler(dataset, children, seed=0), 2)
    offsets, names = [0, 61, 91], list(SIZES)
    mixed_steps = [(owner(offsets, names, a[0]), owner(offsets, names, b[0])) for a, b in zip(*ranks) if a and b]
    assert mixed_steps and all(a != b for a, b in mixed_steps)


def test_deterministic_reshuffled_per_epoch_and_set_epoch_forwarded():
    first = build(seed=7)
    epoch0 = list(first)
    assert epoch0 == list(build(seed=7))
    first.set_epoch(1)
    assert all(child.epoch == 1 for child in first.batch_samplers)
    epoch1 = list(first)
    assert epoch1 != epoch0 and sorted(map(sorted, epoch1)) != sorted(map(sorted, epoch0))
    assert epoch1 == list(build(seed=8))  # the order depends on seed + epoch only
    first.set_epoch(0)
    assert list(first) == epoch0


def test_batch_size_attribute_and_even_batches():
    mixed = build(world_size=2)
    assert mixed.batch_size is None and mixed.drop_last
    # With mixed sizes BatchSamplerShard must not fill or skip: even_batches on or off gives the same shards.
    assert shard(mixed, 2, even_batches=True) == shard(mixed, 2, even_batches=False)
    same = build(world_size=2, batch_sizes={"ir": 4, "sts": 4})
    assert same.batch_size == 4
    assert shard(same, 2, even_batches=True) == shard(same, 2, even_batches=False)
    # Tasks without a batch size use the trainer's per-device batch size (4 in trainer_inputs).
    assert build(batch_sizes={"sts": 5}).task_batch_sizes == {"ir": 4, "sts": 5}


def test_drop_warning_counts_rows(caplog):
    with caplog.at_level(logging.INFO, logger="codiemb_st.sampling"):
        build(world_size=2)
    warnings = [record.getMessage() for record in caplog.records if record.levelno == logging.WARNING]
    # ir step = 2 x 3 rows: 61 % 6 = 1, 30 % 6 = 0; sts step = 2 x 5: 47 % 10 = 7
    assert len(warnings) == 1 and "ir_a: 1 of 61" in warnings[0] and "sts: 7 of 47" in warnings[0]
    assert "ir_b" not in warnings[0]


def test_default_tasks_inferred_from_label_column():
    sampler = build(tasks=None, batch_sizes=None)
    assert sampler.dataset_tasks == {"ir_a": "ir", "ir_b": "ir", "sts": "sts"}
    assert sampler.task_names == ["ir", "sts"] and sampler.task_batch_sizes == {"ir": 4, "sts": 4}


@pytest.mark.parametrize(
    ("options", "error", "message"),
    [
        ({"tasks": {"ir": ["ir_a", "ir_b", "nope"], "sts": ["sts"]}}, ValueError, r"unknown datasets \['nope'\]"),
        ({"tasks": {"ir": ["ir_a"], "sts": ["sts"]}}, ValueError, r"gives no task for datasets \['ir_b'\]"),
        ({"tasks": {"ir": ["ir_a", "ir_b"], "sts": ["sts", "ir_a"]}}, ValueError, r"\['ir_a'\] to more than one"),
        ({"tasks": {"ir": ["ir_a", "ir_b"], "sts": "sts"}}, TypeError, r"write \['sts'\]"),
        ({"tasks": ["ir_a"]}, TypeError, "must be a non-empty dict"),
        ({"batch_sizes": {"ir": 3, "nli": 5}}, ValueError, r"unknown tasks \['nli'\]"),
        ({"batch_sizes": {"ir": 0}}, ValueError, r"`batch_sizes\['ir'\]` must be an integer >= 1"),
        ({"gradient_accumulation_steps": 0}, ValueError, "`gradient_accumulation_steps` must be an integer >= 1"),
        ({"world_size": 2.0}, TypeError, "`world_size` must be an integer"),  # wrong type: TypeError
        (
            {"dataset_names": ["ir_a", "sts"], "tasks": None},
            ValueError,
            "has 2 names but the training data has 3 datasets",
        ),
    ],
)
def test_bad_options(options, error, message):
    with pytest.raises(error, match=message):
        build(**options)


def test_with_options_checks_names_early_and_too_small_datasets():
    with pytest.raises(ValueError, match=r"unknown datasets \['typo'\]"):
        RoundRobinTaskBatchSampler.with_options(tasks={"ir": ["typo"]}, dataset_names=make_datasets())
    with pytest.raises(ValueError, match=r"Dataset 'ir_b' \(task 'ir'\) has 30 rows, fewer than one step needs.*= 32"):
        build(world_size=4, gradient_accumulation_steps=2, batch_sizes={"ir": 4, "sts": 5})
    # Without a dataset_name column (single loss) explicit names cannot be matched unless dataset_names is given.
    dataset, children = trainer_inputs(make_datasets())
    with pytest.raises(ValueError, match="dataset_names=train_dataset"):
        RoundRobinTaskBatchSampler(dataset, children, tasks=TASKS)


def test_inside_the_sentence_transformers_trainer(tiny_model, tmp_path):
    """The trainer instantiates the sampler through the factory; names come from its dataset_name column."""
    train_dataset = make_datasets()
    loss = {
        "ir_a": MultipleNegativesRankingLoss(tiny_model),
        "ir_b": MultipleNegativesRankingLoss(tiny_model),
        "sts": CoSENTLoss(tiny_model),
    }
    args = SentenceTransformerTrainingArguments(
        output_dir=str(tmp_path),
        per_device_train_batch_size=4,
        multi_dataset_batch_sampler=RoundRobinTaskBatchSampler.with_options(tasks=TASKS, batch_sizes=BATCH_SIZES),
        report_to="none",
        use_cpu=True,
    )
    trainer = SentenceTransformerTrainer(model=tiny_model, args=args, train_dataset=train_dataset, loss=loss)
    dataloader = trainer.get_train_dataloader()
    sampler = dataloader.batch_sampler
    assert isinstance(sampler, RoundRobinTaskBatchSampler) and sampler.dataset_names == list(SIZES)
    batches = list(dataloader)
    assert len(batches) == len(dataloader) == len(sampler)
    names = [batch["dataset_name"] for batch in batches]
    assert [{"ir_a": "ir", "ir_b": "ir", "sts": "sts"}[name] for name in names] == ["ir", "sts"] * (len(names) // 2)
    for name, batch in zip(names, batches):
        size = BATCH_SIZES["sts" if name == "sts" else "ir"]
        assert all(len(value) == size for key, value in batch.items() if key.endswith("input_ids"))
