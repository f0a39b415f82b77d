from __future__ import annotations

import json
from pathlib import Path

import pytest
from evaluation_fixtures import reference_ndcg_at_10, reference_sts_spearman, write_tiny_tasks
from torchrun_harness import run_torchrun

TESTS = Path(__file__).resolve().parents[1]  # the workers stay in tests/


@pytest.mark.distributed
def test_two_rank_evaluation_standalone_and_inside_ddp_training(tiny_model_path, tmp_path):
    from sentence_transformers import SentenceTransformer

    data_dir = write_tiny_tasks(tmp_path / "data")
    out = tmp_path / "out"
    out.mkdir()
    result = run_torchrun(
        TESTS / "evaluation_ddp_worker.py", [tiny_model_path, data_dir, out], tmp_path / "torchrun.log", timeout=240
    )
    output = result.stdout
    assert result.returncode == 0, output[-4000:]
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
