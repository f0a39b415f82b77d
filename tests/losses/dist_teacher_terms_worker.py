"""torchrun worker for test_teacher_terms (issue 30): every rank takes its half of a global batch, with its teacher
scores, and runs the IR loss with directions, hardness, distillation and a guide while gathering across ranks."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from dist_jobs import teacher_terms_loss
from sentence_transformers import SentenceTransformer


def main(model_path: str, batch_file: str, out_dir: str) -> None:
    out_dir = Path(out_dir)
    dist.init_process_group("gloo")
    rank, world_size = dist.get_rank(), dist.get_world_size()
    batch = json.loads(Path(batch_file).read_text())
    local_size = len(batch["columns"][0]) // world_size
    rows = slice(rank * local_size, (rank + 1) * local_size)
    local = [column[rows] for column in batch["columns"]]
    labels = torch.tensor(batch["labels"], dtype=torch.float64)[rows]

    model = SentenceTransformer(model_path, device="cpu").double()  # float64, like the single-process reference
    results = []
    for config in batch["configs"]:
        loss_fn = teacher_terms_loss(model, model_path, config, gather_across_devices=True)
        model.zero_grad()
        loss = loss_fn([model.tokenize(column) for column in local], labels)
        loss.backward()
        grads = {}
        for name, param in model.named_parameters():
            if param.grad is not None:  # what DDP does: average the gradients over ranks
                dist.all_reduce(param.grad)
                grads[name] = param.grad / world_size
        results.append({"loss": loss.detach(), "grads": grads})
    torch.save(results, out_dir / f"rank{rank}.pt")
    dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:4])
