"""Both losses and the sampler on a decoder backbone (LLM embedder set-up): a tiny random Qwen2 with left padding,
an appended EOS token, last-token pooling and instruction prompts.

The equivalence tests run in float64 so that "equal" means equal up to rounding; the bf16 test states its tolerance.
"""

from __future__ import annotations

import pytest
import torch
from loss_testing import make_ir_columns, parameter_grads
from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss
from tiny_decoder import QUERY_PROMPT, build_tiny_decoder

from codiemb_st import MultiPositiveCachedInfoNCELoss, PearsonSpearmanLoss, RoundRobinTaskBatchSampler
from codiemb_st.losses.text_identity import hash_columns

TEMPERATURE = 0.05


def tokenize_with_prompt(model, columns: list[list[str]]) -> list[dict[str, torch.Tensor]]:
    """Tokenize like the trainer does with ``prompts={"anchor": QUERY_PROMPT}``: the instruction is prepended to the
    queries, and ``prompt_length`` tells Pooling how many leading tokens are the instruction."""
    features = [model.tokenize([QUERY_PROMPT + text for text in columns[0]])]
    prompt_length = model[0]._get_prompt_length(QUERY_PROMPT)
    features[0]["prompt_length"] = torch.full((len(columns[0]),), prompt_length, dtype=torch.long)
    return features + [model.tokenize(column) for column in columns[1:]]


def copy_features(features: list[dict[str, torch.Tensor]]) -> list[dict[str, torch.Tensor]]:
    return [
        {key: value.clone() if isinstance(value, torch.Tensor) else value for key, value in f.items()}
        for f in features
    ]


def cached_loss_and_grads(model, loss_fn, features):
    model.zero_grad()
    loss = loss_fn(copy_features(features), None)
    loss.backward()
    return loss.detach(), parameter_grads(model)


def uncached_loss_and_grads(model, loss_fn, features):
    """The uncached reference: every column embedded in one pass with its autograd graph, then the plain loss."""
    model.zero_grad()
    features = copy_features(features)
    text_ids = hash_columns(features) if loss_fn.mask_duplicates else None
    embeddings = [model(feature)["sentence_embedding"] for feature in features]
    loss = loss_fn.compute_loss_from_embeddings(embeddings, text_ids)
    loss.backward()
    return loss.detach(), parameter_grads(model)


def assert_grads_close(actual, expected, atol=1e-9, rtol=1e-7):
    assert actual.keys() == expected.keys() and len(actual) > 0
    for name in expected:
        torch.testing.assert_close(
            actual[name], expected[name], atol=atol, rtol=rtol, msg=lambda m, n=name: f"{n}: {m}"
        )


def enable_gradient_checkpointing(model) -> None:
    model[0].auto_model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    model.train()  # transformers only checkpoints in training mode
    assert model[0].auto_model.is_activation_checkpointing


def test_tokenizer_pads_left_and_last_token_is_eos():
    model = build_tiny_decoder()
    features = model.tokenize(["a man", "the quick brown fox jumps over the lazy dog"])
    tokenizer = model[0].processor
    assert tokenizer.padding_side == "left"
    assert (features["input_ids"][:, -1] == tokenizer.eos_token_id).all()
    assert features["attention_mask"][0, 0] == 0 and features["attention_mask"][:, -1].all()


def test_last_token_pooling_reads_the_eos_hidden_state():
    model = build_tiny_decoder(seed=1)
    features = model.tokenize(["a man", "the quick brown fox jumps over the lazy dog"])
    with torch.no_grad():
        hidden = model[0].auto_model(input_ids=features["input_ids"], attention_mask=features["attention_mask"])
        embeddings = model(model.tokenize(["a man", "the quick brown fox jumps over the lazy dog"]))
    torch.testing.assert_close(embeddings["sentence_embedding"], hidden.last_hidden_state[:, -1])


def test_prompt_is_excluded_from_mean_pooling_under_left_padding():
    """include_prompt=False must drop the instruction tokens, which sit after the padding with left padding."""
    model = build_tiny_decoder(seed=2, pooling_mode="mean", include_prompt=False)
    texts = ["a man", "the quick brown fox jumps over the lazy dog"]
    features = tokenize_with_prompt(model, [texts])[0]
    prompt_length = int(features["prompt_length"][0])
    with torch.no_grad():
        hidden = model[0].auto_model(input_ids=features["input_ids"], attention_mask=features["attention_mask"])
        pooled = model(dict(features))["sentence_embedding"]
    for row in range(len(texts)):
        first = int((features["attention_mask"][row] == 0).sum()) + prompt_length  # padding, then the prompt
        expected = hidden.last_hidden_state[row, first:].mean(dim=0)
        torch.testing.assert_close(pooled[row], expected)
    # The attention mask the loss replays must be untouched (GradCache re-embeds the same features).
    assert features["attention_mask"][:, -1].all()


@pytest.mark.parametrize(
    ("pooling_mode", "include_prompt"), [("lasttoken", True), ("mean", False)], ids=["lasttoken", "mean-no-prompt"]
)
@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "grad-checkpointing"])
def test_cached_ir_loss_equals_sentence_transformers_mnrl(pooling_mode, include_prompt, checkpointing):
    model = build_tiny_decoder(seed=3, pooling_mode=pooling_mode, include_prompt=include_prompt).double()
    features = tokenize_with_prompt(model, make_ir_columns(batch_size=7, num_positives=1, num_negatives=2, seed=3))
    expected_loss, expected_grads = cached_loss_and_grads(
        model, MultipleNegativesRankingLoss(model, scale=1 / TEMPERATURE), features
    )
    if checkpointing:
        enable_gradient_checkpointing(model)
    ours = MultiPositiveCachedInfoNCELoss(
        model, num_positives=1, temperature=TEMPERATURE, mini_batch_size=3, mask_duplicates=False
    )
    loss, grads = cached_loss_and_grads(model, ours, features)
    torch.testing.assert_close(loss, expected_loss, atol=1e-9, rtol=1e-9)
    assert_grads_close(grads, expected_grads)


@pytest.mark.parametrize("mini_batch_size", [2, 5, 50])
def test_multi_positive_cached_loss_equals_uncached_reference(mini_batch_size):
    model = build_tiny_decoder(seed=4).double()
    enable_gradient_checkpointing(model)
    features = tokenize_with_prompt(model, make_ir_columns(batch_size=7, num_positives=2, num_negatives=2, seed=4))
    loss_fn = MultiPositiveCachedInfoNCELoss(model, num_positives=2, temperature=0.02, mini_batch_size=mini_batch_size)
    expected_loss, expected_grads = uncached_loss_and_grads(model, loss_fn, features)
    loss, grads = cached_loss_and_grads(model, loss_fn, features)
    torch.testing.assert_close(loss, expected_loss, atol=1e-9, rtol=1e-9)
    assert_grads_close(grads, expected_grads)


def sts_features(model, n: int = 8, seed: int = 5):
    columns = make_ir_columns(batch_size=n, num_positives=1, num_negatives=0, seed=seed)
    labels = torch.linspace(0.0, 5.0, n, dtype=torch.float64)[
        torch.randperm(n, generator=torch.Generator().manual_seed(0))
    ]
    return [model.tokenize(column) for column in columns], labels


def test_pearson_spearman_loss_on_decoder_matches_its_formula_with_checkpointing():
    model = build_tiny_decoder(seed=5).double()
    features, labels = sts_features(model)
    # The three-term formula on the final embeddings (the middle-layer term on decoders: test_pearson_spearman.py).
    loss_fn = PearsonSpearmanLoss(model, mid_nce_weight=0.0)
    model.zero_grad()
    expected = loss_fn.compute_loss_from_embeddings([model(dict(f))["sentence_embedding"] for f in features], labels)
    expected.backward()
    expected_grads = parameter_grads(model)
    enable_gradient_checkpointing(model)
    model.zero_grad()
    loss = loss_fn(features, labels)
    loss.backward()
    assert torch.isfinite(loss) and loss.item() != 0
    torch.testing.assert_close(loss.detach(), expected.detach(), atol=1e-9, rtol=1e-9)
    assert_grads_close(parameter_grads(model), expected_grads)


#: bf16 autocast (CPU) against float32, measured on this tiny decoder (seeds 6, 11, 12; batch 8): loss within 1.45%
#: (IR) / 0.35% (STS) relative, every parameter gradient at cosine >= 0.993 to the float32 one (relative error of
#: the gradient norm up to 12%). The bounds leave margin for other platforms' bf16 kernels.
BF16_LOSS_RTOL = 0.05
BF16_MIN_GRAD_COSINE = 0.97


def _grad_cosines(actual: dict, expected: dict) -> dict[str, float]:
    return {
        name: torch.nn.functional.cosine_similarity(actual[name].flatten(), expected[name].flatten(), dim=0).item()
        for name in expected
        if expected[name].abs().sum() > 0
    }


@pytest.mark.parametrize("loss_name", ["ir", "sts"])
def test_bf16_autocast_on_cpu_stays_close_to_float32(loss_name):
    model = build_tiny_decoder(seed=6)
    enable_gradient_checkpointing(model)
    if loss_name == "ir":
        features = tokenize_with_prompt(model, make_ir_columns(batch_size=8, num_positives=2, num_negatives=1, seed=6))
        loss_fn, labels = (
            MultiPositiveCachedInfoNCELoss(model, num_positives=2, temperature=TEMPERATURE, mini_batch_size=3),
            None,
        )
    else:
        features, labels = sts_features(model, seed=6)
        labels = labels.float()
        loss_fn = PearsonSpearmanLoss(model)

    def run(autocast: bool):
        model.zero_grad()
        # Like the trainer with bf16=True: autocast around the forward pass only, backward outside it.
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = loss_fn(copy_features(features), labels)
        loss.backward()
        return loss.detach().float(), parameter_grads(model)

    reference_loss, reference_grads = run(autocast=False)
    loss, grads = run(autocast=True)
    assert all(grad.dtype == torch.float32 and torch.isfinite(grad).all() for grad in grads.values())
    torch.testing.assert_close(loss, reference_loss, rtol=BF16_LOSS_RTOL, atol=0.0)
    cosines = _grad_cosines(grads, reference_grads)
    assert len(cosines) > 10
    assert min(cosines.values()) > BF16_MIN_GRAD_COSINE, sorted(cosines.items(), key=lambda item: item[1])[:3]


def test_gradcache_replay_runs_under_the_autocast_of_its_forward_pass():
    """The replay happens inside loss.backward(), outside the trainer's autocast; it must still run in bf16."""
    model = build_tiny_decoder(seed=8)
    seen = []
    model[0].auto_model.layers[0].mlp.register_forward_hook(
        lambda module, inputs, output: seen.append((torch.is_grad_enabled(), output.dtype))
    )
    features = tokenize_with_prompt(model, make_ir_columns(batch_size=4, num_positives=1, num_negatives=0, seed=8))
    # keep_graphs=0: the plain two passes, every mini-batch replayed.
    loss_fn = MultiPositiveCachedInfoNCELoss(model, num_positives=1, mini_batch_size=2, keep_graphs=0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = loss_fn(features, None)
    loss.backward()  # outside autocast, as the trainer does
    assert [grad for grad, _ in seen] == [False, False, False, False, True, True, True, True]
    assert all(dtype == torch.bfloat16 for _, dtype in seen)
    # The default keeps the last mini-batch's graph (built under the forward's autocast) and replays the others.
    seen.clear()
    model.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = MultiPositiveCachedInfoNCELoss(model, num_positives=1, mini_batch_size=2)(features, None)
    loss.backward()
    assert [grad for grad, _ in seen] == [False, False, False, True, True, True, True]
    assert all(dtype == torch.bfloat16 for _, dtype in seen)
    # Without autocast nothing changes: both passes in the model's dtype.
    seen.clear()
    model.zero_grad()
    loss_fn(features, None).backward()
    assert all(dtype == torch.float32 for _, dtype in seen) and len(seen) == 8


def test_trainer_run_with_round_robin_sampler_prompts_and_checkpointing(tmp_path):
    """A short multi-task run: IR (instruction on the queries) and STS alternate; every batch is one dataset."""
    from datasets import Dataset, DatasetDict
    from sentence_transformers import SentenceTransformerTrainer, SentenceTransformerTrainingArguments

    model = build_tiny_decoder(seed=7)
    ir_columns = make_ir_columns(batch_size=16, num_positives=2, num_negatives=1, seed=7)
    sts_columns = make_ir_columns(batch_size=16, num_positives=1, num_negatives=0, seed=8)
    train = DatasetDict(
        {
            "ir": Dataset.from_dict(dict(zip(["anchor", "positive_1", "positive_2", "negative_1"], ir_columns))),
            "sts": Dataset.from_dict(
                {"sentence1": sts_columns[0], "sentence2": sts_columns[1], "score": [float(i % 6) for i in range(16)]}
            ),
        }
    )
    ir_loss = MultiPositiveCachedInfoNCELoss(model, num_positives=2, temperature=TEMPERATURE, mini_batch_size=4)
    seen = []

    class RecordingTrainer(SentenceTransformerTrainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            seen.append((inputs["dataset_name"], inputs.get("anchor_prompt_length")))
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)

    def ir_loss_value() -> float:
        with torch.no_grad():
            return ir_loss(tokenize_with_prompt(model, ir_columns), None).item()

    before = ir_loss_value()
    args = SentenceTransformerTrainingArguments(
        output_dir=str(tmp_path),
        num_train_epochs=3,
        per_device_train_batch_size=8,
        learning_rate=5e-3,
        activation_checkpointing=True,
        activation_checkpointing_kwargs={"use_reentrant": False},
        prompts={"ir": {"anchor": QUERY_PROMPT}},
        multi_dataset_batch_sampler=RoundRobinTaskBatchSampler.with_options(tasks={"ir": ["ir"], "sts": ["sts"]}),
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        seed=0,
    )
    trainer = RecordingTrainer(
        model=model, args=args, train_dataset=train, loss={"ir": ir_loss, "sts": PearsonSpearmanLoss(model)}
    )
    trainer.train()
    assert model[0].auto_model.is_activation_checkpointing
    # 3 epochs x (2 IR + 2 STS batches of 8), tasks taking turns.
    assert [name for name, _ in seen] == ["ir", "sts"] * 6
    # The instruction reached the IR queries (with its length, for pooling modes that exclude it), not STS.
    assert all(int(length) > 0 for name, length in seen if name == "ir")
    assert all(length is None for name, length in seen if name == "sts")
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == 12 and all(torch.isfinite(torch.tensor(losses)))
    assert ir_loss_value() < before
