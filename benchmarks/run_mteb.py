"""The main job: evaluate models on mteb tasks, side by side — a thin wrapper of ``codiemb-st eval``.

With no arguments it evaluates the packaged all-MiniLM-L6-v2 on the local English evaluation sets in
../shared/data/eval (STSBenchmark and SciFact), offline, and writes results/ (table, JSON, chart, per-task results).
That folder is this repository's default, passed on as ``--data-dir`` (``codiemb-st eval`` itself searches no folder;
``$CODIEMB_SHARED_DATA`` points elsewhere). Every option of ``codiemb-st eval`` works here
(``python benchmarks/run_mteb.py --help``); an explicit ``--data-dir`` wins.
"""

from __future__ import annotations

import sys

from codiemb_st.cli import main
from codiemb_st.shared_data import shared_data_path


def eval_argv(argv: list[str]) -> list[str]:
    """``codiemb-st eval`` arguments: ``argv`` plus the checkout's shared eval data unless a --data-dir is given."""
    given = any(arg == "--data-dir" or arg.startswith("--data-dir=") for arg in argv)
    default = shared_data_path("eval")
    if given or default is None or not default.is_dir() or "-h" in argv or "--help" in argv:
        return ["eval", *argv]
    return ["eval", "--data-dir", str(default), *argv]


if __name__ == "__main__":
    sys.exit(main(eval_argv(sys.argv[1:])))
