"""torchrun worker that runs several 2-rank loss workers in one launch (one process group, one set of imports).

A torchrun launch costs seconds of interpreter start-up and imports per rank, more than these checks themselves; the
loss equivalence tests therefore share one launch (``tests/dist_jobs.py``). Each job is a worker module of this folder
whose ``main(*args)`` is called in turn on every rank; the workers' own ``init_process_group`` and
``destroy_process_group`` calls become no-ops here (the group is the launcher's). Every worker still runs alone too.
Usage: dist_jobs_worker.py SPEC.json   (a list of {"module": ..., "args": [...]})
"""

from __future__ import annotations

import faulthandler
import importlib
import json
import os
import sys
import traceback
from datetime import timedelta
from pathlib import Path

import torch.distributed as dist


def main(spec_file: str) -> int:
    jobs = json.loads(Path(spec_file).read_text())
    dist.init_process_group("gloo", timeout=timedelta(seconds=60))
    dist.init_process_group = lambda *args, **kwargs: None  # the workers' own calls: the group exists
    dist.destroy_process_group = lambda *args, **kwargs: None  # torn down by os._exit below
    failed = 0
    for job in jobs:
        try:
            code = importlib.import_module(job["module"]).main(*job["args"])
        except Exception:  # the other rank may now wait in a collective: the watchdog ends the launch
            traceback.print_exc()
            code = 1
        print(f"job {job['module']} rank {dist.get_rank()}: exit {code or 0}", flush=True)
        failed += bool(code)
        dist.barrier()
    return 1 if failed else 0


if __name__ == "__main__":
    faulthandler.dump_traceback_later(400, exit=True)  # a hung collective ends the launch before the test's timeout
    code = main(sys.argv[1])
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)  # skip the interpreter teardown of DDP and the process group (it deadlocked once here)
