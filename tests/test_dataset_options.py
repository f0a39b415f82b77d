"""Per-dataset options (batch size, instruction, P/N, in-batch negatives) in the loss, the sampler, the recipe and
``codiemb-st train``; each of the three record formats trains through the Python API and the command line."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from datasets import Dataset
from tiny_model import ENGLISH_SENTENCES

from codiemb_st import RoundRobinTaskBatchSampler, recipe
from codiemb_st.cli import main
from codiemb_st.losses import MultiPositiveCachedInfoNCELoss

S = ENGLISH_SENTENCES


def _write(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def _files(tmp_path: Path) -> dict[str, Path]:
    """Four IR rows in each of the three formats, and four STS pairs (FlagEmbedding form, with a prompt)."""
    unified = [{"query": S[i], "positives": [S[i + 1]], "negatives": [S[i + 2], S[i + 3]]} for i in range(4)]
    flag = [{"query": S[i], "pos": [S[i + 2], S[i + 3]], "neg": [S[i + 4]], "prompt": "Find: "} for i in range(4)]
    st = [{"anchor": S[i], "positive": S[i + 3], "negative_1": S[i + 5]} for i in range(4)]
    sts = [{"query": S[i], "pos": [S[i + 1]], "pos_scores": [i], "prompt": "Same? "} for i in range(4)]
    files = {"unified": _write(tmp_path / "unified.jsonl", unified), "flag": _write(tmp_path / "flag.jsonl", flag)}
    Dataset.from_list(st).to_parquet(tmp_path / "st.parquet")
    files["st"] = tmp_path / "st.parquet"
    files["sts"] = _write(tmp_path / "sts.jsonl", sts)
    return files


def test_loss_without_in_batch_negatives_ranks_each_query_against_its_own_candidates(tiny_model):
    torch.manual_seed(0)
    q, p, n = torch.randn(5, 8), torch.randn(5, 8), torch.randn(5, 8)
    own_only = MultiPositiveCachedInfoNCELoss(tiny_model, temperature=0.5, in_batch_negatives=False)
    qn, pn, nn_ = (F.normalize(x, dim=-1) for x in (q, p, n))
    positive, negative = (qn * pn).sum(-1) / 0.5, (qn * nn_).sum(-1) / 0.5
    expected = (torch.logaddexp(positive, negative) - positive).mean()
    torch.testing.assert_close(own_only.compute_loss_from_embeddings([q, p, n]), expected)
    default = MultiPositiveCachedInfoNCELoss(tiny_model, temperature=0.5)
    assert default.compute_loss_from_embeddings([q, p, n]) > expected  # the other rows add to the denominator
    with pytest.raises(ValueError, match="in_batch_negatives=False\\) needs hard-negative columns"):
        own_only.compute_loss_from_embeddings([q, p])
    assert own_only.get_config_dict()["in_batch_negatives"] is False


def test_sampler_dataset_batch_sizes():
    small, large = Dataset.from_dict({"anchor": ["a"] * 12}), Dataset.from_dict({"anchor": ["b"] * 12})
    concat = torch.utils.data.ConcatDataset([small, large])
    batch_samplers = [torch.utils.data.BatchSampler(range(12), 4, drop_last=True)] * 2
    sampler = RoundRobinTaskBatchSampler.with_options(
        tasks={"ir": ["small", "large"]},
        batch_sizes={"ir": 4},
        dataset_batch_sizes={"small": 2},
        world_size=1,
        dataset_names=["small", "large"],
    )(concat, batch_samplers, seed=0)
    sizes = {("small" if batch[0] < 12 else "large", len(batch)) for batch in sampler}
    assert sizes == {("small", 2), ("large", 4)} and sampler.batch_size is None
    assert sampler.steps_per_dataset == {"small": 6, "large": 3}
    with pytest.raises(ValueError, match=r"`dataset_batch_sizes` names unknown datasets \['other'\]"):
        RoundRobinTaskBatchSampler.with_options(
            tasks={"ir": ["small", "large"]}, dataset_batch_sizes={"other": 2}, dataset_names=["small", "large"]
        )(concat, batch_samplers, seed=0)


def test_recipe_resolves_options_from_arguments_and_files(tmp_path, tiny_model):
    files = _files(tmp_path)
    classes = _write(
        tmp_path / "labels_no_in_batch_neg.jsonl",
        [{"query": S[i], "pos": [S[i + 1]], "neg": [S[i + 2]], "type": "symmetric_sts"} for i in range(4)],
    )
    data = recipe.load_task_datasets(
        {"unified": files["unified"], "flag": files["flag"], "labels": classes},
        {"sts": files["sts"]},
        num_negatives=1,
        options={"unified": {"batch_size": 2, "num_negatives": 2, "instruction": ""}, "flag": {"num_positives": 2}},
    )
    assert data.datasets["unified"].column_names == ["anchor", "positive_1", "negative_1", "negative_2"]
    assert data.datasets["flag"].column_names == ["anchor", "positive_1", "positive_2", "negative_1"]
    # The records' prompt became the dataset's instruction (not written into the text); STS: both sentences.
    assert data.datasets["flag"]["anchor"][0] == S[0] and data.datasets["sts"]["sentence1"][0] == S[0]
    prompts = recipe.training_prompts(data, query="Q: ", sts="S: ")
    assert prompts["unified"] == {}  # instruction "" trains it without one
    assert prompts["flag"] == {"anchor": "Find: "}
    assert prompts["sts"] == {"sentence1": "Same? ", "sentence2": "Same? "}
    # FlagEmbedding symmetric_sts: the passages get the query's instruction; "*no_in_batch_neg" file: own only.
    assert set(prompts["labels"].values()) == {"Q: "} and len(prompts["labels"]) == 3
    assert data.option("labels").in_batch_negatives is False and data.batch_sizes() == {"unified": 2}
    losses = recipe.build_task_losses(tiny_model, data)
    assert losses["labels"].in_batch_negatives is False and losses["unified"].in_batch_negatives is True
    assert losses["flag"].num_positives == 2 and losses["unified"] is not losses["flag"]
    args = recipe.training_arguments(tmp_path / "run", data, ir_batch_size=4, sts_batch_size=4, max_steps=1)
    assert args.multi_dataset_batch_sampler.keywords["dataset_batch_sizes"] == {"unified": 2}


@pytest.mark.parametrize(
    ("options", "error", "message"),
    [
        ({"nope": {"batch_size": 2}}, ValueError, r"`options` names unknown datasets \['nope'\]"),
        ({"sts": {"num_negatives": 2}}, ValueError, "is STS: the option 'num_negatives' applies to IR"),
        ({"unified": {"batch": 2}}, ValueError, r"unknown fields \['batch'\]"),
        ({"unified": {"batch_size": 0}}, ValueError, "`batch_size` must be an integer >= 1"),
        ({"st": {"num_negatives": 0, "in_batch_negatives": False}}, ValueError, "needs hard negatives"),
    ],
)
def test_bad_options(tmp_path, options, error, message):
    files = _files(tmp_path)
    with pytest.raises(error, match=message):
        recipe.load_task_datasets([files["unified"], files["st"]], [files["sts"]], options=options)


def test_mixed_record_prompts_are_refused_by_the_recipe(tmp_path):
    path = _write(
        tmp_path / "mixed.jsonl", [{"query": "a", "pos": ["b"], "prompt": "x"}, {"query": "c", "pos": ["d"]}]
    )
    with pytest.raises(ValueError, match=r"mixed\.jsonl:2: its `prompt` None differs .* split the file"):
        recipe.load_task_datasets([path])


def test_three_formats_train_through_the_python_api(tmp_path, tiny_model):
    from sentence_transformers import SentenceTransformerTrainer

    files = _files(tmp_path)
    data = recipe.load_task_datasets(
        [files["unified"], files["flag"], files["st"]], [files["sts"]], options={"unified": {"batch_size": 2}}
    )
    losses = recipe.build_task_losses(tiny_model, data, mini_batch_size=4)
    args = recipe.training_arguments(
        tmp_path / "run",
        data,
        ir_batch_size=4,
        sts_batch_size=4,
        num_train_epochs=1,
        prompts=recipe.training_prompts(data),
    )
    trainer = SentenceTransformerTrainer(tiny_model, args=args, train_dataset=data.dataset_dict(), loss=losses)
    trainer.train()
    # IR: unified 2 steps (batch 2) + flag 1 + st 1 = 4 steps per pass; STS cycles alongside: 8 steps.
    assert trainer.state.global_step == 8


def test_three_formats_train_through_the_command_line(tmp_path, tiny_model_path, capsys, caplog):
    files = _files(tmp_path)
    argv = ["train", "--model", str(tiny_model_path), "--output-dir", str(tmp_path / "r")]
    argv += ["--ir", str(files["unified"]), str(files["flag"]), str(files["st"]), "--sts", str(files["sts"])]
    argv += ["--ir-batch-size", "4", "--sts-batch-size", "4", "--dataset-option", "unified.batch_size=2"]
    argv += ["--dataset-option", "st.in_batch_negatives=false", "--dataset-option", "unified.instruction=Look: "]
    with caplog.at_level(logging.INFO):
        assert main(argv) == 0  # in-process: the console script is `codiemb_st.cli:main`
    assert "Trained 8 optimizer steps" in capsys.readouterr().out
    for expected in ("unified format", "flagembedding format", "sentence-transformers format"):
        assert expected in caplog.text
    bad = [
        "train",
        "--output-dir",
        str(tmp_path / "r2"),
        "--ir",
        str(files["st"]),
        "--dataset-option",
        "st.batchsize=2",
    ]
    assert main(bad) == 2 and "unknown field 'batchsize'" in capsys.readouterr().err
