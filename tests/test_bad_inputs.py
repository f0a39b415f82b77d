"""Bad inputs, tried as a new user would, get a clear answer: the right exception type and a message that names the
culprit (argument, column, file:line, role). Merging cases also check that the inputs are unchanged and that nothing,
not even an empty parent folder, is left at the output path. Where a documented fallback is right (a batch too small
to define a loss), the test checks the loss of 0, the zero gradients and the warning instead.

Each case is one entry of a table per package area (losses, sampler, records, merging, evaluation, command line);
``test_at_least_sixty_bad_inputs`` counts them.
"""

from __future__ import annotations

import gzip
import hashlib
import inspect
import json
import logging
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from datasets import Dataset, DatasetDict
from safetensors.torch import load_file, save_file
from sentence_transformers import SentenceTransformerTrainer, SentenceTransformerTrainingArguments
from sentence_transformers.sentence_transformer.losses import AdaptiveLayerLoss, CoSENTLoss
from tiny_model import build_tiny_model, save_tiny_model
from torch.utils.data import ConcatDataset, RandomSampler

from codiemb_st import (
    MultiPositiveCachedInfoNCELoss,
    PearsonSpearmanLoss,
    RoundRobinTaskBatchSampler,
    dataset_from_records,
    ir_dataset_from_records,
    read_records,
    sts_dataset_from_records,
)
from codiemb_st._compat import DefaultBatchSampler
from codiemb_st.cli import main
from codiemb_st.evaluation import load_local_task, prepare_task, task_folders
from codiemb_st.evaluation.local_data import LocalTaskInfo
from codiemb_st.merging import TIES, DeltaSoup, GreedySoup, ModelSoup, ModelStock, TaskArithmetic


@dataclass
class Case:
    """One bad input: ``call(env)`` must raise ``error`` with a message matching ``match`` (a regex)."""

    id: str
    call: Callable[[Env], Any]
    error: type[Exception]
    match: str


class Env:
    """What a case may use: a fresh folder, the shared tiny model and pristine merge inputs."""

    def __init__(self, tmp: Path, model: Any, merge_inputs: dict[str, Path]):
        self.tmp = tmp
        self.model = model
        self.merge_inputs = merge_inputs


@pytest.fixture(scope="module")
def model():
    return build_tiny_model(seed=0)


@pytest.fixture(scope="module")
def pristine_merge_inputs(tmp_path_factory) -> dict[str, Path]:
    """A base and two fine-tuned checkpoints (the base plus small random deltas)."""
    root = tmp_path_factory.mktemp("bad_merge_inputs")
    folders = {"base": save_tiny_model(root / "base", seed=0)}
    for index in range(2):
        folder = save_tiny_model(root / f"ckpt{index}", seed=0)
        weights = next(folder.rglob("model.safetensors"))
        generator = torch.Generator().manual_seed(index)
        tensors = {
            k: v + 0.01 * torch.randn(v.shape, generator=generator) if v.is_floating_point() else v
            for k, v in load_file(weights).items()
        }
        save_file(tensors, weights)
        folders[f"ckpt{index}"] = folder
    return folders


@pytest.fixture
def env(tmp_path, model, pristine_merge_inputs) -> Env:
    return Env(tmp_path, model, pristine_merge_inputs)


def run_case(case: Case, env: Env) -> pytest.ExceptionInfo:
    with pytest.raises(case.error) as info:
        case.call(env)
    assert re.search(case.match, str(info.value)), f"message does not name the culprit: {info.value}"
    return info


def features(model, texts: list[str]) -> dict[str, torch.Tensor]:
    return model.tokenize(texts)


def pairs(model, n: int = 2) -> list[dict[str, torch.Tensor]]:
    return [features(model, [f"first {i}" for i in range(n)]), features(model, [f"second {i}" for i in range(n)])]


# ---------------------------------------------------------------------------------------------------------------------
# Losses


def _adaptive_layer_ir(env: Env) -> Any:
    inner = MultiPositiveCachedInfoNCELoss(env.model)
    with pytest.warns(UserWarning, match="not compatible"):  # sentence-transformers' own (vague) warning
        wrapper = AdaptiveLayerLoss(env.model, inner)
    return wrapper(pairs(env.model), None)


# Every term weight of the STS loss (the set of terms grows, e.g. with a middle-layer term).
_STS_WEIGHTS = [
    name for name in inspect.signature(PearsonSpearmanLoss.__init__).parameters if name.endswith("_weight")
]

LOSS_CASES = [
    Case(
        "ir-num-positives-0",
        lambda e: MultiPositiveCachedInfoNCELoss(e.model, num_positives=0),
        ValueError,
        "num_positives",
    ),
    Case(
        "ir-temperature-1e-39-overflows",
        lambda e: MultiPositiveCachedInfoNCELoss(e.model, temperature=1e-39),
        ValueError,
        r"`temperature`=1e-39 .*1/temperature .*overflows float32",
    ),
    Case(
        "ir-temperature-denormal",
        lambda e: MultiPositiveCachedInfoNCELoss(e.model, temperature=5e-324),
        ValueError,
        r"`temperature`=5e-324 .*overflows",
    ),
    Case(
        "ir-temperature-nan",
        lambda e: MultiPositiveCachedInfoNCELoss(e.model, temperature=float("nan")),
        ValueError,
        "temperature",
    ),
    Case(
        "ir-temperature-string",
        lambda e: MultiPositiveCachedInfoNCELoss(e.model, temperature="0.02"),
        TypeError,
        "`temperature` must be a number",
    ),
    Case(  # one rule everywhere (codiemb_st.validation): wrong type -> TypeError, as the data loader raises
        "ir-num-positives-string",
        lambda e: MultiPositiveCachedInfoNCELoss(e.model, num_positives="2"),
        TypeError,
        "`num_positives` must be an integer",
    ),
    Case(
        "ir-model-name-not-model",
        lambda e: MultiPositiveCachedInfoNCELoss("all-MiniLM-L6-v2"),
        TypeError,
        r"`model` must be a SentenceTransformer; got str\. Load it first",
    ),
    Case(
        "ir-mini-batch-size-0",
        lambda e: MultiPositiveCachedInfoNCELoss(e.model, mini_batch_size=0),
        ValueError,
        "mini_batch_size",
    ),
    Case(
        "ir-objective-unknown",
        lambda e: MultiPositiveCachedInfoNCELoss(e.model, objective="both"),
        ValueError,
        "objective",
    ),
    Case(
        "ir-too-few-columns",
        lambda e: MultiPositiveCachedInfoNCELoss(e.model, num_positives=2)(pairs(e.model), None),
        ValueError,
        r"num_positives=2\) needs at least 3 text columns.*has 2",
    ),
    Case(
        "ir-inside-adaptive-layer-loss",
        _adaptive_layer_ir,
        TypeError,
        "AdaptiveLayerLoss cannot wrap MultiPositiveCachedInfoNCELoss: .*GradCache.*MatryoshkaLoss",
    ),
    Case(
        "sts-temperature-1e-39-overflows",
        lambda e: PearsonSpearmanLoss(e.model, temperature=1e-39),
        ValueError,
        r"`temperature`=1e-39 .*overflows float32",
    ),
    Case(
        "sts-mid-nce-temperature-overflows",
        lambda e: PearsonSpearmanLoss(e.model, mid_nce_temperature=1e-40),
        ValueError,
        r"`mid_nce_temperature`=1e-40 .*overflows float32",
    ),
    Case(
        "sts-temperature-inf",
        lambda e: PearsonSpearmanLoss(e.model, temperature=float("inf")),
        ValueError,
        "`temperature` must be a finite number",
    ),
    Case(
        "sts-weight-string",
        lambda e: PearsonSpearmanLoss(e.model, pearson_weight="2"),
        TypeError,
        "`pearson_weight` must be a number",
    ),
    Case(
        "sts-all-weights-zero",
        lambda e: PearsonSpearmanLoss(e.model, **dict.fromkeys(_STS_WEIGHTS, 0)),
        ValueError,
        "At least one of",
    ),
    Case(
        "sts-string-labels",
        lambda e: PearsonSpearmanLoss(e.model)(pairs(e.model), ["4.5", "1.0"]),
        TypeError,
        r"`labels` \(the dataset's 'score' column\) .*got list of str\. Convert the string scores",
    ),
    Case(
        "sts-string-labels-from-scores",
        lambda e: PearsonSpearmanLoss(e.model).compute_loss_from_scores(torch.rand(2), ["a", "b"]),
        TypeError,
        r"`labels`.*list of str",
    ),
    Case(
        "sts-list-labels",
        lambda e: PearsonSpearmanLoss(e.model)(pairs(e.model), [4.5, 1.0]),
        TypeError,
        r"`labels`.*got list of float\. Pass torch\.tensor",
    ),
    Case(
        "sts-bool-labels",
        lambda e: PearsonSpearmanLoss(e.model)(pairs(e.model), torch.tensor([True, False])),
        TypeError,
        r"`labels`.*real numbers; got dtype torch\.bool",
    ),
    Case(
        "sts-no-labels", lambda e: PearsonSpearmanLoss(e.model)(pairs(e.model), None), ValueError, "no labels.*'score'"
    ),
    Case(
        "sts-nan-labels",
        lambda e: PearsonSpearmanLoss(e.model)(pairs(e.model), torch.tensor([1.0, float("nan")])),
        ValueError,
        "NaN or infinite gold scores",
    ),
    Case(
        "sts-three-columns",
        lambda e: PearsonSpearmanLoss(e.model)(pairs(e.model) + pairs(e.model)[:1], torch.rand(2)),
        ValueError,
        "exactly 2 text columns.*got 3",
    ),
    Case(
        "sts-label-count",
        lambda e: PearsonSpearmanLoss(e.model)(pairs(e.model), torch.rand(3)),
        ValueError,
        "expects 2 labels.*got 3",
    ),
]


def _empty(model) -> dict[str, torch.Tensor]:
    return {k: v[:0] if isinstance(v, torch.Tensor) else v for k, v in features(model, ["x"]).items()}


def _assert_zero_step(loss: torch.Tensor, model) -> None:
    assert loss.item() == 0.0
    model.zero_grad()
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert grads and all(g is not None and torch.count_nonzero(g) == 0 for g in grads)


FALLBACK_CASES = [
    "ir-empty-batch",
    "ir-empty-embeddings",
    "ir-one-query-no-negatives",
    "sts-empty-batch",
    "sts-empty-batch-dict",
    "sts-one-pair",
    "sts-empty-batch-mid-nce-only",
]


@pytest.mark.parametrize("case", FALLBACK_CASES)
def test_batches_too_small_for_a_loss_give_zero_and_a_warning(case, model, caplog):
    """Documented fallback, not an error: a short last batch is normal without dataloader_drop_last=True."""
    caplog.set_level(logging.WARNING)
    if case == "ir-empty-batch":
        loss = MultiPositiveCachedInfoNCELoss(model)([_empty(model), _empty(model)], None)
        expected = r"empty batch \(0 queries\)"
    elif case == "ir-empty-embeddings":
        embeddings = [torch.zeros(0, 32, requires_grad=True), torch.zeros(0, 32, requires_grad=True)]
        loss = MultiPositiveCachedInfoNCELoss(model).compute_loss_from_embeddings(embeddings)
        expected = r"empty batch \(0 queries\)"
    elif case == "ir-one-query-no-negatives":
        loss = MultiPositiveCachedInfoNCELoss(model)([features(model, ["a query"]), features(model, ["a doc"])])
        expected = r"1 query and no hard negatives.*exactly 0.*dataloader_drop_last=True"
    elif case == "sts-empty-batch":
        loss = PearsonSpearmanLoss(model)([_empty(model), _empty(model)], torch.zeros(0))
        expected = r"batch of 0 pair\(s\).*contributes 0"
    elif case == "sts-empty-batch-dict":
        terms = PearsonSpearmanLoss(model, return_dict=True)([_empty(model), _empty(model)], torch.zeros(0))
        # The same four keys as every other step (the trainer logs each term).
        assert set(terms) == {"pearson_loss", "rank_kl_loss", "pro_loss", "mid_nce_loss"}
        loss = sum(terms.values())
        expected = r"batch of 0 pair\(s\)"
    elif case == "sts-empty-batch-mid-nce-only":
        only_mid = PearsonSpearmanLoss(model, pearson_weight=0, rank_kl_weight=0, pro_weight=0)
        loss = only_mid([_empty(model), _empty(model)], torch.zeros(0))
        expected = r"batch of 0 pair\(s\)"
    else:
        loss = PearsonSpearmanLoss(model)([features(model, ["a"]), features(model, ["b"])], torch.tensor([1.0]))
        expected = r"batch of 1 pair\(s\)"
    _assert_zero_step(loss, model)
    assert re.search(expected, caplog.text), caplog.text


def test_a_one_query_batch_with_hard_negatives_is_not_flagged(model, caplog):
    caplog.set_level(logging.WARNING)
    loss = MultiPositiveCachedInfoNCELoss(model)([features(model, [t]) for t in ("query", "doc", "negative")])
    assert loss.item() > 0 and "no hard negatives" not in caplog.text


# ---------------------------------------------------------------------------------------------------------------------
# Sampler


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
        "`gradient_accumulation_steps` must be a positive integer",
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
        r"`batch_sizes\['ir'\]` must be a positive integer",
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


# ---------------------------------------------------------------------------------------------------------------------
# Records


def _write(path: Path, lines: list[Any]) -> Path:
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return path


IR_RECORD = {"query": "q", "positives": ["p"], "negatives": ["n"]}
STS_RECORD = {"sentence1": "a", "sentence2": "b", "score": 1.0}


def _not_gzip(e: Env) -> Any:
    path = _write(e.tmp / "train.jsonl.gz", [IR_RECORD])
    return ir_dataset_from_records(path)


def _truncated_gzip(e: Env) -> Any:
    path = e.tmp / "train.jsonl.gz"
    path.write_bytes(gzip.compress((json.dumps(IR_RECORD) + "\n").encode() * 50)[:40])
    return ir_dataset_from_records(path)


def _not_utf8(e: Env) -> Any:
    path = e.tmp / "latin1.jsonl"
    path.write_bytes(
        json.dumps(STS_RECORD).encode()
        + b"\n"
        + '{"sentence1": "caf\xe9", "sentence2": "b", "score": 1}\n'.encode("latin-1")
    )
    return sts_dataset_from_records(path)


RECORD_CASES = [
    Case("gz-not-gzip", _not_gzip, ValueError, r"train\.jsonl\.gz: the file name ends in \.gz but .*not gzip"),
    Case("gz-truncated", _truncated_gzip, ValueError, r"train\.jsonl\.gz: corrupt or truncated gzip"),
    Case("not-utf8", _not_utf8, ValueError, r"latin1\.jsonl:2: the file is not UTF-8"),
    Case(
        "invalid-json-line",
        lambda e: sts_dataset_from_records(_write(e.tmp / "s.jsonl", [STS_RECORD, "{oops"])),
        ValueError,
        r"s\.jsonl:2: invalid JSON",
    ),
    Case(
        "task-type-unknown-inferred",
        lambda e: dataset_from_records(_write(e.tmp / "c.jsonl", [{**IR_RECORD, "task_type": "classification"}])),
        ValueError,
        r"c\.jsonl:1: `task_type` must be 'ir' or 'sts'; got 'classification'",
    ),
    Case(
        "task-type-unknown-explicit",
        lambda e: ir_dataset_from_records([IR_RECORD, {**IR_RECORD, "task_type": "nli"}]),
        ValueError,
        r"row 1: `task_type` must be 'ir' or 'sts' \(or absent\); got 'nli'",
    ),
    Case(
        "task-type-other-task",
        lambda e: ir_dataset_from_records([{**STS_RECORD, "task_type": "sts"}]),
        ValueError,
        "row 0: record has task_type 'sts'.*convert this file with sts_dataset_from_records",
    ),
    Case(
        "task-argument-unknown",
        lambda e: dataset_from_records([IR_RECORD], task="classification"),
        ValueError,
        "`task` must be 'ir', 'sts' or None; got 'classification'",
    ),
    Case(
        "num-positives-string",
        lambda e: ir_dataset_from_records([IR_RECORD], num_positives="2"),
        TypeError,
        "`num_positives` must be an integer; got str",
    ),
    Case(
        "num-negatives-negative",
        lambda e: ir_dataset_from_records([IR_RECORD], num_negatives=-1),
        ValueError,
        "`num_negatives` must be an integer >= 0",
    ),
    Case(
        "seed-string", lambda e: ir_dataset_from_records([IR_RECORD], seed="x"), TypeError, "`seed` must be an integer"
    ),
    Case(
        "sts-score-null",
        lambda e: sts_dataset_from_records(_write(e.tmp / "n.jsonl", [{**STS_RECORD, "score": None}])),
        ValueError,
        r"n\.jsonl:1: `score` must be a finite number; got missing",
    ),
    Case(
        "sts-score-string",
        lambda e: sts_dataset_from_records([STS_RECORD, {**STS_RECORD, "score": "4.5"}]),
        ValueError,
        r"row 1: `score` must be a finite number; got '4.5'",
    ),
    Case(
        "sts-score-nan",
        lambda e: sts_dataset_from_records(
            _write(e.tmp / "nan.jsonl", ['{"sentence1": "a", "sentence2": "b", "score": NaN}'])
        ),
        ValueError,
        r"nan\.jsonl:1: `score`.*got nan",
    ),
    Case(
        "ir-positives-string",
        lambda e: ir_dataset_from_records([{"query": "q", "positives": "p"}]),
        ValueError,
        r"row 0: `positives` must be a list of strings; got str",
    ),
    Case(
        "ir-positives-empty",
        lambda e: ir_dataset_from_records([{"query": "q", "positives": []}]),
        ValueError,
        r"row 0: `positives` is empty",
    ),
    Case(
        "ir-needs-negatives",
        lambda e: ir_dataset_from_records([{"query": "q", "positives": ["p"]}], num_negatives=1),
        ValueError,
        "row 0: the record has no negatives but num_negatives=1",
    ),
    Case(
        "record-not-object",
        lambda e: list(read_records(_write(e.tmp / "l.jsonl", [[1, 2]]))),
        ValueError,
        r"l\.jsonl:1: expected a JSON object",
    ),
    Case(
        "file-missing",
        lambda e: ir_dataset_from_records(e.tmp / "missing.jsonl"),
        FileNotFoundError,
        r"missing\.jsonl",
    ),
    Case(
        "source-is-a-dict",
        lambda e: ir_dataset_from_records(IR_RECORD),
        TypeError,
        "`source` must be a JSONL path, a datasets.Dataset or an iterable of dicts",
    ),
]


# ---------------------------------------------------------------------------------------------------------------------
# Merging: the inputs stay unchanged and nothing is left at the output path


def _copy_inputs(env: Env) -> dict[str, Path]:
    return {name: Path(shutil.copytree(path, env.tmp / "inputs" / name)) for name, path in env.merge_inputs.items()}


def _corrupt(env: Env, name: str, relative: str, content: bytes | str | None) -> dict[str, Path]:
    inputs = _copy_inputs(env)
    target = inputs[name] / relative
    if isinstance(content, str):
        content = content.encode()
    target.write_bytes(content)
    return inputs


def _merge(inputs: dict[str, Path], env: Env, method: Any = None) -> Path:
    method = method or DeltaSoup()
    output = env.tmp / "nested" / "deeper" / "merged"
    return method.merge_to_folder(
        [inputs["ckpt0"], inputs["ckpt1"]], output, base_model=inputs["base"], show_progress_bar=False
    )


def _nan_weights(env: Env) -> Any:
    inputs = _copy_inputs(env)
    weights = next(inputs["ckpt1"].rglob("model.safetensors"))
    tensors = load_file(weights)
    name = next(k for k, v in tensors.items() if v.is_floating_point())
    tensors[name] = tensors[name].clone()
    tensors[name].view(-1)[0] = float("nan")
    save_file(tensors, weights)
    return inputs


def _modules_path(env: Env, path: str) -> dict[str, Path]:
    inputs = _copy_inputs(env)
    modules_file = inputs["ckpt1"] / "modules.json"
    modules = json.loads(modules_file.read_text())
    modules[1]["path"] = path
    modules_file.write_text(json.dumps(modules))
    return inputs


MERGE_CASES = [
    (
        "modules-json-invalid",
        lambda e: _corrupt(e, "ckpt1", "modules.json", "[{"),
        ValueError,
        r"checkpoints\[1\]: .*modules\.json is not valid JSON \(.* at line 1, column",
    ),
    (
        "modules-json-not-utf8",
        lambda e: _corrupt(e, "ckpt0", "modules.json", b"\xff\xfe["),
        ValueError,
        r"checkpoints\[0\]: .*modules\.json is not UTF-8",
    ),
    (
        "modules-json-not-a-list",
        lambda e: _corrupt(e, "base", "modules.json", '{"0": "Transformer"}'),
        ValueError,
        r"base: .*modules\.json must hold a list; got dict",
    ),
    (
        "modules-json-path-escapes",
        lambda e: _modules_path(e, "../elsewhere"),
        ValueError,
        r"checkpoints\[1\]: .*modules\.json gives module .* the path '\.\./elsewhere'",
    ),
    (
        "config-json-invalid",
        lambda e: _corrupt(e, "ckpt1", "config.json", '{"model_type": '),
        ValueError,
        r"checkpoints\[1\]: .*config\.json is not valid JSON",
    ),
    (
        "config-json-a-list",
        lambda e: _corrupt(e, "ckpt0", "config.json", "[]"),
        ValueError,
        r"checkpoints\[0\]: .*config\.json must hold an object; got list",
    ),
    (
        "base-config-json-invalid",
        lambda e: _corrupt(e, "base", "config.json", "not json"),
        ValueError,
        r"base: .*config\.json is not valid JSON",
    ),
    (
        "tokenizer-json-invalid",
        lambda e: _corrupt(e, "ckpt1", "tokenizer.json", "{"),
        ValueError,
        r"checkpoints\[1\]: .*tokenizer\.json is not valid JSON",
    ),
    (
        "st-config-a-list",
        lambda e: _corrupt(e, "ckpt1", "config_sentence_transformers.json", "[1]"),
        ValueError,
        r"checkpoints\[1\]: .*config_sentence_transformers\.json must hold an object",
    ),
    (
        "weights-not-safetensors",
        lambda e: _corrupt(e, "ckpt1", "model.safetensors", b"garbage"),
        ValueError,
        r"checkpoints\[1\]: cannot read the safetensors file .*model\.safetensors",
    ),
    ("weights-nan", _nan_weights, ValueError, r"Tensor .* of checkpoints\[1\] holds NaN or infinite values"),
]


@pytest.mark.parametrize(("case_id", "prepare", "error", "match"), MERGE_CASES, ids=[c[0] for c in MERGE_CASES])
def test_bad_merge_inputs_leave_inputs_and_output_untouched(case_id, prepare, error, match, env):
    inputs = prepare(env)
    before = {name: _fingerprint(path) for name, path in inputs.items()}
    with pytest.raises(error) as info:
        _merge(inputs, env)
    assert re.search(match, str(info.value)), str(info.value)
    assert {name: _fingerprint(path) for name, path in inputs.items()} == before
    assert not (env.tmp / "nested").exists()  # no output, no partial folder, no empty parents


def _fingerprint(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in folder.rglob("*")
        if p.is_file()
    }


def _merge_argument(env: Env, **overrides) -> Any:
    inputs = env.merge_inputs
    arguments = {
        "checkpoints": [inputs["ckpt0"], inputs["ckpt1"]],
        "output_path": env.tmp / "nested" / "out",
        "base_model": inputs["base"],
        **overrides,
    }
    return ModelSoup().merge_to_folder(
        arguments.pop("checkpoints"), arguments.pop("output_path"), show_progress_bar=False, **arguments
    )


MERGE_ARGUMENT_CASES = [
    Case(
        "merge-tensors-nan",
        lambda e: DeltaSoup().merge_tensors(
            [torch.ones(3), torch.tensor([1.0, float("nan"), 0])], base=torch.zeros(3)
        ),
        ValueError,
        r"tensors\[1\] holds NaN or infinite values",
    ),
    Case(
        "merge-tensors-base-inf",
        lambda e: DeltaSoup().merge_tensors([torch.ones(3)], base=torch.full((3,), float("inf"))),
        ValueError,
        "base holds NaN or infinite values",
    ),
    Case(
        "merge-tensors-integer",
        lambda e: ModelSoup().merge_tensors([torch.ones(3, dtype=torch.long)] * 2),
        TypeError,
        r"tensors\[0\] has dtype torch\.int64",
    ),
    Case(
        "merge-tensors-shapes",
        lambda e: ModelSoup().merge_tensors([torch.ones(3), torch.ones(4)]),
        ValueError,
        r"tensors\[1\] has shape \(4,\)",
    ),
    Case(
        "merge-tensors-needs-base",
        lambda e: DeltaSoup().merge_tensors([torch.ones(3)]),
        ValueError,
        "DeltaSoup needs base",
    ),
    Case(
        "checkpoints-single-path",
        lambda e: _merge_argument(e, checkpoints=str(e.merge_inputs["ckpt0"])),
        TypeError,
        "checkpoints must be a list",
    ),
    Case(
        "checkpoint-missing-folder",
        lambda e: _merge_argument(e, checkpoints=[e.tmp / "nope", e.merge_inputs["ckpt0"]]),
        ValueError,
        r"checkpoints\[0\] '.*nope' is not a folder",
    ),
    Case(
        "output-inside-input",
        lambda e: _merge_argument(e, output_path=e.merge_inputs["ckpt0"] / "merged"),
        ValueError,
        r"output_path .* lies inside, the input",
    ),
    Case(
        "base-wrong-type", lambda e: _merge_argument(e, base_model=42), TypeError, "base_model must be a model folder"
    ),
]


def test_failed_merges_by_argument_leave_nothing(env):
    """The argument cases of merge_to_folder leave the inputs unchanged and no folder at the (nested) output path."""
    before = {name: _fingerprint(path) for name, path in env.merge_inputs.items()}
    for case in MERGE_ARGUMENT_CASES:
        if case.id.startswith(("checkpoint", "base", "output")):
            run_case(case, env)
            assert not (env.tmp / "nested").exists(), case.id
            assert not list(env.merge_inputs["ckpt0"].glob("merged*")), case.id
    assert {name: _fingerprint(path) for name, path in env.merge_inputs.items()} == before


# ---------------------------------------------------------------------------------------------------------------------
# Evaluation data


def _sts_folder(env: Env, lines: list[Any], meta: dict | None = None) -> Path:
    folder = env.tmp / "BadSTS"
    folder.mkdir(exist_ok=True)
    meta = {
        "name": "BadSTS",
        "type": "sts",
        "split": "test",
        "language": "en",
        "min_score": 0,
        "max_score": 5,
        **(meta or {}),
    }
    (folder / "task.json").write_text(json.dumps(meta))
    _write(folder / "test.jsonl", lines)
    return folder


GOOD_PAIR = {"sentence1": "a", "sentence2": "b", "score": 1.0}


def _retrieval_folder(
    env: Env,
    qrels: str | None = None,
    meta: dict | None = None,
    corpus: list | None = None,
    queries: list | None = None,
) -> Path:
    folder = env.tmp / "BadRetrieval"
    task_folders.write_retrieval_task(
        folder,
        {"d1": "first passage", "d2": "second passage"},
        {"q1": "a query"},
        {"q1": {"d1": 1}},
        name="BadRetrieval",
        metadata=meta,
    )
    if qrels is not None:
        (folder / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\n" + qrels)
    if corpus is not None:
        _write(folder / "corpus.jsonl", corpus)
    if queries is not None:
        _write(folder / "queries.jsonl", queries)
    return folder


def _task_json(env: Env, content: bytes | str) -> Path:
    folder = _sts_folder(env, [GOOD_PAIR, {**GOOD_PAIR, "score": 2.0}])
    (folder / "task.json").write_bytes(content.encode() if isinstance(content, str) else content)
    return folder


EVALUATION_CASES = [
    Case(
        "task-folder-sts-score-nan",
        lambda e: load_local_task(_sts_folder(e, [GOOD_PAIR, '{"sentence1": "a", "sentence2": "b", "score": NaN}'])),
        ValueError,
        r"BadSTS/test\.jsonl:2: `score` must be a finite number; got nan",
    ),
    Case(
        "task-folder-sts-score-null",
        lambda e: load_local_task(_sts_folder(e, [GOOD_PAIR, {**GOOD_PAIR, "score": None}])),
        ValueError,
        r"test\.jsonl:2: `score` must be a finite number; got None",
    ),
    Case(
        "task-folder-sts-score-string",
        lambda e: load_local_task(_sts_folder(e, [{**GOOD_PAIR, "score": "high"}])),
        ValueError,
        r"test\.jsonl:1: `score` must be a finite number; got 'high'",
    ),
    Case(
        "task-folder-sts-score-bool",
        lambda e: load_local_task(_sts_folder(e, [{**GOOD_PAIR, "score": True}])),
        ValueError,
        r"test\.jsonl:1: `score`",
    ),
    Case(
        "sts-sentence-not-text",
        lambda e: load_local_task(_sts_folder(e, [GOOD_PAIR, {**GOOD_PAIR, "sentence2": 7}])),
        ValueError,
        r"test\.jsonl:2: `sentence2` must be a string; got 7",
    ),
    Case(
        "sts-field-missing",
        lambda e: load_local_task(_sts_folder(e, [{"sentence1": "a", "sentence2": "b"}])),
        ValueError,
        r"test\.jsonl:1 lacks the field\(s\) \['score'\]",
    ),
    Case(
        "qrels-passage-not-in-corpus",
        lambda e: load_local_task(_retrieval_folder(e, qrels="q1\td1\t1\nq1\td9\t1\n")),
        ValueError,
        r"qrels/test\.tsv judges 1 passage id\(s\) that are not in .*corpus\.jsonl \(e\.g\. \['d9'\]\).*"
        r"missing_passages",
    ),
    Case(
        "qrels-fractional-grade",
        lambda e: load_local_task(_retrieval_folder(e, qrels="q1\td1\t0.5\n")),
        ValueError,
        r"qrels/test\.tsv:2: score '0\.5' must be an integer relevance grade",
    ),
    Case(
        "qrels-nan-grade",
        lambda e: load_local_task(_retrieval_folder(e, qrels="q1\td1\tnan\n")),
        ValueError,
        r"qrels/test\.tsv:2: score 'nan'",
    ),
    Case(
        "qrels-inf-grade",
        lambda e: load_local_task(_retrieval_folder(e, qrels="q1\td1\tinf\n")),
        ValueError,
        r"qrels/test\.tsv:2: score 'inf'",
    ),
    Case(
        "qrels-duplicate",
        lambda e: load_local_task(_retrieval_folder(e, qrels="q1\td1\t1\nq1\td1\t2\n")),
        ValueError,
        r"qrels/test\.tsv:3: query 'q1' judges passage 'd1' twice",
    ),
    Case(
        "qrels-two-columns",
        lambda e: load_local_task(_retrieval_folder(e, qrels="q1\td1\n")),
        ValueError,
        r"qrels/test\.tsv:2 needs three tab-separated columns",
    ),
    Case(
        "corpus-duplicate-id",
        lambda e: load_local_task(
            _retrieval_folder(e, corpus=[{"_id": "d1", "text": "x"}, {"_id": "d1", "text": "y"}])
        ),
        ValueError,
        r"corpus\.jsonl:2: `_id` 'd1' repeats the id of .*corpus\.jsonl:1",
    ),
    Case(
        "corpus-text-null",
        lambda e: load_local_task(
            _retrieval_folder(e, corpus=[{"_id": "d1", "text": None}, {"_id": "d2", "text": "y"}])
        ),
        ValueError,
        r"corpus\.jsonl:1: `text` must be a string; got null",
    ),
    Case(
        "queries-id-null",
        lambda e: load_local_task(_retrieval_folder(e, queries=[{"_id": None, "text": "q"}])),
        ValueError,
        r"queries\.jsonl:1: `_id` must be a non-empty string or integer; got None",
    ),
    Case(
        "task-json-invalid",
        lambda e: LocalTaskInfo.from_folder(_task_json(e, "{")),
        ValueError,
        r"task\.json is not valid JSON",
    ),
    Case(
        "task-json-not-utf8",
        lambda e: LocalTaskInfo.from_folder(_task_json(e, b'{"name": "\xff"}')),
        ValueError,
        r"task\.json is not UTF-8",
    ),
    Case(
        "task-json-a-list",
        lambda e: LocalTaskInfo.from_folder(_task_json(e, "[]")),
        ValueError,
        r"task\.json must hold a JSON object",
    ),
    Case(
        "task-json-min-score-string",
        lambda e: LocalTaskInfo.from_folder(_sts_folder(e, [GOOD_PAIR], {"min_score": "0"})),
        ValueError,
        r"task\.json: `min_score` must be a finite number; got '0'",
    ),
    Case(
        "task-json-scores-reversed",
        lambda e: LocalTaskInfo.from_folder(_sts_folder(e, [GOOD_PAIR], {"min_score": 5, "max_score": 0})),
        ValueError,
        r"`min_score` \(5\) is above `max_score` \(0\)",
    ),
    Case(
        "task-json-missing-passages-value",
        lambda e: LocalTaskInfo.from_folder(_retrieval_folder(e, meta={"missing_passages": "ignore"})),
        ValueError,
        r"`missing_passages` must be one of \['error', 'drop'\]; got 'ignore'",
    ),
    Case(
        "unknown-task-with-data-dir",
        lambda e: prepare_task("NoSuchTask", data_dir=_sts_folder(e, [GOOD_PAIR]).parent),
        ValueError,
        r"Unknown task 'NoSuchTask': no task folder in .* matches it .*\(BadSTS\); mteb has no task",
    ),
    Case(
        "unknown-task-without-data-dir",
        lambda e: prepare_task("NoSuchTask"),
        ValueError,
        r"Unknown task 'NoSuchTask': no local folders were searched \(no data_dir given\)",
    ),
    Case(
        "task-folder-without-task-json",
        lambda e: prepare_task(str(e.tmp)),
        ValueError,
        r"the folder .* has no task\.json",
    ),
]


def test_missing_passages_opt_in_drops_those_judgments(env, caplog):
    caplog.set_level(logging.WARNING)
    folder = _retrieval_folder(env, qrels="q1\td1\t1\nq1\td9\t1\n", meta={"missing_passages": "drop"})
    task = load_local_task(folder)
    assert task.dataset["default"]["test"]["relevant_docs"] == {"q1": {"d1": 1}}
    assert "dropped the judgments of 1 passage id(s)" in caplog.text and "d9" in caplog.text


# ---------------------------------------------------------------------------------------------------------------------
# Command line: exit code 2 and a message naming the culprit, no traceback


def _cli(env: Env, argv: list[str], capsys) -> str:
    code = main(argv)
    err = capsys.readouterr().err
    if code != 2:
        raise AssertionError(f"exit code {code}, expected 2; stderr: {err}")
    raise UsageErrorSeen(err)


class UsageErrorSeen(Exception):
    """Carries the command line's stderr into the common Case check."""


def _cli_cases(capsys) -> list[Case]:
    def merge_broken_modules(e: Env) -> Any:
        inputs = _corrupt(e, "ckpt1", "modules.json", "[{")
        return _cli(
            e,
            [
                "merge",
                str(inputs["ckpt0"]),
                str(inputs["ckpt1"]),
                "--base-model",
                str(inputs["base"]),
                "--output",
                str(e.tmp / "nested" / "out"),
                "--no-progress",
            ],
            capsys,
        )

    def train(e: Env, *extra: str) -> Any:
        return _cli(e, ["train", "--output-dir", str(e.tmp / "run"), "--max-steps", "1", *extra], capsys)

    def sts_file(e: Env) -> str:
        return str(_write(e.tmp / "sts.jsonl", [{**STS_RECORD, "score": float(i)} for i in range(8)]))

    return [
        Case(
            "eval-unknown-task",
            lambda e: _cli(
                e,
                [
                    "eval",
                    "--models",
                    f"m={e.tmp}",
                    "--data-dir",
                    str(_sts_folder(e, [GOOD_PAIR]).parent),
                    "--tasks",
                    "NoSuchTask",
                    "--output-dir",
                    str(e.tmp / "out"),
                ],
                capsys,
            ),
            UsageErrorSeen,
            r"error: Could not load task 'NoSuchTask': ValueError: Unknown task 'NoSuchTask': .*\(BadSTS\)",
        ),
        Case(
            "eval-data-dir-missing",
            lambda e: _cli(
                e,
                [
                    "eval",
                    "--models",
                    f"m={e.tmp}",
                    "--data-dir",
                    str(e.tmp / "nope"),
                    "--output-dir",
                    str(e.tmp / "o"),
                ],
                capsys,
            ),
            UsageErrorSeen,
            r"error: --data-dir .*nope does not exist",
        ),
        Case(
            "eval-bad-task-json",
            lambda e: _cli(
                e,
                [
                    "eval",
                    "--models",
                    f"m={e.tmp}",
                    "--data-dir",
                    str(_task_json(e, "{").parent),
                    "--output-dir",
                    str(e.tmp / "o"),
                ],
                capsys,
            ),
            UsageErrorSeen,
            r"error: Bad local evaluation data: .*BadSTS/task\.json is not valid JSON",
        ),
        Case(
            "merge-broken-modules-json",
            merge_broken_modules,
            UsageErrorSeen,
            r"error: checkpoints\[1\]: .*modules\.json is not valid JSON",
        ),
        Case(
            "merge-missing-checkpoint",
            lambda e: _cli(
                e, ["merge", str(e.tmp / "gone"), "--method", "model_soup", "--output", str(e.tmp / "o")], capsys
            ),
            UsageErrorSeen,
            r"error: .*gone is not a model folder",
        ),
        Case(
            "merge-foreign-option",
            lambda e: _cli(
                e,
                ["merge", str(e.tmp), "--method", "model_soup", "--power", "2", "--output", str(e.tmp / "o")],
                capsys,
            ),
            UsageErrorSeen,
            "error: --method model_soup does not take --power",
        ),
        Case(
            "train-missing-file",
            lambda e: train(e, "--sts", str(e.tmp / "missing.jsonl")),
            UsageErrorSeen,
            r"error: Training file .*missing\.jsonl not found",
        ),
        Case(
            "train-gz-not-gzip",
            lambda e: train(e, "--ir", str(_write(e.tmp / "ir.jsonl.gz", [IR_RECORD]))),
            UsageErrorSeen,
            r"error: .*ir\.jsonl\.gz: the file name ends in \.gz but the file is not gzip",
        ),
        Case(
            "train-bad-score",
            lambda e: train(e, "--sts", str(_write(e.tmp / "s.jsonl", [{**STS_RECORD, "score": "x"}]))),
            UsageErrorSeen,
            r"error: .*s\.jsonl:1: `score` must be a finite number",
        ),
        Case(
            "train-model-missing",
            lambda e: train(e, "--sts", sts_file(e), "--model", str(e.tmp / "no-model")),
            UsageErrorSeen,
            r"error: --model '.*no-model': no such model folder",
        ),
    ]


CLI_CASE_IDS = [
    "eval-unknown-task",
    "eval-data-dir-missing",
    "eval-bad-task-json",
    "merge-broken-modules-json",
    "merge-missing-checkpoint",
    "merge-foreign-option",
    "train-missing-file",
    "train-gz-not-gzip",
    "train-bad-score",
    "train-model-missing",
]


@pytest.mark.parametrize("case_id", CLI_CASE_IDS)
def test_cli_bad_inputs_exit_2_naming_the_culprit(case_id, env, capsys):
    case = next(case for case in _cli_cases(capsys) if case.id == case_id)
    run_case(case, env)
    assert not (env.tmp / "nested").exists()


def test_cli_bad_eval_task_in_train_exits_2(env, capsys, tiny_model_path):
    sts = _write(env.tmp / "sts.jsonl", [{**STS_RECORD, "score": float(i)} for i in range(8)])
    argv = [
        "train",
        "--output-dir",
        str(env.tmp / "run"),
        "--model",
        str(tiny_model_path),
        "--sts",
        str(sts),
        "--eval",
        "NoSuchTask",
        "--eval-data-dir",
        str(_sts_folder(env, [GOOD_PAIR]).parent),
    ]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert re.search(r"error: --eval: Unknown task 'NoSuchTask': .*\(BadSTS\)", err), err


# ---------------------------------------------------------------------------------------------------------------------
# The tables


ALL_CASES = {
    "losses": LOSS_CASES,
    "sampler": SAMPLER_CASES,
    "records": RECORD_CASES,
    "merging": MERGE_ARGUMENT_CASES,
    "evaluation": EVALUATION_CASES,
}
TABLE = [case for cases in ALL_CASES.values() for case in cases]


@pytest.mark.parametrize(
    "case", TABLE, ids=[f"{area}:{case.id}" for area, cases in ALL_CASES.items() for case in cases]
)
def test_bad_input_gets_a_clear_answer(case, env):
    run_case(case, env)


def test_at_least_sixty_bad_inputs():
    counts = {area: len(cases) for area, cases in ALL_CASES.items()}
    counts["merging"] += len(MERGE_CASES)
    counts["cli"] = len(CLI_CASE_IDS) + 1
    counts["losses"] += len(FALLBACK_CASES)
    assert all(counts.values()) and sum(counts.values()) >= 60, counts
    assert len({case.id for case in TABLE}) == len(TABLE)  # no case hides another


# ---------------------------------------------------------------------------------------------------------------------
# P recorded with the data: the loss refuses columns that do not fit its num_positives (before its first step)


def _one_step_trainer(model, dataset, loss, tmp: Path) -> SentenceTransformerTrainer:
    from codiemb_st import LossColumnCheck

    args = SentenceTransformerTrainingArguments(
        output_dir=str(tmp / "run"), max_steps=1, per_device_train_batch_size=4, report_to="none", save_strategy="no"
    )
    return SentenceTransformerTrainer(
        model=model, args=args, train_dataset=dataset, loss=loss, callbacks=[LossColumnCheck(loss)]
    )


def _multi_positive_rows(n: int = 8) -> Dataset:
    return Dataset.from_dict(
        {
            "anchor": [f"query {i}" for i in range(n)],
            "positive_1": [f"first answer {i}" for i in range(n)],
            "positive_2": [f"second answer {i}" for i in range(n)],
            "negative_1": [f"unrelated text {i}" for i in range(n)],
        }
    )


def test_loss_refuses_a_second_positive_column_before_its_first_step(tmp_path):
    model = build_tiny_model(seed=0)
    before = [p.detach().clone() for p in model.parameters()]
    loss = MultiPositiveCachedInfoNCELoss(model, num_positives=1, mini_batch_size=4)
    trainer = _one_step_trainer(model, _multi_positive_rows(), loss, tmp_path)
    expected = r"num_positives=1 does not fit .*'positive_2'.*positive_2 would be trained as hard negative.*=2"
    with pytest.raises(ValueError, match=expected):
        trainer.train()
    assert trainer.state.global_step == 0
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_loss_whose_num_positives_fits_the_columns_trains(tmp_path):
    model = build_tiny_model(seed=0)
    before = [p.detach().clone() for p in model.parameters()]
    loss = MultiPositiveCachedInfoNCELoss(model, num_positives=2, mini_batch_size=4)
    trainer = _one_step_trainer(model, _multi_positive_rows(), loss, tmp_path)
    trainer.train()
    assert trainer.state.global_step == 1
    assert not all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_column_check_finds_the_loss_of_each_named_dataset(tmp_path):
    model = build_tiny_model(seed=0)
    fits = MultiPositiveCachedInfoNCELoss(model, num_positives=2, mini_batch_size=4)
    too_few = MultiPositiveCachedInfoNCELoss(model, num_positives=1, mini_batch_size=4)
    data = DatasetDict({"good": _multi_positive_rows(), "bad": _multi_positive_rows()})
    trainer = _one_step_trainer(model, data, {"good": fits, "bad": too_few}, tmp_path)
    with pytest.raises(ValueError, match=r"training dataset 'bad'.*num_positives=1"):
        trainer.train()


@pytest.mark.parametrize(
    ("columns", "num_positives", "match"),
    [
        (["anchor", "positive", "negative"], 2, r"negative would be trained as positive"),
        (["anchor", "positive_1"], 2, r"needs at least 3 text columns"),
        (
            ["anchor", "negative_1", "positive_1"],
            1,
            r"negative_1 would be trained as positive.*right after the anchor",
        ),
    ],
)
def test_column_rule_names_columns_and_num_positives(columns, num_positives, match):
    from codiemb_st.losses.column_check import check_ir_columns

    with pytest.raises(ValueError, match=match):
        check_ir_columns(columns, num_positives)
    check_ir_columns(["anchor", "positive_1", "positive_2", "negative_1", "label"], 2)
    check_ir_columns(["question", "answer", "other"], 1)  # names it does not judge pass


def test_recipe_takes_num_positives_from_the_data(tmp_path):
    from codiemb_st import recipe

    model = build_tiny_model(seed=0)
    records = [{"query": f"q{i}", "positives": [f"a{i}", f"b{i}"], "negatives": [f"n{i}"]} for i in range(4)]
    data = recipe.load_task_datasets(ir={"two": records}, num_positives=2)
    assert (data.num_positives("two"), data.num_negatives("two")) == (2, 1)
    data.datasets["one"] = ir_dataset_from_records(records, num_positives=1, num_negatives=0)  # swapped in by hand
    data.ir.append("one")
    losses = recipe.build_task_losses(model, data, mini_batch_size=4)
    assert losses["two"].num_positives == 2 and losses["one"].num_positives == 1
    with pytest.raises(TypeError, match="takes num_positives from the datasets"):
        recipe.build_task_losses(model, data, num_positives=1)
    data.datasets["odd"] = Dataset.from_dict({"anchor": ["x"], "positive": ["y"]})
    data.ir.append("odd")
    with pytest.raises(ValueError, match=r"IR dataset 'odd' has columns \['anchor', 'positive'\]"):
        recipe.build_task_losses(model, data)


# ---------------------------------------------------------------------------------------------------------------------
# Merging one checkpoint (or the same one twice): one rule for every method that combines checkpoints


@pytest.mark.parametrize("method", [DeltaSoup(), ModelSoup(), ModelStock(), TIES(), TaskArithmetic()], ids=repr)
@pytest.mark.parametrize("twice", [False, True], ids=["one", "same-folder-twice"])
def test_every_method_refuses_fewer_than_two_distinct_checkpoints(method, twice, env):
    ckpt = env.merge_inputs["ckpt0"]
    checkpoints = [ckpt, Path(str(ckpt) + "/.")] if twice else [ckpt]  # spelled differently, the same folder
    before = _fingerprint(ckpt)
    out = env.tmp / "nested" / "out"
    with pytest.raises(
        ValueError, match=rf"{type(method).__name__} combines checkpoints and needs at least 2 distinct"
    ):
        method.merge_to_folder(checkpoints, out, base_model=env.merge_inputs["base"])
    assert not (env.tmp / "nested").exists() and _fingerprint(ckpt) == before


def test_greedy_soup_refuses_the_same_candidate_twice(env):
    ckpt = env.merge_inputs["ckpt0"]
    with pytest.raises(ValueError, match=r"GreedySoup combines checkpoints .*2 checkpoint\(s\), 1 distinct"):
        GreedySoup(lambda model: 1.0).merge_to_folder([ckpt, ckpt], env.tmp / "nested" / "g")
    assert not (env.tmp / "nested").exists()


def test_merge_cli_refuses_one_checkpoint(env, capsys):
    ckpt = str(env.merge_inputs["ckpt0"])
    out = env.tmp / "nested" / "out"
    argv = ["merge", ckpt, "--base-model", str(env.merge_inputs["base"]), "--output", str(out), "--no-progress"]
    assert main(argv) == 2
    assert "combines checkpoints and needs at least 2 distinct" in capsys.readouterr().err
    assert not (env.tmp / "nested").exists()


def test_greedy_soup_with_a_nan_score_leaves_no_parent_folders(env):
    checkpoints = [env.merge_inputs["ckpt0"], env.merge_inputs["ckpt1"]]
    with pytest.raises(ValueError, match="finite score"):
        GreedySoup(lambda model: float("nan")).merge_to_folder(checkpoints, env.tmp / "nested" / "deeper" / "g")
    assert not (env.tmp / "nested").exists()


# ---------------------------------------------------------------------------------------------------------------------
# Other paths that used to pass without a word


def test_ir_records_with_negatives_under_another_key_warn(env, caplog):
    records = [{"query": f"q{i}", "positives": [f"p{i}"], "neg": [f"n{i}"]} for i in range(3)]
    path = _write(env.tmp / "flag.jsonl", records)
    with caplog.at_level(logging.WARNING, logger="codiemb_st.data"):
        dataset = ir_dataset_from_records(path, num_negatives=0)
    assert dataset.column_names == ["anchor", "positive_1"]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1  # once per key and file, not once per record
    assert re.search(
        r"flag\.jsonl:1: the IR record has a 'neg' key, which is not read.*Rename 'neg' to 'negatives'", warnings[0]
    )


def test_gz_that_is_not_gzip_says_what_to_do(env):
    with pytest.raises(
        ValueError, match=r"not gzip-compressed\. .*drop the \.gz suffix \(rename it to train\.jsonl\)"
    ):
        _not_gzip(env)


@pytest.mark.parametrize("where", ["file", "under-a-file"])
def test_eval_output_dir_that_is_a_file_is_refused_before_any_work(where, env, capsys, monkeypatch):
    from codiemb_st.cli import eval_command

    monkeypatch.setattr(eval_command, "resolve_models", lambda specs: pytest.fail("a model was resolved"))
    target = env.tmp / "results.txt"
    target.write_text("not a folder")
    out = target if where == "file" else target / "sub"
    assert main(["eval", "--models", str(env.tmp), "--output-dir", str(out)]) == 2
    assert re.search(r"error: --output-dir .*results\.txt is a file, not a folder", capsys.readouterr().err)
    assert target.read_text() == "not a folder"
