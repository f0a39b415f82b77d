"""torchrun worker for tests/losses/test_pearson_spearman.py: gathered 2-rank DDP loss == one process on the full batch.

The loss has all four terms, the middle-layer InfoNCE (MidNCE) included, whose middle-layer embeddings are gathered
like the final ones. Without gathering, each rank's MidNCE must be the one of its own slice (the official per-device
computation).

Usage: torchrun --nproc_per_node 2 tests/dist_pearson_spearman_worker.py MODEL_PATH OUTPUT_DIR

Each rank holds an identical float64 copy of the model and its slice of one global batch. With
``gather_across_devices=True`` every rank computes the loss of the global batch; ``torch.distributed.nn.all_gather``
sums the gradient flowing back to each rank's slice over the ranks (W times the local share) and DDP divides by W when
it averages, so the averaged parameter gradients must equal the gradients of a single process on the full batch.
Writes OUTPUT_DIR/rank{r}.json per rank and exits non-zero on any mismatch.
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
from tiny_model import ENGLISH_SENTENCES
from torch.nn.parallel import DistributedDataParallel

from codiemb_st import PearsonSpearmanLoss

PAIRS_PER_RANK = 6
SENTENCES = ENGLISH_SENTENCES


def main(model_path: str, output_dir: str) -> int:
    # A short timeout turns a stuck collective into an error instead of a 30-minute hang.
    dist.init_process_group("gloo", timeout=timedelta(seconds=60))
    rank, world_size = dist.get_rank(), dist.get_world_size()
    global_size = PAIRS_PER_RANK * world_size

    generator = torch.Generator().manual_seed(0)  # the same global batch on every rank
    first = torch.randint(len(SENTENCES), (global_size,), generator=generator).tolist()
    second = torch.randint(len(SENTENCES), (global_size,), generator=generator).tolist()
    sentences1 = [SENTENCES[i] for i in first]
    sentences2 = [SENTENCES[i] for i in second]
    # Graded, with ties; labels 0 are not MidNCE anchors (threshold 1.0), so anchors and non-anchors sit on both ranks.
    labels = torch.randint(0, 4, (global_size,), generator=generator).double()
    labels[[0, PAIRS_PER_RANK + 1]] = 0.0

    # Loaded from one saved folder so every rank has the same weights and vocabulary (building the tiny model's
    # tokenizer is not deterministic across processes). The reload adds an unused, randomly initialised BERT
    # pooler; drop it so every parameter gets a gradient.
    model = SentenceTransformer(model_path, device="cpu").double()
    model[0].auto_model.pooler = None
    reference_model = copy.deepcopy(model)

    # One process, full batch, no gathering.
    reference_loss = PearsonSpearmanLoss(reference_model, return_dict=True)
    features = [reference_model.preprocess(sentences1), reference_model.preprocess(sentences2)]
    reference_terms = reference_loss(features, labels)
    sum(reference_terms.values()).backward()

    # W processes under DDP, each with its slice, gathering across ranks (as the trainer sets it up).
    loss = PearsonSpearmanLoss(model, gather_across_devices=True, return_dict=True)
    loss.model = DistributedDataParallel(model)
    local = slice(rank * PAIRS_PER_RANK, (rank + 1) * PAIRS_PER_RANK)
    features = [model.preprocess(sentences1[local]), model.preprocess(sentences2[local])]
    terms = loss(features, labels[local])
    total = sum(terms.values())
    total.backward()

    # Without gathering: every rank's terms are those of one process on its own slice only.
    with torch.no_grad():
        local_terms = PearsonSpearmanLoss(model, return_dict=True)(
            [model.preprocess(sentences1[local]), model.preprocess(sentences2[local])], labels[local]
        )
        local_reference = PearsonSpearmanLoss(reference_model, return_dict=True)(
            [reference_model.preprocess(sentences1[local]), reference_model.preprocess(sentences2[local])],
            labels[local],
        )
    local_diff = max(abs(local_terms[name].item() - local_reference[name].item()) for name in local_reference)
    # The local term differs from the global one, so the check above can tell gathering from not gathering.
    local_vs_global = abs(local_terms["mid_nce_loss"].item() - reference_terms["mid_nce_loss"].item())

    all_totals = [torch.zeros(1, dtype=torch.float64) for _ in range(world_size)]
    dist.all_gather(all_totals, total.detach().reshape(1))
    term_diff = max(abs(terms[name].item() - reference_terms[name].item()) for name in reference_terms)
    grad_diff = max(
        (param.grad - reference_param.grad).abs().max().item()
        for param, reference_param in zip(model.parameters(), reference_model.parameters())
    )
    grad_scale = max(reference_param.grad.abs().max().item() for reference_param in reference_model.parameters())
    result = {
        "rank": rank,
        "loss": total.item(),
        "reference_loss": sum(reference_terms.values()).item(),
        "rank_losses": [value.item() for value in all_totals],
        "max_term_diff": term_diff,
        "terms": sorted(terms),
        "mid_nce_loss": terms["mid_nce_loss"].item(),
        "reference_mid_nce_loss": reference_terms["mid_nce_loss"].item(),
        "local_term_diff": local_diff,
        "local_vs_global_mid_nce": local_vs_global,
        "max_grad_diff": grad_diff,
        "max_grad": grad_scale,
    }
    (Path(output_dir) / f"rank{rank}.json").write_text(json.dumps(result))
    ok = (
        sorted(terms) == sorted(reference_terms)
        and term_diff < 1e-10
        and local_diff < 1e-10
        and local_vs_global > 1e-6
        and reference_terms["mid_nce_loss"].item() > 1e-3
        and grad_diff < 1e-10
        and grad_scale > 1e-6
        and max(result["rank_losses"]) - min(result["rank_losses"]) < 1e-12
    )
    # Both ranks are done with every collective once past this barrier. The caller then leaves with os._exit: tearing
    # down DDP's reducer and the gloo group at interpreter exit deadlocked once here (the gloo destructor joined a
    # thread that was waiting for the GIL).
    dist.barrier()
    return 0 if ok else 1


if __name__ == "__main__":
    # Watchdog: whatever hangs (a collective, the teardown), the worker exits well before the test's timeout.
    faulthandler.dump_traceback_later(150, exit=True)
    code = main(sys.argv[1], sys.argv[2])
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)  # skip the interpreter teardown of DDP and the process group
