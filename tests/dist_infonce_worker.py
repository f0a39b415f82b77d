"""torchrun worker for test_multi_positive_infonce: rank r takes its half of a global batch, gathers, saves."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from sentence_transformers import SentenceTransformer

from codiemb_st import MultiPositiveCachedInfoNCELoss


def main(model_path: str, batch_file: str, out_dir: str) -> None:
    batch_file, out_dir = Path(batch_file), Path(out_dir)
    dist.init_process_group("gloo")
    rank, world_size = dist.get_rank(), dist.get_world_size()
    columns = json.loads(batch_file.read_text())
    local_size = len(columns[0]) // world_size
    local = [column[rank * local_size : (rank + 1) * local_size] for column in columns]

    model = SentenceTransformer(model_path, device="cpu").double()  # float64, like the single-process reference
    loss_fn = MultiPositiveCachedInfoNCELoss(model, num_positives=2, mini_batch_size=3, gather_across_devices=True)
    loss = loss_fn([model.tokenize(column) for column in local], None)
    loss.backward()
    grads = {}
    for name, param in model.named_parameters():
        if param.grad is not None:  # what DDP does: average the gradients over ranks
            dist.all_reduce(param.grad)
            grads[name] = param.grad / world_size

    # Ranks disagreeing on the batch size must all get the same clear error (and not hang in all_gather).
    uneven = [column[: local_size - rank] for column in local]
    try:
        loss_fn([model.tokenize(column) for column in uneven], None)
        mismatch_error = ""
    except ValueError as error:
        mismatch_error = str(error)
    torch.save({"loss": loss.detach(), "grads": grads, "mismatch_error": mismatch_error}, out_dir / f"rank{rank}.pt")
    dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:4])
