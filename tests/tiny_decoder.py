"""Build a tiny, random, offline decoder embedder (Qwen2 architecture) for tests: left padding, last-token pooling.

It mirrors how LLM embedders (Qwen3-Embedding, gte-Qwen2, MiniCPM-Embedding style) are set up in
sentence-transformers: a causal decoder, the tokenizer pads on the left and appends an end-of-sequence token, and the
embedding is the hidden state of the last token, which has attended to the whole text (instruction included).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch
from sentence_transformers import SentenceTransformer
from sentence_transformers.sentence_transformer.modules import Normalize, Pooling, Transformer
from tiny_model import _vocabulary
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2Model

EOS_TOKEN = "[SEP]"
PAD_TOKEN = "[PAD]"
#: Instruction prompts as LLM embedders use them: only queries get an instruction, documents none.
QUERY_PROMPT = "instruct a query a b c query "


def build_decoder_tokenizer() -> PreTrainedTokenizerFast:
    """The fixed WordPiece vocabulary of tests/tiny_model.py as a decoder tokenizer: left padding, EOS appended."""
    vocab = {token: index for index, token in enumerate(_vocabulary())}
    tok = Tokenizer(models.WordPiece(vocab=vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    # Last-token pooling reads the hidden state of this EOS token (as Qwen3-Embedding does with <|endoftext|>).
    tok.post_processor = processors.TemplateProcessing(
        single=f"$A {EOS_TOKEN}", special_tokens=[(EOS_TOKEN, vocab[EOS_TOKEN])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        model_max_length=64,
        pad_token=PAD_TOKEN,
        eos_token=EOS_TOKEN,
        unk_token="[UNK]",
        padding_side="left",
    )


def build_tiny_decoder(
    seed: int = 0,
    hidden_size: int = 32,
    num_layers: int = 2,
    dropout: float = 0.0,
    pooling_mode: str = "lasttoken",
    include_prompt: bool = True,
    normalize: bool = False,
    prompts: dict[str, str] | None = None,
) -> SentenceTransformer:
    """A random Qwen2 decoder (hidden 32, 2 layers, grouped-query attention) with a fixed tokenizer.

    Args:
        seed: Seed of the random weights.
        hidden_size: Hidden size of the decoder.
        num_layers: Number of decoder layers.
        dropout: Attention dropout (Qwen2 has no other dropout).
        pooling_mode: sentence-transformers pooling mode; ``"lasttoken"`` as LLM embedders use.
        include_prompt: Whether prompt (instruction) tokens are pooled; only matters for pooling modes that
            average over tokens (``"mean"``...): the last token is never a prompt token.
        normalize: Add a Normalize module.
        prompts: The model's prompts (e.g. ``{"query": QUERY_PROMPT}``).
    """
    torch.manual_seed(seed)
    tokenizer = build_decoder_tokenizer()
    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 2,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        attention_dropout=dropout,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False,
    )
    decoder = Qwen2Model(config)
    # Build through the public constructor from a saved folder, so save/load round-trips like a real model.
    with tempfile.TemporaryDirectory() as tmp:
        decoder.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        transformer = Transformer(tmp, max_seq_length=64)
    modules = [
        transformer,
        Pooling(transformer.get_embedding_dimension(), pooling_mode=pooling_mode, include_prompt=include_prompt),
    ]
    if normalize:
        modules.append(Normalize())
    return SentenceTransformer(modules=modules, device="cpu", prompts=prompts)


def save_tiny_decoder(path: str | Path, **kwargs) -> Path:
    model = build_tiny_decoder(**kwargs)
    model.save(str(path))
    return Path(path)
