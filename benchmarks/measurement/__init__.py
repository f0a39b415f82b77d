"""Measurement helpers shared by the scripts in ``benchmarks/`` (not part of the installed package).

``python benchmarks/<script>.py`` puts ``benchmarks/`` first on ``sys.path``, so the scripts import these modules as
``from measurement.timing import ...``; the tests do the same (``benchmarks`` is on pytest's ``pythonpath``).

One concept per module: :mod:`measurement.timing` (CPU / wall clocks, interleaved rounds, medians and ratios against a
baseline measured in the same run), :mod:`measurement.memory` (peak resident set, CUDA peak, activations saved for
backward), :mod:`measurement.workers` (one measurement in a fresh process that answers JSON),
:mod:`measurement.tables` (markdown rows, ratio cells, target verdicts), :mod:`measurement.baselines` (reference
implementations the benchmarks compare against), :mod:`measurement.data` (benchmark inputs),
:mod:`measurement.checkpoints` (synthetic checkpoints for the merge benchmark), :mod:`measurement.padding` (padding
efficiency) and :mod:`measurement.llm_embedder` (the GPU script's random decoder embedder). None of them imports
torch at import time, so a parent process that measures its children's memory stays small.
"""
