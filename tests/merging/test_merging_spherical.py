"""SLERP and Multi-SLERP (Karcher mean): per-tensor math against plain loop references, fallbacks, streaming, CLI."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from codiemb_st.cli import main
from codiemb_st.merging import MERGE_METHODS, SLERP, MultiSLERP, streaming_merge
from codiemb_st.merging.spherical import PARALLEL_ANGLE

# ---------------------------------------------------------------------------------------------------------------------
# Loop references: plain Python floats, one tensor at a time (no Gram matrix, no coefficient form)


def _flat(tensor: torch.Tensor) -> list[float]:
    return [float(x) for x in tensor.double().flatten()]


def _dot(a: list[float], b: list[float]) -> float:
    return sum(x * y for x, y in zip(a, b))


def _norm(a: list[float]) -> float:
    return math.sqrt(_dot(a, a))


def _vectors(tensors, base, space):
    if space == "weights":
        return [_flat(t) for t in tensors]
    base_values = _flat(base)
    return [[x - b for x, b in zip(_flat(t), base_values)] for t in tensors]


def _result(values: list[float], base, space, shape) -> torch.Tensor:
    if space == "deltas":
        values = [v + b for v, b in zip(values, _flat(base))]
    return torch.tensor(values, dtype=torch.float64).reshape(shape)


def reference_slerp(tensors, base, t: float, space: str) -> torch.Tensor:
    v0, v1 = _vectors(tensors, base, space)
    n0, n1 = _norm(v0), _norm(v1)
    linear = [(1 - t) * a + t * b for a, b in zip(v0, v1)]
    if n0 == 0 or n1 == 0:
        return _result(linear, base, space, tensors[0].shape)
    omega = math.acos(max(-1.0, min(1.0, _dot(v0, v1) / (n0 * n1))))
    if omega < PARALLEL_ANGLE or omega > math.pi - PARALLEL_ANGLE:
        return _result(linear, base, space, tensors[0].shape)
    norm = (1 - t) * n0 + t * n1
    c0, c1 = math.sin((1 - t) * omega) / math.sin(omega), math.sin(t * omega) / math.sin(omega)
    values = [norm * (c0 * a / n0 + c1 * b / n1) for a, b in zip(v0, v1)]
    return _result(values, base, space, tensors[0].shape)


def reference_karcher(tensors, base, weights, space: str, steps: int = 500) -> torch.Tensor:
    """The weighted Karcher mean by Riemannian gradient descent on the full vectors (log and exp maps spelled out)."""
    vectors = _vectors(tensors, base, space)
    total = sum(weights)
    weights = [w / total for w in weights]
    norms = [_norm(v) for v in vectors]
    linear = [sum(w * v[i] for w, v in zip(weights, vectors)) for i in range(len(vectors[0]))]
    if any(n == 0 and w > 0 for n, w in zip(norms, weights)):
        return _result(linear, base, space, tensors[0].shape)  # documented fallback: a zero vector
    vectors, norms, weights = zip(*[(v, n, w) for v, n, w in zip(vectors, norms, weights) if w > 0])
    units = [[x / n for x in v] for v, n in zip(vectors, norms)]
    angles = [math.acos(max(-1.0, min(1.0, _dot(u, v)))) for u in units for v in units]
    if max(angles) < PARALLEL_ANGLE:
        return _result(linear, base, space, tensors[0].shape)  # documented fallback: all parallel
    mean = [sum(w * u[i] for w, u in zip(weights, units)) for i in range(len(units[0]))]
    mean = [x / _norm(mean) for x in mean]
    for _ in range(steps):
        tangent = [0.0] * len(mean)
        for w, u in zip(weights, units):
            cos = max(-1.0, min(1.0, _dot(mean, u)))
            theta = math.acos(cos)
            factor = theta / math.sin(theta) if theta > 1e-12 else 1.0
            for i in range(len(mean)):
                tangent[i] += w * factor * (u[i] - cos * mean[i])
        length = _norm(tangent)
        if length < 1e-13:
            break
        mean = [math.cos(length) * m + math.sin(length) * x / length for m, x in zip(mean, tangent)]
        mean = [x / _norm(mean) for x in mean]
    scale = sum(w * n for w, n in zip(weights, norms))
    return _result([scale * m for m in mean], base, space, tensors[0].shape)


def _case(k: int, shape=(6, 5), seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=generator, dtype=torch.float64)
    checkpoints = [
        base + (0.5 + c) * 0.1 * torch.randn(shape, generator=generator, dtype=torch.float64) for c in range(k)
    ]
    return checkpoints, base


# ---------------------------------------------------------------------------------------------------------------------
# Per-tensor math


@pytest.mark.parametrize("space", ["deltas", "weights"])
@pytest.mark.parametrize("t", [0.0, 0.3, 0.5, 1.0])
@pytest.mark.parametrize("shape", [(6, 5), (7,), (3, 2, 4)])
def test_slerp_equals_the_loop_reference(space, t, shape):
    (a, b), base = _case(2, shape)
    merged = SLERP(t=t, space=space).merge_tensors([a, b], base)
    torch.testing.assert_close(merged, reference_slerp([a, b], base, t, space), atol=1e-12, rtol=1e-12)
    if t in (0.0, 1.0):
        torch.testing.assert_close(merged, a if t == 0 else b, atol=1e-12, rtol=1e-12)


def test_slerp_keeps_the_norm_that_linear_interpolation_loses():
    base = torch.zeros(2, dtype=torch.float64)
    a, b = torch.tensor([1.0, 0.0], dtype=torch.float64), torch.tensor([0.0, 1.0], dtype=torch.float64)
    merged = SLERP().merge_tensors([a, b], base)
    torch.testing.assert_close(merged, torch.tensor([math.sqrt(0.5), math.sqrt(0.5)], dtype=torch.float64))
    assert abs(float(merged.norm()) - 1.0) < 1e-12  # the linear average has norm 0.707


@pytest.mark.parametrize("space", ["deltas", "weights"])
def test_slerp_falls_back_to_linear_interpolation(space):
    (a, _), base = _case(2)
    linear = lambda x, y, t: (1 - t) * x + t * y  # noqa: E731
    delta = a - base
    if space == "deltas":
        cases = [(base.clone(), a), (a, base + 3 * delta), (a, base - delta)]  # zero delta, parallel, opposed
    else:
        cases = [(torch.zeros_like(a), a), (a, 3 * a), (a, -a)]
    for x, y in cases:
        torch.testing.assert_close(SLERP(t=0.3, space=space).merge_tensors([x, y], base), linear(x, y, 0.3))
    # just above the parallel threshold: true slerp (norm interpolated), no longer the chord
    rotated = a.clone()
    rotated[0, 0] += 10 * PARALLEL_ANGLE * float((a - base if space == "deltas" else a).norm())
    merged = SLERP(t=0.5, space=space).merge_tensors([a, rotated], base)
    torch.testing.assert_close(merged, reference_slerp([a, rotated], base, 0.5, space), atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("space", ["deltas", "weights"])
@pytest.mark.parametrize("k, weights", [(3, None), (3, [1.0, 2.0, 3.0]), (4, [0.1, 0.0, 0.5, 0.4])])
def test_multi_slerp_equals_the_loop_reference(space, k, weights):
    checkpoints, base = _case(k, (5, 3), seed=k)
    merged = MultiSLERP(weights=weights, space=space).merge_tensors(checkpoints, base)
    expected = reference_karcher(checkpoints, base, weights or [1.0] * k, space)
    torch.testing.assert_close(merged, expected, atol=1e-9, rtol=1e-9)


def test_multi_slerp_with_two_checkpoints_is_slerp():
    (a, b), base = _case(2, (4, 4), seed=3)
    for space in ("deltas", "weights"):
        torch.testing.assert_close(
            MultiSLERP(space=space).merge_tensors([a, b], base),
            SLERP(t=0.5, space=space).merge_tensors([a, b], base),
            atol=1e-10,
            rtol=1e-10,
        )
        torch.testing.assert_close(
            MultiSLERP(weights=[0.7, 0.3], space=space).merge_tensors([a, b], base),
            SLERP(t=0.3, space=space).merge_tensors([a, b], base),
            atol=1e-10,
            rtol=1e-10,
        )


def test_multi_slerp_falls_back_to_the_weighted_average():
    checkpoints, base = _case(3)
    delta = checkpoints[0] - base
    weights = [0.2, 0.3, 0.5]
    average = lambda ts: sum(w * t for w, t in zip(weights, ts))  # noqa: E731
    for inputs in (
        [base.clone(), checkpoints[1], checkpoints[2]],  # a zero delta of positive weight
        [base + delta, base + 2 * delta, base + 0.5 * delta],  # all parallel
    ):
        torch.testing.assert_close(MultiSLERP(weights=weights).merge_tensors(inputs, base), average(inputs))
    # a zero-weight checkpoint does not matter, even with a zero delta
    merged = MultiSLERP(weights=[0.5, 0.5, 0.0]).merge_tensors([checkpoints[0], checkpoints[1], base], base)
    torch.testing.assert_close(merged, SLERP().merge_tensors(checkpoints[:2], base), atol=1e-10, rtol=1e-10)


def test_identical_checkpoints_come_back_and_float32_keeps_its_dtype():
    (a, _), base = _case(2)
    for method in (SLERP(t=0.3), MultiSLERP(), MultiSLERP(space="weights")):
        torch.testing.assert_close(method.merge_tensors([a, a, a][: 2 if isinstance(method, SLERP) else 3], base), a)
    (a, b), base = _case(2)
    merged = SLERP().merge_tensors([a.float(), b.float()], base.float())
    assert merged.dtype == torch.float32
    torch.testing.assert_close(merged, reference_slerp([a, b], base, 0.5, "deltas").float(), atol=1e-5, rtol=1e-5)


def test_bad_arguments_are_refused():
    (a, b), base = _case(2)
    with pytest.raises(ValueError, match="`t`"):
        SLERP(t=1.5)
    with pytest.raises(ValueError, match="space"):
        SLERP(space="both")
    with pytest.raises(ValueError, match="weights\\[1\\]"):
        MultiSLERP(weights=[1.0, -1.0])
    with pytest.raises(ValueError, match="positive weight"):
        MultiSLERP(weights=[0.0, 0.0])
    with pytest.raises(TypeError, match="sequence"):
        MultiSLERP(weights="1,2")
    with pytest.raises(ValueError, match="exactly 2"):
        SLERP().merge_tensors([a, b, a], base)
    with pytest.raises(ValueError, match="3 weights for 2"):
        MultiSLERP(weights=[1, 1, 1]).merge_tensors([a, b], base)
    with pytest.raises(ValueError, match="needs base"):
        MultiSLERP().merge_tensors([a, b])
    assert SLERP(space="weights").merge_tensors([a, b]).shape == a.shape  # weights space: no base needed


# ---------------------------------------------------------------------------------------------------------------------
# Streaming through model folders, and the CLI


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    from test_merging_folders import build_model

    root = tmp_path_factory.mktemp("spherical")
    build_model().save(str(root / "base"))
    for seed in (1, 2, 3):
        build_model(noise_seed=seed).save(str(root / f"ckpt{seed}"))
    return root


def _state(folder: Path, file: str = "model.safetensors") -> dict[str, torch.Tensor]:
    return load_file(str(folder / file))


@pytest.mark.parametrize(
    "method",
    [SLERP(t=0.3), SLERP(space="weights"), MultiSLERP(), MultiSLERP(weights=[1, 2, 3], space="weights")],
    ids=repr,
)
def test_streamed_merge_equals_the_loop_reference(folders, tmp_path, monkeypatch, method):
    # A tiny slice budget: every tensor is streamed in several row slices, its Gram matrix accumulated over them.
    monkeypatch.setattr(streaming_merge, "SLICE_BUDGET_BYTES", 4096)
    k = 2 if isinstance(method, SLERP) else 3
    checkpoints = [folders / f"ckpt{seed}" for seed in (1, 2, 3)][:k]
    out = method.merge_to_folder(checkpoints, tmp_path / "m", base_model=folders / "base", show_progress_bar=False)
    for file in ("model.safetensors", "2_Dense/model.safetensors"):
        merged, base = _state(out, file), _state(folders / "base", file)
        states = [_state(c, file) for c in checkpoints]
        assert merged.keys() == base.keys()
        for name in base:
            inputs = [s[name] for s in states]
            # every tensor: the whole-tensor math; small ones (biases, LayerNorms, Dense) also the loop reference
            whole = method.merge_tensors(inputs, base[name])
            torch.testing.assert_close(merged[name], whole, atol=2e-6, rtol=1e-5, msg=name)
            if base[name].numel() > 512:
                continue
            if isinstance(method, SLERP):
                expected = reference_slerp(inputs, base[name], method.t, method.space)
            else:
                expected = reference_karcher(inputs, base[name], method.weights or [1.0] * k, method.space)
            torch.testing.assert_close(merged[name], expected.float(), atol=2e-6, rtol=1e-5, msg=name)
    config = json.loads((out / "merge_config.json").read_text())
    assert config["method"] == type(method).__name__ and config["parameters"] == method.get_config_dict()
    from sentence_transformers import SentenceTransformer

    embeddings = SentenceTransformer(str(out), device="cpu").encode(["a man is playing a guitar"])
    assert embeddings.shape == (1, 16)


def test_streamed_slerp_of_three_checkpoints_writes_nothing(folders, tmp_path):
    checkpoints = [folders / f"ckpt{seed}" for seed in (1, 2, 3)]
    with pytest.raises(ValueError, match="exactly 2"):
        SLERP().merge_to_folder(checkpoints, tmp_path / "m", base_model=folders / "base", show_progress_bar=False)
    assert list(tmp_path.iterdir()) == []


def test_cli_exposes_the_spherical_merges(folders, tmp_path):
    assert {"slerp", "multi_slerp"} <= set(MERGE_METHODS)
    checkpoints = [str(folders / f"ckpt{seed}") for seed in (1, 2, 3)]
    common = ["--base-model", str(folders / "base"), "--no-progress"]
    cases = [
        (checkpoints[:2], ["--method", "slerp", "--t", "0.3"], SLERP(t=0.3)),
        (
            checkpoints,
            ["--method", "multi_slerp", "--weights", "1", "2", "3", "--space", "weights"],
            MultiSLERP(weights=[1, 2, 3], space="weights"),
        ),
    ]
    for index, (inputs, extra, method) in enumerate(cases):
        assert main(["merge", *inputs, *common, *extra, "--output", str(tmp_path / f"cli{index}")]) == 0
        api = method.merge_to_folder(
            inputs, tmp_path / f"api{index}", base_model=folders / "base", show_progress_bar=False
        )
        cli, expected = _state(tmp_path / f"cli{index}"), _state(api)
        assert cli.keys() == expected.keys() and all(torch.equal(cli[n], expected[n]) for n in cli)
        config = json.loads((tmp_path / f"cli{index}" / "merge_config.json").read_text())
        assert config["parameters"] == method.get_config_dict()
