"""A real 2-process DDP training run (torchrun, gloo, CPU) with RoundRobinTaskBatchSampler must not deadlock."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

WORKER = Path(__file__).with_name("ddp_train_worker.py")
REPO_ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_torchrun(args: list[str], log_path: Path, timeout: float) -> subprocess.CompletedProcess:
    """Run torchrun; on timeout stop it (and so its workers) so that a deadlock fails the test instead of hanging."""
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
    command += ["--master_addr", "127.0.0.1", "--master_port", str(free_port()), str(WORKER), *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO_ROOT), "HF_HUB_OFFLINE": "1"}
    # Output to a file, not a pipe (a worker outliving torchrun would block a pipe). SIGTERM lets torchrun stop its
    # workers, which run in sessions of their own; each worker also has a 150 s watchdog.
    with open(log_path, "w") as log:
        process = subprocess.Popen(
            command, cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
            pytest.fail(f"torchrun did not finish within {timeout} s (deadlock?):\n{log_path.read_text()[-3000:]}")
    return subprocess.CompletedProcess(command, process.returncode, log_path.read_text())


@pytest.mark.distributed
def test_two_rank_training_with_gathering_losses_finishes(tiny_model_path, tmp_path):
    result = run_torchrun(
        [str(tiny_model_path), str(tmp_path), "--sampler", "codiemb"], tmp_path / "torchrun.log", timeout=180
    )
    assert result.returncode == 0, result.stdout[-3000:]
    ranks = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in range(2)]

    # 2 epochs x (3 IR steps + 3 STS steps): IR 24 rows / (2 ranks x 4), STS 40 rows / (2 ranks x 6), tasks alternate.
    steps = [[(step["dataset"], step["batch_size"]) for step in rank["steps"]] for rank in ranks]
    assert steps[0] == steps[1] == [("ir", 4), ("sts", 6)] * 6

    losses = [[entry["loss"] for entry in rank["log_history"] if "loss" in entry] for rank in ranks]
    assert len(losses[0]) == 12 and losses[0] == losses[1]
    # The logged losses are the trainer's cross-rank mean: the local IR losses differ between ranks (each rank
    # scores its own queries against the gathered candidates), the gathered STS loss is one global value.
    local = {
        task: [[step["loss"] for step in rank["steps"] if step["dataset"] == task] for rank in ranks]
        for task in ("ir", "sts")
    }
    assert local["ir"][0] != local["ir"][1]
    assert local["sts"][0] == pytest.approx(local["sts"][1], abs=1e-6)
