from __future__ import annotations

import pytest
import torch

from measurement.llm_embedder import (
    SHARDINGS,
    decoder_layers,
    load_decoder_embedder,
    sharding_arguments,
    synthetic_task_records,
    tiny_decoder_folder,
)


@pytest.fixture(scope="module")
def decoder_folder(tmp_path_factory):
    return tiny_decoder_folder(tmp_path_factory.mktemp("decoder") / "model", hidden_size=32, num_layers=1)


def test_tiny_decoder_pads_left_and_pools_the_last_token(decoder_folder):
    model = load_decoder_embedder(str(decoder_folder), "cpu", max_seq_length=64)
    assert model[0].tokenizer.padding_side == "left"
    short, long = "dog park", "the quick brown fox jumps over the lazy dog in the park"
    alone = model.encode([short], convert_to_tensor=True)
    batched = model.encode([short, long], convert_to_tensor=True)
    # Left padding keeps the EOS token last, so padding next to a longer text does not move the embedding.
    torch.testing.assert_close(alone[0], batched[0], atol=1e-5, rtol=1e-4)
    assert torch.allclose(batched.norm(dim=1), torch.ones(2), atol=1e-5)


def test_load_decoder_embedder_sets_left_padding_and_wraps_lora(decoder_folder, caplog):
    from sentence_transformers import SentenceTransformer

    right_padded = SentenceTransformer(str(decoder_folder), device="cpu")
    right_padded[0].tokenizer.padding_side = "right"
    right_padded.save(str(decoder_folder.parent / "right"))
    with caplog.at_level("WARNING"):
        model = load_decoder_embedder(str(decoder_folder.parent / "right"), "cpu", max_seq_length=16, lora_rank=2)
    assert "padding_side='left'" in caplog.text
    assert model.max_seq_length == 16
    trainable = [name for name, parameter in model.named_parameters() if parameter.requires_grad]
    assert trainable and all("lora_" in name for name in trainable)
    assert len(decoder_layers(model)) == 1  # found through the LoRA wrapper


def test_synthetic_task_records_are_seeded():
    ir, sts = synthetic_task_records(3, 4, seed=5)
    assert (ir, sts) == synthetic_task_records(3, 4, seed=5)
    assert ir != synthetic_task_records(3, 4, seed=6)[0]
    assert [len(r["positives"]) for r in ir] == [2, 2, 2] and all(len(r["negatives"]) == 2 for r in ir)
    assert len(sts) == 4 and all(0 <= r["score"] <= 5 for r in sts)


def test_sharding_arguments(decoder_folder, tiny_model):
    model = load_decoder_embedder(str(decoder_folder), "cpu", max_seq_length=16)
    fsdp = sharding_arguments("fsdp2", model)
    assert fsdp["fsdp_config"]["transformer_layer_cls_to_wrap"] == ["Qwen2DecoderLayer"]
    assert sharding_arguments("deepspeed-zero2", model)["deepspeed"]["zero_optimization"] == {"stage": 2}
    assert sharding_arguments("ddp", model) == {} and "ddp" in SHARDINGS
    with pytest.raises(ValueError, match="sharding='zero3'"):
        sharding_arguments("zero3", model)
    with pytest.raises(ValueError, match="decoder layers"):
        sharding_arguments("fsdp2", tiny_model)  # a BERT encoder: no .layers list
