from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

# Two cores here: oversubscribing threads (torch intra-op x torchrun workers) makes tests crawl.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

sys.path.insert(0, str(Path(__file__).parent))

from bad_input_cases import env, model, pristine_merge_inputs  # noqa: E402, F401 (fixtures of the bad-input tables)
from tiny_model import build_tiny_model, save_tiny_model  # noqa: E402

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture
def tiny_model():
    """A fresh random tiny SentenceTransformer (hidden 32, 2 layers, mean pooling, no dropout)."""
    return build_tiny_model(seed=0)


@pytest.fixture
def tiny_model_with_dropout():
    return build_tiny_model(seed=0, dropout=0.1)


@pytest.fixture(scope="session")
def tiny_model_path(tmp_path_factory) -> Path:
    """A tiny model saved to disk once per session (for subprocesses and loading tests)."""
    return save_tiny_model(tmp_path_factory.mktemp("tiny_model") / "model", seed=0)


@pytest.fixture(scope="session")
def loss_rank_runs(tmp_path_factory, tiny_model_path):
    """The 2-rank (torchrun, gloo) loss checks, all in one launch per session: ``dist_jobs.job_output(runs, name)``
    gives a check's output folder once it finished on both ranks."""
    from dist_jobs import run_loss_jobs
    from tiny_decoder import save_tiny_decoder

    root = tmp_path_factory.mktemp("loss_ranks")
    return run_loss_jobs(root, tiny_model_path, save_tiny_decoder(root / "decoder", seed=3))
