"""Build tiny, random, offline SentenceTransformer models for tests (no hub access needed)."""

from __future__ import annotations

import functools
import string
import tempfile
from pathlib import Path

import torch
from sentence_transformers import SentenceTransformer
from sentence_transformers.sentence_transformer.modules import Normalize, Pooling, Transformer
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers
from transformers import BertConfig, BertModel, BertTokenizerFast

_CORPUS = [
    "the quick brown fox jumps over the lazy dog",
    "a man is playing a guitar on the stage",
    "a woman is slicing an onion in the kitchen",
    "machine learning models embed sentences into vectors",
    "retrieval finds relevant passages for a query",
    "semantic similarity compares the meaning of two sentences",
    "the weather is sunny and warm today",
    "he drove his car to the office in the morning",
    "children are playing football in the park",
    "stock markets fell sharply after the announcement",
    "今天天气很好 我们去公园散步",
    "如何办理信用卡 需要什么材料",
    "这个手机的电池续航怎么样",
] + [" ".join(string.ascii_lowercase[i : i + 5]) for i in range(20)]


@functools.cache
def _trained_tokenizer(vocab_size: int) -> Tokenizer:
    # The WordPiece trainer breaks ties in no fixed order (two trainings gave 288 and 291 tokens), so train once per
    # process: every tiny model of a test run then shares one vocabulary and can be merged or compared.
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    trainer = trainers.WordPieceTrainer(
        vocab_size=vocab_size, special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    )
    tok.train_from_iterator(_CORPUS * 3, trainer=trainer)
    return tok


def build_tokenizer(vocab_size: int = 400) -> BertTokenizerFast:
    """A small WordPiece tokenizer trained offline on a fixed corpus (the same one for the whole process)."""
    return BertTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_trained_tokenizer(vocab_size).to_str()), model_max_length=64
    )


def build_tiny_model(
    seed: int = 0,
    hidden_size: int = 32,
    num_layers: int = 2,
    dropout: float = 0.0,
    pooling_mode: str = "mean",
    normalize: bool = False,
) -> SentenceTransformer:
    """A random BERT (hidden 32, 2 layers) with a trained WordPiece tokenizer and mean pooling."""
    torch.manual_seed(seed)
    tokenizer = build_tokenizer()
    config = BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        intermediate_size=hidden_size * 2,
        max_position_embeddings=128,
        hidden_dropout_prob=dropout,
        attention_probs_dropout_prob=dropout,
    )
    bert = BertModel(config, add_pooling_layer=False)
    # Build through the public constructor from a saved folder, so save/load round-trips like a real model.
    # No pooler: an unused module breaks DDP with find_unused_parameters=False.
    with tempfile.TemporaryDirectory() as tmp:
        bert.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        transformer = Transformer(tmp, max_seq_length=64, model_kwargs={"add_pooling_layer": False})
    modules = [transformer, Pooling(transformer.get_embedding_dimension(), pooling_mode=pooling_mode)]
    if normalize:
        modules.append(Normalize())
    return SentenceTransformer(modules=modules, device="cpu")


def save_tiny_model(path: str | Path, **kwargs) -> Path:
    model = build_tiny_model(**kwargs)
    model.save(str(path))
    return Path(path)
