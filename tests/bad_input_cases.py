"""Shared pieces of the bad-input tests (tests/**/test_*_bad_inputs.py): the ``Case`` table entry and ``run_case``,
the ``env`` fixture (a fresh folder, a shared tiny model, pristine merge inputs; made available to every test
folder by tests/conftest.py), and builders of bad files that several areas use (records, merge inputs, evaluation
task folders).

Each area keeps its own table of cases next to its code's tests; ``tests/test_bad_input_count.py`` counts them all.
"""

from __future__ import annotations

import gzip
import json
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file
from tiny_model import build_tiny_model, save_perturbed_tiny_model, save_tiny_model

from codiemb_st import (
    ir_dataset_from_records,
    sts_dataset_from_records,
)
from codiemb_st.evaluation import task_folders
from codiemb_st.merging import DeltaSoup


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
        folders[f"ckpt{index}"] = save_perturbed_tiny_model(root / f"ckpt{index}", perturbation_seed=index)
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
