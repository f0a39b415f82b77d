"""``codiemb-st eval`` checks every model and its output folder before any work, and says when a cap subsamples."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
from evaluation_fixtures import tiny_eval_argv, write_retrieval_task, write_sts_task

from codiemb_st.cli import UsageError, main
from codiemb_st.cli import eval_command as eval_cli
from codiemb_st.cli.model_source import resolve_model_folder
from codiemb_st.evaluation import runner


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("validation_tasks")
    write_sts_task(root / "TinySTS")
    write_retrieval_task(root / "TinyRetrieval")
    return root


@pytest.fixture
def no_work(monkeypatch) -> None:
    """Fail the test as soon as a model is loaded or a task evaluated."""
    monkeypatch.setattr(eval_cli, "load_model", lambda *a, **k: pytest.fail("a model was loaded"))
    monkeypatch.setattr(runner, "_evaluate_one", lambda *a, **k: pytest.fail("a task was evaluated"))


def _training_output(root: Path, model: Path, *, final: bool = True, checkpoints: tuple[int, ...] = ()) -> Path:
    """A ``codiemb-st train --output-dir`` folder: ``final/`` and/or ``checkpoint-N/`` model folders, no model on top."""
    root.mkdir(parents=True)
    if final:
        shutil.copytree(model, root / "final")
    for step in checkpoints:
        shutil.copytree(model, root / f"checkpoint-{step}")
    (root / "train_config.json").write_text("{}")
    return root


def test_training_output_folder_is_evaluated_from_its_final_model(data_dir, tiny_model_path, tmp_path, capsys):
    run = _training_output(tmp_path / "runs" / "mine", tiny_model_path, checkpoints=(5,))
    out = tmp_path / "results"
    argv = tiny_eval_argv(run, data_dir, out, "--tasks", "TinySTS", "--no-geometry", "--no-plot")
    assert main(argv) == 0
    err = capsys.readouterr().err
    assert f"note: --models {run} is a training output folder: using its final model {run / 'final'}." in err
    assert json.loads((out / "run.json").read_text())["config"]["models"] == {"tiny": str(run / "final")}


@pytest.mark.parametrize(
    ("layout", "expected"),
    [
        ("checkpoints", r"training output folder without a final/ model .*checkpoint-2, checkpoint-10\. Pass one"),
        ("empty", r"is not a model folder: it has neither modules\.json .* nor config\.json"),
        ("config-without-model-type", r"its config\.json has no model_type"),
        ("models-inside", r"it holds model folder\(s\) a, b: pass one"),
        ("broken-modules", r"modules\.json names module folder\(s\) \['1_Pooling'\] that are not there"),
    ],
)
def test_a_folder_that_is_no_model_is_refused_with_what_to_pass(layout, expected, tiny_model_path, tmp_path):
    folder = tmp_path / "candidate"
    if layout == "checkpoints":
        _training_output(folder, tiny_model_path, final=False, checkpoints=(10, 2))
    elif layout == "empty":
        folder.mkdir()
    elif layout == "config-without-model-type":
        folder.mkdir()
        (folder / "config.json").write_text("{}")
    elif layout == "models-inside":
        folder.mkdir()
        for name in ("b", "a"):
            shutil.copytree(tiny_model_path, folder / name)
    else:
        shutil.copytree(tiny_model_path, folder)
        shutil.rmtree(folder / "1_Pooling")
    with pytest.raises(UsageError, match=expected) as info:
        resolve_model_folder(str(folder), "--models")
    assert str(info.value).startswith(f"--models {folder}")
    assert "should have a model_type" not in str(info.value)


@pytest.mark.parametrize("bad", ["checkpoint-only", "hub-name-offline", "missing"])
def test_every_model_is_checked_before_any_is_evaluated(bad, data_dir, tiny_model_path, tmp_path, no_work, capsys):
    if bad == "checkpoint-only":
        third = str(_training_output(tmp_path / "runs" / "mine", tiny_model_path, final=False, checkpoints=(3,)))
    else:
        third = "nobody/no-such-model" if bad == "hub-name-offline" else str(tmp_path / "gone")
    argv = [
        "eval",
        "--models",
        f"a={tiny_model_path}",
        f"b={tiny_model_path}",
        f"c={third}",
        "--data-dir",
        str(data_dir),
        "--output-dir",
        str(tmp_path / "results"),
    ]
    assert main(argv) == 2  # no_work fails the test if the first two were loaded or evaluated
    err = capsys.readouterr().err
    assert f"error: --models {third!r}" in err or f"error: --models {third} " in err
    assert "model_type" not in err and "Traceback" not in err
    assert not (tmp_path / "results").exists()


@pytest.mark.parametrize("where", ["model", "inside-model", "data-dir", "inside-task-folder"])
def test_output_dir_on_or_inside_an_input_is_refused_before_any_model_loads(
    where, data_dir, tiny_model_path, tmp_path, no_work, capsys
):
    model = shutil.copytree(tiny_model_path, tmp_path / "model")
    tasks = shutil.copytree(data_dir, tmp_path / "tasks")
    task_folder = tasks / "TinySTS"
    out = {
        "model": model,
        "inside-model": model / "results",
        "data-dir": tasks,
        "inside-task-folder": task_folder / "results",
    }[where]
    argv = ["eval", "--models", str(model), "--data-dir", str(tasks), "--output-dir", str(out)]
    if where == "inside-task-folder":
        argv += ["--tasks", str(task_folder)]
    assert main(argv) == 2
    err = capsys.readouterr().err
    option, source = {
        "model": ("--models", model),
        "inside-model": ("--models", model),
        "data-dir": ("--data-dir", tasks),
        "inside-task-folder": ("--data-dir", tasks),  # the first input that holds it is named
    }[where]
    assert f"error: --output-dir {out} " in err and f"the {option} {source}" in err, err
    assert not (model / "results").exists() and not (task_folder / "results").exists()


def test_output_inside_a_task_folder_given_with_tasks_is_named(data_dir, tiny_model_path, tmp_path, no_work, capsys):
    task_folder = shutil.copytree(data_dir / "TinySTS", tmp_path / "TinySTS")
    out = task_folder / "results"
    argv = ["eval", "--models", str(tiny_model_path), "--tasks", str(task_folder), "--output-dir", str(out)]
    assert main(argv) == 2
    assert f"is inside the --tasks {task_folder}" in capsys.readouterr().err


def test_unknown_task_is_refused_before_models_are_checked(data_dir, tmp_path, no_work, capsys):
    argv = ["eval", "--models", str(tmp_path / "gone"), "--data-dir", str(data_dir), "--tasks", "NoSuchTask"]
    assert main([*argv, "--output-dir", str(tmp_path / "o")]) == 2
    assert "error: Could not load task 'NoSuchTask': ValueError: Unknown task 'NoSuchTask'" in capsys.readouterr().err


def test_default_corpus_cap_that_subsamples_warns_in_the_cli(data_dir, tiny_model_path, tmp_path, caplog):
    argv = tiny_eval_argv(tiny_model_path, data_dir, tmp_path / "o", "--tasks", "TinyRetrieval", "--no-geometry")
    with caplog.at_level(logging.WARNING):
        assert main([*argv, "--no-plot"]) == 0
    (message,) = [r.getMessage() for r in caplog.records if "corpus capped" in r.getMessage()]
    assert message.startswith("TinyRetrieval (test): corpus capped at 8 passages: 12 -> 8 passages kept")
    assert "all 7 judged passages kept" in message and "--corpus-cap 0" in message
