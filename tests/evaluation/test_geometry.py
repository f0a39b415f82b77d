from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from codiemb_st.evaluation import (
    alignment,
    anisotropy,
    condition_number,
    effective_rank,
    embedding_geometry,
    model_geometry,
    numerical_rank,
    svd_entropy,
    uniformity,
)


def _gaussian(n: int, d: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, d))


def _collapsed(n: int, d: int, seed: int = 0) -> np.ndarray:
    """Every row the same direction up to tiny noise: the degenerate, fully anisotropic case."""
    direction = _gaussian(1, d, seed)
    return direction + 1e-6 * _gaussian(n, d, seed + 1)


def test_orthonormal_rows_have_the_exact_ideal_values():
    eye = np.eye(16)
    assert anisotropy(eye) == pytest.approx(0.0, abs=1e-12)
    assert svd_entropy(eye) == pytest.approx(math.log(16))
    assert effective_rank(eye) == pytest.approx(16.0)
    assert condition_number(eye) == pytest.approx(1.0)
    # Every pair is at squared distance 2: log exp(-2 t).
    assert uniformity(eye, t=2.0) == pytest.approx(-4.0)
    assert uniformity(eye, t=0.5) == pytest.approx(-1.0)


def test_antipodal_and_identical_pairs():
    x = np.array([[1.0, 2.0, -0.5]])
    pair = np.concatenate([x, -3 * x])  # opposite directions, scale ignored
    assert anisotropy(pair) == pytest.approx(-1.0)
    assert uniformity(pair) == pytest.approx(-8.0)  # squared distance 4
    assert alignment(x, 5 * x) == pytest.approx(0.0, abs=1e-12)
    assert alignment(x, -x) == pytest.approx(4.0)
    assert alignment(x, -x, alpha=1.0) == pytest.approx(2.0)


def test_isotropic_gaussian_vs_collapsed():
    n, d = 2000, 64
    iso, col = _gaussian(n, d), _collapsed(n, d)
    assert abs(anisotropy(iso)) < 0.01
    assert anisotropy(col) == pytest.approx(1.0, abs=1e-6)
    assert effective_rank(iso) > 0.95 * d
    assert effective_rank(col) == pytest.approx(1.0, abs=0.01)
    # Marchenko-Pastur edges: sigma_max / sigma_min -> (1 + sqrt(d/n)) / (1 - sqrt(d/n)) for a Gaussian matrix.
    ratio = math.sqrt(d / n)
    assert condition_number(iso, normalize=False) == pytest.approx((1 + ratio) / (1 - ratio), rel=0.05)
    assert condition_number(col) > 1e4
    # High dimension: cosines ~ N(0, 1/d), so E exp(-t (2 - 2 cos)) = exp(-2t + 2 t^2 / d).
    assert uniformity(iso) == pytest.approx(-4.0 + 8.0 / d, abs=0.02)
    assert uniformity(col) == pytest.approx(0.0, abs=1e-6)


def test_anisotropy_and_uniformity_match_brute_force_pairs():
    x = _gaussian(50, 8, seed=3) + 0.7  # a shared offset: anisotropic
    unit = x / np.linalg.norm(x, axis=1, keepdims=True)
    pairs = [(i, j) for i in range(50) for j in range(i + 1, 50)]
    cosines = np.array([unit[i] @ unit[j] for i, j in pairs])
    assert anisotropy(x) == pytest.approx(cosines.mean())
    assert uniformity(x) == pytest.approx(math.log(np.mean(np.exp(-2.0 * (2 - 2 * cosines)))))
    s = np.linalg.svd(unit, compute_uv=False)
    p = s / s.sum()
    assert svd_entropy(x) == pytest.approx(-(p * np.log(p)).sum())
    centred = np.linalg.svd(unit - unit.mean(0), compute_uv=False)
    assert condition_number(x, center=True) == pytest.approx(centred[0] / centred[-1])


def test_uniformity_blocks_agree(monkeypatch):
    import codiemb_st.evaluation.geometry as geometry

    x = _gaussian(300, 5, seed=4)
    full = uniformity(x)
    monkeypatch.setattr(geometry, "_BLOCK_ROWS", 7)
    assert uniformity(x) == pytest.approx(full, abs=1e-12)


def test_rank_deficient_is_infinitely_ill_conditioned_and_torch_inputs_work():
    low_rank = _gaussian(20, 3) @ _gaussian(3, 10, seed=1)
    assert condition_number(low_rank) == math.inf and numerical_rank(low_rank) == 3
    assert numerical_rank(np.eye(16)) == 16
    # Computed in float32, the null directions hold float32 rounding noise (~1e-7 relative), not float64 noise:
    # judged in the input's own precision they are still null.
    low_rank32 = _gaussian(20, 3).astype(np.float32) @ _gaussian(3, 10, seed=1).astype(np.float32)
    assert numerical_rank(low_rank32) == 3 and condition_number(low_rank32) == math.inf
    assert numerical_rank(torch.from_numpy(low_rank32)) == 3
    tensor = torch.tensor(_gaussian(30, 6), dtype=torch.float32)
    assert anisotropy(tensor) == pytest.approx(anisotropy(tensor.numpy()), abs=1e-6)


def test_bad_inputs_are_rejected():
    with pytest.raises(ValueError, match="2-D"):
        anisotropy(np.ones(4))
    with pytest.raises(ValueError, match="n >= 2"):
        uniformity(np.ones((1, 4)))
    with pytest.raises(ValueError, match="all-zero row"):
        effective_rank(np.zeros((3, 4)))
    with pytest.raises(ValueError, match="NaN"):
        anisotropy(np.array([[1.0, np.nan], [0.0, 1.0]]))
    with pytest.raises(ValueError, match="same shape"):
        alignment(np.ones((3, 2)), np.ones((2, 2)))


def test_embedding_geometry_and_model_geometry(tiny_model):
    texts = ["the quick brown fox", "a man is playing a guitar", "the weather is sunny", "stock markets fell"]
    pairs = [("the quick brown fox", "a quick fox"), ("the weather is sunny", "sunny weather")]
    metrics = model_geometry(tiny_model, texts, pairs)
    embeddings = tiny_model.encode(texts)
    expected = embedding_geometry(
        embeddings, (tiny_model.encode([a for a, _ in pairs]), tiny_model.encode([b for _, b in pairs]))
    )
    assert metrics == pytest.approx(expected)
    assert set(metrics) == {
        "anisotropy",
        "svd_entropy",
        "effective_rank",
        "condition_number",
        "numerical_rank",
        "uniformity",
        "alignment",
    }
    assert metrics["effective_rank"] == pytest.approx(math.exp(metrics["svd_entropy"]))
    with pytest.raises(ValueError, match="at least two"):
        model_geometry(tiny_model, ["one"])
