"""LoRA adapter checkpoints as merge inputs.

The reference: peft itself materialises each fine-tune (``merge_and_unload``), the full checkpoints are merged, and
merging the adapter folders directly must give the same model. Tested with peft 0.21.2 (``get_peft_model`` and
``merge_and_unload`` work with transformers 5.24; ``model.add_adapter`` there wants peft >= 0.22) and writes the same
folder layout sentence-transformers writes after ``add_adapter``.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import peft  # in the dev extra: a missing peft fails here instead of skipping the adapter tests
import pytest
import torch
from safetensors.torch import load_file, save_file
from sentence_transformers import SentenceTransformer
from tiny_decoder import save_tiny_decoder
from tiny_model import save_tiny_model

from codiemb_st.merging import TIES, DeltaSoup, ModelSoup, ModelStock, TaskArithmetic, streaming_merge
from codiemb_st.merging.adapters import lora_delta_rows

TEXTS = ["the quick brown fox", "a man is playing a guitar", "retrieval finds relevant passages"]


def decoder_configs() -> list[peft.LoraConfig]:
    """Three fine-tunes with different ranks, alphas, targets and options (init_lora_weights=False: B != 0)."""
    return [
        peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "embed_tokens"], init_lora_weights=False),
        peft.LoraConfig(
            r=2, lora_alpha=16, target_modules=["q_proj", "k_proj", "o_proj", "gate_proj"], use_rslora=True,
            init_lora_weights=False, bias="lora_only",
        ),
        peft.LoraConfig(
            r=8, lora_alpha=4, target_modules=["down_proj", "up_proj"], rank_pattern={"layers.0.mlp.down_proj": 3},
            alpha_pattern={"up_proj": 12}, init_lora_weights=False,
        ),
    ]  # fmt: skip


def save_lora_checkpoint(
    base: Path, folder: Path, config: peft.LoraConfig, seed: int, **model_kwargs
) -> tuple[Path, Path]:
    """Save an adapter checkpoint (sentence-transformers layout) and its peft-materialised full checkpoint."""
    model = SentenceTransformer(str(base), device="cpu", model_kwargs=model_kwargs)
    torch.manual_seed(seed)
    peft_model = peft.get_peft_model(model[0].model, config)
    with torch.no_grad():  # trained biases (bias="lora_only"), so the adapter stores tensors whole too
        for name, param in peft_model.named_parameters():
            if name.endswith(".bias") and param.requires_grad:
                param.add_(torch.randn_like(param))
    model[0].model = peft_model
    model.save(str(folder / "adapter"))
    model[0].model = peft_model.merge_and_unload()
    model.save(str(folder / "full"))
    return folder / "adapter", folder / "full"


@pytest.fixture(scope="module")
def decoder_lora(tmp_path_factory):
    root = tmp_path_factory.mktemp("decoder_lora")
    base = save_tiny_decoder(root / "base", seed=0)
    pairs = [
        save_lora_checkpoint(base, root / f"ckpt{i}", config, seed=10 + i)
        for i, config in enumerate(decoder_configs())
    ]
    return base, [adapter for adapter, _ in pairs], [full for _, full in pairs]


def load_weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "model.safetensors"))


def assert_same_weights(actual: Path, expected: Path, atol: float = 2e-6) -> None:
    actual_weights, expected_weights = load_weights(actual), load_weights(expected)
    assert actual_weights.keys() == expected_weights.keys()
    for name, tensor in expected_weights.items():
        assert actual_weights[name].dtype == tensor.dtype, name
        torch.testing.assert_close(
            actual_weights[name], tensor, atol=atol, rtol=1e-5, msg=lambda m, n=name: f"{n}: {m}"
        )


def test_adapters_change_what_the_reference_says(decoder_lora):
    """Sanity check of the fixture: every fine-tune moved the tensors its adapter targets, and only those."""
    base, _, fulls = decoder_lora
    base_weights = load_weights(base)
    for full, marker in zip(fulls, ["q_proj", "k_proj", "down_proj"]):
        moved = {name for name, tensor in load_weights(full).items() if not torch.equal(tensor, base_weights[name])}
        assert any(marker in name for name in moved)
        assert len(moved) < len(base_weights)


@pytest.mark.parametrize(
    "method",
    [
        DeltaSoup(),
        DeltaSoup(granularity="tensor", power=2.0),
        ModelSoup(),
        TaskArithmetic(scale=0.7),
        ModelStock(),  # whole-tensor statistics: extra reads of the materialised deltas
        TIES(density=0.5),  # exact top-k threshold over several statistics passes
    ],
    ids=["deltasoup", "deltasoup-tensor", "modelsoup", "task-arithmetic", "model-stock", "ties"],
)
def test_merging_adapters_equals_merging_peft_materialised_checkpoints(decoder_lora, tmp_path, method):
    base, adapters, fulls = decoder_lora
    expected = method.merge_to_folder(fulls, tmp_path / "reference", base_model=base, show_progress_bar=False)
    merged = method.merge_to_folder(adapters, tmp_path / "merged", base_model=base, show_progress_bar=False)
    assert_same_weights(merged, expected)
    assert json.loads((merged / "merge_config.json").read_text())["lora_checkpoints"] == [
        "checkpoints[0]",
        "checkpoints[1]",
        "checkpoints[2]",
    ]


def test_small_row_slices_give_the_same_merge(decoder_lora, tmp_path, monkeypatch):
    """δ is materialised per row slice; slices of a few rows (also of the transposed embedding delta) must agree."""
    base, adapters, fulls = decoder_lora
    expected = DeltaSoup().merge_to_folder(fulls, tmp_path / "reference", base_model=base, show_progress_bar=False)
    monkeypatch.setattr(streaming_merge, "SLICE_BUDGET_BYTES", 3 * 4 * 32 * 3)  # 3 rows of hidden 32, 4 inputs
    merged = DeltaSoup().merge_to_folder(adapters, tmp_path / "merged", base_model=base, show_progress_bar=False)
    assert_same_weights(merged, expected)


def test_adapter_and_full_checkpoints_can_be_mixed(decoder_lora, tmp_path):
    base, adapters, fulls = decoder_lora
    expected = DeltaSoup().merge_to_folder([fulls[0], fulls[1]], tmp_path / "ref", base_model=base)
    merged = DeltaSoup().merge_to_folder([fulls[0], adapters[1]], tmp_path / "mixed", base_model=base)
    assert_same_weights(merged, expected)


def test_single_adapter_model_soup_is_the_materialised_checkpoint(decoder_lora, tmp_path, caplog):
    base, adapters, fulls = decoder_lora
    with caplog.at_level("WARNING", logger="codiemb_st.merging.base"):
        merged = ModelSoup().merge_to_folder([adapters[0]], tmp_path / "soup", base_model=base)
    assert_same_weights(merged, fulls[0])
    assert "ModelSoup of one LoRA adapter checkpoint: the output is that adapter materialised" in caplog.text
    for method in (DeltaSoup(), TaskArithmetic()):  # the other methods combine checkpoints: one is refused
        with pytest.raises(ValueError, match=r"needs at least 2 distinct.*use ModelSoup with that adapter"):
            method.merge_to_folder([adapters[0]], tmp_path / "one", base_model=base)
    assert not (tmp_path / "one").exists()


def test_adapter_recorded_on_another_base_of_the_same_shapes_warns(decoder_lora, tmp_path, caplog):
    base, adapters, _ = decoder_lora
    other = [
        copy_adapter(a, tmp_path / f"a{i}", base_model_name_or_path="Qwen/another-model")
        for i, a in enumerate(adapters)
    ]
    with caplog.at_level("WARNING", logger="codiemb_st.merging.adapters"):
        DeltaSoup().merge_to_folder(other, tmp_path / "out", base_model=base)
    assert "base_model_name_or_path='Qwen/another-model', but base_model is" in caplog.text
    assert str(base) in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="codiemb_st.merging.adapters"):
        DeltaSoup().merge_to_folder(adapters, tmp_path / "out2", base_model=base)  # recorded base = base: quiet
    assert "base_model_name_or_path" not in caplog.text


def test_adapter_folder_without_its_config_is_named(decoder_lora, tmp_path):
    base, adapters, _ = decoder_lora
    broken = copy_adapter(adapters[0], tmp_path / "no_config")
    (broken / "adapter_config.json").unlink()
    with pytest.raises(ValueError, match=r"holds adapter_model\.safetensors but no adapter_config\.json"):
        DeltaSoup().merge_to_folder([broken, adapters[1]], tmp_path / "out", base_model=base)
    assert not (tmp_path / "out").exists()


def test_merged_folder_loads_without_peft(decoder_lora, tmp_path, monkeypatch):
    base, adapters, fulls = decoder_lora
    merged = TaskArithmetic(scale=0.5).merge_to_folder(adapters, tmp_path / "merged", base_model=base)
    expected = TaskArithmetic(scale=0.5).merge(fulls, base_model=base, show_progress_bar=False)
    assert not list(merged.rglob("adapter_*")) and (merged / "config.json").is_file()
    # Loading a folder that still held an adapter would need peft: pretend it is not installed.
    import sentence_transformers.base.modules.transformer as st_transformer

    monkeypatch.setattr(st_transformer, "is_peft_available", lambda: False)
    with pytest.raises(ImportError, match="peft"):
        SentenceTransformer(str(adapters[0]), device="cpu")
    model = SentenceTransformer(str(merged), device="cpu")
    assert not hasattr(model[0].model, "peft_config")
    torch.testing.assert_close(model.encode(TEXTS), expected.encode(TEXTS), atol=1e-5, rtol=1e-4)


def test_bert_adapters_with_modules_to_save(tmp_path):
    base = save_tiny_model(tmp_path / "base", seed=0)
    configs = [
        peft.LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"], init_lora_weights=False),
        peft.LoraConfig(
            r=2, lora_alpha=4, target_modules=["key", "dense"], modules_to_save=["LayerNorm"], init_lora_weights=False
        ),
    ]
    # The tiny BERT has no pooler (an unused module); load it the same way here.
    pairs = [
        save_lora_checkpoint(base, tmp_path / f"c{i}", config, seed=i, add_pooling_layer=False)
        for i, config in enumerate(configs)
    ]
    expected = DeltaSoup().merge_to_folder([full for _, full in pairs], tmp_path / "ref", base_model=base)
    merged = DeltaSoup().merge_to_folder([adapter for adapter, _ in pairs], tmp_path / "merged", base_model=base)
    assert_same_weights(merged, expected)


def test_lora_delta_rows_equal_rows_of_the_full_delta():
    generator = torch.Generator().manual_seed(0)
    a, b = torch.randn(3, 7, generator=generator), torch.randn(5, 3, generator=generator)
    full = 0.5 * b @ a
    torch.testing.assert_close(lora_delta_rows(a, b, 0.5, False, 1, 4), full[1:4])
    torch.testing.assert_close(lora_delta_rows(a, b, 0.5, True, 2, 6), full.T[2:6])


# ---------------------------------------------------------------------------------------------------------------------
# Refusals


def test_adapters_need_the_base_model_even_for_model_soup(decoder_lora, tmp_path):
    _, adapters, _ = decoder_lora
    with pytest.raises(ValueError, match="base_model= is required"):
        ModelSoup().merge_to_folder(adapters, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def copy_adapter(adapter: Path, destination: Path, **config_changes) -> Path:
    shutil.copytree(adapter, destination)
    config_file = destination / "adapter_config.json"
    config = json.loads(config_file.read_text())
    config.update(config_changes)
    config_file.write_text(json.dumps(config))
    return destination


def test_adapters_on_different_base_names_are_refused(decoder_lora, tmp_path):
    base, adapters, _ = decoder_lora
    other = copy_adapter(adapters[1], tmp_path / "other", base_model_name_or_path="Qwen/another-model")
    with pytest.raises(ValueError, match="different base models"):
        DeltaSoup().merge_to_folder([adapters[0], other], tmp_path / "out", base_model=base)


def test_adapter_on_a_base_of_other_shapes_is_refused(decoder_lora, tmp_path):
    _, adapters, _ = decoder_lora
    wider = save_tiny_decoder(tmp_path / "wider", hidden_size=48)
    with pytest.raises(ValueError, match="trained on another base model"):
        DeltaSoup().merge_to_folder(adapters[:2], tmp_path / "out", base_model=wider)


@pytest.mark.parametrize(
    ("changes", "match"),
    [({"use_dora": True}, "use_dora"), ({"peft_type": "IA3"}, "only LoRA"), ({"lora_bias": True}, "lora_bias")],
)
def test_unsupported_adapter_configs_are_refused(decoder_lora, tmp_path, changes, match):
    base, adapters, _ = decoder_lora
    unsupported = copy_adapter(adapters[0], tmp_path / "unsupported", **changes)
    with pytest.raises(ValueError, match=match):
        DeltaSoup().merge_to_folder([unsupported], tmp_path / "out", base_model=base)


def test_incomplete_adapter_is_refused(decoder_lora, tmp_path):
    base, adapters, _ = decoder_lora
    broken = copy_adapter(adapters[0], tmp_path / "broken")
    weights = load_file(str(broken / "adapter_model.safetensors"))
    del weights[next(name for name in weights if name.endswith("lora_B.weight"))]
    save_file(weights, str(broken / "adapter_model.safetensors"))
    with pytest.raises(ValueError, match="no lora_B matrix"):
        DeltaSoup().merge_to_folder([broken], tmp_path / "out", base_model=base)


def test_unknown_adapter_tensor_is_refused(decoder_lora, tmp_path):
    base, adapters, _ = decoder_lora
    dora_like = copy_adapter(adapters[0], tmp_path / "dora_like")
    weights = load_file(str(dora_like / "adapter_model.safetensors"))
    weights["base_model.model.layers.0.self_attn.q_proj.lora_magnitude_vector"] = torch.ones(32)
    save_file(weights, str(dora_like / "adapter_model.safetensors"))
    with pytest.raises(ValueError, match="not a LoRA A/B matrix"):
        DeltaSoup().merge_to_folder([dora_like], tmp_path / "out", base_model=base)


def test_an_adapter_as_base_is_refused(decoder_lora, tmp_path):
    _, adapters, fulls = decoder_lora
    with pytest.raises(ValueError, match="base must be the full pre-trained model"):
        DeltaSoup().merge_to_folder([adapters[0]], tmp_path / "out", base_model=adapters[1])


def test_gpt2_conv1d_adapters_with_fan_in_fan_out(tmp_path):
    """GPT-2 stores Linear weights transposed (Conv1D, ``in x out``); peft then sets fan_in_fan_out: δ = (B A)^T."""
    import tempfile

    from sentence_transformers.sentence_transformer.modules import Pooling, Transformer
    from tiny_decoder import build_decoder_tokenizer
    from transformers import GPT2Config, GPT2Model

    torch.manual_seed(0)
    tokenizer = build_decoder_tokenizer()
    config = GPT2Config(vocab_size=len(tokenizer), n_embd=32, n_layer=2, n_head=4, n_positions=128)
    with tempfile.TemporaryDirectory() as tmp:
        GPT2Model(config).save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        transformer = Transformer(tmp, max_seq_length=64)
    model = SentenceTransformer(modules=[transformer, Pooling(32, pooling_mode="lasttoken")], device="cpu")
    base = tmp_path / "base"
    model.save(str(base))
    configs = [
        peft.LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn"], fan_in_fan_out=True, init_lora_weights=False),
        peft.LoraConfig(
            r=2, lora_alpha=2, target_modules=["c_proj", "c_fc"], fan_in_fan_out=True, init_lora_weights=False
        ),
    ]
    pairs = [save_lora_checkpoint(base, tmp_path / f"g{i}", config, seed=i) for i, config in enumerate(configs)]
    assert json.loads((pairs[0][0] / "adapter_config.json").read_text())["fan_in_fan_out"]
    expected = TaskArithmetic().merge_to_folder([full for _, full in pairs], tmp_path / "ref", base_model=base)
    merged = TaskArithmetic().merge_to_folder([adapter for adapter, _ in pairs], tmp_path / "merged", base_model=base)
    assert_same_weights(merged, expected)


def test_adapter_checkpoints_are_read_in_row_slices(decoder_lora, tmp_path, monkeypatch):
    """Streaming: with a small slice budget, no read of the base or of a materialised checkpoint exceeds a slice."""
    from codiemb_st.merging import adapters, safetensors_stream

    base, adapter_folders, _ = decoder_lora
    budget = 4 * 4 * 32 * 2  # 2 rows of hidden 32 for 4 inputs in float32
    monkeypatch.setattr(streaming_merge, "SLICE_BUDGET_BYTES", budget)
    largest = {"base": 0, "materialised": 0}  # elements per read
    base_read, adapter_read = safetensors_stream.RowReader.read, adapters.AdapterRowReader.read

    def tracked_base_read(self, name, start=None, stop=None, out=None):
        values = base_read(self, name, start, stop, out)
        if not name.startswith("base_model."):  # the adapter's own small A/B matrices are read whole, on purpose
            largest["base"] = max(largest["base"], values.numel())
        return values

    def tracked_adapter_read(self, name, start=None, stop=None, out=None):
        values = adapter_read(self, name, start, stop, out)
        largest["materialised"] = max(largest["materialised"], values.numel())
        return values

    monkeypatch.setattr(safetensors_stream.RowReader, "read", tracked_base_read)
    monkeypatch.setattr(adapters.AdapterRowReader, "read", tracked_adapter_read)
    DeltaSoup().merge_to_folder(adapter_folders, tmp_path / "merged", base_model=base, show_progress_bar=False)
    # A slice holds at most budget / (4 inputs x 4 bytes) = 64 elements (the largest tensor has 215 x 32).
    assert 0 < largest["materialised"] <= 64 and 0 < largest["base"] <= 64, largest
