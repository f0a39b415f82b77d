"""Adding a merge method is one file: this one defines a toy method and runs it through the Python API and
``codiemb-st merge`` without any other edit (docs/extending.md, "Adding a merge method", follows these steps)."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from safetensors.torch import load_file
from tiny_model import save_perturbed_tiny_model, save_tiny_model
from torch import Tensor

from codiemb_st.cli import main
from codiemb_st.merging import MERGE_METHODS, MergeMethod


# --- the method: its class and its math, registered under its command-line name where it is defined -----------------
class HalfwayToBase(MergeMethod, name="halfway_to_base"):
    """The base plus a fraction of the checkpoints' mean delta: θ = θ_0 + f · mean_c(θ_c − θ_0).

    Args:
        fraction: f, in [0, 1]. Defaults to 0.5.

    Example:
        ::

            HalfwayToBase(fraction=0.5).merge_to_folder(["runs/a", "runs/b"], "merged", base_model="models/base")
    """

    requires_base = True
    keeps_agreement = False  # identical checkpoints still move towards the base

    def __init__(self, fraction: float = 0.5) -> None:
        if not 0 <= fraction <= 1:
            raise ValueError(f"fraction must be in [0, 1], got {fraction}.")
        self.fraction = float(fraction)

    def merge_rows(self, checkpoints: Tensor, base: Tensor | None, statistics: Any = None) -> Tensor:
        return checkpoints.sub_(base).mean(dim=0).mul_(self.fraction).add_(base)

    def get_config_dict(self) -> dict[str, Any]:
        return {"fraction": self.fraction}


# A test file is imported when the suite is collected, long before its tests run: keep the toy method out of the
# registry (and so out of `codiemb-st merge --help` and docs/cli.md) except while this file's tests run.
TOY = MERGE_METHODS.pop("halfway_to_base")


@pytest.fixture(autouse=True, scope="module")
def registered():
    MERGE_METHODS["halfway_to_base"] = TOY
    yield
    MERGE_METHODS.pop("halfway_to_base", None)


# --- its tests ------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("toy")
    base = save_tiny_model(root / "base", seed=0)
    checkpoints = [save_perturbed_tiny_model(root / f"ckpt{index}", perturbation_seed=index) for index in range(2)]
    return base, checkpoints


def test_the_method_registered_itself():
    assert TOY is HalfwayToBase and MERGE_METHODS["halfway_to_base"] is HalfwayToBase
    assert HalfwayToBase.name == "halfway_to_base"


def test_per_tensor_math():
    base, a, b = torch.zeros(3), torch.tensor([1.0, 2.0, 3.0]), torch.tensor([3.0, 2.0, 1.0])
    assert torch.equal(HalfwayToBase().merge_tensors([a, b], base), torch.tensor([1.0, 1.0, 1.0]))


def test_python_api_and_command_line_give_the_same_folder(inputs, tmp_path):
    base, checkpoints = inputs
    api = HalfwayToBase(fraction=0.25).merge_to_folder(
        checkpoints, tmp_path / "api", base_model=base, show_progress_bar=False
    )
    argv = ["merge", *map(str, checkpoints), "--base-model", str(base), "--method", "halfway_to_base"]
    assert main([*argv, "--fraction", "0.25", "--output", str(tmp_path / "cli"), "--no-progress"]) == 0
    expected, got = load_file(api / "model.safetensors"), load_file(tmp_path / "cli" / "model.safetensors")
    assert expected.keys() == got.keys() and all(torch.equal(expected[name], got[name]) for name in expected)
    states = [load_file(folder / "model.safetensors") for folder in (base, *checkpoints)]
    name = "encoder.layer.0.attention.self.query.weight"
    mean_delta = (states[1][name] + states[2][name]) / 2 - states[0][name]
    torch.testing.assert_close(got[name], states[0][name] + 0.25 * mean_delta)
    assert "halfway_to_base" in (tmp_path / "cli" / "README.md").read_text()  # the model card's tag


def test_command_line_refuses_a_bad_option(inputs, tmp_path, capsys):
    base, checkpoints = inputs
    argv = ["merge", *map(str, checkpoints), "--base-model", str(base), "--method", "halfway_to_base"]
    assert main([*argv, "--fraction", "2", "--output", str(tmp_path / "bad")]) == 2
    assert "Bad option for halfway_to_base: fraction must be in [0, 1], got 2.0." in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()
