"""torchrun worker for test_gradcache_paths: the single-pass / kept-graph paths across 2 gloo ranks.

Usage: torchrun --nproc_per_node 2 tests/dist_gradcache_paths_worker.py MODEL_PATH BATCH_FILE OUTPUT_DIR

1. Path agreement (gathering, manual gradient averaging): rank 0 holds short texts, rank 1 long ones, and the token
   budget is set so that rank 0's local batch fits in one mini-batch per column and rank 1's does not. Every rank
   records how many mini-batches it embedded without gradients (0 = single pass). A third batch of uneven lengths
   (both ranks fit) is embedded in length-sorted chunks in the single pass: more forward calls than columns.
2. Real DDP (gathering, both find_unused_parameters settings): one no_sync micro-step then one synchronised
   micro-step, each back-propagating loss / 2, for the plain passes, kept graphs and the single pass. A counting comm
   hook records how many bucket all-reduces ran during each micro-step.
Writes OUTPUT_DIR/rank{r}.pt per rank.
"""

from __future__ import annotations

import copy
import faulthandler
import json
import os
import sys
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from sentence_transformers import SentenceTransformer
from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
from torch.nn.parallel import DistributedDataParallel

from codiemb_st import MultiPositiveCachedInfoNCELoss
from codiemb_st.losses import length_order

# (name, mini_batch_size, keep_graphs): 4 local rows x 4 columns.
DDP_SCENARIOS = [("plain", 3, 0), ("kept", 3, 1), ("kept3", 3, 3), ("single", 4, 1)]


def count_no_grad_embeddings(loss_fn: MultiPositiveCachedInfoNCELoss) -> dict[str, int]:
    counts = {"no_grad": 0, "with_grad": 0}
    embed_minibatch = loss_fn.embed_minibatch

    def counting(*args, **kwargs):
        counts["with_grad" if kwargs["with_grad"] else "no_grad"] += 1
        return embed_minibatch(*args, **kwargs)

    loss_fn.embed_minibatch = counting
    return counts


def local_rows(columns: list[list[str]], rank: int, world_size: int) -> list[list[str]]:
    size = len(columns[0]) // world_size
    return [column[rank * size : (rank + 1) * size] for column in columns]


def averaged_grads(model: torch.nn.Module, world_size: int) -> dict[str, torch.Tensor]:
    grads = {}
    for name, param in model.named_parameters():
        if param.grad is not None:
            grad = param.grad.clone()
            dist.all_reduce(grad)
            grads[name] = grad / world_size
    return grads


def main(model_path: str, batch_file: str, output_dir: str) -> None:
    dist.init_process_group("gloo", timeout=timedelta(seconds=60))
    rank, world_size = dist.get_rank(), dist.get_world_size()
    data = json.loads(Path(batch_file).read_text())
    model = SentenceTransformer(model_path, device="cpu").double()
    model[0].auto_model.pooler = None  # the reload adds an unused pooler, which DDP would wait for
    # Cut even these tiny columns into length-sorted chunks in the single pass (without DDP each rank chunks its own
    # columns, so the ranks' numbers of forward calls differ; under DDP a column stays one chunk).
    length_order.CHUNK_OVERHEAD_TOKENS = 2
    result: dict = {}

    # 1. Path agreement. The budget is rank 0's largest column, so rank 0 alone would take the single pass.
    mixed = data["mixed"]
    column_tokens = [
        [int(model.tokenize(column)["attention_mask"].sum()) for column in local_rows(mixed, r, world_size)]
        for r in range(world_size)
    ]
    result["column_tokens"] = column_tokens
    scenarios = (
        ("mixed", max(column_tokens[0]), mixed),
        ("both_fit", 10**6, mixed),
        ("uneven", 10**6, data["uneven"]),
    )
    for name, budget, columns in scenarios:
        loss_fn = MultiPositiveCachedInfoNCELoss(
            model, num_positives=2, mini_batch_size=64, mini_batch_num_tokens=budget, gather_across_devices=True
        )
        counts = count_no_grad_embeddings(loss_fn)
        model.zero_grad()
        loss = loss_fn([model.tokenize(column) for column in local_rows(columns, rank, world_size)], None)
        loss.backward()
        result[name] = {
            "budget": budget,
            "loss": loss.detach(),
            "grads": averaged_grads(model, world_size),
            "counts": counts,
        }

    # 2. Real DDP: no_sync then sync, loss / 2 each (gradient accumulation over 2 micro-steps).
    micro = [local_rows(data["ddp"][key], rank, world_size) for key in ("A", "B")]
    for find_unused in (False, True):
        for name, mini_batch_size, keep_graphs in DDP_SCENARIOS:
            replica = copy.deepcopy(model)
            ddp = DistributedDataParallel(replica, find_unused_parameters=find_unused)
            all_reduces = [0]

            def counting_hook(state, bucket, all_reduces=all_reduces):
                all_reduces[0] += 1
                return allreduce_hook(state, bucket)

            ddp.register_comm_hook(None, counting_hook)
            loss_fn = MultiPositiveCachedInfoNCELoss(
                replica,
                num_positives=2,
                mini_batch_size=mini_batch_size,
                keep_graphs=keep_graphs,
                gather_across_devices=True,
            )
            loss_fn.model = ddp  # as the trainer does
            counts = count_no_grad_embeddings(loss_fn)
            replica.zero_grad()
            with ddp.no_sync():
                (loss_fn([replica.tokenize(column) for column in micro[0]], None) / 2).backward()
            after_no_sync = all_reduces[0]
            local_after_no_sync = {n: p.grad.clone() for n, p in replica.named_parameters() if p.grad is not None}
            (loss_fn([replica.tokenize(column) for column in micro[1]], None) / 2).backward()
            result[f"ddp_{name}_{find_unused}"] = {
                "all_reduces_no_sync": after_no_sync,
                "all_reduces_sync": all_reduces[0] - after_no_sync,
                "local_after_no_sync": local_after_no_sync,
                "grads": {n: p.grad.clone() for n, p in replica.named_parameters() if p.grad is not None},
                "counts": counts,
            }

    torch.save(result, Path(output_dir) / f"rank{rank}.pt")
    # Both ranks are past every collective here; leave with os._exit (tearing down DDP and gloo at interpreter exit
    # deadlocked once in this project).
    dist.barrier()


if __name__ == "__main__":
    faulthandler.dump_traceback_later(200, exit=True)  # a hung collective ends the worker before the test's timeout
    main(sys.argv[1], sys.argv[2], sys.argv[3])
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
