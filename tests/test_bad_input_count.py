"""The bad-input tables of every area together: at least sixty cases, none hiding another (same id).

Each area's cases live beside its tests (tests/losses/test_loss_bad_inputs.py, ...); this test loads those modules
by path to count them.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

TESTS = Path(__file__).resolve().parent
AREA_FILES = {
    "losses": TESTS / "losses" / "test_loss_bad_inputs.py",
    "sampler": TESTS / "test_sampling_bad_inputs.py",
    "records": TESTS / "test_data_bad_inputs.py",
    "merging": TESTS / "merging" / "test_merging_bad_inputs.py",
    "evaluation": TESTS / "evaluation" / "test_evaluation_bad_inputs.py",
    "cli": TESTS / "cli" / "test_cli_bad_inputs.py",
}


def _load(area: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"_bad_input_count_{area}", AREA_FILES[area])
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_at_least_sixty_bad_inputs():
    modules = {area: _load(area) for area in AREA_FILES}
    tables = {
        "losses": modules["losses"].LOSS_CASES,
        "sampler": modules["sampler"].SAMPLER_CASES,
        "records": modules["records"].RECORD_CASES,
        "merging": modules["merging"].MERGE_ARGUMENT_CASES,
        "evaluation": modules["evaluation"].EVALUATION_CASES,
    }
    counts = {area: len(cases) for area, cases in tables.items()}
    counts["merging"] += len(modules["merging"].MERGE_CASES)
    counts["cli"] = len(modules["cli"].CLI_CASE_IDS) + 1
    counts["losses"] += len(modules["losses"].FALLBACK_CASES)
    assert all(counts.values()) and sum(counts.values()) >= 60, counts
    table = [case for cases in tables.values() for case in cases]
    assert len({case.id for case in table}) == len(table)  # no case hides another
