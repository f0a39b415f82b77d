"""End-to-end CoDiEmb training — a thin wrapper of ``codiemb-st train`` (works under torchrun too).

    python benchmarks/train_codiemb.py --output-dir runs/codiemb --max-steps 200
    torchrun --nproc_per_node 4 benchmarks/train_codiemb.py --output-dir runs/codiemb

Every option of ``codiemb-st train`` works here (``python benchmarks/train_codiemb.py --help``).
"""

from __future__ import annotations

import sys

from codiemb_st.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
