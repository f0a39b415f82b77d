"""The per-tensor merge math (pure functions on random tensors), against hand computations and loop references."""

from __future__ import annotations

import math

import pytest
import torch

from codiemb_st.merging import DeltaSoup, ModelSoup, TaskArithmetic

GRANULARITIES = ["element", "row", "tensor"]


def _random_case(k: int = 3, shape: tuple[int, ...] = (6, 5), seed: int = 0, dtype=torch.float32):
    """A base and K checkpoints fine-tuned from it; some entries untouched by some or all checkpoints."""
    generator = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=generator, dtype=torch.float64)
    checkpoints = []
    for _ in range(k):
        delta = 0.05 * torch.randn(shape, generator=generator, dtype=torch.float64)
        delta[torch.rand(shape, generator=generator) < 0.2] = 0.0  # sparse moves
        if len(shape) >= 1:
            delta[0] = 0.0  # the first row never moves
        checkpoints.append((base + delta).to(dtype))
    return checkpoints, base.to(dtype)


def _reference_delta_soup(tensors, base, power, granularity, temperature=None):
    """Independent float64 reference with explicit loops over checkpoints, rows and the whole tensor."""
    deltas = torch.stack([t.double() for t in tensors]) - base.double()
    k = deltas.shape[0]

    def score(x):
        return torch.ones_like(x) if power == 0 else x.abs() ** power

    scores = torch.empty_like(deltas)
    for c in range(k):
        if granularity == "tensor":
            scores[c] = score(deltas[c]).sum()
        elif granularity == "row" and deltas.dim() > 2:
            for r in range(deltas.shape[1]):
                scores[c, r] = score(deltas[c, r]).sum()
        else:  # element-wise (also rows of 0-d / 1-d tensors)
            scores[c] = score(deltas[c])
    total = scores.sum(0, keepdim=True)
    weights = torch.where(total > 0, scores / torch.where(total > 0, total, 1.0), torch.full_like(total, 1 / k))
    if temperature is not None:
        weights = torch.softmax(weights / temperature, dim=0)
    return base.double() + (weights * deltas).sum(0)


@pytest.mark.parametrize("granularity", GRANULARITIES)
@pytest.mark.parametrize("power", [0.0, 0.5, 1.0, 2.0, 8.0])
@pytest.mark.parametrize("temperature", [None, 0.1, 10.0])
def test_weights_are_non_negative_and_sum_to_one(granularity, power, temperature):
    checkpoints, base = _random_case(k=4, shape=(7, 3, 2))
    deltas = torch.stack(checkpoints) - base
    deltas[:, 1] = 0.0  # a whole row where nothing moved: uniform weights there
    weights = DeltaSoup(power, granularity, temperature).merging_weights(deltas)
    expected_shape = {"element": (4, 7, 3, 2), "row": (4, 7, 1, 1), "tensor": (4, 1, 1, 1)}[granularity]
    if power == 0:
        assert weights.shape == (4, 1, 1, 1)
    else:
        assert weights.shape == expected_shape
    assert (weights >= 0).all()
    torch.testing.assert_close(weights.sum(0), torch.ones_like(weights.sum(0)))
    if granularity != "tensor" and power != 0 and temperature is None:
        torch.testing.assert_close(weights[:, 1], torch.full_like(weights[:, 1], 0.25))


def test_hand_computed_three_element_example():
    # base = [1, 2, 3]; δ1 = [0.5, 0, -1], δ2 = [1, 0, 0]
    base = torch.tensor([1.0, 2.0, 3.0])
    theta1 = torch.tensor([1.5, 2.0, 2.0])
    theta2 = torch.tensor([2.0, 2.0, 3.0])
    merge = lambda method: method.merge_tensors([theta1, theta2], base)  # noqa: E731

    # p = 1: element 0 weights (1/3, 2/3) -> 1 + 0.5/3 + 2/3; element 1: no move -> 2; element 2: only θ1 moved -> 2
    torch.testing.assert_close(merge(DeltaSoup()), torch.tensor([11 / 6, 2.0, 2.0]))
    # p = 2: element 0 weights (0.25, 1) / 1.25 = (0.2, 0.8) -> 1 + 0.1 + 0.8
    torch.testing.assert_close(merge(DeltaSoup(power=2)), torch.tensor([1.9, 2.0, 2.0]))
    # tensor-wise p = 1: Σ|δ1| = 1.5, Σ|δ2| = 1 -> weights (0.6, 0.4) -> base + 0.6 δ1 + 0.4 δ2
    torch.testing.assert_close(merge(DeltaSoup(granularity="tensor")), torch.tensor([1.7, 2.0, 2.4]))
    # row-wise on a 1-d tensor is element-wise
    torch.testing.assert_close(merge(DeltaSoup(granularity="row")), torch.tensor([11 / 6, 2.0, 2.0]))
    # temperature 0.5 on the p = 1 scores: element 0 weights softmax((1/3, 2/3) / 0.5); element 2 softmax((1, 0) / 0.5)
    w0 = 1 / (1 + math.exp(2 / 3))
    w2 = math.exp(2) / (1 + math.exp(2))
    expected = torch.tensor([1 + 0.5 * w0 + 1.0 * (1 - w0), 2.0, 3 - w2])
    torch.testing.assert_close(merge(DeltaSoup(temperature=0.5)), expected)
    # baselines
    torch.testing.assert_close(merge(ModelSoup()), torch.tensor([1.75, 2.0, 2.5]))
    torch.testing.assert_close(merge(TaskArithmetic(scale=1.0)), torch.tensor([2.5, 2.0, 2.0]))
    torch.testing.assert_close(merge(TaskArithmetic(scale=0.5)), torch.tensor([1.75, 2.0, 2.5]))


def test_hand_computed_row_example():
    base = torch.tensor([[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]])
    theta1 = torch.tensor([[1.5, 2.0, 2.0], [1.0, 1.0, 0.0]])
    theta2 = torch.tensor([[2.0, 2.0, 3.0], [0.0, 0.0, -4.0]])
    # row 0: Σ|δ| = (1.5, 1) -> (0.6, 0.4); row 1: (2, 4) -> (1/3, 2/3)
    expected = torch.tensor([[1.7, 2.0, 2.4], [1 / 3, 1 / 3, -8 / 3]])
    torch.testing.assert_close(DeltaSoup(granularity="row").merge_tensors([theta1, theta2], base), expected)


@pytest.mark.parametrize("granularity", GRANULARITIES)
@pytest.mark.parametrize("power", [0.0, 0.5, 1.0, 3.0])
@pytest.mark.parametrize("temperature", [None, 0.2])
@pytest.mark.parametrize("shape", [(5, 4, 3), (6, 4), (9,), ()])
def test_delta_soup_matches_loop_reference(granularity, power, temperature, shape):
    checkpoints, base = _random_case(k=3, shape=shape, seed=1)
    merged = DeltaSoup(power, granularity, temperature).merge_tensors(checkpoints, base)
    expected = _reference_delta_soup(checkpoints, base, power, granularity, temperature)
    assert merged.dtype == torch.float32 and merged.shape == base.shape
    torch.testing.assert_close(merged.double(), expected, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("granularity", GRANULARITIES)
@pytest.mark.parametrize("method_kwargs", [{}, {"power": 2.0}, {"temperature": 0.3}])
def test_single_and_identical_checkpoints_are_returned_bit_for_bit(granularity, method_kwargs):
    checkpoints, base = _random_case(k=1, dtype=torch.bfloat16)
    method = DeltaSoup(granularity=granularity, **method_kwargs)
    for tensors in (checkpoints, checkpoints * 3):
        merged = method.merge_tensors(tensors, base)
        assert merged.dtype == torch.bfloat16
        assert torch.equal(merged, checkpoints[0])
    assert torch.equal(ModelSoup().merge_tensors(checkpoints * 3), checkpoints[0])


@pytest.mark.parametrize("granularity", GRANULARITIES)
@pytest.mark.parametrize("power", [0.0, 1.0, 2.0])
def test_all_zero_deltas_return_the_base(granularity, power):
    _, base = _random_case()
    for method in (DeltaSoup(power, granularity), DeltaSoup(power, granularity, temperature=0.5), TaskArithmetic(0.7)):
        assert torch.equal(method.merge_tensors([base.clone(), base.clone()], base), base)


def test_power_zero_is_the_uniform_soup():
    checkpoints, base = _random_case(k=4, seed=3)
    for granularity in GRANULARITIES:
        torch.testing.assert_close(
            DeltaSoup(power=0, granularity=granularity).merge_tensors(checkpoints, base),
            ModelSoup().merge_tensors(checkpoints),
        )


def test_large_power_selects_the_largest_delta_without_underflow():
    # |δ| ~ 1e-3: |δ|^64 ~ 1e-192 underflows even in float64, a naive |δ|^p / Σ|δ|^p would give 0/0.
    generator = torch.Generator().manual_seed(4)
    base = torch.randn(50, 8, generator=generator)
    deltas = 1e-3 * torch.randn(3, 50, 8, generator=generator)
    checkpoints = list(base + deltas)
    merged = DeltaSoup(power=64).merge_tensors(checkpoints, base)
    exact_deltas = (torch.stack(checkpoints) - base).double()
    weights = torch.softmax(64 * exact_deltas.abs().log(), dim=0)  # |δ|^p / Σ|δ|^p computed in log space
    torch.testing.assert_close(merged.double(), base.double() + (weights * exact_deltas).sum(0), atol=1e-6, rtol=0)
    assert (weights.amax(0) > 0.9).float().mean() > 0.8  # mostly a clear pick, far from uniform
    # tensor-wise, Σ|δ|^64 is dominated by the largest entry: checkpoint 1 (twice the spread) is picked
    deltas[1] *= 2
    tensor_wise = DeltaSoup(power=64, granularity="tensor").merge_tensors(list(base + deltas), base)
    assert deltas.abs().flatten(1).amax(1).argmax() == 1
    torch.testing.assert_close(tensor_wise, base + deltas[1], atol=1e-6, rtol=0)


def test_temperature_limits():
    checkpoints, base = _random_case(k=3, seed=5)
    hot = DeltaSoup(temperature=1e6).merge_tensors(checkpoints, base)
    torch.testing.assert_close(hot, ModelSoup().merge_tensors(checkpoints), atol=1e-5, rtol=0)
    deltas = torch.stack(checkpoints) - base
    weights = DeltaSoup(temperature=1e-4).merging_weights(deltas)
    largest = deltas.abs().argmax(0)
    moved = deltas.abs().amax(0) > 0
    torch.testing.assert_close(weights.argmax(0)[moved], largest[moved])
    assert (weights.amax(0)[moved] > 0.999).all()


@pytest.mark.parametrize("granularity", GRANULARITIES)
@pytest.mark.parametrize("power", [1.0, 2.5])
def test_row_slices_give_the_whole_tensor_result(granularity, power):
    # The streaming path merges row slices; tensor granularity first folds statistics over all slices.
    checkpoints, base = _random_case(k=3, shape=(11, 4, 3), seed=6)
    method = DeltaSoup(power, granularity, temperature=None)
    stacked = torch.stack(checkpoints)
    bounds = [(0, 4), (4, 5), (5, 11)]
    statistics = None
    if method.needs_tensor_statistics:
        for start, stop in bounds:
            statistics = method.accumulate_statistics(statistics, stacked[:, start:stop], base[start:stop])
    pieces = [
        method.merge_rows(stacked[:, start:stop].clone(), base[start:stop], statistics) for start, stop in bounds
    ]
    torch.testing.assert_close(torch.cat(pieces), method.merge_tensors(checkpoints, base), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("method", [DeltaSoup(), DeltaSoup(granularity="tensor"), ModelSoup(), TaskArithmetic(0.5)])
def test_merge_tensors_leaves_its_inputs_unchanged(method):
    checkpoints, base = _random_case(k=3, seed=9)
    copies, base_copy = [t.clone() for t in checkpoints], base.clone()
    method.merge_tensors(checkpoints, base)
    assert all(torch.equal(a, b) for a, b in zip(checkpoints, copies)) and torch.equal(base, base_copy)
    # float32 input of shape (1, ...) must not be stacked as a view of the caller's tensor either
    one = [t[:1] for t in checkpoints]
    method.merge_tensors(one, base[:1])
    assert all(torch.equal(a, b) for a, b in zip(checkpoints, copies))


def test_baselines_on_random_tensors():
    checkpoints, base = _random_case(k=5, shape=(4, 7), seed=7)
    stacked = torch.stack(checkpoints)
    torch.testing.assert_close(ModelSoup().merge_tensors(checkpoints), stacked.mean(0))
    torch.testing.assert_close(ModelSoup().merge_tensors(checkpoints, base), stacked.mean(0))  # base unused
    for scale in (1.0, 0.3, -0.5):
        expected = base + scale * sum(t - base for t in checkpoints)
        torch.testing.assert_close(TaskArithmetic(scale).merge_tensors(checkpoints, base), expected)
    # task arithmetic with λ = 1/K is the uniform soup
    torch.testing.assert_close(TaskArithmetic(1 / 5).merge_tensors(checkpoints, base), stacked.mean(0))


def test_half_precision_is_computed_in_float32_and_cast_back():
    checkpoints, base = _random_case(k=3, seed=8)
    for dtype in (torch.float16, torch.bfloat16):
        low = [t.to(dtype) for t in checkpoints]
        merged = DeltaSoup().merge_tensors(low, base.to(dtype))
        assert merged.dtype == dtype
        expected = DeltaSoup().merge_tensors([t.float() for t in low], base.to(dtype).float()).to(dtype)
        assert torch.equal(merged, expected)
    double = DeltaSoup().merge_tensors([t.double() for t in checkpoints], base.double())
    assert double.dtype == torch.float64


def test_invalid_arguments_are_refused():
    for power in (-1, math.nan, math.inf):
        with pytest.raises(ValueError, match="power"):
            DeltaSoup(power=power)
    for power in (True, "1"):  # wrong type: TypeError (codiemb_st.validation's rule)
        with pytest.raises(TypeError, match="power"):
            DeltaSoup(power=power)
    with pytest.raises(ValueError, match="granularity"):
        DeltaSoup(granularity="column")
    for temperature in (0, -1.0, math.inf):
        with pytest.raises(ValueError, match="temperature"):
            DeltaSoup(temperature=temperature)
    with pytest.raises(ValueError, match="scale"):
        TaskArithmetic(scale=math.nan)

    checkpoints, base = _random_case()
    with pytest.raises(ValueError, match="at least one"):
        DeltaSoup().merge_tensors([], base)
    with pytest.raises(ValueError, match="needs base"):
        DeltaSoup().merge_tensors(checkpoints)
    with pytest.raises(ValueError, match="needs base"):
        TaskArithmetic().merge_tensors(checkpoints)
    with pytest.raises(ValueError, match="shape"):
        DeltaSoup().merge_tensors([checkpoints[0], checkpoints[1][:3]], base)
    with pytest.raises(ValueError, match="base has shape"):
        DeltaSoup().merge_tensors(checkpoints, base[:2])
    poisoned = checkpoints[1].clone()
    poisoned.view(-1)[0] = math.nan
    for method in (DeltaSoup(), ModelSoup(), TaskArithmetic()):
        with pytest.raises(ValueError, match=r"tensors\[1\] holds NaN"):
            method.merge_tensors([checkpoints[0], poisoned], base)
    with pytest.raises(ValueError, match="base holds NaN"):
        DeltaSoup().merge_tensors(checkpoints, torch.full_like(base, math.inf))
    with pytest.raises(TypeError, match="floating-point"):
        ModelSoup().merge_tensors([torch.arange(3), torch.arange(3)])


def test_config_and_repr():
    method = DeltaSoup(power=2, granularity="row", temperature=0.5)
    assert method.get_config_dict() == {"power": 2.0, "granularity": "row", "temperature": 0.5}
    assert repr(method) == "DeltaSoup(power=2.0, granularity='row', temperature=0.5)"
    assert repr(TaskArithmetic(0.5)) == "TaskArithmetic(scale=0.5)"
    assert repr(ModelSoup()) == "ModelSoup()"
