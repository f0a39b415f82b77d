"""FSDP2 (``torch.distributed.fsdp.fully_shard``) with both losses: 2 gloo CPU ranks, loss and gradients of the
sharded run equal the unsharded single-process run on the global batch."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from dist_jobs import job_output

WORKER = Path(__file__).parents[1] / "fsdp_loss_worker.py"


@pytest.mark.distributed
def test_fsdp2_sharded_losses_equal_the_unsharded_run(loss_rank_runs):
    # fsdp_loss_worker.py on a tiny decoder (save_tiny_decoder(seed=3)), in the session's 2-rank launch.
    ranks = [torch.load(job_output(loss_rank_runs, "fsdp") / f"rank{rank}.pt") for rank in range(2)]
    for task in ("ir", "sts"):
        reference_loss, reference_grads = ranks[0][f"reference_{task}"]
        # The global loss is the mean of the ranks' local losses (each scores its rows against the gathered batch).
        sharded_loss = sum(rank[f"sharded_{task}"][0] for rank in ranks) / 2
        torch.testing.assert_close(sharded_loss, reference_loss, atol=1e-9, rtol=1e-9)
        for rank in ranks:
            grads = rank[f"sharded_{task}"][1]
            assert grads.keys() == reference_grads.keys() and len(grads) > 10
            for name, expected in reference_grads.items():
                # FSDP2 averages the ranks' gradients in its reduce-scatter, as DDP does.
                torch.testing.assert_close(
                    grads[name], expected, atol=1e-9, rtol=1e-7, msg=lambda m, n=name: f"{n}: {m}"
                )
    for rank in ranks:  # a second step on the same batch gives the same gradients
        for name, grad in rank["sharded_ir"][1].items():
            torch.testing.assert_close(rank["sharded_ir_again"][1][name], grad, atol=1e-12, rtol=0)
