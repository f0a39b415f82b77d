"""End-to-end CoDiEmb training — a thin wrapper of ``codiemb-st train`` (works under torchrun too).

    python benchmarks/train_codiemb.py --output-dir runs/codiemb --max-steps 200
    torchrun --nproc_per_node 4 benchmarks/train_codiemb.py --output-dir runs/codiemb

Without --ir and --sts it trains on this repository's English demo files in ../shared/data/train (en_scifact and
en_snli for IR, en_stsb for STS), passed on explicitly and printed (``codiemb-st train`` itself never looks for
data). Every option of ``codiemb-st train`` works here (``python benchmarks/train_codiemb.py --help``).
"""

from __future__ import annotations

import sys

from codiemb_st.cli import main
from codiemb_st.shared_data import shared_data_path

DEMO_IR = ("en_scifact.jsonl.gz", "en_snli.jsonl.gz")
DEMO_STS = ("en_stsb.jsonl.gz",)


def train_argv(argv: list[str]) -> list[str]:
    """``codiemb-st train`` arguments: ``argv``, plus the demo files when it names no training data."""
    named = any(arg in ("--ir", "--sts") or arg.startswith(("--ir=", "--sts=")) for arg in argv)
    train = shared_data_path("train")
    if named or train is None or not train.is_dir() or "-h" in argv or "--help" in argv:
        return ["train", *argv]
    ir, sts = [str(train / name) for name in DEMO_IR], [str(train / name) for name in DEMO_STS]
    print(f"No --ir/--sts given: training on the demo files --ir {' '.join(ir)} --sts {' '.join(sts)}", flush=True)
    return ["train", "--ir", *ir, "--sts", *sts, *argv]


if __name__ == "__main__":
    sys.exit(main(train_argv(sys.argv[1:])))
