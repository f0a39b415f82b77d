from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F
from dist_jobs import infonce_batch, job_output
from loss_testing import (
    assert_grads_close,
    embed_columns,
    make_ir_columns,
    parameter_grads,
    tokenize_columns,
)
from sentence_transformers.sentence_transformer.losses import (
    CachedMultipleNegativesRankingLoss,
    MultipleNegativesRankingLoss,
)
from tiny_model import build_tiny_model

from codiemb_st import MultiPositiveCachedInfoNCELoss
from codiemb_st.losses.text_identity import hash_texts


def reference_loss(
    embeddings: list[torch.Tensor],
    columns: list[list[str]] | None,
    num_positives: int,
    temperature: float,
    objective: str = "per_slot",
    mask_duplicates: bool = False,
) -> torch.Tensor:
    """Loop-by-loop transcription of METHOD.md's multi-positive InfoNCE (and the joint-numerator variant)."""
    queries, candidates = embeddings[0], embeddings[1:]
    batch_size, num_candidate_columns = len(queries), len(candidates)

    def excluded(i: int, j: int, c: int) -> bool:
        if not mask_duplicates or (j == i and c < num_positives):
            return False
        own_positive_texts = {columns[1 + k][i] for k in range(num_positives)}
        return columns[1 + c][j] in own_positive_texts

    def logit(i: int, j: int, c: int) -> torch.Tensor:
        return F.cosine_similarity(queries[i], candidates[c][j], dim=0) / temperature

    per_query = []
    for i in range(batch_size):
        if objective == "joint":
            numerator = torch.logsumexp(torch.stack([logit(i, i, k) for k in range(num_positives)]), 0)
            denominator = torch.logsumexp(
                torch.stack(
                    [
                        logit(i, j, c)
                        for j in range(batch_size)
                        for c in range(num_candidate_columns)
                        if not excluded(i, j, c)
                    ]
                ),
                0,
            )
            per_query.append(denominator - numerator)
            continue
        per_slot = []
        for k in range(num_positives):
            slot_columns = [k, *range(num_positives, num_candidate_columns)]
            logits = [logit(i, j, c) for j in range(batch_size) for c in slot_columns if not excluded(i, j, c)]
            per_slot.append(torch.logsumexp(torch.stack(logits), 0) - logit(i, i, k))
        per_query.append(torch.stack(per_slot).mean())
    return torch.stack(per_query).mean()


def run_reference(model, columns, **kwargs):
    model.zero_grad()
    loss = reference_loss(embed_columns(model, columns), columns, **kwargs)
    loss.backward()
    return loss.detach(), parameter_grads(model)


def run_loss(model, loss_fn, columns):
    model.zero_grad()
    loss = loss_fn(tokenize_columns(model, columns), None)
    loss.backward()
    return loss.detach(), parameter_grads(model)


@pytest.mark.parametrize("num_negatives", [0, 1, 3])
def test_single_positive_equals_sentence_transformers_mnrl(num_negatives):
    model = build_tiny_model(seed=1).double()  # float64: exact equivalence, tight tolerances
    columns = make_ir_columns(batch_size=6, num_positives=1, num_negatives=num_negatives, seed=num_negatives)
    temperature = 0.05
    expected_loss, expected_grads = run_loss(
        model, MultipleNegativesRankingLoss(model, scale=1 / temperature), columns
    )
    cached_st_loss, cached_st_grads = run_loss(
        model, CachedMultipleNegativesRankingLoss(model, scale=1 / temperature, mini_batch_size=4), columns
    )
    for mask_duplicates in (False, True):  # all texts are distinct, so masking must not change anything
        ours = MultiPositiveCachedInfoNCELoss(
            model, num_positives=1, temperature=temperature, mini_batch_size=4, mask_duplicates=mask_duplicates
        )
        loss, grads = run_loss(model, ours, columns)
        torch.testing.assert_close(loss, expected_loss, atol=1e-9, rtol=1e-9)
        torch.testing.assert_close(loss, cached_st_loss, atol=1e-9, rtol=1e-9)
        assert_grads_close(grads, expected_grads)
        assert_grads_close(grads, cached_st_grads)


@pytest.mark.parametrize("num_positives", [2, 3])
@pytest.mark.parametrize("num_negatives", [0, 1, 4])
def test_multi_positive_equals_reference_formula(num_positives, num_negatives):
    model = build_tiny_model(seed=2).double()  # float64: exact equivalence, tight tolerances
    columns = make_ir_columns(batch_size=5, num_positives=num_positives, num_negatives=num_negatives, seed=7)
    ours = MultiPositiveCachedInfoNCELoss(model, num_positives=num_positives, temperature=0.02, mini_batch_size=2)
    expected_loss, expected_grads = run_reference(model, columns, num_positives=num_positives, temperature=0.02)
    loss, grads = run_loss(model, ours, columns)
    torch.testing.assert_close(loss, expected_loss, atol=1e-9, rtol=1e-9)
    assert_grads_close(grads, expected_grads)


def test_second_positive_is_not_a_negative():
    """The gap this loss fills: ST's MNRL silently scores a second positive column as a hard negative."""
    model = build_tiny_model(seed=3)
    columns = make_ir_columns(batch_size=4, num_positives=2, num_negatives=0, seed=3)
    with torch.no_grad():
        ours = MultiPositiveCachedInfoNCELoss(model, num_positives=2)(tokenize_columns(model, columns), None)
        mnrl = MultipleNegativesRankingLoss(model, scale=50.0)(tokenize_columns(model, columns), None)
    assert not torch.isclose(ours, mnrl, atol=1e-4)


@pytest.mark.parametrize("num_negatives", [0, 2])
def test_joint_objective_equals_reference(num_negatives):
    model = build_tiny_model(seed=4).double()  # float64: exact equivalence, tight tolerances
    columns = make_ir_columns(batch_size=5, num_positives=2, num_negatives=num_negatives, seed=11)
    ours = MultiPositiveCachedInfoNCELoss(model, num_positives=2, objective="joint", mini_batch_size=3)
    expected_loss, expected_grads = run_reference(model, columns, num_positives=2, temperature=0.02, objective="joint")
    loss, grads = run_loss(model, ours, columns)
    torch.testing.assert_close(loss, expected_loss, atol=1e-9, rtol=1e-9)
    assert_grads_close(grads, expected_grads)


@pytest.mark.parametrize("mini_batch_size", [2, 3, 5, 50])
def test_mini_batch_size_does_not_change_loss_or_gradients(mini_batch_size):
    model = build_tiny_model(seed=5).double()  # float64: exact equivalence, tight tolerances
    columns = make_ir_columns(batch_size=7, num_positives=2, num_negatives=2, seed=5)
    loss_fn = MultiPositiveCachedInfoNCELoss(model, num_positives=2, mini_batch_size=mini_batch_size)
    # Uncached: one forward pass per column with the autograd graph kept, then the plain loss.
    model.zero_grad()
    uncached = loss_fn.compute_loss_from_embeddings(
        embed_columns(model, columns), torch.stack([hash_texts(f) for f in tokenize_columns(model, columns)], 1)
    )
    uncached.backward()
    uncached_grads = parameter_grads(model)
    loss, grads = run_loss(model, loss_fn, columns)
    torch.testing.assert_close(loss, uncached.detach(), atol=1e-9, rtol=1e-9)
    assert_grads_close(grads, uncached_grads, atol=1e-9, rtol=1e-9)


def test_dropout_is_replayed_in_the_cached_backward_pass():
    model = build_tiny_model(seed=6, dropout=0.3)
    model.train()
    columns = make_ir_columns(batch_size=7, num_positives=2, num_negatives=1, seed=6)
    features = tokenize_columns(model, columns)
    with torch.no_grad():  # dropout is really on: two plain passes differ
        assert not torch.allclose(model(features[0])["sentence_embedding"], model(features[0])["sentence_embedding"])

    # keep_graphs=0: the plain two passes, every mini-batch embedded twice (kept graphs: see test_gradcache_paths.py).
    loss_fn = MultiPositiveCachedInfoNCELoss(model, num_positives=2, mini_batch_size=3, keep_graphs=0)
    recorded: dict[bool, list[torch.Tensor]] = {False: [], True: []}
    embed_minibatch = loss_fn.embed_minibatch

    def recording_embed_minibatch(*args, **kwargs):
        reps, state = embed_minibatch(*args, **kwargs)
        recorded[kwargs["with_grad"]].append(reps.detach().clone())
        return reps, state

    loss_fn.embed_minibatch = recording_embed_minibatch
    loss_fn(features, None).backward()
    first_pass, replay = recorded[False], recorded[True]
    assert len(first_pass) == len(replay) == 4 * 3  # 4 columns x 3 mini-batches of a batch of 7
    for before, after in zip(first_pass, replay):
        torch.testing.assert_close(after, before, atol=0, rtol=0)


def duplicated_batch() -> list[list[str]]:
    """Queries 0 and 1 share a passage (0's second positive is 1's first), and query 2's negative is 0's positive."""
    columns = make_ir_columns(batch_size=4, num_positives=2, num_negatives=1, seed=21)
    columns[2][0] = columns[1][1]
    columns[3][2] = columns[1][0]
    return columns


def test_duplicate_positives_are_masked_out_of_the_denominator():
    model = build_tiny_model(seed=7).double()  # float64: exact equivalence, tight tolerances
    columns = duplicated_batch()
    masked = MultiPositiveCachedInfoNCELoss(model, num_positives=2, mini_batch_size=3)
    unmasked = MultiPositiveCachedInfoNCELoss(model, num_positives=2, mini_batch_size=3, mask_duplicates=False)
    expected_loss, expected_grads = run_reference(
        model, columns, num_positives=2, temperature=0.02, mask_duplicates=True
    )
    loss, grads = run_loss(model, masked, columns)
    torch.testing.assert_close(loss, expected_loss, atol=1e-9, rtol=1e-9)
    assert_grads_close(grads, expected_grads)

    unmasked_expected, _ = run_reference(model, columns, num_positives=2, temperature=0.02)
    unmasked_loss, _ = run_loss(model, unmasked, columns)
    torch.testing.assert_close(unmasked_loss, unmasked_expected, atol=1e-9, rtol=1e-9)
    assert not torch.isclose(loss, unmasked_loss, atol=1e-4)


def test_duplicate_masking_uses_inputs_not_embeddings_under_dropout():
    """With dropout, two copies of a text embed differently; they must still be recognised as the same text."""
    model = build_tiny_model(seed=8, dropout=0.3)
    model.train()
    columns = duplicated_batch()
    loss_fn = MultiPositiveCachedInfoNCELoss(model, num_positives=2, mini_batch_size=2)
    features = tokenize_columns(model, columns)
    torch.manual_seed(0)
    with torch.no_grad():
        embeddings = [model(f)["sentence_embedding"] for f in features]
    assert not torch.allclose(embeddings[2][0], embeddings[1][1])  # same text, different embeddings
    ids = torch.stack([hash_texts(f) for f in features], 1)
    expected = reference_loss(embeddings, columns, num_positives=2, temperature=0.02, mask_duplicates=True)
    actual = loss_fn.compute_loss_from_embeddings(embeddings, ids)
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-5)  # float32


def test_text_identity_ignores_padding_side_and_layout(tiny_model):
    texts = ["a man is playing a guitar", "the weather is sunny", "a man is playing a guitar", "hello"]
    tokenizer = tiny_model.tokenizer
    right = tiny_model.tokenize(texts)
    tokenizer.padding_side = "left"
    left = tiny_model.tokenize(texts)
    tokenizer.padding_side = "right"
    assert not torch.equal(right["input_ids"], left["input_ids"])
    ids = hash_texts(right)
    torch.testing.assert_close(hash_texts(left), ids)
    assert ids[0] == ids[2] and len(set(ids.tolist())) == 3
    # Flattened layout (DataCollatorWithFlattening): concatenated ids and sequence offsets.
    lengths = right["attention_mask"].sum(1)
    flat_ids = right["input_ids"][right["attention_mask"].bool()]
    cu_seq_lens = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)])
    torch.testing.assert_close(hash_texts({"input_ids": flat_ids[None], "cu_seq_lens_q": cu_seq_lens}), ids)


def test_trainer_run_lowers_the_loss(tmp_path):
    from datasets import Dataset
    from sentence_transformers import SentenceTransformerTrainer, SentenceTransformerTrainingArguments

    model = build_tiny_model(seed=9)
    columns = make_ir_columns(batch_size=32, num_positives=2, num_negatives=1, seed=9)
    names = ["anchor", "positive_1", "positive_2", "negative_1"]
    dataset = Dataset.from_dict(dict(zip(names, columns)))
    loss_fn = MultiPositiveCachedInfoNCELoss(model, num_positives=2, temperature=0.05, mini_batch_size=8)

    def full_batch_loss() -> float:
        with torch.no_grad():
            return loss_fn(tokenize_columns(model, columns), None).item()

    before = full_batch_loss()
    args = SentenceTransformerTrainingArguments(
        output_dir=str(tmp_path),
        num_train_epochs=8,
        per_device_train_batch_size=16,
        learning_rate=5e-3,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        seed=0,
    )
    trainer = SentenceTransformerTrainer(model=model, args=args, train_dataset=dataset, loss=loss_fn)
    trainer.train()
    after = full_batch_loss()
    logged = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(logged) == 16
    assert after < 0.8 * before, (before, after)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"num_positives": 0}, ValueError, "`num_positives` must be an integer >= 1"),
        ({"num_positives": 1.5}, TypeError, "`num_positives` must be an integer"),  # wrong type: TypeError
        ({"temperature": 0}, ValueError, "`temperature` must be > 0"),
        ({"temperature": -0.1}, ValueError, "`temperature` must be > 0"),
        ({"temperature": float("nan")}, ValueError, "`temperature` must be a finite number"),
        ({"mini_batch_size": 0}, ValueError, "`mini_batch_size`"),
        ({"objective": "both"}, ValueError, "`objective` must be one of 'per_slot', 'joint'"),
        ({"mini_batch_num_tokens": 0}, ValueError, "`mini_batch_num_tokens`"),
        ({"keep_graphs": -1}, ValueError, "`keep_graphs` must be an integer >= 0"),
        ({"in_batch_negatives": 1}, TypeError, "`in_batch_negatives` must be True or False"),
    ],
)
def test_invalid_arguments_raise_value_or_type_error(tiny_model, kwargs, error, match):
    with pytest.raises(error, match=match):
        MultiPositiveCachedInfoNCELoss(tiny_model, **kwargs)


def test_too_few_columns_for_num_positives(tiny_model):
    loss_fn = MultiPositiveCachedInfoNCELoss(tiny_model, num_positives=3)
    columns = make_ir_columns(batch_size=3, num_positives=2, num_negatives=0)
    with pytest.raises(ValueError, match=r"num_positives=3.*needs at least 4 text columns.*has 3"):
        loss_fn(tokenize_columns(tiny_model, columns), None)


def test_config_and_citation(tiny_model):
    loss_fn = MultiPositiveCachedInfoNCELoss(tiny_model, num_positives=2, temperature=0.05)
    config = loss_fn.get_config_dict()
    assert config["num_positives"] == 2 and config["temperature"] == 0.05 and config["mask_duplicates"] is True
    assert loss_fn.scale == pytest.approx(20.0)
    assert "2508.11442" in loss_fn.citation


def test_gather_without_distributed_warns_and_uses_local_batch(tiny_model, caplog):
    columns = make_ir_columns(batch_size=4, num_positives=2, num_negatives=1, seed=13)
    features = tokenize_columns(tiny_model, columns)
    with torch.no_grad():
        local = MultiPositiveCachedInfoNCELoss(tiny_model, num_positives=2)(features, None)
        with caplog.at_level(logging.WARNING):
            gathered = MultiPositiveCachedInfoNCELoss(tiny_model, num_positives=2, gather_across_devices=True)(
                features, None
            )
    torch.testing.assert_close(gathered, local)
    assert "torch.distributed is not initialized" in caplog.text


@pytest.mark.distributed
def test_two_process_gather_equals_single_process_full_batch(tiny_model_path, loss_rank_runs):
    """torchrun, 2 ranks, gloo: local rows vs gathered candidates give the single-process full-batch loss/grads."""
    columns = infonce_batch()  # the worker's global batch (dist_infonce_worker.py)
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(tiny_model_path), device="cpu").double()
    loss_fn = MultiPositiveCachedInfoNCELoss(model, num_positives=2, mini_batch_size=3)
    expected_loss, expected_grads = run_loss(model, loss_fn, columns)
    unmasked = MultiPositiveCachedInfoNCELoss(model, num_positives=2, mini_batch_size=3, mask_duplicates=False)
    assert not torch.isclose(expected_loss, run_loss(model, unmasked, columns)[0], atol=1e-4)

    outputs = [torch.load(job_output(loss_rank_runs, "infonce") / f"rank{rank}.pt") for rank in range(2)]
    # Each rank's loss is the mean over its own rows; their average is the full-batch mean.
    torch.testing.assert_close((outputs[0]["loss"] + outputs[1]["loss"]) / 2, expected_loss, atol=1e-9, rtol=1e-9)
    for output in outputs:  # DDP-averaged gradients equal the single-process gradients, on every rank
        assert_grads_close(output["grads"], expected_grads)
    for output in outputs:  # unequal per-rank batches: a clear error on every rank, not a hang
        assert "same (batch size, number of columns, embedding dim) on every rank" in output["mismatch_error"]
