"""Training with a teacher from the command line and the recipe (issue 30): teacher scores reach the IR loss as its
labels, a guide model and the InfoNCE options reach it, per dataset too, and missing scores are named."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tiny_model import ENGLISH_SENTENCES, save_tiny_cross_encoder

from codiemb_st.cli import main
from codiemb_st.losses import MultiPositiveCachedInfoNCELoss

RECORDS = [
    {"query": q, "positives": [ENGLISH_SENTENCES[(i + 1) % 10]], "negatives": [ENGLISH_SENTENCES[(i + 4) % 10]]}
    for i, q in enumerate(ENGLISH_SENTENCES)
]


@pytest.fixture
def spy(monkeypatch) -> list[tuple[MultiPositiveCachedInfoNCELoss, object]]:
    calls: list[tuple[MultiPositiveCachedInfoNCELoss, object]] = []
    forward = MultiPositiveCachedInfoNCELoss.forward

    def record(self, sentence_features, labels=None):
        calls.append((self, None if labels is None else tuple(labels.shape)))
        return forward(self, sentence_features, labels)

    monkeypatch.setattr(MultiPositiveCachedInfoNCELoss, "forward", record)
    return calls


def _files(folder: Path, teacher: Path) -> tuple[Path, Path]:
    plain = folder / "plain.jsonl"
    plain.write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    scored = folder / "scored.jsonl"
    assert main(["score", str(plain), "--teacher", str(teacher), "--output", str(scored)]) == 0
    return plain, scored


def test_teacher_scores_reach_the_loss_and_the_options_are_set(tmp_path, tiny_model_path, spy, capsys):
    teacher = save_tiny_cross_encoder(tmp_path / "teacher")
    _, scored = _files(tmp_path, teacher)
    argv = ["train", "--model", str(tiny_model_path), "--ir", str(scored), "--output-dir", str(tmp_path / "run")]
    argv += ["--max-steps", "2", "--ir-batch-size", "4", "--distill-weight", "0.5", "--teacher-temperature", "2"]
    argv += ["--guide", str(tiny_model_path), "--guide-margin", "0.1", "--directions", "query_to_doc", "doc_to_doc"]
    argv += ["--hardness-mode", "all_negatives", "--hardness-strength", "5"]
    assert main(argv) == 0, capsys.readouterr().err[-2000:]
    loss, shape = spy[0]
    assert shape == (4, 2)  # one teacher score per candidate column (positive_1, negative_1)
    config = loss.get_config_dict()
    assert config["distillation_weight"] == 0.5 and config["teacher_temperature"] == 2.0
    assert loss.guide is not None and config["margin"] == 0.1
    assert tuple(config["directions"]) == ("query_to_doc", "doc_to_doc") and config["hardness_strength"] == 5.0


def test_per_dataset_distillation_and_missing_scores_named(tmp_path, tiny_model_path, spy, capsys):
    teacher = save_tiny_cross_encoder(tmp_path / "teacher")
    plain, scored = _files(tmp_path, teacher)
    argv = ["train", "--model", str(tiny_model_path), "--ir", str(scored), str(plain), "--max-steps", "6"]
    argv += ["--ir-batch-size", "4", "--output-dir", str(tmp_path / "run")]
    # Only the scored dataset distils; the plain one needs no scores.
    assert main([*argv, "--dataset-option", "scored.distillation_weight=1"]) == 0, capsys.readouterr().err[-2000:]
    weights = {loss.get_config_dict().get("distillation_weight", 0.0) for loss, _ in spy}
    assert weights == {0.0, 1.0}
    # A run-level weight asks every IR dataset for scores: the plain file is named, before any model loads.
    assert main([*argv, "--distill-weight", "0.5"]) == 2
    assert f"{plain}:1: dataset 'plain' is trained with distillation but its records carry no teacher scores" in (
        capsys.readouterr().err
    )
    assert main([*argv, "--dataset-option", "plain.distillation_weight=-1"]) == 2
    assert "distillation_weight must be a finite number >= 0" in capsys.readouterr().err


def test_the_teacher_page_example_runs_as_written(tmp_path, monkeypatch):
    from docs_examples import run_docs_example

    monkeypatch.chdir(tmp_path)
    namespace = run_docs_example("teacher.md", "teacher-example")
    rows = [json.loads(line) for line in (tmp_path / "pairs_scored.jsonl").read_text().splitlines()]
    assert all(len(row["positive_scores"]) == 1 and len(row["negative_scores"]) == 2 for row in rows)
    assert namespace["trainer"].state.global_step == 2
    (loss,) = set(namespace["losses"].values())
    assert loss.get_config_dict()["distillation_weight"] == 2500.0 and loss.guide is namespace["teacher"]
