"""The model card of a merged folder: sentence-transformers' layout, Hub metadata that loads offline."""

from __future__ import annotations

import json

import pytest
from huggingface_hub import ModelCard
from tiny_model import save_perturbed_tiny_model, save_tiny_model

from codiemb_st.cli import main
from codiemb_st.merging import DeltaSoup, ModelSoup, MultiSLERP


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("card")
    base = save_tiny_model(root / "base", seed=0)
    checkpoints = [save_perturbed_tiny_model(root / f"ckpt{index}", perturbation_seed=index) for index in range(2)]
    return base, checkpoints


def _card(folder):
    return ModelCard.load(folder / "README.md")


def test_merge_writes_a_card_whose_metadata_loads_offline(inputs, tmp_path):
    base, checkpoints = inputs
    out = DeltaSoup(power=2).merge_to_folder(
        checkpoints, tmp_path / "merged", base_model=base, show_progress_bar=False
    )
    card = _card(out)
    data = card.data.to_dict()
    assert data["library_name"] == "sentence-transformers" and data["pipeline_tag"] == "sentence-similarity"
    assert data["base_model"] == str(base)
    assert {"sentence-transformers", "merge", "delta_soup"} <= set(data["tags"])
    # The body: the inputs, the method's parameters (as merge_config.json records them) and the loading snippet.
    text = card.text
    assert all(f"`{checkpoint}`" in text for checkpoint in checkpoints) and f"`{base}`" in text
    assert json.dumps(DeltaSoup(power=2).get_config_dict(), indent=4) in text
    assert "per tensor or parameter" in text  # DeltaSoup has no one weight per checkpoint
    assert 'SentenceTransformer("sentence_transformers_model_id")' in text and "model.encode(sentences)" in text
    # Not the checkpoint's own card (which describes its training).
    assert (out / "README.md").read_text() != (checkpoints[0] / "README.md").read_text()


def test_card_lists_the_weights_and_the_checkpoints_recorded_base(inputs, tmp_path):
    base, checkpoints = inputs
    # Checkpoints whose cards record the Hub model they were fine-tuned from, merged without a base.
    recorded = []
    for index, checkpoint in enumerate(checkpoints):
        copy = tmp_path / f"recorded{index}"
        copy.mkdir()
        for file in checkpoint.rglob("*"):
            if file.is_file():
                (copy / file.relative_to(checkpoint)).parent.mkdir(parents=True, exist_ok=True)
                (copy / file.relative_to(checkpoint)).write_bytes(file.read_bytes())
        (copy / "README.md").write_text(
            "---\nbase_model: org/base-encoder\nlibrary_name: sentence-transformers\n---\n"
        )
        recorded.append(copy)
    out = MultiSLERP(weights=[3, 1], space="weights").merge_to_folder(
        recorded, tmp_path / "slerp", show_progress_bar=False
    )
    data = _card(out).data
    assert data.base_model == "org/base-encoder" and "multi_slerp" in data.tags
    assert "| 0.75 |" in _card(out).text and "| 0.25 |" in _card(out).text


def test_cli_merge_writes_the_card(inputs, tmp_path):
    base, checkpoints = inputs
    assert main(["merge", *map(str, checkpoints), "--output", str(tmp_path / "cli"), "--no-progress"]) == 0
    data = _card(tmp_path / "cli").data
    assert "model_soup" in data.tags and "merge" in data.tags
    assert data.base_model is None  # no base given, none recorded: nothing to claim
    assert "| 0.5 |" in _card(tmp_path / "cli").text
    expected = ModelSoup().merge_to_folder(checkpoints, tmp_path / "api", show_progress_bar=False)
    assert (expected / "README.md").read_text() != ""
