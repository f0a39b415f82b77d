"""Experiments on top of the library: resumable runs, one result store, held-out dev sets, seed pairing.

The generic layer a study is built from. It sits above :mod:`codiemb_st.recipe`, :mod:`codiemb_st.evaluation` and
:mod:`codiemb_st.merging` and imports only from them (nothing in the library imports it). Its functions take explicit
arguments, never a command line's namespace. The repository's two concrete studies (the CoDiEmb reproduction and the
fusion study) live with their scripts in ``benchmarks/studies/`` and are not part of the installed package.

- :mod:`~codiemb_st.experiments.training`: a run folder is reused when finished with the same configuration.
- :mod:`~codiemb_st.experiments.store`: :func:`record_fingerprint` (how a folder was made), :func:`weights_key`
  (what it holds), evaluation caches and once-only merges.
- :mod:`~codiemb_st.experiments.held_out`: the dev hold-out of training files and their local dev tasks.
- :mod:`~codiemb_st.experiments.seeds`: results paired by seed and judged by the one claim rule.
- :mod:`~codiemb_st.experiments.errors`: :class:`ExperimentError`, a problem the user can fix.

Example:
    >>> from codiemb_st.experiments import split_dev
    >>> train, dev = split_dev([{"i": i} for i in range(10)], 5, "toy")
    >>> len(dev)
    2
"""

from __future__ import annotations

from codiemb_st.experiments.errors import ExperimentError
from codiemb_st.experiments.held_out import (
    DEFAULT_DEV_SEED,
    hold_out,
    read_training_file,
    sample_sts_tasks,
    split_dev,
    write_dev_tasks,
)
from codiemb_st.experiments.seeds import compare, means, paired_record, per_seed
from codiemb_st.experiments.store import (
    RECORD_FILES,
    CachedEvaluator,
    cached_json,
    merge_once,
    record_fingerprint,
    weights_key,
)
from codiemb_st.experiments.training import count_task_updates, finished_run, load_base, train_to_folder

__all__ = [
    "DEFAULT_DEV_SEED",
    "RECORD_FILES",
    "CachedEvaluator",
    "ExperimentError",
    "cached_json",
    "compare",
    "count_task_updates",
    "finished_run",
    "hold_out",
    "load_base",
    "means",
    "merge_once",
    "paired_record",
    "per_seed",
    "read_training_file",
    "record_fingerprint",
    "sample_sts_tasks",
    "split_dev",
    "train_to_folder",
    "weights_key",
    "write_dev_tasks",
]
