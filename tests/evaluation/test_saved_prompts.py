"""A model's saved prompts are applied by mteb task type (retrieval query/document, STS), recorded, and overridable.

The convention (``codiemb-st train`` saves it): ``query`` = IR query instruction, ``document`` = IR passage
instruction, ``sts`` = STS instruction on both sentences; any other name is ignored and said so.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
from evaluation_fixtures import QUERIES, STS_PAIRS, tiny_eval_argv, write_retrieval_task, write_sts_task
from sentence_transformers import SentenceTransformer
from tiny_model import build_tiny_model

from codiemb_st.cli import main
from codiemb_st.evaluation import evaluate_model, plan_prompts, prepare_task, prepare_tasks, runner

SAVED = {"query": "q: ", "sts": "s: ", "classification": "c: "}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("prompt_tasks")
    write_sts_task(root / "TinySTS")
    write_retrieval_task(root / "TinyRetrieval")
    # Under a C-MTEB name, so --instructions has an official instruction for it.
    write_sts_task(root / "ATEC", name="ATEC")
    return root


@pytest.fixture(scope="module")
def prompted_model_path(tmp_path_factory) -> Path:
    model = build_tiny_model(seed=0)
    model.prompts = dict(SAVED)
    folder = tmp_path_factory.mktemp("prompted") / "model"
    model.save(str(folder))
    saved = json.loads((folder / "config_sentence_transformers.json").read_text())["prompts"]
    assert {name: saved[name] for name in SAVED} == SAVED
    return folder


@pytest.fixture
def encode_calls(monkeypatch) -> list[dict]:
    """Every ``SentenceTransformer.encode`` call during evaluation: the task being evaluated, the texts, the prompt."""
    calls: list[dict] = []
    current = {"task": None}
    real_encode, real_evaluate_one = SentenceTransformer.encode, runner._evaluate_one

    def encode(self, inputs, *args, **kwargs):
        texts = [inputs] if isinstance(inputs, str) else list(inputs)
        calls.append(
            {
                "task": current["task"],
                "texts": texts,
                "prompt": kwargs.get("prompt"),
                "name": kwargs.get("prompt_name"),
            }
        )
        return real_encode(self, inputs, *args, **kwargs)

    def evaluate_one(model, prepared, *args):
        current["task"] = prepared.name
        try:
            return real_evaluate_one(model, prepared, *args)
        finally:
            current["task"] = None

    monkeypatch.setattr(SentenceTransformer, "encode", encode)
    monkeypatch.setattr(runner, "_evaluate_one", evaluate_one)
    return calls


def _prompts_by_input(calls: list[dict]) -> dict[str, set]:
    """``{"sts": {prompts}, "query": {...}, "document": {...}}`` seen by the encode calls of each kind of input."""
    queries = set(QUERIES.values())
    seen: dict[str, set] = {"sts": set(), "query": set(), "document": set()}
    for call in calls:
        assert call["name"] is None  # never a prompt *name*: that would look into the saved dictionary again
        if call["task"] in ("TinySTS", "ATEC"):
            kind = "sts"
        elif call["task"] == "TinyRetrieval":
            kind = "query" if set(call["texts"]) <= queries else "document"
        else:
            continue
        seen[kind].add(call["prompt"] or None)
    return seen


def test_eval_applies_saved_prompts_by_task_type_and_records_them(
    data_dir, prompted_model_path, tmp_path, encode_calls, capsys
):
    out = tmp_path / "results"
    argv = tiny_eval_argv(prompted_model_path, data_dir, out, "--tasks", "TinySTS", "TinyRetrieval")
    assert main([*argv, "--no-geometry", "--no-plot"]) == 0
    # STS sentences got "s: ", retrieval queries "q: ", documents nothing; "classification" reached nothing.
    assert _prompts_by_input(encode_calls) == {"sts": {"s: "}, "query": {"q: "}, "document": {None}}
    sts_texts = {text for call in encode_calls if call["task"] == "TinySTS" for text in call["texts"]}
    assert sts_texts == {a for a, _, _ in STS_PAIRS} | {b for _, b, _ in STS_PAIRS}

    err = capsys.readouterr().err
    line = next(line for line in err.splitlines() if line.startswith("Prompts of tiny:"))
    assert "query='q: ' on retrieval queries (TinyRetrieval)" in line
    assert "sts='s: ' on STS sentences (both) (TinySTS)" in line
    assert "ignored 'classification'" in line
    assert "not valid" not in err  # mteb never saw the raw saved dictionary

    run = json.loads((out / "run.json").read_text())
    record = run["prompts"]["tiny"]
    # sentence-transformers saves an empty "document" prompt next to the ones set: applied, and empty.
    assert record["saved"] == {**SAVED, "document": ""}
    assert record["applied"] == {"query": ["TinyRetrieval"], "document": ["TinyRetrieval"], "sts": ["TinySTS"]}
    assert record["ignored"] == ["classification"] and record["use_saved"] is True
    assert record["tasks"]["TinyRetrieval"] == {
        "query": {"prompt": "q: ", "source": "saved:query"},
        "document": {"prompt": "", "source": "saved:document"},
    }
    assert record["tasks"]["TinySTS"] == {"sentences": {"prompt": "s: ", "source": "saved:sts"}}
    assert run["config"]["saved_prompts"] is True
    # Each per-task result says what it was measured with.
    sts_result = json.loads((out / "tiny" / "TinySTS.json").read_text())["scores"]["test"][0]
    assert sts_result["prompts"] == {"sentences": {"prompt": "s: ", "source": "saved:sts"}}
    retrieval_result = json.loads((out / "tiny" / "TinyRetrieval.json").read_text())["scores"]["test"][0]
    assert retrieval_result["prompts"]["query"]["prompt"] == "q: "


def test_no_saved_prompts_applies_none_and_instructions_win(
    data_dir, prompted_model_path, tmp_path, encode_calls, capsys
):
    out = tmp_path / "off"
    argv = tiny_eval_argv(prompted_model_path, data_dir, out, "--tasks", "TinySTS", "TinyRetrieval")
    assert main([*argv, "--no-geometry", "--no-plot", "--no-saved-prompts"]) == 0
    assert _prompts_by_input(encode_calls) == {"sts": {None}, "query": {None}, "document": {None}}
    assert "not applied (--no-saved-prompts)" in capsys.readouterr().err
    run = json.loads((out / "run.json").read_text())
    assert run["prompts"]["tiny"]["use_saved"] is False and run["config"]["saved_prompts"] is False

    # --instructions (the user's explicit choice) replaces the saved "sts" prompt on ATEC; TinySTS keeps it.
    encode_calls.clear()
    out = tmp_path / "instructions"
    argv = tiny_eval_argv(prompted_model_path, data_dir, out, "--tasks", "ATEC", "TinySTS", "--instructions", "en")
    assert main([*argv, "--no-geometry", "--no-plot"]) == 0
    by_task = {call["task"]: call["prompt"] for call in encode_calls if call["task"]}
    assert by_task["TinySTS"] == "s: "
    assert by_task["ATEC"].startswith("Instruction: Represent the text in conversations")
    line = next(line for line in capsys.readouterr().err.splitlines() if line.startswith("Prompts of tiny:"))
    assert "sts replaced by --instructions en on ATEC (an explicit choice wins)" in line
    record = json.loads((out / "run.json").read_text())["prompts"]["tiny"]
    assert record["overridden"] == {"sts": ["ATEC"]} and record["applied"] == {"sts": ["TinySTS"]}
    assert record["tasks"]["ATEC"]["sentences"]["source"] == "explicit"


def test_plan_prompts_rules(data_dir):
    tasks = prepare_tasks(["TinySTS", "TinyRetrieval"], data_dir=data_dir)
    plan = plan_prompts(tasks, {"query": "q: ", "passage": "p: ", "corpus": "c: ", "sts": None, "Clustering": "x"})
    # Every input has an entry ("" included), so sentence-transformers never falls back to a saved prompt itself.
    assert plan.mteb_prompts == {"TinySTS": "", "TinyRetrieval-query": "q: ", "TinyRetrieval-document": "p: "}
    assert plan.applied == {"query": ["TinyRetrieval"], "passage": ["TinyRetrieval"]}
    assert plan.unused == {"corpus": "'passage' is used for documents"} and plan.ignored == ["Clustering"]
    assert plan.task_prompts("TinyRetrieval") == {"TinyRetrieval-query": "q: ", "TinyRetrieval-document": "p: "}
    only_sts = plan_prompts(tasks[:1], {"query": "q: ", "sts": "s: "})
    assert only_sts.unused == {"query": "no retrieval task"} and only_sts.applied == {"sts": ["TinySTS"]}
    # Explicit prompts win input by input, in mteb's lookup order (a generic "query" reaches every retrieval task).
    explicit = plan_prompts(tasks, {"query": "q: ", "document": "d: "}, overrides={"query": "Q: "})
    assert explicit.mteb_prompts["TinyRetrieval-query"] == "Q: "
    assert explicit.mteb_prompts["TinyRetrieval-document"] == "d: "
    assert explicit.overridden == {"query": ["TinyRetrieval"]}


def test_evaluate_model_applies_saved_sts_prompt_and_leaves_model_prompts_alone(data_dir, caplog):
    model = build_tiny_model(seed=0)
    model.prompts = {"sts": "s: ", "query": "q: "}
    tasks = prepare_tasks(["TinySTS", "TinyRetrieval"], data_dir=data_dir)
    with caplog.at_level(logging.WARNING):
        scores = evaluate_model(model, tasks)
        without = evaluate_model(model, tasks, saved_prompts=False)
    assert "not valid" not in caplog.text
    assert model.prompts == {"sts": "s: ", "query": "q: "}
    assert scores[0].prompts == {"sentences": {"prompt": "s: ", "source": "saved:sts"}}
    assert without[0].prompts == {"sentences": {"prompt": "", "source": "none"}}
    # The prompt changes what is encoded, so the score: it was really applied.
    assert scores[0].main_score != pytest.approx(without[0].main_score, abs=1e-9)


def test_corpus_cap_that_subsamples_warns_with_the_numbers(data_dir, caplog):
    with caplog.at_level(logging.WARNING, logger="codiemb_st.evaluation.corpus_subsample"):
        prepared = prepare_task("TinyRetrieval", data_dir=data_dir, corpus_cap=8)
    assert prepared.corpus_subsample is not None
    (record,) = [r for r in caplog.records if r.name == "codiemb_st.evaluation.corpus_subsample"]
    assert record.levelno == logging.WARNING
    message = record.getMessage()
    assert "TinyRetrieval (test)" in message and "12 -> 8 passages" in message and "all 7 judged" in message
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        prepare_task("TinyRetrieval", data_dir=data_dir, corpus_cap=12)  # fits: nothing cut, nothing said
    assert not caplog.records
