"""Run a 2-process torchrun (gloo, CPU) worker from a test; a deadlock fails the test instead of hanging it."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

TESTS_DIR = Path(__file__).resolve().parent
REPO_ROOT = TESTS_DIR.parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_torchrun(
    worker: Path, args: list[str], log_path: Path, timeout: float = 180, nproc: int = 2
) -> subprocess.CompletedProcess:
    """Run ``torchrun --nproc_per_node nproc worker *args`` and return its exit code and combined output.

    Output goes to ``log_path``, not a pipe (a worker outliving torchrun would block a pipe). On timeout, SIGTERM
    lets torchrun stop its workers (they run in sessions of their own, out of reach of killpg), then SIGKILL, and the
    test fails with the log's tail. Workers should also have a watchdog of their own.
    """
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc)]
    command += ["--master_addr", "127.0.0.1", "--master_port", str(free_port()), str(worker), *map(str, args)]
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "HF_HUB_OFFLINE": "1",
        "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), str(TESTS_DIR)]),
    }
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
            pytest.fail(f"torchrun did not finish within {timeout} s (deadlock?):\n{log_path.read_text()[-4000:]}")
    return subprocess.CompletedProcess(command, process.returncode, log_path.read_text())
