"""Bad merge inputs and arguments: the right exception naming the culprit, the inputs unchanged and nothing (not even
an empty parent folder) left at the output path.

Part of the bad-input tables (shared pieces: tests/bad_input_cases.py; the count: tests/test_bad_input_count.py).
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path
from typing import Any

import pytest
import torch
from bad_input_cases import (
    Case,
    Env,
    _corrupt,
    _merge,
    _modules_path,
    _nan_weights,
    run_case,
)

from codiemb_st.cli import main
from codiemb_st.merging import TIES, DeltaSoup, GreedySoup, ModelSoup, ModelStock, TaskArithmetic

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


# At their defaults TaskArithmetic (scale 1) and TIES with density 1 copy one checkpoint; TIES() trims it (allowed:
# tests/merging/test_merging_compatibility.py).
@pytest.mark.parametrize(
    "method", [DeltaSoup(), ModelSoup(), ModelStock(), TIES(density=1.0), TaskArithmetic()], ids=repr
)
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


@pytest.mark.parametrize("case", MERGE_ARGUMENT_CASES, ids=[f"merging:{case.id}" for case in MERGE_ARGUMENT_CASES])
def test_bad_input_gets_a_clear_answer(case, env):
    run_case(case, env)
