"""LLM-embedder benchmark inputs: a random offline decoder embedder, seeded task records, sharding options.

Used by ``benchmarks/train_llm_embedder_gpu.py``; kept here so the pieces are tested on CPU (tests/benchmarking) and
the script stays a declaration of what it measures.

Example:
    ::

        from measurement.llm_embedder import synthetic_task_records, tiny_decoder_folder

        folder = tiny_decoder_folder(Path("/tmp/tiny_decoder"))  # Qwen2, left padding, last-token pooling
        ir_records, sts_pairs = synthetic_task_records(num_queries=64, num_pairs=64, seed=0)
"""

from __future__ import annotations

import logging
import random
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from sentence_transformers import SentenceTransformer

logger = logging.getLogger(__name__)

WORDS = (
    "the quick brown fox jumps over lazy dog man playing guitar stage woman slicing onion kitchen machine learning "
    "models embed sentences vectors retrieval finds relevant passages query semantic similarity compares meaning "
    "weather sunny warm today drove car office morning children football park stock markets fell sharply"
).split()
#: The query instruction of Qwen3-Embedding-style LLM embedders (documents get none).
QUERY_INSTRUCTION = "Instruct: Given a question, retrieve passages that answer it\nQuery: "
SHARDINGS = ("none", "ddp", "fsdp2", "deepspeed-zero1", "deepspeed-zero2")


def tiny_decoder_folder(folder: Path, hidden_size: int = 256, num_layers: int = 4, seed: int = 0) -> Path:
    """Save a random Qwen2 decoder embedder to ``folder``: a word-level tokenizer over :data:`WORDS` and the
    instruction, left padding, EOS appended, last-token pooling, normalized output. Needs no download.

    Args:
        folder: Where the SentenceTransformer folder is written (created).
        hidden_size: Hidden size of the decoder (8 heads, 2 key/value heads).
        num_layers: Number of decoder layers.
        seed: Seed of the random weights.

    Returns:
        ``folder``.
    """
    import torch
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Normalize, Pooling, Transformer
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2Model

    torch.manual_seed(seed)
    words = ["<pad>", "<unk>", "<eos>", *sorted(set(WORDS)), *QUERY_INSTRUCTION.replace(":", " : ").lower().split()]
    vocab = {token: i for i, token in enumerate(dict.fromkeys(words))}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    # Last-token pooling reads the hidden state of this EOS token, which has attended to the whole text.
    tok.post_processor = processors.TemplateProcessing(single="$A <eos>", special_tokens=[("<eos>", vocab["<eos>"])])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>", padding_side="left"
    )
    config = Qwen2Config(
        vocab_size=len(vocab), hidden_size=hidden_size, intermediate_size=2 * hidden_size, num_hidden_layers=num_layers,
        num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=512, pad_token_id=0, eos_token_id=2,
        tie_word_embeddings=False,
    )  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        Qwen2Model(config).save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        transformer = Transformer(tmp, max_seq_length=128)
    pooling = Pooling(transformer.get_embedding_dimension(), pooling_mode="lasttoken")
    SentenceTransformer(modules=[transformer, pooling, Normalize()], device="cpu").save(str(folder))
    return Path(folder)


def synthetic_task_records(num_queries: int, num_pairs: int, seed: int) -> tuple[list[dict], list[dict]]:
    """Seeded IR records (a query, 2 positives, 2 negatives) and STS pairs (scores 0-5) over :data:`WORDS`."""
    rng = random.Random(seed)

    def text(length: int) -> str:
        return " ".join(rng.choice(WORDS) for _ in range(length))

    ir = [
        {"query": text(6), "positives": [text(24), text(24)], "negatives": [text(24) for _ in range(2)]}
        for _ in range(num_queries)
    ]
    sts = [{"sentence1": text(10), "sentence2": text(10), "score": rng.uniform(0, 5)} for _ in range(num_pairs)]
    return ir, sts


def load_decoder_embedder(
    model_name_or_path: str, device: str, max_seq_length: int, lora_rank: int = 0
) -> SentenceTransformer:
    """Load a decoder embedder in float32, make its tokenizer pad on the left (last-token pooling needs it) and
    optionally wrap it in a LoRA adapter of rank ``lora_rank`` on every linear layer."""
    import torch
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(model_name_or_path, device=device, model_kwargs={"dtype": torch.float32})
    model.max_seq_length = max_seq_length
    tokenizer = model[0].processor
    tokenizer = getattr(tokenizer, "tokenizer", tokenizer)
    if tokenizer.padding_side != "left":
        logger.warning("Setting padding_side='left' for last-token pooling (was %r).", tokenizer.padding_side)
        tokenizer.padding_side = "left"
    if lora_rank:
        from peft import LoraConfig, get_peft_model

        config = LoraConfig(r=lora_rank, lora_alpha=2 * lora_rank, target_modules="all-linear")
        try:
            model.add_adapter(config)  # needs peft >= 0.22 with transformers 5.x
        except ValueError:
            model[0].model = get_peft_model(model[0].model, config)  # works with older peft
    return model


def decoder_layers(model: SentenceTransformer) -> Any:
    """The ``ModuleList`` of decoder layers of a SentenceTransformer's first module (plain or LoRA-wrapped)."""
    inner = model[0].model
    for candidate in (
        inner,
        getattr(inner, "model", None),
        getattr(getattr(inner, "base_model", None), "model", None),
    ):
        if candidate is not None and hasattr(candidate, "layers"):
            return candidate.layers
    raise ValueError("Cannot find the decoder layers of this model (expected a .layers ModuleList).")


def sharding_arguments(sharding: str, model: SentenceTransformer) -> dict[str, Any]:
    """``SentenceTransformerTrainingArguments`` keywords for a sharding name of :data:`SHARDINGS`.

    ``fsdp2`` wraps each decoder layer (accelerate's FSDP plugin, version 2); ``deepspeed-zero1/2`` pass a ZeRO config
    whose sizes the trainer fills in ("auto"); ``none`` and ``ddp`` need nothing (torchrun makes it DDP).
    """
    if sharding not in SHARDINGS:
        raise ValueError(f"sharding={sharding!r}: expected one of {', '.join(SHARDINGS)}.")
    if sharding == "fsdp2":
        layer_class = type(decoder_layers(model)[0]).__name__
        return {
            "fsdp": "full_shard",
            "fsdp_config": {"fsdp_version": 2, "transformer_layer_cls_to_wrap": [layer_class]},
        }
    if sharding.startswith("deepspeed"):
        config = {
            "zero_optimization": {"stage": int(sharding[-1])},
            "bf16": {"enabled": "auto"},
            "train_micro_batch_size_per_gpu": "auto",
            "gradient_accumulation_steps": "auto",
        }
        return {"deepspeed": config}
    return {}
