"""ModelStock, TIES, DeltaSoup's variants and GreedySoup: the per-tensor math against loop references written here,
the exact streaming top-k threshold, row slices against whole tensors, and model folders."""

from __future__ import annotations

import itertools
import json
import math

import pytest
import torch
from test_merging_folders import build_model, reference_merge, tensors

from codiemb_st.merging import TIES, DeltaSoup, GreedySoup, ModelSoup, ModelStock, streaming_merge
from codiemb_st.merging.ties import topk_threshold_accumulate, topk_threshold_finish

SHAPES = [(), (5,), (6, 5), (4, 3, 2)]


def _case(k: int = 3, shape: tuple[int, ...] = (6, 5), seed: int = 0, dtype=torch.float32, shared: float = 0.0):
    """A base and K checkpoints; ``shared`` adds a common delta direction (so the deltas correlate)."""
    generator = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=generator, dtype=torch.float64)
    common = torch.randn(shape, generator=generator, dtype=torch.float64)
    checkpoints = []
    for _ in range(k):
        delta = 0.05 * (shared * common + torch.randn(shape, generator=generator, dtype=torch.float64))
        delta[torch.rand(shape, generator=generator) < 0.2] = 0.0
        checkpoints.append((base + delta).to(dtype))
    return checkpoints, base.to(dtype)


# ---------------------------------------------------------------------------------------------------------------------
# Loop references (float64, explicit loops)


def _reference_model_stock(tensors_, base):
    deltas = [t.double().flatten() - base.double().flatten() for t in tensors_]
    k = len(deltas)
    cosines = []
    for i, j in itertools.combinations(range(k), 2):
        ni, nj = math.sqrt(float(deltas[i] @ deltas[i])), math.sqrt(float(deltas[j] @ deltas[j]))
        cosines.append(float(deltas[i] @ deltas[j]) / (ni * nj) if ni > 0 and nj > 0 else 0.0)
    cos = min(1.0, max(0.0, sum(cosines) / len(cosines)))
    t = k * cos / (1 + (k - 1) * cos)
    mean = sum(x.double() for x in tensors_) / k
    return t * mean + (1 - t) * base.double()


def _reference_ties(tensors_, base, density, scale):
    deltas = [t.double().flatten() - base.double().flatten() for t in tensors_]
    n = deltas[0].numel()
    keep = max(1, math.ceil(density * n))
    trimmed = []
    for delta in deltas:
        threshold = sorted(delta.abs().tolist(), reverse=True)[keep - 1]
        trimmed.append(torch.tensor([v if abs(v) >= threshold else 0.0 for v in delta.tolist()], dtype=torch.float64))
    merged = torch.zeros(n, dtype=torch.float64)
    for e in range(n):
        total = sum(float(d[e]) for d in trimmed)
        sign = (total > 0) - (total < 0)
        agreeing = [
            float(d[e]) for d in trimmed if float(d[e]) != 0 and ((float(d[e]) > 0) - (float(d[e]) < 0)) == sign
        ]
        merged[e] = sum(agreeing) / len(agreeing) if agreeing else 0.0
    return (base.double().flatten() + scale * merged).reshape(base.shape)


def _reference_consensus_soup(tensors_, base):
    """DeltaSoup(sign_consensus=True), element-wise p = 1, by loops over elements."""
    deltas = [t.double().flatten() - base.double().flatten() for t in tensors_]
    out = base.double().flatten().clone()
    for e in range(out.numel()):
        values = [float(d[e]) for d in deltas]
        total = sum(values)
        sign = (total > 0) - (total < 0)
        kept = [v if ((v > 0) - (v < 0)) == sign else 0.0 for v in values]
        weight_total = sum(abs(v) for v in kept)
        out[e] += sum(abs(v) * v for v in kept) / weight_total if weight_total > 0 else 0.0
    return out.reshape(base.shape)


def _sliced(method, stacked, base, bounds):
    """The streaming loop on row slices: statistics passes over every slice, then merge slice by slice."""
    statistics = method.collect_statistics(lambda: [(stacked[:, a:b], base[a:b]) for a, b in bounds])
    return torch.cat([method.merge_rows(stacked[:, a:b].clone(), base[a:b], statistics) for a, b in bounds])


# ---------------------------------------------------------------------------------------------------------------------
# ModelStock


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("shared", [0.0, 1.0, 3.0])
@pytest.mark.parametrize("k", [2, 3, 5])
def test_model_stock_matches_loop_reference(shape, shared, k):
    checkpoints, base = _case(k=k, shape=shape, seed=k, shared=shared)
    merged = ModelStock().merge_tensors(checkpoints, base)
    torch.testing.assert_close(merged.double(), _reference_model_stock(checkpoints, base), atol=1e-6, rtol=1e-5)


def test_model_stock_hand_computed():
    base = torch.zeros(2)
    a, b = torch.tensor([1.0, 0.0]), torch.tensor([1.0, 1.0])
    cos = 1 / math.sqrt(2)
    t = 2 * cos / (1 + cos)
    torch.testing.assert_close(ModelStock().merge_tensors([a, b], base), t * (a + b) / 2)
    assert ModelStock().interpolation_ratio(torch.tensor([[1.0, 1.0], [1.0, 2.0]], dtype=torch.float64)) == (
        pytest.approx(t)
    )
    # parallel deltas: t = 1, the plain average
    torch.testing.assert_close(ModelStock().merge_tensors([a, 2 * a], base), 1.5 * a)


def test_model_stock_non_positive_cosine_stays_at_the_base():
    base = torch.randn(4, 3)
    delta = torch.randn(4, 3)
    assert torch.equal(ModelStock().merge_tensors([base + delta, base - delta], base), base)  # cos = -1
    orthogonal = [base + torch.tensor([1.0, 0, 0]), base + torch.tensor([0, 1.0, 0])]
    assert torch.equal(ModelStock().merge_tensors(orthogonal, base), base)  # cos = 0
    # a checkpoint that did not move counts as cos 0 with the others
    moved = base + 0.1
    torch.testing.assert_close(ModelStock().merge_tensors([moved, base], base), base)
    assert torch.equal(ModelStock().merge_tensors([base, base], base), base)


def test_model_stock_needs_two_checkpoints_and_a_base():
    checkpoints, base = _case(k=2)
    with pytest.raises(ValueError, match="at least 2 checkpoints"):
        ModelStock().merge_tensors(checkpoints[:1], base)
    with pytest.raises(ValueError, match="needs base"):
        ModelStock().merge_tensors(checkpoints)


# ---------------------------------------------------------------------------------------------------------------------
# TIES and the exact streaming top-k threshold


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("density", [0.01, 0.2, 0.5, 0.999, 1.0])
def test_radix_select_threshold_is_the_exact_kth_largest(dtype, density):
    generator = torch.Generator().manual_seed(3)
    values = (
        torch.randn(4, 257, 3, generator=generator, dtype=dtype) * torch.logspace(-30, 3, 257, dtype=dtype)[:, None]
    )
    values[1, :100] = 0.0  # many zeros
    values[2] = values[2].round()  # many ties
    values[3, :5] = torch.finfo(dtype).tiny / 4  # subnormals
    base = torch.zeros(257, 3, dtype=dtype)
    state, again, passes = None, True, 0
    while again:
        for start in range(0, 257, 50):  # several slices per pass
            state = topk_threshold_accumulate(state, values[:, start : start + 50], base[start : start + 50], density)
        state, again = topk_threshold_finish(state)
        passes += 1
    assert passes == (4 if dtype == torch.float64 else 2)
    keep = max(1, math.ceil(density * 257 * 3))
    expected = values.abs().flatten(start_dim=1).sort(dim=1, descending=True).values[:, keep - 1]
    assert state.thresholds.dtype == dtype
    assert torch.equal(state.thresholds, expected)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("density", [0.1, 0.2, 0.5, 1.0])
@pytest.mark.parametrize("scale", [1.0, 0.7])
def test_ties_matches_loop_reference(shape, density, scale):
    checkpoints, base = _case(k=3, shape=shape, seed=11, shared=0.5)
    merged = TIES(density=density, scale=scale).merge_tensors(checkpoints, base)
    torch.testing.assert_close(
        merged.double(), _reference_ties(checkpoints, base, density, scale), atol=1e-6, rtol=1e-5
    )


def test_ties_keeps_ties_at_the_threshold_and_hand_example():
    base = torch.zeros(5)
    a = torch.tensor([3.0, -2.0, 2.0, 0.5, 0.0])
    b = torch.tensor([1.0, 1.0, -4.0, 0.0, 0.0])
    # density 0.4 -> k = 2: a keeps 3 and both |2| (tie at the threshold), b keeps 1, 1 (tied) and -4
    merged = TIES(density=0.4).merge_tensors([a, b], base)
    # elected signs: +, -, -, 0, 0; disjoint means: (3+1)/2, -2, -4, 0, 0
    torch.testing.assert_close(merged, torch.tensor([2.0, -2.0, -4.0, 0.0, 0.0]))
    # identical checkpoints are trimmed, not returned
    trimmed = TIES(density=0.2).merge_tensors([a, a], base)
    torch.testing.assert_close(trimmed, torch.tensor([3.0, 0.0, 0.0, 0.0, 0.0]))


def test_ties_rejects_bad_options():
    for density in (0, -0.1, 1.5, math.nan):
        with pytest.raises(ValueError, match="density"):
            TIES(density=density)
    for density in (True, "0.2"):
        with pytest.raises(TypeError, match="density"):
            TIES(density=density)
    with pytest.raises(ValueError, match="scale"):
        TIES(scale=math.inf)
    checkpoints, _ = _case()
    with pytest.raises(ValueError, match="needs base"):
        TIES().merge_tensors(checkpoints)


# ---------------------------------------------------------------------------------------------------------------------
# DeltaSoup variants


@pytest.mark.parametrize("shape", SHAPES)
def test_sign_consensus_matches_loop_reference(shape):
    checkpoints, base = _case(k=4, shape=shape, seed=5, shared=0.3)
    merged = DeltaSoup(sign_consensus=True).merge_tensors(checkpoints, base)
    torch.testing.assert_close(merged.double(), _reference_consensus_soup(checkpoints, base), atol=1e-6, rtol=1e-5)
    # identical checkpoints agree with themselves: returned unchanged
    assert torch.equal(DeltaSoup(sign_consensus=True).merge_tensors([checkpoints[0]] * 3, base), checkpoints[0])


@pytest.mark.parametrize("granularity", ["element", "row", "tensor"])
@pytest.mark.parametrize("shape", [(5,), (6, 5), (4, 3, 2)])
def test_rescale_restores_the_mean_delta_norm(granularity, shape):
    checkpoints, base = _case(k=3, shape=shape, seed=2)
    plain = DeltaSoup(granularity=granularity).merge_tensors(checkpoints, base).double() - base.double()
    rescaled = DeltaSoup(granularity=granularity, rescale=True).merge_tensors(checkpoints, base).double()
    mean_norm = sum((t.double() - base.double()).norm() for t in checkpoints) / 3
    expected = base.double() + plain * (mean_norm / plain.norm())
    torch.testing.assert_close(rescaled, expected, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close((rescaled - base.double()).norm(), mean_norm, atol=1e-5, rtol=1e-5)
    assert torch.equal(DeltaSoup(rescale=True).merge_tensors([base, base], base), base)  # nothing moved


def test_variant_options_are_validated_and_recorded():
    for name in ("sign_consensus", "rescale"):
        for value in ("yes", 1, None):
            with pytest.raises(TypeError, match=name):
                DeltaSoup(**{name: value})
    assert DeltaSoup().get_config_dict() == {"power": 1.0, "granularity": "element", "temperature": None}
    method = DeltaSoup(sign_consensus=True, rescale=True)
    assert method.get_config_dict()["sign_consensus"] is True and method.get_config_dict()["rescale"] is True
    assert not method.keeps_agreement and DeltaSoup(sign_consensus=True).keeps_agreement


# ---------------------------------------------------------------------------------------------------------------------
# All new methods: slices, dtypes, inputs untouched

NEW_METHODS = [
    ModelStock(),
    TIES(),
    TIES(density=0.5, scale=0.8),
    DeltaSoup(sign_consensus=True),
    DeltaSoup(rescale=True),
    DeltaSoup(granularity="tensor", rescale=True, sign_consensus=True),
    DeltaSoup(granularity="row", power=2.0, rescale=True),
]


@pytest.mark.parametrize("method", NEW_METHODS, ids=repr)
def test_row_slices_give_the_whole_tensor_result(method):
    checkpoints, base = _case(k=3, shape=(11, 4, 3), seed=6, shared=1.0)
    stacked = torch.stack(checkpoints)
    sliced = _sliced(method, stacked, base, [(0, 4), (4, 5), (5, 11)])
    torch.testing.assert_close(sliced, method.merge_tensors(checkpoints, base), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("method", NEW_METHODS, ids=repr)
def test_dtypes_are_kept_and_inputs_untouched(method):
    checkpoints, base = _case(k=3, seed=8, shared=1.0)
    copies = [t.clone() for t in checkpoints]
    method.merge_tensors(checkpoints, base)
    assert all(torch.equal(a, b) for a, b in zip(checkpoints, copies))
    for dtype in (torch.float16, torch.bfloat16, torch.float64):
        low = [t.to(dtype) for t in checkpoints]
        merged = method.merge_tensors(low, base.to(dtype))
        assert merged.dtype == dtype
        if dtype != torch.float64:  # computed in float32 and cast back
            expected = method.merge_tensors([t.float() for t in low], base.to(dtype).float()).to(dtype)
            assert torch.equal(merged, expected)


# ---------------------------------------------------------------------------------------------------------------------
# Model folders


@pytest.fixture(scope="module")
def fusion_folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("fusion")
    build_model().save(str(root / "base"))
    for seed in (1, 2, 3):
        build_model(noise_seed=seed).save(str(root / f"ckpt{seed}"))
    return root


def _checkpoints(root):
    return [root / f"ckpt{seed}" for seed in (1, 2, 3)]


@pytest.mark.parametrize("method", NEW_METHODS[:5], ids=repr)
def test_folder_merge_streams_and_matches_the_math(fusion_folders, tmp_path, monkeypatch, method):
    monkeypatch.setattr(streaming_merge, "SLICE_BUDGET_BYTES", 4096)  # several slices (and passes) per tensor
    checkpoints = _checkpoints(fusion_folders)
    out = method.merge_to_folder(
        checkpoints, tmp_path / "m", base_model=fusion_folders / "base", show_progress_bar=False
    )
    for file in ("model.safetensors", "2_Dense/model.safetensors"):
        merged = tensors(out, file)
        expected = reference_merge(method, checkpoints, fusion_folders / "base", file)
        assert merged.keys() == expected.keys()
        for name, value in expected.items():
            assert merged[name].dtype == value.dtype
            torch.testing.assert_close(merged[name], value, atol=1e-6, rtol=1e-6, msg=name)
    assert (out / "2_Dense" / "config.json").is_file() and (out / "3_Normalize").is_dir()
    assert json.loads((out / "merge_config.json").read_text())["method"] == type(method).__name__


def test_model_stock_folder_merge_needs_two_checkpoints(fusion_folders, tmp_path):
    with pytest.raises(ValueError, match="at least 2"):
        ModelStock().merge_to_folder([fusion_folders / "ckpt1"], tmp_path / "m", base_model=fusion_folders / "base")
    assert not (tmp_path / "m").exists()


def _distance_evaluator(target: dict[str, torch.Tensor]):
    """Score = minus the distance of a model's transformer weights to ``target`` (higher is better)."""
    calls = []

    def evaluate(model):
        state = model[0].auto_model.state_dict()
        distance = sum(float((state[name].double() - value.double()).norm() ** 2) for name, value in target.items())
        calls.append(distance)
        return {"closeness": -distance}

    evaluate.primary_metric = "closeness"
    evaluate.calls = calls
    return evaluate


def test_greedy_soup_keeps_only_ingredients_that_help(fusion_folders, tmp_path):
    checkpoints = _checkpoints(fusion_folders)
    # The target is checkpoint 2 itself: it ranks first, and every soup with another checkpoint is farther away.
    evaluator = _distance_evaluator({k.removeprefix("auto_model."): v for k, v in tensors(checkpoints[1]).items()})
    result = GreedySoup(evaluator).merge_to_folder(checkpoints, tmp_path / "greedy", show_progress_bar=False)
    assert result.chosen == [checkpoints[1]] and result.path == tmp_path / "greedy"
    assert [s.index for s in result.steps] == [1, 0, 2] or [s.index for s in result.steps] == [1, 2, 0]
    assert [s.accepted for s in result.steps] == [True, False, False]
    assert result.score == 0.0 and len(result.ingredient_scores) == 3
    for name, value in tensors(checkpoints[1]).items():
        assert torch.equal(tensors(result.path)[name], value)  # the one-checkpoint soup is the checkpoint
    record = json.loads((result.path / "greedy_soup.json").read_text())
    assert record["chosen"] == [str(checkpoints[1])]
    assert not [p for p in tmp_path.iterdir() if p.name != "greedy"]  # no trial folders left


def test_greedy_soup_adds_ingredients_while_the_score_rises(fusion_folders, tmp_path):
    checkpoints = _checkpoints(fusion_folders)
    states = [tensors(c) for c in checkpoints]
    mean = {k: sum(s[k] for s in states) / 3 for k in states[0]}
    evaluator = _distance_evaluator(mean)
    # Precomputed ingredient scores skip the three single evaluations; ModelStock needs >= 2 and still works.
    for method in (ModelSoup(), ModelStock()):
        evaluator.calls.clear()
        result = GreedySoup(evaluator, method=method).merge(
            checkpoints, base_model=fusion_folders / "base", ingredient_scores=[-1e3, -3e3, -2e3]
        )
        assert [s.index for s in result.steps] == [0, 2, 1] and len(evaluator.calls) == 2
        assert result.path is None and result.model is not None
        if isinstance(method, ModelSoup):  # the uniform soup of all three is the target itself
            assert result.chosen == [checkpoints[0], checkpoints[2], checkpoints[1]]
            assert result.score == pytest.approx(0.0, abs=1e-8)


def test_greedy_soup_rejects_bad_arguments(fusion_folders, tmp_path):
    with pytest.raises(TypeError, match="evaluator"):
        GreedySoup("dev")
    with pytest.raises(TypeError, match="MergeMethod"):
        GreedySoup(lambda m: 1.0, method="model_soup")
    with pytest.raises(ValueError, match="ingredient_scores"):
        GreedySoup(lambda m: 1.0).merge_to_folder(_checkpoints(fusion_folders), tmp_path / "g", ingredient_scores=[1])
    with pytest.raises(ValueError, match="no 'missing'"):
        GreedySoup(lambda m: {"a": 1.0}, primary_metric="missing").merge_to_folder(
            _checkpoints(fusion_folders)[:2], tmp_path / "g"
        )
    with pytest.raises(ValueError, match="finite score"):
        GreedySoup(lambda m: math.nan).merge_to_folder(_checkpoints(fusion_folders)[:2], tmp_path / "g")
    assert not (tmp_path / "g").exists()
