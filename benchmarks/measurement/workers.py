"""One measurement in a fresh process: a script re-runs itself with a JSON config and prints a JSON answer last.

Example:
    ::

        from measurement.workers import run_worker

        result = run_worker([sys.executable, __file__, "--worker", json.dumps(config)], name="memory")
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Mapping, Sequence
from typing import Any


def last_json_line(stdout: str) -> Any:
    """The JSON value on the last non-empty line of a worker's output.

    Raises:
        ValueError: if the output is empty or its last line is not JSON.
    """
    lines = stdout.strip().splitlines()
    if not lines:
        raise ValueError("the worker printed nothing; it must print its JSON answer on the last line")
    try:
        return json.loads(lines[-1])
    except json.JSONDecodeError as error:
        raise ValueError(f"the worker's last line is not JSON: {lines[-1][:200]!r}") from error


def run_worker(command: Sequence[str], name: str = "worker", env: Mapping[str, str] | None = None) -> Any:
    """Run ``command`` in a fresh process and return the JSON it printed last.

    Raises:
        RuntimeError: naming ``name`` with the end of the worker's stderr if it exits non-zero.
    """
    result = subprocess.run(list(command), capture_output=True, text=True, check=False, env=env)
    if result.returncode != 0:
        raise RuntimeError(f"{name} failed:\n{result.stderr[-3000:]}")
    return last_json_line(result.stdout)
