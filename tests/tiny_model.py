"""Build tiny, random, offline SentenceTransformer models for tests (no hub access needed)."""

from __future__ import annotations

import string
import tempfile
from pathlib import Path

import torch
from sentence_transformers import SentenceTransformer
from sentence_transformers.sentence_transformer.modules import Normalize, Pooling, Transformer
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
from transformers import BertConfig, BertModel, BertTokenizerFast, Qwen2Config, Qwen2Model

ENGLISH_SENTENCES = [
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
]
_CORPUS = (
    ENGLISH_SENTENCES
    + [
        "今天天气很好 我们去公园散步",
        "如何办理信用卡 需要什么材料",
        "这个手机的电池续航怎么样",
    ]
    + [" ".join(string.ascii_lowercase[i : i + 5]) for i in range(20)]
)


_SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def _vocabulary() -> list[str]:
    """A fixed vocabulary: the corpus words, and every corpus character, ASCII letter and digit (also as '##' pieces)
    so any lowercase ASCII text tokenizes without [UNK]. Built without a trainer: tokenizers' WordPiece trainer
    breaks ties in no fixed order (vocabularies of 288 to 291 tokens from one corpus), and tests need every process
    to build the same model."""
    words = sorted({word for line in _CORPUS for word in line.split()})
    characters = sorted(set("".join(_CORPUS).replace(" ", "")) | set(string.ascii_lowercase + string.digits))
    pieces = ["##" + character for character in characters]
    return _SPECIAL_TOKENS + list(dict.fromkeys(characters + pieces + words))


def build_tokenizer() -> BertTokenizerFast:
    """A small deterministic WordPiece tokenizer (BERT normalisation and pre-tokenization), built offline."""
    vocab = {token: index for index, token in enumerate(_vocabulary())}
    tok = Tokenizer(models.WordPiece(vocab=vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    return BertTokenizerFast(tokenizer_object=tok, model_max_length=64)


def build_tiny_model(
    seed: int = 0,
    hidden_size: int = 32,
    num_layers: int = 2,
    dropout: float = 0.0,
    pooling_mode: str = "mean",
    normalize: bool = False,
) -> SentenceTransformer:
    """A random BERT (hidden 32, 2 layers) with a fixed WordPiece tokenizer and mean pooling."""
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


def build_tiny_decoder(seed: int = 0, hidden_size: int = 32, num_layers: int = 2, pooling_mode: str = "lasttoken"):
    """A random Qwen2 decoder (hidden 32, 2 layers) with the same tokenizer, left padding and the given pooling."""
    torch.manual_seed(seed)
    tokenizer = build_tokenizer()
    tokenizer.model_input_names = ["input_ids", "attention_mask"]  # a decoder takes no token_type_ids
    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=hidden_size * 2,
        max_position_embeddings=128,
        pad_token_id=tokenizer.pad_token_id,
    )
    decoder = Qwen2Model(config)
    with tempfile.TemporaryDirectory() as tmp:
        decoder.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        transformer = Transformer(tmp, max_seq_length=64)
    transformer.tokenizer.padding_side = "left"  # decoders pad left, so the last position is a real token
    pooling = Pooling(transformer.get_embedding_dimension(), pooling_mode=pooling_mode)
    return SentenceTransformer(modules=[transformer, pooling], device="cpu")


def save_tiny_model(path: str | Path, **kwargs) -> Path:
    model = build_tiny_model(**kwargs)
    model.save(str(path))
    return Path(path)


def save_perturbed_tiny_model(path: str | Path, perturbation_seed: int, scale: float = 0.01) -> Path:
    """A tiny model (seed 0) whose float weights moved by ``scale`` x N(0, 1): a stand-in for a fine-tuned checkpoint."""
    from safetensors.torch import load_file, save_file

    folder = save_tiny_model(path, seed=0)
    weights = next(folder.rglob("model.safetensors"))
    generator = torch.Generator().manual_seed(perturbation_seed)
    tensors = {
        k: v + scale * torch.randn(v.shape, generator=generator) if v.is_floating_point() else v
        for k, v in load_file(weights).items()
    }
    save_file(tensors, weights)
    return folder


def save_tiny_cross_encoder(
    path: str | Path, seed: int = 0, as_cross_encoder: bool = True, num_layers: int = 1, head_scale: float = 1.0
) -> Path:
    """A random BERT sequence classifier (one label) with the tiny tokenizer: a cross-encoder teacher, offline.

    ``as_cross_encoder``: saved by sentence-transformers' ``CrossEncoder`` (its folder says "CrossEncoder"); else as
    a plain transformers ``BertForSequenceClassification`` folder. ``head_scale`` multiplies the classifier's weights
    (a random head scores every pair about alike).
    """
    from sentence_transformers import CrossEncoder
    from transformers import BertForSequenceClassification

    torch.manual_seed(seed)
    tokenizer = build_tokenizer()
    config = BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=128,
        num_labels=1,
    )
    path = Path(path)
    model = BertForSequenceClassification(config)
    with torch.no_grad():
        model.classifier.weight.mul_(head_scale)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    if as_cross_encoder:
        CrossEncoder(str(path), device="cpu").save(str(path))
    return path
