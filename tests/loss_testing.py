"""Shared helpers for loss tests: deterministic texts, tokenized columns, parameter gradients."""

from __future__ import annotations

import random

import torch
from sentence_transformers import SentenceTransformer

WORDS = (
    "the quick brown fox jumps over lazy dog man playing guitar stage woman slicing onion kitchen machine learning "
    "models embed sentences vectors retrieval finds relevant passages query semantic similarity compares meaning "
    "weather sunny warm today drove car office morning children football park stock markets fell sharply"
).split()


def random_texts(count: int, seed: int, length: int = 6) -> list[str]:
    """``count`` distinct pseudo-sentences."""
    rng = random.Random(seed)
    texts: list[str] = []
    while len(texts) < count:
        text = " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, length)))
        if text not in texts:
            texts.append(text)
    return texts


def make_ir_columns(batch_size: int, num_positives: int, num_negatives: int, seed: int = 0) -> list[list[str]]:
    """Columns anchor, positive_1..P, negative_1..N of distinct texts."""
    texts = random_texts(batch_size * (1 + num_positives + num_negatives), seed)
    return [texts[c * batch_size : (c + 1) * batch_size] for c in range(1 + num_positives + num_negatives)]


def tokenize_columns(model: SentenceTransformer, columns: list[list[str]]) -> list[dict[str, torch.Tensor]]:
    return [model.tokenize(column) for column in columns]


def embed_columns(model: SentenceTransformer, columns: list[list[str]]) -> list[torch.Tensor]:
    """Embed every column in one forward pass each, with gradients (the uncached path)."""
    return [model(features)["sentence_embedding"] for features in tokenize_columns(model, columns)]


def parameter_grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: param.grad.detach().clone() for name, param in model.named_parameters() if param.grad is not None}


def assert_grads_close(actual: dict, expected: dict, atol: float = 1e-9, rtol: float = 1e-7) -> None:
    """Defaults for float64 models; pass float32 tolerances explicitly."""
    assert actual.keys() == expected.keys() and len(actual) > 0
    for name in expected:
        torch.testing.assert_close(
            actual[name], expected[name], atol=atol, rtol=rtol, msg=lambda m, name=name: f"{name}: {m}"
        )
