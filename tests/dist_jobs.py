"""The 2-rank loss equivalence checks, run in one torchrun launch per test session (see dist_jobs_worker.py).

Each check's inputs are built here, so that the test comparing a check's output with its single-process reference
builds the same ones. ``run_loss_jobs`` is used by the session fixture ``loss_rank_runs`` (tests/conftest.py).
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from loss_testing import make_ir_columns, random_texts
from torchrun_harness import TESTS_DIR, run_torchrun


def infonce_batch() -> list[list[str]]:
    """8 rows: a query, 2 positives, 2 negatives; one passage shared by queries on different ranks."""
    columns = make_ir_columns(batch_size=8, num_positives=2, num_negatives=2, seed=17)
    columns[2][1] = columns[1][6]  # masking must see a duplicate that lives on the other rank
    return columns


def mixed_length_batch() -> list[list[str]]:
    """8 rows x 4 columns: rows 0-3 (rank 0) short texts, rows 4-7 (rank 1) four times as long."""
    short = random_texts(8 * 4 * 4, seed=41, length=3)
    columns = []
    for c in range(4):
        texts = short[c * 32 : c * 32 + 4]
        texts += [" ".join(short[c * 32 + 4 + 4 * r : c * 32 + 8 + 4 * r]) for r in range(4)]
        columns.append(texts)
    return columns


def gradcache_batches() -> dict:
    """The GradCache path checks' batches: path agreement (mixed), uneven lengths, two DDP micro-steps."""
    return {
        "mixed": mixed_length_batch(),
        "uneven": make_ir_columns(batch_size=8, num_positives=2, num_negatives=1, seed=44),
        "ddp": {
            "A": make_ir_columns(batch_size=8, num_positives=2, num_negatives=1, seed=42),
            "B": make_ir_columns(batch_size=8, num_positives=2, num_negatives=1, seed=43),
        },
    }


def teacher_terms_batch() -> dict:
    """The teacher-terms check (issue 30): 8 rows x (query, 2 positives, 2 negatives), one passage shared across the
    ranks, teacher scores per candidate, and the loss options of each configuration (``guide``: the model's own
    weights as guide, with a shorter max_seq_length so that the re-tokenizing path runs)."""
    columns = make_ir_columns(batch_size=8, num_positives=2, num_negatives=2, seed=18)
    columns[3][1] = columns[1][6]
    labels = [[float((3 * row + 7 * column) % 11) - 3.0 for column in range(4)] for row in range(8)]
    configs = [
        {
            "num_positives": 2,
            "mini_batch_size": 3,
            "directions": ["query_to_doc", "query_to_query", "doc_to_query", "doc_to_doc"],
            "hardness_mode": "in_batch_negatives",
            "hardness_strength": 9.0,
            "distillation_weight": 0.5,
            "student_temperature": 0.05,
            "guide": True,
            "margin": 0.01,
        },
        {
            "num_positives": 2,
            "mini_batch_size": 50,
            "directions": ["query_to_doc", "doc_to_query"],
            "partition_mode": "per_direction",
            "hardness_mode": "all_negatives",
            "hardness_strength": 5.0,
            "guide": True,
            "margin_strategy": "relative",
            "margin": 0.05,
        },
    ]
    return {"columns": columns, "labels": labels, "configs": configs}


def teacher_terms_loss(model, model_path: str, config: dict, **kwargs):
    """The IR loss of one ``teacher_terms_batch`` configuration (the worker and the test build it alike)."""
    from sentence_transformers import SentenceTransformer

    from codiemb_st import MultiPositiveCachedInfoNCELoss

    options = {**config, **kwargs}
    if "directions" in options:
        options["directions"] = tuple(options["directions"])
    if options.pop("guide", False):
        guide = SentenceTransformer(model_path, device="cpu").double()
        guide.max_seq_length = 32  # shorter than the model's: the guide re-tokenizes the decoded texts
        options["guide"] = guide
    return MultiPositiveCachedInfoNCELoss(model, **options)


#: Check name -> worker module, in the order they run.
WORKERS = {
    "infonce": "dist_infonce_worker",
    "pearson_spearman": "dist_pearson_spearman_worker",
    "fsdp": "fsdp_loss_worker",
    "teacher_terms": "losses.dist_teacher_terms_worker",
    "gradcache": "dist_gradcache_paths_worker",
}


def run_loss_jobs(
    root: Path, model_path: Path, decoder_path: Path
) -> tuple[dict[str, Path], subprocess.CompletedProcess]:
    """Run the checks in one launch; returns each check's output folder (rank{r}.pt / .json) and the launch."""
    folders = {name: root / name for name in WORKERS}
    for folder in folders.values():
        folder.mkdir(parents=True, exist_ok=True)
    (root / "infonce.json").write_text(json.dumps(infonce_batch()))
    (root / "gradcache.json").write_text(json.dumps(gradcache_batches()))
    (root / "teacher_terms.json").write_text(json.dumps(teacher_terms_batch()))
    model, decoder = str(model_path), str(decoder_path)
    args = {  # in WORKERS' order: the GradCache worker last, as it lowers a module constant for the process
        "infonce": [model, str(root / "infonce.json"), str(folders["infonce"])],
        "pearson_spearman": [model, str(folders["pearson_spearman"])],
        "fsdp": [decoder, str(folders["fsdp"])],
        "teacher_terms": [model, str(root / "teacher_terms.json"), str(folders["teacher_terms"])],
        "gradcache": [model, str(root / "gradcache.json"), str(folders["gradcache"])],
    }
    jobs = [{"module": WORKERS[name], "args": args[name]} for name in WORKERS]
    (root / "jobs.json").write_text(json.dumps(jobs))
    result = run_torchrun(TESTS_DIR / "dist_jobs_worker.py", [root / "jobs.json"], root / "torchrun.log", timeout=480)
    return folders, result


def job_output(runs: tuple[dict[str, Path], subprocess.CompletedProcess], name: str) -> Path:
    """The output folder of one check of the session's launch, after asserting it ran to the end on both ranks."""
    folders, launch = runs
    for rank in range(2):
        assert f"job {WORKERS[name]} rank {rank}: exit 0" in launch.stdout, launch.stdout[-6000:]
    return folders[name]
