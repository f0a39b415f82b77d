"""Bad command lines: exit code 2 and a message naming the culprit, no traceback.

Part of the bad-input tables (shared pieces: tests/bad_input_cases.py; the count: tests/test_bad_input_count.py).
"""

from __future__ import annotations

import re
from typing import Any

import pytest
from bad_input_cases import (
    GOOD_PAIR,
    IR_RECORD,
    STS_RECORD,
    Case,
    Env,
    _corrupt,
    _sts_folder,
    _task_json,
    _write,
    run_case,
)

from codiemb_st.cli import main


def _cli(env: Env, argv: list[str], capsys) -> str:
    code = main(argv)
    err = capsys.readouterr().err
    if code != 2:
        raise AssertionError(f"exit code {code}, expected 2; stderr: {err}")
    raise UsageErrorSeen(err)


class UsageErrorSeen(Exception):
    """Carries the command line's stderr into the common Case check."""


def _cli_cases(capsys) -> list[Case]:
    def merge_broken_modules(e: Env) -> Any:
        inputs = _corrupt(e, "ckpt1", "modules.json", "[{")
        return _cli(
            e,
            [
                "merge",
                str(inputs["ckpt0"]),
                str(inputs["ckpt1"]),
                "--base-model",
                str(inputs["base"]),
                "--output",
                str(e.tmp / "nested" / "out"),
                "--no-progress",
            ],
            capsys,
        )

    def train(e: Env, *extra: str) -> Any:
        return _cli(e, ["train", "--output-dir", str(e.tmp / "run"), "--max-steps", "1", *extra], capsys)

    def sts_file(e: Env) -> str:
        return str(_write(e.tmp / "sts.jsonl", [{**STS_RECORD, "score": float(i)} for i in range(8)]))

    return [
        Case(
            "eval-unknown-task",
            lambda e: _cli(
                e,
                [
                    "eval",
                    "--models",
                    f"m={e.tmp}",
                    "--data-dir",
                    str(_sts_folder(e, [GOOD_PAIR]).parent),
                    "--tasks",
                    "NoSuchTask",
                    "--output-dir",
                    str(e.tmp / "out"),
                ],
                capsys,
            ),
            UsageErrorSeen,
            r"error: Could not load task 'NoSuchTask': ValueError: Unknown task 'NoSuchTask': .*\(BadSTS\)",
        ),
        Case(
            "eval-data-dir-missing",
            lambda e: _cli(
                e,
                [
                    "eval",
                    "--models",
                    f"m={e.tmp}",
                    "--data-dir",
                    str(e.tmp / "nope"),
                    "--output-dir",
                    str(e.tmp / "o"),
                ],
                capsys,
            ),
            UsageErrorSeen,
            r"error: --data-dir .*nope does not exist",
        ),
        Case(
            "eval-bad-task-json",
            lambda e: _cli(
                e,
                [
                    "eval",
                    "--models",
                    f"m={e.tmp}",
                    "--data-dir",
                    str(_task_json(e, "{").parent),
                    "--output-dir",
                    str(e.tmp / "o"),
                ],
                capsys,
            ),
            UsageErrorSeen,
            r"error: Bad local evaluation data: .*BadSTS/task\.json is not valid JSON",
        ),
        Case(
            "merge-broken-modules-json",
            merge_broken_modules,
            UsageErrorSeen,
            r"error: checkpoints\[1\]: .*modules\.json is not valid JSON",
        ),
        Case(
            "merge-missing-checkpoint",
            lambda e: _cli(
                e, ["merge", str(e.tmp / "gone"), "--method", "model_soup", "--output", str(e.tmp / "o")], capsys
            ),
            UsageErrorSeen,
            r"error: .*gone is not a model folder",
        ),
        Case(
            "merge-foreign-option",
            lambda e: _cli(
                e,
                ["merge", str(e.tmp), "--method", "model_soup", "--power", "2", "--output", str(e.tmp / "o")],
                capsys,
            ),
            UsageErrorSeen,
            "error: --method model_soup does not take --power",
        ),
        Case(
            "train-missing-file",
            lambda e: train(e, "--sts", str(e.tmp / "missing.jsonl")),
            UsageErrorSeen,
            r"error: Training file .*missing\.jsonl not found",
        ),
        Case(
            "train-gz-not-gzip",
            lambda e: train(e, "--ir", str(_write(e.tmp / "ir.jsonl.gz", [IR_RECORD]))),
            UsageErrorSeen,
            r"error: .*ir\.jsonl\.gz: the file name ends in \.gz but the file is not gzip",
        ),
        Case(
            "train-bad-score",
            lambda e: train(e, "--sts", str(_write(e.tmp / "s.jsonl", [{**STS_RECORD, "score": "x"}]))),
            UsageErrorSeen,
            r"error: .*s\.jsonl:1: `score` must be a finite number",
        ),
        Case(
            "train-model-missing",
            lambda e: train(e, "--sts", sts_file(e), "--model", str(e.tmp / "no-model")),
            UsageErrorSeen,
            r"error: --model '.*no-model': no such model folder",
        ),
    ]


CLI_CASE_IDS = [
    "eval-unknown-task",
    "eval-data-dir-missing",
    "eval-bad-task-json",
    "merge-broken-modules-json",
    "merge-missing-checkpoint",
    "merge-foreign-option",
    "train-missing-file",
    "train-gz-not-gzip",
    "train-bad-score",
    "train-model-missing",
]


@pytest.mark.parametrize("case_id", CLI_CASE_IDS)
def test_cli_bad_inputs_exit_2_naming_the_culprit(case_id, env, capsys):
    case = next(case for case in _cli_cases(capsys) if case.id == case_id)
    run_case(case, env)
    assert not (env.tmp / "nested").exists()


def test_cli_bad_eval_task_in_train_exits_2(env, capsys, tiny_model_path):
    sts = _write(env.tmp / "sts.jsonl", [{**STS_RECORD, "score": float(i)} for i in range(8)])
    argv = [
        "train",
        "--output-dir",
        str(env.tmp.parent / f"{env.tmp.name}-run"),  # not inside the evaluation data folder (env.tmp)
        "--model",
        str(tiny_model_path),
        "--sts",
        str(sts),
        "--eval",
        "NoSuchTask",
        "--eval-data-dir",
        str(_sts_folder(env, [GOOD_PAIR]).parent),
    ]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert re.search(r"error: --eval: Unknown task 'NoSuchTask': .*\(BadSTS\)", err), err


@pytest.mark.parametrize("where", ["file", "under-a-file"])
def test_eval_output_dir_that_is_a_file_is_refused_before_any_work(where, env, capsys, monkeypatch):
    from codiemb_st.cli import eval_command

    monkeypatch.setattr(eval_command, "resolve_models", lambda specs: pytest.fail("a model was resolved"))
    target = env.tmp / "results.txt"
    target.write_text("not a folder")
    out = target if where == "file" else target / "sub"
    assert main(["eval", "--models", str(env.tmp), "--output-dir", str(out)]) == 2
    assert re.search(r"error: --output-dir .*results\.txt is a file, not a folder", capsys.readouterr().err)
    assert target.read_text() == "not a folder"
