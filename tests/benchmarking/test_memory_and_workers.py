from __future__ import annotations

import sys

import pytest
import torch

from measurement.baselines import official_sts_loss_loop
from measurement.memory import read_status_kib, saved_activations_bytes
from measurement.workers import last_json_line, run_worker


def test_read_status_field_and_missing_field():
    status = "Name:\tpython\nVmHWM:\t  2048 kB\nVmRSS:\t  1024 kB\n"
    assert read_status_kib("VmHWM", status) == 2048
    assert read_status_kib("VmRSS", status) == 1024
    with pytest.raises(RuntimeError, match="VmSwap"):
        read_status_kib("VmSwap", status)


def test_saved_activations_count_non_excluded_storages():
    weight = torch.randn(64, 64, requires_grad=True)
    inputs = torch.randn(32, 64)
    saved = saved_activations_bytes(lambda: (inputs @ weight).tanh().sum().backward(), exclude=[weight])
    # matmul saves the input (32x64, 4 bytes each); tanh saves its output (32x64); the weight is excluded
    assert saved == 2 * 32 * 64 * 4


def test_worker_answer_is_its_last_json_line():
    assert last_json_line('log line\n{"peak_mib": 3.5}\n') == {"peak_mib": 3.5}
    with pytest.raises(ValueError, match="not JSON"):
        last_json_line("done\n")
    assert run_worker([sys.executable, "-c", "print('x'); print('[1, 2]')"]) == [1, 2]
    with pytest.raises(RuntimeError, match="probe failed"):
        run_worker([sys.executable, "-c", "raise SystemExit(3)"], name="probe")


def test_official_loop_matches_our_vectorised_loss():
    from codiemb_st import PearsonSpearmanLoss

    generator = torch.Generator().manual_seed(0)
    scores = torch.rand(16, generator=generator) * 2 - 1
    labels = torch.randint(0, 6, (16,), generator=generator).float()
    ours = PearsonSpearmanLoss(None).compute_loss_from_scores(scores, labels)
    assert official_sts_loss_loop(scores, labels).item() == pytest.approx(ours.item(), rel=1e-3)
