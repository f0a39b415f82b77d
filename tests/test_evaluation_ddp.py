from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from evaluation_fixtures import reference_ndcg_at_10, reference_sts_spearman, write_tiny_tasks

TESTS = Path(__file__).resolve().parent


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.distributed
def test_two_rank_evaluation_standalone_and_inside_ddp_training(tiny_model_path, tmp_path):
    from sentence_transformers import SentenceTransformer

    data_dir = write_tiny_tasks(tmp_path / "data")
    out = tmp_path / "out"
    out.mkdir()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(TESTS.parent), str(TESTS)])}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
    command += ["--master_addr", "127.0.0.1", "--master_port", str(_free_port())]
    command += [str(TESTS / "evaluation_ddp_worker.py"), str(tiny_model_path), str(data_dir), str(out)]
    # A deadlock (e.g. an unmatched collective) must fail the test, not hang it; kill the workers with the launcher.
    process = subprocess.Popen(
        command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )
    try:
        output, _ = process.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        output, _ = process.communicate()
        pytest.fail(f"torchrun timed out:\n{output[-4000:]}")
    assert process.returncode == 0, output[-4000:]
    ranks = [json.loads((out / f"rank{rank}.json").read_text()) for rank in (0, 1)]

    model = SentenceTransformer(str(tiny_model_path), device="cpu")
    expected = {
        "mteb_TinySTS_cosine_spearman": reference_sts_spearman(model),
        "mteb_TinyRetrieval_ndcg_at_10": reference_ndcg_at_10(model),
    }
    for record in ranks:
        # Standalone on every rank: rank 0 computes, every rank receives the same, correct metrics.
        assert {key: record["standalone"][key] for key in expected} == pytest.approx(expected, abs=1e-5)
        assert record["standalone"] == ranks[0]["standalone"]
        # The trainer's evaluation (rank 0, encode sharded over both ranks) equals a fresh one on the final weights.
        for key, value in record["final"].items():
            assert record["trainer"][f"eval_{key}"] == pytest.approx(value, abs=1e-5)
    assert ranks[0]["error"] == "ValueError: boom on rank 0"
    assert ranks[1]["error"].startswith("RuntimeError: MTEBEvaluator failed on rank 0") and "boom" in ranks[1]["error"]
