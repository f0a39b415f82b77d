"""torchrun worker for test_fsdp: both losses on a decoder sharded with FSDP2 (``fully_shard``), gloo on CPU.

Every rank first computes the unsharded single-process reference on the full global batch (a deep copy of the model,
before sharding), then shards the model (each decoder layer, then the root), takes its slice of the batch and runs
the loss with ``gather_across_devices=True``. It saves the reference, its local loss and the full (unsharded)
gradients, ``DTensor.full_tensor()`` of FSDP2's reduce-scattered gradient shards, to OUT_DIR/rank{r}.pt.
Usage: fsdp_loss_worker.py MODEL_PATH OUT_DIR
"""

from __future__ import annotations

import copy
import faulthandler
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from loss_testing import make_ir_columns
from sentence_transformers import SentenceTransformer
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

from codiemb_st import MultiPositiveCachedInfoNCELoss, PearsonSpearmanLoss

BATCH = 8  # global batch; 4 rows per rank


def ir_loss(model, gather: bool):
    return MultiPositiveCachedInfoNCELoss(
        model, num_positives=2, temperature=0.05, mini_batch_size=3, gather_across_devices=gather
    )


def tokenize(model, columns: list[list[str]]) -> list[dict[str, torch.Tensor]]:
    return [model.tokenize(column) for column in columns]


def rows(features: list[dict[str, torch.Tensor]], local: slice) -> list[dict[str, torch.Tensor]]:
    """This rank's rows of the globally tokenized batch. Slicing one tokenization keeps every text's left padding,
    hence its position ids: Qwen2 numbers positions from the padded start, and RoPE's cos/sin are computed in
    float32, so a batch padded differently gives embeddings that differ at ~1e-7 even in float64."""
    return [
        {key: value[local] if isinstance(value, torch.Tensor) else value for key, value in feature.items()}
        for feature in features
    ]


def run(model, loss_fn, features, labels=None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad()
    # Fresh dicts: the modules write their outputs (token_embeddings, ...) into the feature dicts, and features that
    # still hold the outputs of an earlier, already back-propagated forward pass break the next backward pass.
    loss = loss_fn([dict(feature) for feature in features], labels)
    loss.backward()
    grads = {}
    for name, param in model.named_parameters():
        if param.grad is not None:
            grad = param.grad
            grads[name] = grad.full_tensor() if hasattr(grad, "full_tensor") else grad.clone()
    return loss.detach(), grads


def main(model_path: str, out_dir: str) -> None:
    out_dir = Path(out_dir)
    dist.init_process_group("gloo")
    rank, world_size = dist.get_rank(), dist.get_world_size()
    mesh = init_device_mesh("cpu", (world_size,))

    model = SentenceTransformer(model_path, device="cpu").double()  # float64: equal up to rounding
    ir_features = tokenize(model, make_ir_columns(batch_size=BATCH, num_positives=2, num_negatives=1, seed=21))
    sts_features = tokenize(model, make_ir_columns(batch_size=BATCH, num_positives=1, num_negatives=0, seed=22))
    sts_labels = torch.tensor([0.5, 4.0, 2.5, 1.0, 3.5, 0.0, 5.0, 2.0], dtype=torch.float64)

    reference = copy.deepcopy(model)
    results = {
        "reference_ir": run(reference, ir_loss(reference, gather=False), ir_features),
        "reference_sts": run(reference, PearsonSpearmanLoss(reference), sts_features, sts_labels),
    }

    for layer in model[0].model.layers:  # the usual FSDP wrapping of a decoder: every block, then the root
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    assert type(model.named_parameters().__next__()[1]).__name__ == "DTensor"

    local = slice(rank * BATCH // world_size, (rank + 1) * BATCH // world_size)
    ir_fn = ir_loss(model, gather=True)
    results["sharded_ir"] = run(model, ir_fn, rows(ir_features, local))
    # A second step on the same shards: FSDP2's state must survive GradCache's backward-time replays.
    results["sharded_ir_again"] = run(model, ir_fn, rows(ir_features, local))
    sts_fn = PearsonSpearmanLoss(model, gather_across_devices=True)
    results["sharded_sts"] = run(model, sts_fn, rows(sts_features, local), sts_labels[local])
    torch.save(results, out_dir / f"rank{rank}.pt")
    dist.destroy_process_group()


if __name__ == "__main__":
    faulthandler.dump_traceback_later(150, exit=True)  # a hang fails with tracebacks instead of blocking the test
    main(*sys.argv[1:3])
