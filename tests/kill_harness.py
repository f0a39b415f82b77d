"""Kill a child process with SIGKILL at a chosen point: the fault tests' one way to stop a command mid-work.

The child (a ``python -c`` script) touches a signal file when it reaches the point to be killed at (mid-write,
mid-encode, part-way through scoring) and then stalls; the test kills it there and checks what it left behind.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]


def kill_when_signalled(command: Sequence[str], signal_file: Path, what: str, *, timeout: float = 240) -> int:
    """Run ``command`` with the checkout on ``PYTHONPATH``, SIGKILL it once ``signal_file`` exists; returns its pid.

    Args:
        command: The child's command line.
        signal_file: The file the child touches at the point it is to be killed.
        what: What the child should have reached, for the message when it never does.
        timeout: Seconds to wait for the signal file.

    Raises:
        AssertionError: If the child exits before the signal (with its output), never signals, or was not killed.
    """
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    child = subprocess.Popen(list(command), env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + timeout
        while not signal_file.exists():
            assert child.poll() is None, child.stdout.read().decode()[-3000:]
            assert time.monotonic() < deadline, f"the child never {what}"
            time.sleep(0.05)
        os.kill(child.pid, signal.SIGKILL)
    finally:
        child.kill()
        child.wait(timeout=60)
    assert child.returncode == -signal.SIGKILL
    return child.pid
