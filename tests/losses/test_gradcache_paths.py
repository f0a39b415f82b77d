"""MultiPositiveCachedInfoNCELoss's adaptive GradCache: the single pass and kept graphs are exact.

Reference points: ``keep_graphs=0`` (sentence-transformers' plain two passes, tested against the uncached loss in
test_multi_positive_infonce.py) and the uncached loss itself (one forward per column with its graph).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from dist_jobs import gradcache_batches, job_output
from loss_testing import (
    assert_grads_close,
    embed_columns,
    make_ir_columns,
    parameter_grads,
    tokenize_columns,
)
from sentence_transformers.sentence_transformer.losses import MatryoshkaLoss
from tiny_model import build_tiny_model

from codiemb_st import MultiPositiveCachedInfoNCELoss
from codiemb_st.losses.text_identity import hash_texts

WORKER = Path(__file__).parents[1] / "dist_gradcache_paths_worker.py"


def record_embeddings(loss_fn: MultiPositiveCachedInfoNCELoss) -> dict[bool, list[torch.Tensor]]:
    """Record every embedded mini-batch, keyed by whether it was embedded with gradients."""
    recorded: dict[bool, list[torch.Tensor]] = {False: [], True: []}
    embed_minibatch = loss_fn.embed_minibatch

    def recording(*args, **kwargs):
        reps, state = embed_minibatch(*args, **kwargs)
        recorded[kwargs["with_grad"]].append(reps.detach().clone())
        return reps, state

    loss_fn.embed_minibatch = recording
    return recorded


def step(model, loss_fn, columns, scale: float = 1.0):
    model.zero_grad()
    loss = loss_fn(tokenize_columns(model, columns), None)
    (loss * scale).backward()
    return loss.detach(), parameter_grads(model)


def uncached(model, columns, **loss_kwargs):
    """One forward per column with its graph (no GradCache), the same loss formula."""
    loss_fn = MultiPositiveCachedInfoNCELoss(model, **loss_kwargs)
    model.zero_grad()
    ids = torch.stack([hash_texts(f) for f in tokenize_columns(model, columns)], 1)
    loss = loss_fn.compute_loss_from_embeddings(embed_columns(model, columns), ids)
    loss.backward()
    return loss.detach(), parameter_grads(model)


# A batch of 7 rows x 5 columns. (mini_batch_size, keep_graphs) -> number of mini-batches embedded without
# gradients: 0 is the single pass; otherwise total - kept (the plain passes embed all of them twice).
PATHS = [
    pytest.param(7, 1, 0, id="single-pass-exact-fit"),
    pytest.param(50, 1, 0, id="single-pass-mini-50"),
    pytest.param(3, 1, 14, id="keep-last-1-of-15"),
    pytest.param(3, 4, 11, id="keep-last-4-of-15"),
    pytest.param(2, 19, 1, id="keep-19-of-20-leaves-one-replay"),
    pytest.param(2, 20, 0, id="budget-covers-all-20-single-pass"),
    pytest.param(3, 0, 15, id="plain-two-passes"),
]


@pytest.mark.parametrize(("mini_batch_size", "keep_graphs", "no_grad_embeddings"), PATHS)
def test_paths_equal_plain_gradcache_and_uncached(mini_batch_size, keep_graphs, no_grad_embeddings):
    model = build_tiny_model(seed=31).double()  # float64: exact equivalence, tight tolerances
    columns = make_ir_columns(batch_size=7, num_positives=2, num_negatives=2, seed=31)
    columns[3][4] = columns[1][0]  # a shared passage, so duplicate masking is exercised too
    kwargs = {"num_positives": 2, "mini_batch_size": mini_batch_size}
    expected_loss, expected_grads = uncached(model, columns, **kwargs)
    plain_loss, plain_grads = step(model, MultiPositiveCachedInfoNCELoss(model, **kwargs, keep_graphs=0), columns)

    loss_fn = MultiPositiveCachedInfoNCELoss(model, **kwargs, keep_graphs=keep_graphs)
    recorded = record_embeddings(loss_fn)
    loss, grads = step(model, loss_fn, columns)
    total = 5 * -(-7 // mini_batch_size)
    assert len(recorded[False]) == no_grad_embeddings  # the path taken
    assert len(recorded[True]) == total  # every mini-batch is embedded with gradients exactly once
    torch.testing.assert_close(loss, plain_loss, atol=0, rtol=0)  # the same chunked loss code on the same values
    torch.testing.assert_close(loss, expected_loss, atol=1e-9, rtol=1e-9)
    assert_grads_close(grads, plain_grads)
    assert_grads_close(grads, expected_grads)


@pytest.mark.parametrize(("budget", "single_pass"), [(10**6, True), (25, False)])
def test_token_budget_decides_the_single_pass(budget, single_pass):
    model = build_tiny_model(seed=32).double()
    columns = make_ir_columns(batch_size=6, num_positives=1, num_negatives=1, seed=32)
    features = tokenize_columns(model, columns)
    assert max(int(f["attention_mask"].sum()) for f in features) > 25  # 25 tokens do not hold a whole column
    kwargs = {"num_positives": 1, "mini_batch_size": 64, "mini_batch_num_tokens": budget}
    expected_loss, expected_grads = uncached(model, columns, **kwargs)
    loss_fn = MultiPositiveCachedInfoNCELoss(model, **kwargs)
    recorded = record_embeddings(loss_fn)
    loss, grads = step(model, loss_fn, columns)
    assert (len(recorded[False]) == 0) is single_pass
    torch.testing.assert_close(loss, expected_loss, atol=1e-9, rtol=1e-9)
    assert_grads_close(grads, expected_grads)


@pytest.mark.parametrize(("mini_batch_size", "keep_graphs"), [(7, 1), (3, 1), (3, 4), (2, 20)])
def test_dropout_kept_graphs_equal_replay_semantics(mini_batch_size, keep_graphs):
    """With dropout, a kept graph holds the masks the replay would reproduce: same embeddings, gradients, RNG."""
    model = build_tiny_model(seed=33, dropout=0.3).double()
    model.train()
    columns = make_ir_columns(batch_size=7, num_positives=2, num_negatives=1, seed=33)
    kwargs = {"num_positives": 2, "mini_batch_size": mini_batch_size}

    plain = MultiPositiveCachedInfoNCELoss(model, **kwargs, keep_graphs=0)
    plain_recorded = record_embeddings(plain)
    torch.manual_seed(1)
    plain_loss, plain_grads = step(model, plain, columns)
    plain_rng_after = torch.get_rng_state()

    ours = MultiPositiveCachedInfoNCELoss(model, **kwargs, keep_graphs=keep_graphs)
    recorded = record_embeddings(ours)
    torch.manual_seed(1)
    loss, grads = step(model, ours, columns)

    first_pass = plain_recorded[False]  # every mini-batch, in order, as the plain first pass drew it
    num_replayed = len(recorded[False])
    kept = recorded[True][: len(first_pass) - num_replayed]  # embedded with gradients in our first pass
    replayed = recorded[True][len(kept) :]
    for before, after in zip(first_pass, recorded[False] + kept):  # our first pass = the plain first pass
        torch.testing.assert_close(after, before, atol=0, rtol=0)
    for before, after in zip(recorded[False], replayed):  # and the replay reproduces it bit for bit
        torch.testing.assert_close(after, before, atol=0, rtol=0)
    torch.testing.assert_close(loss, plain_loss, atol=0, rtol=0)
    assert_grads_close(grads, plain_grads)
    assert torch.equal(torch.get_rng_state(), plain_rng_after)  # the training RNG stream is unchanged

    # The dropout is real: a different seed gives other masks and other gradients.
    torch.manual_seed(2)
    _, other_grads = step(model, ours, columns)
    assert any(not torch.allclose(other_grads[name], plain_grads[name]) for name in plain_grads)


@pytest.mark.parametrize(("mini_batch_size", "keep_graphs"), [(4, 1), (3, 1), (3, 2), (2, 0)])
def test_gradient_accumulation_scales_every_mini_batch(mini_batch_size, keep_graphs):
    """Two micro-batches backpropagating loss / 2 (the trainer's accumulation) give the mean of their gradients."""
    model = build_tiny_model(seed=34).double()
    micro = [make_ir_columns(batch_size=4, num_positives=2, num_negatives=1, seed=s) for s in (34, 35)]
    kwargs = {"num_positives": 2, "mini_batch_size": mini_batch_size}
    singles = [uncached(model, columns, **kwargs)[1] for columns in micro]
    expected = {name: (singles[0][name] + singles[1][name]) / 2 for name in singles[0]}

    loss_fn = MultiPositiveCachedInfoNCELoss(model, **kwargs, keep_graphs=keep_graphs)
    model.zero_grad()
    for columns in micro:
        (loss_fn(tokenize_columns(model, columns), None) / 2).backward()
    assert_grads_close(parameter_grads(model), expected)


@pytest.mark.parametrize(("mini_batch_size", "keep_graphs"), [(5, 1), (2, 1), (2, 3)])
def test_matryoshka_wrapping_is_unchanged(mini_batch_size, keep_graphs):
    """MatryoshkaLoss decorates calculate_loss of cached losses; the new paths must keep that working."""
    model = build_tiny_model(seed=36).double()
    columns = make_ir_columns(batch_size=5, num_positives=2, num_negatives=1, seed=36)
    kwargs = {"num_positives": 2, "mini_batch_size": mini_batch_size}
    plain = MatryoshkaLoss(model, MultiPositiveCachedInfoNCELoss(model, **kwargs, keep_graphs=0), [32, 16, 8])
    ours = MatryoshkaLoss(model, MultiPositiveCachedInfoNCELoss(model, **kwargs, keep_graphs=keep_graphs), [32, 16, 8])
    plain_loss, plain_grads = step(model, plain, columns)
    loss, grads = step(model, ours, columns)
    torch.testing.assert_close(loss, plain_loss, atol=1e-12, rtol=1e-12)
    assert_grads_close(grads, plain_grads)


@pytest.mark.parametrize("mini_batch_size", [8, 2])
def test_no_grad_and_frozen_model(mini_batch_size):
    model = build_tiny_model(seed=37).double()
    columns = make_ir_columns(batch_size=4, num_positives=1, num_negatives=1, seed=37)
    loss_fn = MultiPositiveCachedInfoNCELoss(model, num_positives=1, mini_batch_size=mini_batch_size)
    expected, _ = uncached(model, columns, num_positives=1, mini_batch_size=mini_batch_size)
    with torch.no_grad():  # evaluation: the loss value only
        torch.testing.assert_close(loss_fn(tokenize_columns(model, columns), None), expected, atol=1e-9, rtol=1e-9)
    model.zero_grad()
    model.requires_grad_(False)  # nothing trainable: backward is a no-op, not an error
    loss = loss_fn(tokenize_columns(model, columns), None)
    loss.backward()
    torch.testing.assert_close(loss.detach(), expected, atol=1e-9, rtol=1e-9)
    assert all(param.grad is None for param in model.parameters())


@pytest.mark.parametrize(
    ("keep_graphs", "error"), [(-1, ValueError), (1.5, TypeError), (True, TypeError), ("1", TypeError)]
)
def test_invalid_keep_graphs(tiny_model, keep_graphs, error):
    with pytest.raises(error, match="`keep_graphs`"):
        MultiPositiveCachedInfoNCELoss(tiny_model, keep_graphs=keep_graphs)


def test_keep_graphs_in_config(tiny_model):
    assert MultiPositiveCachedInfoNCELoss(tiny_model, keep_graphs=3).get_config_dict()["keep_graphs"] == 3


@pytest.mark.distributed
def test_two_ranks_agree_on_the_path_and_ddp_syncs_once(tiny_model_path, loss_rank_runs):
    """torchrun, 2 gloo ranks. (1) Rank 0's batch would fit in one mini-batch per column, rank 1's would not: both
    must take the same path, and the result must equal one process on the full batch. (2) Under real DDP, the single
    pass and kept graphs accumulate locally under no_sync and synchronise exactly as often as the plain passes."""
    from sentence_transformers import SentenceTransformer

    data = gradcache_batches()  # the worker's batches (dist_gradcache_paths_worker.py)
    outputs = [torch.load(job_output(loss_rank_runs, "gradcache") / f"rank{rank}.pt") for rank in range(2)]

    model = SentenceTransformer(str(tiny_model_path), device="cpu").double()
    tokens = outputs[0]["column_tokens"]
    budget = outputs[0]["mixed"]["budget"]
    assert max(tokens[0]) <= budget < max(tokens[1])  # alone, rank 0 would take the single pass, rank 1 not

    # (1) The path is agreed: with one rank too long, neither takes the single pass; when both fit, both do.
    for output in outputs:
        assert output["mixed"]["counts"]["no_grad"] > 0
        assert output["both_fit"]["counts"]["no_grad"] == 0
    # Uneven lengths: length-sorted chunks in the single pass (the worker lowers the chunk overhead), more forward
    # calls than the 4 columns on each rank.
    assert all(output["uneven"]["counts"]["no_grad"] == 0 for output in outputs)
    assert all(output["uneven"]["counts"]["with_grad"] > 4 for output in outputs)
    for name, key in (("mixed", "mixed"), ("both_fit", "mixed"), ("uneven", "uneven")):
        loss_fn = MultiPositiveCachedInfoNCELoss(model, num_positives=2, mini_batch_size=3)
        expected_loss, expected_grads = step(model, loss_fn, data[key])
        mean_loss = (outputs[0][name]["loss"] + outputs[1][name]["loss"]) / 2
        torch.testing.assert_close(mean_loss, expected_loss, atol=1e-9, rtol=1e-9)
        for output in outputs:
            assert_grads_close(output[name]["grads"], expected_grads)

    # (2) DDP: gradients of (loss(A) + loss(B)) / 2 over the global batches, synchronised once, on the last step.
    plain = MultiPositiveCachedInfoNCELoss(model, num_positives=2, mini_batch_size=3, keep_graphs=0)
    grads_a, grads_b = step(model, plain, data["ddp"]["A"])[1], step(model, plain, data["ddp"]["B"])[1]
    expected = {name: (grads_a[name] + grads_b[name]) / 2 for name in grads_a}
    # 4 columns x 2 mini-batches per micro-step. Under DDP graphs are kept from the last column only, leaving one of
    # its mini-batches to replay (keep_graphs=3 keeps 1 here; without DDP it would keep 3).
    expected_no_grad = {"plain": 2 * 8, "kept": 2 * 7, "kept3": 2 * 7, "single": 0}
    for find_unused in (False, True):
        reference_all_reduces = outputs[0][f"ddp_plain_{find_unused}"]["all_reduces_sync"]
        assert reference_all_reduces > 0
        for name, no_grad in expected_no_grad.items():
            for rank, output in enumerate(outputs):
                scenario = output[f"ddp_{name}_{find_unused}"]
                label = f"{name}, find_unused={find_unused}, rank {rank}"
                assert scenario["counts"]["no_grad"] == no_grad, label
                assert scenario["all_reduces_no_sync"] == 0, label  # no_sync holds
                assert scenario["all_reduces_sync"] == reference_all_reduces, label  # one synchronisation
                assert_grads_close(scenario["grads"], expected)
            # Under no_sync the ranks really kept local gradients (they differ before the synchronised step).
            local = [output[f"ddp_{name}_{find_unused}"]["local_after_no_sync"] for output in outputs]
            assert any(not torch.allclose(local[0][key], local[1][key]) for key in local[0])
