"""The main job: evaluate models on mteb tasks, side by side — a thin wrapper of ``codiemb-st eval``.

With no arguments it evaluates the packaged all-MiniLM-L6-v2 on the local English evaluation sets in
../shared/data/eval (STSBenchmark and SciFact), offline, and writes results/ (table, JSON, chart, per-task results).
Every option of ``codiemb-st eval`` works here (``python benchmarks/run_mteb.py --help``).
"""

from __future__ import annotations

import sys

from codiemb_st.cli import main

if __name__ == "__main__":
    sys.exit(main(["eval", *sys.argv[1:]]))
