"""Fault tolerance. Training: a run resumed from a mid-epoch checkpoint ends with the uninterrupted run's weights, and a
4-rank gloo run with both gathering losses finishes (under a watchdog) with the same dataset at every step on every
rank. Merging: a merge killed with SIGKILL mid-write, or failing with ENOSPC, leaves the inputs byte-identical and
nothing at the output path (a killed merge leaves its hidden ``.partial`` folder, which the next merge removes).
Evaluation: two runs into one results folder both finish with valid files, and a truncated or corrupt stored task
result is detected, warned about and evaluated again."""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from datasets import Dataset, DatasetDict
from evaluation_fixtures import tiny_eval_argv, write_tiny_tasks
from kill_harness import kill_when_signalled
from safetensors.torch import load_file
from sentence_transformers import SentenceTransformer, SentenceTransformerTrainer, SentenceTransformerTrainingArguments
from tiny_model import save_perturbed_tiny_model, save_tiny_model

from codiemb_st import DeltaSoup, MultiPositiveCachedInfoNCELoss, PearsonSpearmanLoss, RoundRobinTaskBatchSampler
from codiemb_st.cli import main
from codiemb_st.evaluation import runner
from codiemb_st.merging import safetensors_stream

REPO_ROOT = Path(__file__).resolve().parents[1]

WORDS = "the quick brown fox jumps over lazy dog a man is playing guitar on stage woman slicing onion".split()
SAVE_STEPS = 7  # epochs are 12 steps long: checkpoint-7 lies in the middle of the first epoch


def _text(i: int, length: int) -> str:
    return " ".join(WORDS[(i * 7 + k * 3) % len(WORDS)] for k in range(length)) + f" {i}"


def _train_dataset() -> DatasetDict:
    return DatasetDict(
        {
            "ir": Dataset.from_dict(
                {
                    "anchor": [_text(i, 4) for i in range(24)],
                    "positive_1": [_text(i + 100, 10) for i in range(24)],
                    "negative_1": [_text(i + 200, 10) for i in range(24)],
                }
            ),
            "sts": Dataset.from_dict(
                {
                    "sentence1": [_text(i + 300, 6) for i in range(24)],
                    "sentence2": [_text(i + 400, 6) for i in range(24)],
                    "score": [(i % 6) / 5 for i in range(24)],
                }
            ),
        }
    )


@pytest.fixture(scope="module")
def model_with_dropout(tmp_path_factory) -> Path:
    # Dropout on, so that resuming must also restore the RNG state (GradCache replays it within a step).
    return save_tiny_model(tmp_path_factory.mktemp("resume") / "model", seed=0, dropout=0.1)


def _trainer(model_path: Path, output_dir: Path) -> SentenceTransformerTrainer:
    # Loaded from its folder, as the trainer loads a checkpoint when resuming: the reloaded BERT has a pooler (its
    # config does not record add_pooling_layer=False), so the model trained from the start must have one too.
    torch.manual_seed(0)
    model = SentenceTransformer(str(model_path), device="cpu")
    loss = {
        "ir": MultiPositiveCachedInfoNCELoss(model, num_positives=1, mini_batch_size=3),
        "sts": PearsonSpearmanLoss(model),
    }
    args = SentenceTransformerTrainingArguments(
        output_dir=str(output_dir),
        num_train_epochs=2,
        per_device_train_batch_size=4,
        learning_rate=1e-3,
        multi_dataset_batch_sampler=RoundRobinTaskBatchSampler.with_options(
            tasks={"ir": ["ir"], "sts": ["sts"]}, batch_sizes={"ir": 4, "sts": 6}
        ),
        save_strategy="steps",
        save_steps=SAVE_STEPS,
        logging_steps=100,
        report_to="none",
        use_cpu=True,
        seed=0,
        disable_tqdm=True,
    )
    return SentenceTransformerTrainer(model=model, args=args, train_dataset=_train_dataset(), loss=loss)


def _weights(trainer: SentenceTransformerTrainer) -> dict[str, torch.Tensor]:
    return {name: tensor.detach().clone() for name, tensor in trainer.model.state_dict().items()}


def test_resume_from_a_mid_epoch_checkpoint_gives_the_uninterrupted_weights(model_with_dropout, tmp_path):
    uninterrupted = _trainer(model_with_dropout, tmp_path / "a")
    initial = _weights(uninterrupted)
    uninterrupted.train()
    expected = _weights(uninterrupted)
    # 2 epochs x (6 IR steps of 4 + 6 STS steps of 6, the STS task cycling to keep up): 24 optimizer steps.
    assert uninterrupted.state.global_step == 24
    checkpoint = tmp_path / "a" / f"checkpoint-{SAVE_STEPS}"
    assert checkpoint.is_dir()

    resumed = _trainer(model_with_dropout, tmp_path / "b")
    resumed.train(resume_from_checkpoint=str(checkpoint))
    assert resumed.state.global_step == 24
    got = _weights(resumed)

    assert any(not torch.equal(initial[name], expected[name]) for name in expected)  # training changed the model
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=0, atol=1e-6, msg=name)


# ---------------------------------------------------------------------------------------------------------------------
# Merging: SIGKILL mid-write, ENOSPC


@pytest.fixture(scope="module")
def merge_inputs(tmp_path_factory) -> tuple[Path, list[Path]]:
    root = tmp_path_factory.mktemp("fault_merge")
    base = save_tiny_model(root / "base", seed=0)
    checkpoints = []
    for index in range(2):
        checkpoints.append(save_perturbed_tiny_model(root / f"ckpt{index}", perturbation_seed=index))
    return base, checkpoints


def _digest(folders: list[Path]) -> dict[str, str]:
    return {
        str(path): hashlib.sha256(path.read_bytes()).hexdigest()
        for folder in folders
        for path in sorted(folder.rglob("*"))
        if path.is_file()
    }


_KILLED_MERGE = """
import sys, time
from pathlib import Path
from codiemb_st.merging import DeltaSoup, safetensors_stream

base, ckpt0, ckpt1, out, signal_file = map(Path, sys.argv[1:])
real_write = safetensors_stream.SafetensorsStreamWriter.write

def write_then_stall(self, name, data):
    real_write(self, name, data)
    self._file.flush()
    signal_file.touch()  # the weight file is half written: kill me now
    time.sleep(600)

safetensors_stream.SafetensorsStreamWriter.write = write_then_stall
DeltaSoup().merge_to_folder([ckpt0, ckpt1], out, base_model=base, show_progress_bar=False)
"""


def test_merge_killed_mid_write_leaves_inputs_and_no_output_and_the_next_run_cleans_up(merge_inputs, tmp_path, caplog):
    base, checkpoints = merge_inputs
    before = _digest([base, *checkpoints])
    out, signal_file = tmp_path / "merged", tmp_path / "writing"
    argv = [sys.executable, "-c", _KILLED_MERGE, str(base), *map(str, checkpoints), str(out), str(signal_file)]
    child_pid = kill_when_signalled(argv, signal_file, "started writing")

    assert _digest([base, *checkpoints]) == before  # inputs byte-identical
    assert not out.exists()  # nothing complete-looking at the output path
    (partial,) = [p for p in tmp_path.iterdir() if p.name.endswith(".partial")]  # the documented work folder
    assert partial.name.startswith(f".merged.{child_pid}.")

    with caplog.at_level(logging.WARNING, logger="codiemb_st.merging.streaming_merge"):
        DeltaSoup().merge_to_folder(checkpoints, out, base_model=base, show_progress_bar=False)
    assert f"the unfinished work of a merge (process {child_pid}) that was killed" in caplog.text
    assert not partial.exists() and not [p for p in tmp_path.iterdir() if p.name.endswith(".partial")]
    reference = DeltaSoup().merge_to_folder(
        checkpoints, tmp_path / "reference", base_model=base, show_progress_bar=False
    )
    got, expected = (
        load_file(next(out.rglob("model.safetensors"))),
        load_file(next(reference.rglob("model.safetensors"))),
    )
    assert got.keys() == expected.keys() and all(torch.equal(got[k], expected[k]) for k in got)


def test_merge_running_out_of_disk_space_leaves_nothing(merge_inputs, tmp_path, monkeypatch, capsys):
    base, checkpoints = merge_inputs
    before = _digest([base, *checkpoints])
    real_write = safetensors_stream.SafetensorsStreamWriter.write
    written = {"tensors": 0}

    def write_until_the_disk_is_full(self, name, data):
        if written["tensors"] == 3:
            self._file.write(b"\0" * 16)  # a few bytes get through, then the disk is full
            raise OSError(errno.ENOSPC, "No space left on device")
        written["tensors"] += 1
        real_write(self, name, data)

    monkeypatch.setattr(safetensors_stream.SafetensorsStreamWriter, "write", write_until_the_disk_is_full)
    out = tmp_path / "deep" / "er" / "merged"
    with pytest.raises(OSError) as error:
        DeltaSoup().merge_to_folder(checkpoints, out, base_model=base, show_progress_bar=False)
    assert error.value.errno == errno.ENOSPC
    assert not (tmp_path / "deep").exists()  # no output, no work folder, not even the parents it created
    assert _digest([base, *checkpoints]) == before

    written["tensors"] = 0  # the command line says what happened in one line
    argv = ["merge", *map(str, checkpoints), "--base-model", str(base), "--output", str(out), "--no-progress"]
    assert main(argv) == 2
    assert "No space left on device" in capsys.readouterr().err
    assert not (tmp_path / "deep").exists()


# ---------------------------------------------------------------------------------------------------------------------
# Evaluation: two runs into one folder, damaged stored results


def _eval_argv(model: Path, data_dir: Path, out: Path) -> list[str]:
    return tiny_eval_argv(model, data_dir, out, "--tasks", "TinySTS", "TinyRetrieval", "--no-geometry", "--no-plot")


def test_two_evaluations_into_one_results_folder_both_finish_with_valid_files(tiny_model_path, tmp_path, monkeypatch):
    data_dir = write_tiny_tasks(tmp_path / "tasks")
    out = tmp_path / "results"
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    argv = [sys.executable, "-m", "codiemb_st", *_eval_argv(tiny_model_path, data_dir, out), "--no-resume"]
    runs = [subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE) for _ in range(2)]
    outputs = [run.communicate(timeout=400) for run in runs]
    assert [run.returncode for run in runs] == [0, 0], [err.decode()[-2000:] for _, err in outputs]
    for path in out.rglob("*.json"):
        json.loads(path.read_text(encoding="utf-8"))  # every file complete and valid
    assert not list(out.rglob("*.tmp"))
    assert set(json.loads((out / "run.json").read_text())["scores"]["tiny"]) >= {"TinySTS", "TinyRetrieval"}
    # Each stored result belongs to its key: a third run reuses both tasks instead of evaluating them again.
    evaluated: list[str] = []
    real = runner._evaluate_one
    monkeypatch.setattr(runner, "_evaluate_one", lambda m, p, *a: evaluated.append(p.name) or real(m, p, *a))
    assert main(_eval_argv(tiny_model_path, data_dir, out)) == 0
    assert evaluated == []


@pytest.mark.parametrize("damage", ["truncated-result", "corrupt-key", "result-without-scores"])
def test_damaged_stored_result_is_detected_warned_and_redone(damage, tiny_model_path, tmp_path, monkeypatch, caplog):
    data_dir = write_tiny_tasks(tmp_path / "tasks")
    out = tmp_path / "results"
    argv = _eval_argv(tiny_model_path, data_dir, out)
    assert main(argv) == 0
    result_path, key_path = out / "tiny" / "TinySTS.json", out / "tiny" / "TinySTS.key.json"
    good = json.loads(result_path.read_text())
    if damage == "truncated-result":
        text = result_path.read_text()
        result_path.write_text(text[: len(text) // 2])
    elif damage == "corrupt-key":
        key_path.write_bytes(b"\x00\x01not json")
    else:
        result_path.write_text(json.dumps({**good, "scores": {}}))
    evaluated: list[str] = []
    real = runner._evaluate_one
    monkeypatch.setattr(runner, "_evaluate_one", lambda m, p, *a: evaluated.append(p.name) or real(m, p, *a))
    with caplog.at_level(logging.WARNING, logger="codiemb_st.evaluation.runner"):
        assert main(argv) == 0
    assert evaluated == ["TinySTS"]  # only the damaged task is evaluated again
    assert "TinySTS" in caplog.text and "evaluating again" in caplog.text
    assert json.loads(result_path.read_text())["scores"] == good["scores"]


# ---------------------------------------------------------------------------------------------------------------------
# Mining: killed mid-write, out of disk space

# Mines with the tiny model, but the output's write stalls half-way (after touching a signal file) to be killed there.
_KILLED_MINE = """
import sys, time
from pathlib import Path
source, corpus, model, out, signal_file = sys.argv[1:6]
real_write_text = Path.write_text
def write_half_then_stall(self, text, *args, **kwargs):
    real_write_text(self, text[: len(text) // 2], *args, **kwargs)
    Path(signal_file).touch()
    time.sleep(600)
Path.write_text = write_half_then_stall
from codiemb_st.cli import main
main(["mine", source, "--corpus", corpus, "--model", model, "--output", out, "--num-negatives", "2", "--no-margin"])
"""


@pytest.fixture
def mine_inputs(tmp_path, tiny_model_path) -> list[str]:
    from tiny_model import ENGLISH_SENTENCES

    source = tmp_path / "pairs.jsonl"
    rows = [{"query": q, "positives": [ENGLISH_SENTENCES[(i + 1) % 10]]} for i, q in enumerate(ENGLISH_SENTENCES)]
    source.write_text("".join(json.dumps(row) + "\n" for row in rows))
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("".join(f"{_text(i, 6)}\n" for i in range(40)))
    return [
        str(source),
        "--corpus",
        str(corpus),
        "--model",
        str(tiny_model_path),
        "--num-negatives",
        "2",
        "--no-margin",
    ]


def test_mine_killed_mid_write_leaves_no_output_and_a_rerun_completes(mine_inputs, tmp_path, capsys):
    out, signal_file = tmp_path / "mined" / "pairs_mined.jsonl", tmp_path / "writing"
    source, corpus, model = mine_inputs[0], mine_inputs[2], mine_inputs[4]
    argv = [sys.executable, "-c", _KILLED_MINE, source, corpus, model, str(out), str(signal_file)]
    child_pid = kill_when_signalled(argv, signal_file, "started writing")
    assert not out.exists()  # the half-written file is the hidden temporary, never the output
    (stale,) = list(out.parent.glob(".pairs_mined.jsonl.*.tmp"))
    assert stale.name.startswith(f".pairs_mined.jsonl.{child_pid}.")

    assert main(["mine", *mine_inputs, "--output", str(out)]) == 0  # the rerun completes and removes the leftover
    assert not stale.exists() and [p.name for p in out.parent.iterdir()] == ["pairs_mined.jsonl"]
    reference = tmp_path / "reference.jsonl"
    assert main(["mine", *mine_inputs, "--output", str(reference)]) == 0
    assert out.read_text() == reference.read_text() and len(out.read_text().splitlines()) == 10


def test_mine_running_out_of_disk_space_leaves_nothing(mine_inputs, tmp_path, monkeypatch, capsys):
    real_write_text = Path.write_text

    def write_until_the_disk_is_full(self, text, *args, **kwargs):
        real_write_text(self, text[:10], *args, **kwargs)  # a few bytes get through, then the disk is full
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Path, "write_text", write_until_the_disk_is_full)
    out = tmp_path / "deep" / "er" / "mined.jsonl"
    assert main(["mine", *mine_inputs, "--output", str(out)]) == 2
    assert f"Could not write --output {out}: No space left on device; nothing was written" in capsys.readouterr().err
    assert not (tmp_path / "deep").exists()  # no output, no temporary, not even the folders made for it
